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
  (modality "rgb") every cell counts (ones), as in the paper, unless one of the RGB-only
  options below is set.

RGB-only options (modality "rgb"; not in the paper, each recorded in the manifest's
``preprocessing`` and off unless set; see docs/results.md, AST, for what they are worth):

* ``roi`` = [x0, y0, x1, y1] (fractions of the frame): the image is cropped to this box
  before the resize (the station places the part at a fixed spot); the map covers the box
  (``roi_geometry``). ``foreground_roi`` derives it from training images.
* ``rgb_foreground`` = {"threshold", "dilate", "side", "corner"}: the RGB analogue of AST's
  four-corner depth background. Per frame, the colour (resized to ``side`` px, Gaussian
  blur sigma 2) is compared with the colour statistics of the four ``corner``-fraction
  corner patches (Mahalanobis distance); pixels above ``threshold`` are the part, dilated by
  ``dilate`` px; ``fg`` is their coverage of each cell. A frame with no foreground cell
  falls back to every cell (an empty mask would hide everything).
* ``border`` = N: the outer N rings of grid cells never count for the score and the map
  (the extractor's zero padding makes them the least reliable cells), nor, unless
  ``border_train`` is set, for the training losses.
* ``border_train`` = true (only with ``border``): the training losses still cover the
  outer rings (the student learns them like any cell); only the score and the map leave
  them out. The runtime preprocessor is the same either way; the trainer preprocesses its
  images with ``training_params(params)``.

The parameters come from the bundle manifest's ``preprocessing`` dict
(``preprocessing_params``). Source and deviations: docs/methods.md (AST).
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.data.depth import centred_depth_input
from edge_runtime.errors import DataError

__all__ = ["preprocessing_params", "image_input", "make_preprocessor", "map_valid_mask", "colour_foreground",
           "roi_box", "roi_geometry", "foreground_roi", "training_params", "RGB_FOREGROUND"]

# the corner-colour foreground's default parameters (measured on the MVTec 3D-AD tire, docs/results.md)
RGB_FOREGROUND = {"threshold": 6.0, "dilate": 16, "side": 192, "corner": 0.1}


def preprocessing_params(cfg, mean=None, std=None, threshold_m: float = 0.007, fill_passes: int = 3,
                         corner_patch: int = 2, dilate: int | None = None, roi=None, rgb_foreground=None,
                         border: int = 0, border_train: bool = False) -> dict:
    """The manifest's ``preprocessing`` dict for ``cfg`` (an ASTConfig).

    mean / std: the extractor's input normalisation (0..1 units; needed for "rgb" modes).
    dilate: foreground dilation square in depth-map pixels (default: 8 at the paper's
    192 px depth map, scaled with the depth map's side).
    roi, rgb_foreground, border, border_train: the RGB-only options of the module doc (None /
    None / 0 / False: the paper's whole frame, every cell); ``rgb_foreground=True`` takes
    ``RGB_FOREGROUND``.
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
    if (roi is not None or rgb_foreground) and cfg.modality != "rgb":
        raise ValueError("ast: roi / rgb_foreground are RGB-only options (with a point cloud the depth "
                         "foreground is used, as in the paper)")
    if roi is not None:
        params["roi"] = _check_roi(roi)
    if rgb_foreground:
        fgp = dict(RGB_FOREGROUND) if rgb_foreground is True else {**RGB_FOREGROUND, **dict(rgb_foreground)}
        params["rgb_foreground"] = {"threshold": float(fgp["threshold"]), "dilate": int(fgp["dilate"]),
                                    "side": int(fgp["side"]), "corner": float(fgp["corner"])}
    border = int(border)
    if border < 0 or 2 * border >= cfg.grid:
        raise ValueError(f"ast: border must be 0..{(cfg.grid - 1) // 2} cells for grid {cfg.grid}, got {border}")
    if border:
        params["border"] = border
    if border_train:
        if not border:
            raise ValueError("ast: border_train needs border >= 1 (the rings that are trained on but not scored)")
        params["border_train"] = True
    return params


def training_params(params: dict) -> dict:
    """The preprocessing the trainer applies to its training images: ``params`` itself, or,
    with ``border_train``, ``params`` without the border (the losses cover the outer rings;
    the score and the map, made with ``params``, still leave them out)."""
    if params.get("border_train"):
        return {k: v for k, v in params.items() if k not in ("border", "border_train")}
    return params


def _check_roi(roi) -> list[float]:
    try:
        box = [float(v) for v in roi]
    except (TypeError, ValueError):
        raise ValueError(f"ast: roi must be 4 numbers x0 y0 x1 y1 (fractions of the frame), got {roi!r}") from None
    if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
        raise ValueError(f"ast: roi must be x0 y0 x1 y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {roi!r}")
    return box


def roi_box(image_shape, roi) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) image pixels of the fractional ``roi`` on an image of ``image_shape``."""
    h, w = int(image_shape[0]), int(image_shape[1])
    x0, y0 = int(round(roi[0] * w)), int(round(roi[1] * h))
    x1, y1 = max(x0 + 1, int(round(roi[2] * w))), max(y0 + 1, int(round(roi[3] * h)))
    return x0, y0, min(x1, w), min(y1, h)


def roi_geometry(image_shape, roi):
    """The MapGeometry of a map that covers ``roi`` of an image of ``image_shape``."""
    from edge_runtime.geometry import MapGeometry

    if roi is None:
        return MapGeometry.identity(image_shape)
    x0, y0, x1, y1 = roi_box(image_shape, roi)
    return MapGeometry(y1 - y0, x1 - x0, -y0, -x0)


def _foreground_pixels(rgb: np.ndarray, side: int, threshold: float, corner: float) -> np.ndarray:
    """bool side x side: blurred colour far (Mahalanobis) from the four corner patches' colour."""
    small = cv2.GaussianBlur(cv2.resize(np.ascontiguousarray(rgb), (side, side), interpolation=cv2.INTER_AREA)
                             .astype(np.float32), (0, 0), 2.0)
    c = max(2, round(corner * side))
    cor = np.concatenate([small[:c, :c], small[:c, -c:], small[-c:, :c], small[-c:, -c:]]).reshape(-1, 3)
    diff = small - cor.mean(0)
    inv = np.linalg.inv(np.cov(cor.T) + 0.25 * np.eye(3))  # + 0.25: a floor for flat (synthetic) backgrounds
    return np.sqrt(np.maximum(np.einsum("hwc,cd,hwd->hw", diff, inv, diff), 0)) > threshold


def colour_foreground(rgb: np.ndarray, grid: int, threshold: float = RGB_FOREGROUND["threshold"],
                      dilate: int = RGB_FOREGROUND["dilate"], side: int = RGB_FOREGROUND["side"],
                      corner: float = RGB_FOREGROUND["corner"], roi=None) -> np.ndarray:
    """float32 grid x grid: coverage of each cell by the dilated corner-colour foreground
    (all ones when nothing is foreground). The colour model is always made on the whole
    frame (its corners are the background); with ``roi`` the mask is then cut to the box."""
    fg = _foreground_pixels(_check_rgb(rgb), side, threshold, corner).astype(np.uint8)
    if dilate > 1:
        fg = cv2.dilate(fg, np.ones((dilate, dilate), np.uint8))
    if roi is not None:
        x0, y0, x1, y1 = roi_box((side, side), roi)
        fg = fg[y0:y1, x0:x1]
    cells = cv2.resize(fg.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)
    return cells if (cells > 0).any() else np.ones((grid, grid), np.float32)


def foreground_roi(rgbs, margin: float = 0.03, threshold: float = RGB_FOREGROUND["threshold"],
                   side: int = RGB_FOREGROUND["side"], corner: float = RGB_FOREGROUND["corner"]) -> list[float]:
    """The fractional box [x0, y0, x1, y1] holding every image's largest corner-colour
    foreground component, widened by ``margin`` (fractions) per side: an ROI learned from
    good training images of a station that places the part at a fixed spot."""
    lo, hi = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    for rgb in rgbs:
        fg = _foreground_pixels(_check_rgb(rgb), side, threshold, corner).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(fg)
        if n < 2:
            continue
        x, y, w, h, _ = stats[1 + int(np.argmax(stats[1:, 4]))]
        lo = np.minimum(lo, np.array([x, y]) / side)
        hi = np.maximum(hi, np.array([x + w, y + h]) / side)
    if not (hi > lo).all():
        return [0.0, 0.0, 1.0, 1.0]
    lo, hi = np.clip(lo - margin, 0.0, 1.0), np.clip(hi + margin, 0.0, 1.0)
    return [round(float(v), 4) for v in (lo[0], lo[1], hi[0], hi[1])]


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

    roi, fgp, border = params.get("roi"), params.get("rgb_foreground"), int(params.get("border", 0))

    def preprocess(rgb: np.ndarray, xyz: np.ndarray | None) -> dict:
        out = {}
        if fgp and not uses_depth:
            out["fg"] = colour_foreground(rgb, grid, roi=roi, **fgp)
        if uses_rgb and roi is not None:
            x0, y0, x1, y1 = roi_box(_check_rgb(rgb).shape, roi)
            rgb = np.ascontiguousarray(rgb[y0:y1, x0:x1])
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
        elif not fgp:
            out["fg"] = np.ones((grid, grid), np.float32)
        if border:
            fg = np.zeros_like(out["fg"])
            fg[border:-border, border:-border] = out["fg"][border:-border, border:-border]
            out["fg"] = fg
        return out

    return preprocess


def map_valid_mask(fg_grid: np.ndarray, map_shape: tuple[int, int]) -> np.ndarray:
    """bool map-grid mask of the cells that count (``fg > 0``), nearest-upsampled to ``map_shape``."""
    cells = (np.asarray(fg_grid, np.float32) > 0).astype(np.uint8)
    return cv2.resize(cells, (int(map_shape[1]), int(map_shape[0])), interpolation=cv2.INTER_NEAREST) > 0
