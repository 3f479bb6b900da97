"""Depth / point-cloud preprocessing for CFM, AST and DBRN (numpy + OpenCV on the host).

Every function takes and returns arrays in the project's conventions: an organized
point cloud ``xyz`` is float32 H x W x 3 in metres, pixel-registered with the RGB image,
and a point the sensor missed is exactly (0, 0, 0); a depth map ``z`` is float32 H x W in
metres with 0 = missing; masks are bool H x W. Only ``resize_organized_torch`` is torch
(for the inference path); ``cfm_preprocess`` uses torch's CPU resampler for the RGB
image because it reproduces PIL's antialiased bicubic resize used by the released code.

Sources (see docs/methods.md):

* CFM (Costanzino et al., CVPR 2024) and its released code
  (``processing/preprocess_mvtec.py``, ``models/dataset.py``): border-strip RANSAC plane
  removal, square zero-padding, DBSCAN largest cluster, 224 px inputs.
* AST (Rudolph et al., WACV 2023) and its released code: 3x3 hole filling, corner-patch
  background surface, 8x8 dilated foreground mask, soft downsampling to the score grid.
* DBRN (no public code): depth preprocessed as AST, with a per-object height threshold.

Choices that differ from the released code (each also noted at the function):

* A point is valid when it is not exactly (0, 0, 0); the released CFM code requires all
  three coordinates to be non-zero, which drops real points lying on a coordinate plane.
* RANSAC scores 3-point hypotheses (batched) and refits the best one by least squares on
  its inliers; the released code calls Open3D ``segment_plane`` with 50-point hypotheses.
* DBSCAN (eps 6 mm) is replaced by ``largest_component`` on the organized grid with
  grid neighbours joined when closer than 6 mm in 3D; ``cfm_preprocess`` runs it on the
  R x R model grid (see ``scripts/measure_lcc_vs_dbscan.py`` for how often the two agree).
* RGB, xyz and gt are padded to the same square (side rounded up to a multiple of 100)
  and resized with pixel-centre sampling, so the three stay pixel-aligned; the released
  code pads RGB / gt to max(H, W) without rounding and resizes xyz with corner-aligned
  ("floor") nearest sampling, a shift of up to half an output pixel.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "check_cloud",
    "IMAGENET_STD",
    "valid_mask",
    "nearest_indices",
    "resize_organized",
    "resize_organized_torch",
    "fill_holes",
    "border_points",
    "fit_plane_ransac",
    "remove_background_plane",
    "remove_background_corners",
    "dilate_square",
    "soft_downsample",
    "largest_component",
    "dbscan_largest_cluster",
    "square_pad",
    "centred_depth_input",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Sampling = Literal["center", "floor"]


# --------------------------------------------------------------------------- checks


def check_cloud(xyz: np.ndarray, field: str = "xyz") -> np.ndarray:
    """Return ``xyz`` as a float array after checking it is H x W x 3 (else DataError)."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(None, f"{field}: must be an H x W x 3 organized point cloud, got shape {xyz.shape}")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise DataError(None, f"{field}: must be floating point metres, got dtype {xyz.dtype}")
    return xyz


def _check_depth(z: np.ndarray, field: str = "z") -> np.ndarray:
    """Return ``z`` as a float array after checking it is H x W (else DataError)."""
    z = np.asarray(z)
    if z.ndim != 2 or not np.issubdtype(z.dtype, np.floating):
        raise DataError(None, f"{field}: must be a floating-point H x W depth map, got {z.dtype} {z.shape}")
    return z


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` as (height, width); an int means a square."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


# --------------------------------------------------------------------------- basics


def valid_mask(xyz: np.ndarray) -> np.ndarray:
    """bool H x W: True where the point is not exactly (0, 0, 0).

    Source: MVTec 3D-AD convention (a missed point is stored as zeros). The released CFM
    code tests ``all(p != 0)`` instead; we only treat the exact origin as missing.
    """
    xyz = check_cloud(xyz)
    return (xyz[..., 0] != 0) | (xyz[..., 1] != 0) | (xyz[..., 2] != 0)


def nearest_indices(n_in: int, n_out: int, sampling: Sampling = "center") -> np.ndarray:
    """int64 (n_out,): the source index each output index copies in a nearest resize.

    ``"center"`` samples at pixel centres, ``floor((i + 0.5) * n_in / n_out)``: torch's
    ``interpolate(mode="nearest-exact")``, the same rule as PIL's NEAREST (used by the
    released CFM code for gt). ``"floor"`` is ``floor(i * n_in / n_out)``: torch's
    ``mode="nearest"`` (used by the released CFM code for xyz). The scale is computed in
    float32 exactly as torch's CPU kernel does, so both match torch index for index.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    if sampling == "center":
        src = np.floor((dst + np.float32(0.5)) * scale)
    elif sampling == "floor":
        src = np.floor(dst * scale)
    else:
        raise ValueError(f"sampling must be 'center' or 'floor', got {sampling!r}")
    return np.minimum(src.astype(np.int64), n_in - 1)


def resize_organized(arr: np.ndarray, size: int | tuple[int, int], sampling: Sampling = "center") -> np.ndarray:
    """Nearest-neighbour resize of an organized cloud (H x W x C) or map / mask (H x W).

    Every output pixel is a copy of one input pixel, so a missing point is never blended
    into a valid one (no point is invented between an object and a hole); values keep
    their units (metres) and dtype. ``size`` is an int (square) or (height, width);
    ``sampling`` as in ``nearest_indices``. Source: CFM released code (nearest resize of
    xyz to 224); pixel-centre sampling by default (module docstring).
    """
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise DataError(None, f"organized array: must be H x W or H x W x C, got shape {arr.shape}")
    oh, ow = _size_hw(size)
    rows = nearest_indices(arr.shape[0], oh, sampling)
    cols = nearest_indices(arr.shape[1], ow, sampling)
    return arr.take(rows, axis=0).take(cols, axis=1)  # row then column gathers: whole-pixel copies


def resize_organized_torch(
    x: torch.Tensor,
    size: int | tuple[int, int],
    sampling: Sampling = "center",
    dims: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Torch twin of ``resize_organized`` for the inference path (any device, any dtype).

    ``dims`` names the height and width dimensions: (0, 1) for H x W [x C] (the numpy
    layout), (-2, -1) for N x C x H x W. Implemented as two ``index_select`` gathers with
    the indices of ``nearest_indices``, so it is bit-identical to the numpy version,
    never blends a missing point into a valid one, and exports to ONNX as Gather ops.
    """
    oh, ow = _size_hw(size)
    hdim, wdim = dims
    rows = torch.from_numpy(nearest_indices(x.shape[hdim], oh, sampling)).to(x.device)
    cols = torch.from_numpy(nearest_indices(x.shape[wdim], ow, sampling)).to(x.device)
    return x.index_select(hdim, rows).index_select(wdim, cols)


def square_pad(arr: np.ndarray, multiple: int = 100, mode: Literal["constant", "edge"] = "constant") -> np.ndarray:
    """Pad H x W [x C] to a centred S x S square, S = max(H, W) rounded up to ``multiple``.

    The extra rows / columns are split with the smaller half before (top / left), as in
    the released CFM code. ``mode="constant"`` pads zeros (xyz: missing points; gt: good),
    ``"edge"`` repeats the border pixels (RGB, as the released ``SquarePad``). Source:
    CFM ``pad_cropped_pc`` (multiple of 100). ``multiple=1`` gives max(H, W) exactly.
    """
    arr = np.asarray(arr)
    if mode not in ("constant", "edge"):
        raise ValueError(f"mode must be 'constant' or 'edge', got {mode!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = arr.shape[:2]
    side = -(-max(h, w) // multiple) * multiple
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((top, side - h - top), (left, side - w - left)) + ((0, 0),) * (arr.ndim - 2)
    return np.pad(arr, pad, mode=mode)


# --------------------------------------------------------------------------- AST / DBRN depth


def fill_holes(arr: np.ndarray, passes: int = 3) -> np.ndarray:
    """Fill missing pixels with the mean of their valid 3x3 neighbours, ``passes`` times.

    ``arr`` is a depth map z (H x W, 0 = missing) or an organized cloud (H x W x 3,
    (0, 0, 0) = missing); units are kept (metres). In each pass every missing pixel with
    at least one valid 8-neighbour becomes their mean; valid pixels never change, and a
    pixel filled in one pass counts as valid in the next, so a pass grows the data by one
    pixel into each hole. Source: AST released preprocessing (3 passes on z).
    """
    arr = np.asarray(arr)
    if arr.ndim == 3:
        valid = valid_mask(arr)
    else:
        valid = _check_depth(arr) != 0
    out = arr.astype(np.float32, copy=True)
    ones = np.ones((3, 3), np.float32)
    for _ in range(passes):
        count = cv2.filter2D(valid.astype(np.float32), -1, ones, borderType=cv2.BORDER_CONSTANT)
        grow = ~valid & (count > 0.5)
        if not grow.any():
            break
        total = cv2.filter2D(out, -1, ones, borderType=cv2.BORDER_CONSTANT)  # missing pixels are 0: add nothing
        mean = cv2.divide(total, count if out.ndim == 2 else cv2.merge([count] * out.shape[2]))
        cv2.copyTo(mean, grow.view(np.uint8), out)
        valid |= grow
    return out


def remove_background_corners(
    z: np.ndarray, threshold_m: float = 0.007, patch: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """AST background removal on a depth map z (H x W metres, 0 = missing).

    The background is the bilinear surface through the means of the valid pixels of
    the four ``patch`` x ``patch`` corner patches (placed at the corner pixels); the
    foreground is ``|z - surface| > threshold_m`` where z is valid. Returns
    ``(fg, depth)``: fg bool H x W, depth float32 H x W = (z' - mean_fg) * 100 where z'
    is z on the foreground and mean_fg elsewhere, i.e. centimetres relative to the mean
    foreground height, 0 on the background. Source: AST released code (threshold 7 mm;
    DBRN sets the threshold per object height). Raises DataError when a corner patch
    has no valid pixel or nothing stands out from the surface.
    """
    z = _check_depth(z).astype(np.float32, copy=False)
    h, w = z.shape
    if h < patch or w < patch:
        raise DataError(None, f"z: {h} x {w} is smaller than the {patch} x {patch} corner patches")
    corners = {}
    for name, (rs, cs) in {
        "top-left": (slice(0, patch), slice(0, patch)),
        "top-right": (slice(0, patch), slice(w - patch, w)),
        "bottom-left": (slice(h - patch, h), slice(0, patch)),
        "bottom-right": (slice(h - patch, h), slice(w - patch, w)),
    }.items():
        block = z[rs, cs]
        good = block != 0
        if not good.any():
            raise DataError(
                None, f"z: the {name} {patch}x{patch} corner patch has no valid depth; cannot fit the background"
            )
        corners[name] = float(block[good].mean())
    v = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    u = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    top = corners["top-left"] * (1 - u) + corners["top-right"] * u
    bottom = corners["bottom-left"] * (1 - u) + corners["bottom-right"] * u
    surface = top * (1 - v) + bottom * v
    fg = (z != 0) & (np.abs(z - surface) > threshold_m)
    if not fg.any():
        raise DataError(
            None, f"z: no pixel is more than {threshold_m} m from the corner background surface (empty foreground)"
        )
    mean_fg = float(z[fg].mean())
    depth = np.where(fg, (z - mean_fg) * 100.0, 0.0).astype(np.float32)
    return fg, depth


def dilate_square(mask: np.ndarray, size: int = 8) -> np.ndarray:
    """bool H x W: ``mask`` dilated by a ``size`` x ``size`` square.

    For an even size the square reaches size//2 pixels up / left and size//2 - 1 down /
    right, the placement of scipy's ``binary_dilation`` used by the released AST code
    (8x8 on the 192 px foreground mask).
    """
    mask = np.asarray(mask, dtype=bool)
    if size <= 1:
        return mask.copy()
    anchor = size - 1 - size // 2
    kernel = np.ones((size, size), np.uint8)
    return cv2.dilate(mask.view(np.uint8), kernel, anchor=(anchor, anchor)).astype(bool)


def soft_downsample(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """float32 (size): the fraction of each output cell covered by ``mask`` (area average).

    Used to weight losses and scores on a coarse grid (AST: 192 px mask -> 24 x 24).
    The released AST code uses a bilinear resize without antialiasing, which averages
    only the 2x2 centre pixels of each 8x8 cell; the area average weighs every pixel.
    """
    oh, ow = _size_hw(size)
    return cv2.resize(np.asarray(mask, dtype=np.float32), (ow, oh), interpolation=cv2.INTER_AREA)


def centred_depth_input(
    xyz: np.ndarray,
    size: int = 192,
    passes: int = 3,
    threshold_m: float = 0.007,
    patch: int = 2,
    dilate: int = 8,
    grid: int = 24,
) -> dict[str, np.ndarray]:
    """AST / DBRN depth input from an organized cloud (H x W x 3 metres).

    z (missing where the point is missing) -> ``fill_holes`` (``passes``) ->
    ``remove_background_corners`` (``threshold_m``, ``patch``) -> resize to ``size``.
    Returns ``{"depth": float32 size x size (cm relative to the mean foreground z,
    bilinear resize), "fg": bool size x size (foreground after a bilinear resize where
    any coverage counts, then ``dilate_square(dilate)``), "fg_grid": float32 grid x grid
    (``soft_downsample`` of fg)}``. Source: AST released code (192 px depth, 8x8
    dilation, 24 x 24 score grid); DBRN uses the same depth preprocessing.
    """
    xyz = check_cloud(xyz)
    z = np.where(valid_mask(xyz), xyz[..., 2], 0).astype(np.float32)
    z = fill_holes(z, passes)
    fg, depth = remove_background_corners(z, threshold_m, patch)
    depth_r = cv2.resize(depth, (size, size), interpolation=cv2.INTER_LINEAR)
    fg_r = cv2.resize(fg.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) > 0
    fg_d = dilate_square(fg_r, dilate)
    return {"depth": depth_r, "fg": fg_d, "fg_grid": soft_downsample(fg_d, grid)}


# --------------------------------------------------------------------------- CFM: plane


def border_points(xyz: np.ndarray, border: int = 10) -> np.ndarray:
    """float (N, 3): the valid points of the ``border``-pixel strip along the four edges.

    Each pixel counts once (the released CFM code concatenates the four strips, so its
    corner pixels count twice).
    """
    xyz = check_cloud(xyz)
    h, w = xyz.shape[:2]
    if 2 * border >= min(h, w):
        pts = xyz.reshape(-1, 3)
    else:
        middle = slice(border, h - border)
        strips = (xyz[:border], xyz[h - border :], xyz[middle, :border], xyz[middle, w - border :])
        pts = np.concatenate([s.reshape(-1, 3) for s in strips])
    return pts[np.any(pts != 0, axis=1)]


def _plane_distance(points: np.ndarray, normal: np.ndarray, d: float) -> np.ndarray:
    """|n . p + d| (metres) of float points (..., 3) to one plane, as float32 (...).

    One OpenCV pass (``cv2.transform``); numpy arithmetic over a last axis of 3 runs
    several times slower.
    """
    pts = np.ascontiguousarray(points, dtype=np.float32)
    plane = np.array([[normal[0], normal[1], normal[2], d]], np.float32)
    return np.abs(cv2.transform(pts.reshape(-1, 1, 3), plane)).reshape(pts.shape[:-1])


def fit_plane_ransac(
    points: np.ndarray,
    inlier_m: float = 0.004,
    n_hypotheses: int = 256,
    max_eval_points: int = 1024,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Plane ``n . p + d = 0`` (unit n, metres) fitted by RANSAC to ``points`` (N x 3).

    All ``n_hypotheses`` 3-point hypotheses are built and scored in one batched
    operation (numpy + one OpenCV matrix product): each is scored by its number of
    inliers (distance < ``inlier_m``) among at most ``max_eval_points`` points drawn at
    random; the best is refitted by least squares (smallest-eigenvalue direction of the
    inliers' covariance) on its inliers among all points. Deterministic for a given
    ``seed``. Source: CFM released code (Open3D ``segment_plane``, threshold 0.004 m,
    1000 iterations of 50-point hypotheses); with 3-point hypotheses 256 draws already
    give a clean sample with probability > 1 - 1e-14 when half the points are
    background. Returns ``(normal float64 (3,), d float)``; the normal points away
    from the camera (positive z component).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 3:
        raise DataError(None, f"plane fit: need at least 3 valid points (N x 3), got shape {pts.shape}")
    rng = np.random.default_rng(seed)
    centre = pts.mean(axis=0)
    local = pts - centre  # centred coordinates keep float32 scoring accurate
    sample = local if len(local) <= max_eval_points else local[rng.choice(len(local), max_eval_points, replace=False)]

    tri = local[rng.integers(0, len(local), size=(n_hypotheses, 3))]  # (K, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norms = np.linalg.norm(normals, axis=1)
    ok = norms > 1e-12
    normals[ok] /= norms[ok, None]
    offsets = -np.einsum("kc,kc->k", normals, tri[:, 0])
    planes = np.column_stack([normals, offsets]).astype(np.float32)  # (K, 4)
    homog = np.column_stack([sample, np.ones(len(sample))]).astype(np.float32)  # (M, 4)
    dist = np.abs(cv2.gemm(planes, homog, 1.0, None, 0.0, flags=cv2.GEMM_2_T))  # (K, M)
    score = np.where(ok, np.count_nonzero(dist < inlier_m, axis=1), -1)
    best = int(np.argmax(score))

    inliers = local[_plane_distance(local, normals[best], offsets[best]) < inlier_m]
    if len(inliers) >= 3:
        mean = inliers.mean(axis=0)
        centred = inliers - mean
        normal = np.linalg.eigh(np.einsum("ni,nj->ij", centred, centred))[1][:, 0]
        d_local = -float(normal @ mean)
    else:
        normal, d_local = normals[best], float(offsets[best])
    if normal[2] < 0:
        normal, d_local = -normal, -d_local
    return normal, d_local - float(normal @ centre)


def remove_background_plane(
    xyz: np.ndarray,
    border: int = 10,
    inlier_m: float = 0.004,
    remove_m: float = 0.005,
    n_hypotheses: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """CFM plane removal: zero every point within ``remove_m`` of the border-strip plane.

    The plane is ``fit_plane_ransac`` on ``border_points(xyz, border)``. Returns a
    float32 copy of ``xyz`` (H x W x 3 metres) with the plane's points set to (0, 0, 0).
    Source: CFM released ``remove_plane`` (10 px strip, 0.004 m inliers, 0.005 m removal).
    Raises DataError when the strip has fewer than 3 valid points.
    """
    xyz = check_cloud(xyz)
    pts = border_points(xyz, border)
    if len(pts) < 3:
        raise DataError(
            None, f"xyz: only {len(pts)} valid points in the {border}-pixel border strip; cannot fit the table plane"
        )
    normal, d = fit_plane_ransac(pts, inlier_m, n_hypotheses, seed=seed)
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    off_plane = _plane_distance(xyz, normal, d) >= remove_m  # missing points are 0 either way
    return cv2.copyTo(xyz, off_plane.view(np.uint8))


# --------------------------------------------------------------------------- CFM: clusters


_OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


def _gap_components(
    xyz: np.ndarray, valid: np.ndarray, connectivity: int, max_gap_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """Components of valid pixels whose grid neighbours (4 or 8) join when their 3D gap < max_gap_m.

    Returns ``(pixels, roots)``: the flat indices of the valid pixels (raster order) and,
    for each, the smallest node id of its component. Vectorised union-find over the valid
    pixels only: each round hooks the larger root of every still-split edge onto the
    smaller one (``np.minimum.at``), then compresses paths by pointer jumping.
    """
    h, w = valid.shape
    pixels = np.flatnonzero(valid)
    node = np.full(h * w, -1, np.int64)
    node[pixels] = np.arange(pixels.size)
    pts = xyz.reshape(-1, 3)[pixels]
    rows, cols = np.divmod(pixels, w)
    gap2 = np.float32(max_gap_m) ** 2
    us, vs = [], []
    for dy, dx in _OFFSETS[connectivity]:
        a = np.flatnonzero((rows + dy < h) & (cols + dx >= 0) & (cols + dx < w))
        b = node[pixels[a] + dy * w + dx]
        a, b = a[b >= 0], b[b >= 0]
        diff = pts[a] - pts[b]
        close = np.einsum("ij,ij->i", diff, diff) < gap2
        us.append(a[close])
        vs.append(b[close])
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(pixels.size)
    while u.size:
        pu, pv = parent[u], parent[v]
        split = pu != pv
        u, v, pu, pv = u[split], v[split], pu[split], pv[split]
        if not u.size:
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return pixels, parent


def largest_component(cloud: np.ndarray, connectivity: int = 8, max_gap_m: float | None = None) -> np.ndarray:
    """bool H x W: the largest connected component of valid pixels on the organized grid.

    ``cloud`` is an xyz cloud (H x W x 3, metres) or a bool validity mask (H x W).
    Without ``max_gap_m`` two valid grid neighbours (4- or 8-connectivity) are always
    connected (OpenCV ``connectedComponentsWithStats``). With ``max_gap_m`` (needs xyz)
    they are connected only if their 3D distance is below it, which splits objects that
    touch in the image but lie apart in depth. Ties go to the component met first in
    raster order; an input with no valid pixel gives an all-False mask. A fast stand-in
    for CFM's DBSCAN(eps 0.006 m, min 30 points) largest cluster (see
    ``dbscan_largest_cluster`` and ``scripts/measure_lcc_vs_dbscan.py``).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    cloud = np.asarray(cloud)
    if cloud.ndim == 2:
        if max_gap_m is not None:
            raise ValueError("largest_component: max_gap_m needs an xyz cloud, got a mask")
        valid = cloud.astype(bool, copy=False)
    else:
        valid = valid_mask(cloud)
    if not valid.any():
        return np.zeros(valid.shape, bool)
    if max_gap_m is None:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            np.ascontiguousarray(valid).view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
        )
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        return labels == best
    pixels, roots = _gap_components(np.asarray(cloud, np.float32), valid, connectivity, max_gap_m)
    keep = np.zeros(valid.size, bool)
    keep[pixels[roots == np.argmax(np.bincount(roots))]] = True
    return keep.reshape(valid.shape)


def dbscan_largest_cluster(xyz: np.ndarray, eps: float = 0.006, min_samples: int = 30) -> np.ndarray:
    """bool H x W: the largest DBSCAN cluster of the valid points (reference, measurement only).

    Source: CFM released ``connected_components_cleaning`` (Open3D DBSCAN, eps 0.006 m,
    30 points). Here scikit-learn's DBSCAN (a dev extra, imported lazily); noise points
    (label -1) never win, whereas the released code would keep the noise if it were the
    biggest group. Memory grows with the number of neighbours within ``eps``, so keep
    clouds small (a few 10k points).
    """
    try:
        from sklearn.cluster import DBSCAN
    except ImportError as exc:
        raise ImportError("dbscan_largest_cluster needs scikit-learn (pip install 'edge-runtime[dev]')") from exc
    valid = valid_mask(xyz)
    out = np.zeros(valid.shape, bool)
    if not valid.any():
        return out
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(np.asarray(xyz)[valid].astype(np.float64)).labels_
    if (labels >= 0).any():
        out[valid] = labels == int(np.argmax(np.bincount(labels[labels >= 0])))
    return out
