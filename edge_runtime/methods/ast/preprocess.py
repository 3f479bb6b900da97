"""AST input preprocessing (numpy + OpenCV, no torch): the runtime's preprocessing stage.

One frame ``(rgb uint8 H x W x 3, xyz float32 H x W x 3 metres or None)`` becomes the
model inputs (no batch axis):

* ``image``: float32 3 x S x S, the RGB image resized to S x S (no padding; area average
  when shrinking, bilinear when enlarging) and normalised with the extractor's mean/std;
* ``depth``: float32 1 x D x D (D = grid * depth_unshuffle), AST's depth map
  (``edge_runtime.data.depth.centred_depth_input``: 3x3 hole filling, corner-patch
  background surface, 7 mm foreground threshold, background at the mean foreground z,
  centimetres relative to it);
* ``fg``: float32 G x G, the dilated foreground's coverage of each grid cell (soft
  downsampling); cells with ``fg > 0`` count for losses and scores. Without a point cloud
  (modality "rgb") every cell counts (ones), as in the paper.

The parameters come from the bundle manifest's ``preprocessing`` dict
(``preprocessing_params``). Source and deviations: docs/methods.md (AST).
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.data.depth import centred_depth_input
from edge_runtime.errors import DataError

__all__ = ["preprocessing_params", "image_input", "make_preprocessor", "map_valid_mask"]


def preprocessing_params(cfg, mean=None, std=None, threshold_m: float = 0.007, fill_passes: int = 3,
                         corner_patch: int = 2, dilate: int | None = None) -> dict:
    """The manifest's ``preprocessing`` dict for ``cfg`` (an ASTConfig).

    mean / std: the extractor's input normalisation (0..1 units; needed for "rgb" modes).
    dilate: foreground dilation square in depth-map pixels (default: 8 at the paper's
    192 px depth map, scaled with the depth map's side).
    """
    params = {
        "modality": cfg.modality,
        "grid": cfg.grid,
    }
    if cfg.uses_rgb:
        if mean is None or std is None:
            raise ValueError("preprocessing_params: modality with RGB needs the extractor's mean and std")
        params.update(image_size=cfg.image_size, mean=[float(v) for v in mean], std=[float(v) for v in std])
    if cfg.uses_depth:
        if dilate is None:
            dilate = max(1, round(8 * cfg.depth_size / 192))
        params.update(depth_size=cfg.depth_size, threshold_m=float(threshold_m), fill_passes=int(fill_passes),
                      corner_patch=int(corner_patch), dilate=int(dilate))
    return params


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(None, f"rgb: must be uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
    return rgb


def image_input(rgb: np.ndarray, size: int, mean, std) -> np.ndarray:
    """float32 3 x size x size: ``(resize(rgb) / 255 - mean) / std``."""
    rgb = _check_rgb(rgb)
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if (size < h and size < w) else cv2.INTER_LINEAR
    small = cv2.resize(np.ascontiguousarray(rgb), (size, size), interpolation=interp).astype(np.float32)
    m = np.asarray(mean, np.float32) * 255.0
    s = np.asarray(std, np.float32) * 255.0
    return ((small - m) / s).transpose(2, 0, 1).copy()


def make_preprocessor(params: dict):
    """``(rgb, xyz) -> {name: np.ndarray}`` for the manifest's ``preprocessing`` ``params``."""
    modality = params["modality"]
    grid = int(params["grid"])
    uses_rgb, uses_depth = modality != "3d", modality != "rgb"

    def preprocess(rgb: np.ndarray, xyz: np.ndarray | None) -> dict:
        out = {}
        if uses_rgb:
            out["image"] = image_input(rgb, int(params["image_size"]), params["mean"], params["std"])
        if uses_depth:
            if xyz is None:
                raise DataError(None, f"the AST {modality} model needs a point cloud (xyz) for every frame; "
                                      "this frame is RGB only")
            xyz = np.asarray(xyz)
            if rgb is not None and uses_rgb and np.asarray(rgb).shape[:2] != xyz.shape[:2]:
                raise DataError(None, f"rgb is {np.asarray(rgb).shape[:2]} but xyz is {xyz.shape[:2]}; "
                                      "they must be pixel-registered")
            d = centred_depth_input(xyz, size=int(params["depth_size"]), passes=int(params["fill_passes"]),
                                     threshold_m=float(params["threshold_m"]), patch=int(params["corner_patch"]),
                                     dilate=int(params["dilate"]), grid=grid)
            out["depth"] = d["depth"][None].astype(np.float32)
            out["fg"] = d["fg_grid"].astype(np.float32)
        else:
            out["fg"] = np.ones((grid, grid), np.float32)
        return out

    return preprocess


def map_valid_mask(fg_grid: np.ndarray, map_shape: tuple[int, int]) -> np.ndarray:
    """bool map-grid mask of the cells that count (``fg > 0``), nearest-upsampled to ``map_shape``."""
    cells = (np.asarray(fg_grid, np.float32) > 0).astype(np.uint8)
    return cv2.resize(cells, (int(map_shape[1]), int(map_shape[0])), interpolation=cv2.INTER_NEAREST) > 0
