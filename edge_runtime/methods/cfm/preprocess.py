"""CFM preprocessing: from a camera frame (rgb, xyz) to the model's inputs, and back.

The released CFM code cleans every cloud offline (RANSAC border-plane removal, then the
largest DBSCAN cluster) and pads rgb, xyz and gt to a centred square whose side is
max(H, W) rounded up to 100 before resizing to R x R (docs/methods.md, CFM). Here that
is one function per frame, so training, evaluation and the station's preprocessing
stage share it. The generic depth operations live in ``edge_runtime.data.depth``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.data.depth import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_cloud,
    largest_component,
    remove_background_plane,
    resize_organized,
    square_pad,
    valid_mask,
)
from edge_runtime.errors import DataError
from edge_runtime.geometry import MapGeometry

PAD_MULTIPLE = 100  # the released code pads to a square side rounded up to a multiple of 100
PAPER_PLANE_M = 0.005  # the released code removes every point within 5 mm of the table plane


def cfm_clean_cloud(
    xyz: np.ndarray,
    seed: int = 0,
    border: int = 10,
    connectivity: int = 8,
    max_gap_m: float | None = 0.006,
) -> np.ndarray:
    """The released CFM offline cleaning: plane removal, then the largest component.

    ``remove_background_plane`` (border strip ``border``, RANSAC ``seed``) followed by
    ``largest_component(connectivity, max_gap_m)`` in place of DBSCAN. Returns a float32
    H x W x 3 cloud (metres) with everything else zeroed. Raises DataError (no path: the
    caller adds the file / frame id) when no valid point remains.
    """
    cleaned = remove_background_plane(xyz, border=border, seed=seed)
    keep = largest_component(cleaned, connectivity, max_gap_m)
    if not keep.any():
        raise DataError(None, "xyz: no valid points left after removing the background plane")
    return cv2.copyTo(cleaned, keep.view(np.uint8))


# --------------------------------------------------------------------------- CFM: model input


def _resize_rgb_bicubic(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 size x size x 3: antialiased bicubic resize of uint8 H x W x 3.

    torch's uint8 CPU resampler with ``antialias=True`` follows PIL's BICUBIC filter
    (a = -0.5, support widened by the downscale factor), which is what the released
    CFM code used through torchvision on PIL images.
    """
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # channels-last view
    out = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class ModelInputs(dict):
    """The model's input arrays by name, and ``geometry``: where this frame's anomaly map
    lies on the camera image (a ``MapGeometry``; it differs per frame when the inputs are
    an object-centred crop). A plain dict to every consumer that needs only the arrays."""

    geometry: MapGeometry | None = None


def _canvas(arr: np.ndarray, top: int, left: int, side: int, mode: str) -> np.ndarray:
    """The ``side`` x ``side`` window of ``arr`` at (top, left), padded where it leaves
    the image (``mode``: "constant" zeros, "edge" repeated border pixels)."""
    h, w = arr.shape[:2]
    pads = [(max(0, -top), max(0, top + side - h)), (max(0, -left), max(0, left + side - w))]
    pads += [(0, 0)] * (arr.ndim - 2)
    y0, x0 = max(0, top), max(0, left)
    sub = arr[y0:min(h, top + side), x0:min(w, left + side)]
    return np.pad(sub, pads, mode=mode) if any(a or b for a, b in pads) else sub


def object_square(valid: np.ndarray, geometry: MapGeometry, margin: float) -> tuple[int, int, int]:
    """(top, left, side) in image pixels of the square around the valid points of an
    R x R grid laid on the image by ``geometry``, grown by ``margin`` x its side on each side."""
    ys, xs = np.nonzero(valid)
    r = valid.shape[0]
    cell = geometry.canvas_h / r
    y0, y1 = ys.min() * cell - geometry.top, (ys.max() + 1) * cell - geometry.top
    x0, x1 = xs.min() * cell - geometry.left, (xs.max() + 1) * cell - geometry.left
    side = max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin)
    side = int(np.ceil(max(side, 8.0)))
    return int(round((y0 + y1 - side) / 2)), int(round((x0 + x1 - side) / 2)), side


def cfm_preprocess(
    rgb: np.ndarray,
    xyz: np.ndarray,
    resolution: int = 224,
    clean: bool = True,
    seed: int = 0,
    max_gap_m: float | None = 0.006,
    crop: float | None = None,
    plane_m: float = PAPER_PLANE_M,
) -> ModelInputs:
    """CFM model input for one frame: the runtime's "depth preprocessing" stage and training.

    ``rgb`` uint8 H x W x 3 (RGB order), ``xyz`` float H x W x 3 metres (same H, W).
    RGB and xyz are padded to the same centred square (``square_pad``, multiple 100: RGB
    edge-repeated, xyz zero) and resized to ``resolution``: RGB with antialiased bicubic,
    scaled to [0, 1] and normalised with the ImageNet mean / std; xyz with pixel-centre
    nearest sampling (``resize_organized``; missing points stay (0, 0, 0)).
    When ``clean``, the cloud is cleaned as ``cfm_clean_cloud`` does, split around the
    resize for speed: ``remove_background_plane`` on the full-resolution cloud (its
    border strip is the camera image's), then ``largest_component(max_gap_m=max_gap_m)``
    on the R x R grid (about 10x fewer pixels at 800 x 600 -> 224; a grid step there
    spans ~3.6 camera pixels, closer to DBSCAN's 6 mm reach than camera-pixel
    adjacency). Returns ``{"rgb": float32 3 x R x R, "xyz": float32 R x R x 3 (metres)}``
    as ``ModelInputs`` whose ``geometry`` places the R x R grid on the image.
    ``crop`` (a margin, e.g. 0.1; needs ``clean``): instead of the whole padded frame, the
    model sees a square around the part (the cleaned points' bounding box, grown by
    ``crop`` x its side on each side), so a part that fills a small share of the camera's
    view still gets the whole R x R grid; the geometry then follows the part.
    ``plane_m``: points closer than this to the fitted table plane are removed (metres;
    the released code: 5 mm, tuned to MVTec 3D-AD's parts). A part whose rim is lower
    than that (a dome, a tube, a flat tray) loses its rim: its defects there are never
    seen. Bundles record the value they were trained with (``preprocessing.plane_m``).
    Source: CFM released ``preprocess_mvtec.py`` + ``dataset.py``. Raises DataError (no
    path: the caller adds the file / frame id) on malformed input or when no valid 3D
    point is left.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(None, f"rgb: must be uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
    xyz = check_cloud(xyz)
    if rgb.shape[:2] != xyz.shape[:2]:
        raise DataError(
            None,
            f"rgb is {rgb.shape[0]} x {rgb.shape[1]} but xyz is {xyz.shape[0]} x {xyz.shape[1]}; "
            "they must be pixel-registered",
        )
    if crop is not None and (not clean or crop < 0):
        raise ValueError(f"crop needs clean=True and a margin >= 0, got crop={crop!r}, clean={clean!r}")
    if not plane_m > 0:
        raise ValueError(f"plane_m must be > 0 metres, got {plane_m!r}")
    if clean:
        xyz = remove_background_plane(xyz, seed=seed, remove_m=plane_m)
    geometry = MapGeometry.square_pad(xyz.shape, PAD_MULTIPLE)
    xyz_r = resize_organized(square_pad(xyz, mode="constant"), resolution).astype(np.float32, copy=False)
    if clean:
        xyz_r = cv2.copyTo(xyz_r, largest_component(xyz_r, max_gap_m=max_gap_m).view(np.uint8))
    if not valid_mask(xyz_r).any():
        raise DataError(None, f"xyz: no valid 3D point left in the {resolution} x {resolution} model input")
    if crop is not None:  # the part found on the padded grid, then cut from the full frame
        top, left, side = object_square(valid_mask(xyz_r), geometry, crop)
        geometry = MapGeometry(side, side, -top, -left)
        xyz_r = resize_organized(_canvas(xyz, top, left, side, "constant"), resolution).astype(np.float32, copy=False)
        xyz_r = cv2.copyTo(xyz_r, largest_component(xyz_r, max_gap_m=max_gap_m).view(np.uint8))
        rgb_sq = _canvas(rgb, top, left, side, "edge")
    else:
        rgb_sq = square_pad(rgb, mode="edge")
    chw = _resize_rgb_bicubic(rgb_sq, resolution).transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None] * 255
    inv_std = 1 / (np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255)
    out = ModelInputs(rgb=(chw - mean) * inv_std, xyz=xyz_r)
    out.geometry = geometry
    return out


def cfm_gt(gt: np.ndarray, resolution: int = 224) -> np.ndarray:
    """bool R x R ground truth aligned with ``cfm_preprocess``'s output.

    ``gt`` is H x W (bool, or class-coded integers where > 0 is anomalous): zero-padded
    to the same square as RGB / xyz, nearest-resized with pixel-centre sampling (the
    released code: PIL NEAREST), thresholded at 0.5. Source: CFM released ``dataset.py``.
    """
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise DataError(None, f"gt: must be an H x W mask, got shape {gt.shape}")
    return resize_organized(square_pad(gt, mode="constant"), resolution) > 0.5
