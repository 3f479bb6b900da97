"""DBRN input preparation (numpy + OpenCV): RGB image, normalised depth map, foreground.

Depth (docs/methods.md, DBRN): z of the organized cloud (0 where the point is missing)
-> AST hole filling (``fill_holes``, 3 passes) -> AST foreground against the four-corner
background surface (``remove_background_corners``) with a threshold set per object
height -> background model: a least-squares plane z = a u + b v + c through the
background pixels (the non-foreground cluster; the station's table is slightly tilted,
so one mean value would leave a +-3 mm ramp) -> height above that plane, with pixels
still missing after the filling set to the background (height 0; the paper fills them
with the background mean) -> normalised as ``0.2 + 0.6 * height / height_scale_m``, so
the background lies at 0.2, the tallest good surface near 0.8 and simulated or real
protrusions / indentations fall outside [0.2, 0.8] -> clipped to [0, 1] and resized
(area average) to R x R. The foreground is resized (area > 0.5) and dilated by
``fg_dilate`` pixels.

RGB: resized to R x R (area average), float32 in [0, 1], channels first.

``estimate_depth_params`` derives the two per-category constants (``fg_threshold_m``,
``height_scale_m``) from the training clouds; the trainer stores them in the bundle's
``preprocessing`` so the station prepares frames exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from edge_runtime.data.depth import dilate_square, fill_holes, remove_background_corners, valid_mask
from edge_runtime.errors import DataError

DEFAULTS = {"fill_passes": 3, "corner_patch": 2, "fg_threshold_m": 0.007, "height_scale_m": 0.01, "fg_dilate": 3}
LOW, HIGH = 0.2, 0.8  # the good surface's range in the normalised depth map


def prepare_rgb(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """float32 3 x R x R in [0, 1] from uint8 H x W x 3 (area resize)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(None, f"rgb: must be uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
    out = cv2.resize(rgb, (resolution, resolution), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def _background_plane(z: np.ndarray, bg: np.ndarray, max_points: int = 4096) -> np.ndarray:
    """float32 H x W: the least-squares plane z = a u + b v + c through the ``bg`` pixels."""
    h, w = z.shape
    ys, xs = np.nonzero(bg)
    if ys.size < 3:
        raise DataError(None, "z: fewer than 3 background pixels; cannot fit the background plane")
    step = max(1, ys.size // max_points)
    ys, xs = ys[::step], xs[::step]
    a = np.column_stack([xs / w, ys / h, np.ones(xs.size)])
    coef, *_ = np.linalg.lstsq(a, z[ys, xs].astype(np.float64), rcond=None)
    u = np.arange(w, dtype=np.float32)[None, :] / w
    v = np.arange(h, dtype=np.float32)[:, None] / h
    return (coef[0] * u + coef[1] * v + coef[2]).astype(np.float32)


def height_map(xyz: np.ndarray, fg_threshold_m: float, fill_passes: int = 3, corner_patch: int = 2
               ) -> tuple[np.ndarray, np.ndarray]:
    """(height float32 H x W metres above the background plane, fg bool H x W) at camera size."""
    if xyz is None:
        raise DataError(None, "xyz: this DBRN model needs a point cloud (modality 3d or rgb+3d)")
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(None, f"xyz: must be an H x W x 3 organized point cloud, got shape {xyz.shape}")
    z = np.where(valid_mask(xyz), xyz[..., 2], 0).astype(np.float32)
    z = fill_holes(z, fill_passes)
    fg, _ = remove_background_corners(z, fg_threshold_m, corner_patch)
    have = z != 0
    plane = _background_plane(z, have & ~fg)
    height = np.where(have, plane - z, 0.0).astype(np.float32)
    return height, fg


def prepare_depth(xyz: np.ndarray, resolution: int, fg_threshold_m: float, height_scale_m: float,
                  fill_passes: int = 3, corner_patch: int = 2, fg_dilate: int = 3
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(depth float32 1 x R x R in [0, 1], fg bool R x R) as the module doc describes."""
    height, fg = height_map(xyz, fg_threshold_m, fill_passes, corner_patch)
    d = np.clip(LOW + (HIGH - LOW) * height / np.float32(height_scale_m), 0.0, 1.0).astype(np.float32)
    d = cv2.resize(d, (resolution, resolution), interpolation=cv2.INTER_AREA)
    fg_r = cv2.resize(fg.astype(np.float32), (resolution, resolution), interpolation=cv2.INTER_AREA) > 0.5
    return d[None], dilate_square(fg_r, fg_dilate)


def estimate_depth_params(clouds: Iterable[np.ndarray], fill_passes: int = 3, corner_patch: int = 2) -> dict:
    """Per-category depth constants from good training clouds.

    A first foreground at 1.5 mm gives the object's median height H (median over images
    of the per-image median foreground height); the threshold is 0.3 H clipped to
    [1.5 mm, 7 mm] (AST's 7 mm suits tall objects, a 5 mm cookie needs less). The height
    scale is the 99th percentile of the foreground heights over all images at that
    threshold (the "top" of a good part, mapped to 0.8).
    """
    clouds = list(clouds)
    if not clouds:
        raise ValueError("estimate_depth_params: no training clouds")
    medians = []
    for xyz in clouds:
        h, fg = height_map(xyz, 0.0015, fill_passes, corner_patch)
        medians.append(float(np.median(h[fg])))
    threshold = float(np.clip(0.3 * np.median(medians), 0.0015, 0.007))
    tops = []
    for xyz in clouds:
        h, fg = height_map(xyz, threshold, fill_passes, corner_patch)
        tops.append(h[fg])
    scale = float(np.percentile(np.concatenate(tops), 99))
    if not scale > 0:
        raise DataError(None, "depth: the foreground has no height above the background plane")
    return {"fg_threshold_m": threshold, "height_scale_m": scale}


def preprocess_frame(rgb: np.ndarray | None, xyz: np.ndarray | None, modality: str, resolution: int,
                     params: dict) -> dict[str, np.ndarray]:
    """The model inputs of one frame: {"rgb": 3 x R x R} and/or {"depth": 1 x R x R, "fg": R x R}.

    "fg" (float32 0/1) travels with the depth so the model can restrict its image score to
    the object and the tools can mask the map; an RGB-only model scores the whole image.
    """
    p = {**DEFAULTS, **(params or {})}
    out: dict[str, np.ndarray] = {}
    if modality != "3d":
        if rgb is None:
            raise DataError(None, "rgb: this DBRN model needs the colour image")
        out["rgb"] = prepare_rgb(rgb, resolution)
    if modality != "rgb":
        depth, fg = prepare_depth(xyz, resolution, p["fg_threshold_m"], p["height_scale_m"],
                                  p["fill_passes"], p["corner_patch"], p["fg_dilate"])
        if rgb is not None and np.asarray(rgb).shape[:2] != np.asarray(xyz).shape[:2]:
            raise DataError(None, f"rgb is {np.asarray(rgb).shape[:2]} but xyz is {np.asarray(xyz).shape[:2]}; "
                                  "they must be pixel-registered")
        out["depth"] = depth
        out["fg"] = fg.astype(np.float32)
    return out
