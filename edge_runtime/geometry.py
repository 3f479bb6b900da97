"""Where an anomaly map lies on the camera image: one small, method-independent description.

Every method scores on a grid of its own (CFM: the image square-padded and resized to
R x R; AST and DBRN: the image resized to R x R without padding). All of them are the
same affine picture: the map covers a *canvas* of ``canvas_h x canvas_w`` image pixels
whose top-left corner sits at ``(-top, -left)`` in image coordinates (``top``/``left`` > 0
means padding above / left of the image, < 0 a crop that starts inside it), sampled on
the map's ``h x w`` grid. A method
says which canvas it uses (``Method.geometry``); everything that turns maps into image
pixels (regions, overlays, gt alignment, the live view) works from that tuple alone, so
the geometry travels with a frame as four integers and no consumer knows the method.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from edge_runtime.errors import DataError


MAX_SIDE = 1 << 20  # bound on canvas sides and offsets read from the wire


class MapGeometry(NamedTuple):
    """The canvas an anomaly map covers, in image pixels (see the module doc)."""

    canvas_h: int
    canvas_w: int
    top: int
    left: int

    @classmethod
    def identity(cls, image_shape: tuple[int, ...]) -> "MapGeometry":
        """The map covers exactly the image (a plain resize, no padding)."""
        h, w = _hw(image_shape)
        return cls(h, w, 0, 0)

    @classmethod
    def square_pad(cls, image_shape: tuple[int, ...], multiple: int = 100) -> "MapGeometry":
        """The image centred on a square of side max(H, W) rounded up to ``multiple``
        (``top = (side - H) // 2``, ``left = (side - W) // 2``)."""
        h, w = _hw(image_shape)
        side = math.ceil(max(h, w) / multiple) * multiple
        return cls(side, side, (side - h) // 2, (side - w) // 2)

    @classmethod
    def from_wire(cls, value) -> "MapGeometry":
        """From a frame header's ``[canvas_h, canvas_w, top, left]`` list (validated)."""
        try:
            g = cls(*(int(v) for v in value))
        except (TypeError, ValueError):
            raise DataError(None, f"geometry must be 4 integers [canvas_h, canvas_w, top, left], got {value!r}") from None
        if g.canvas_h < 1 or g.canvas_w < 1 or max(abs(g.top), abs(g.left), g.canvas_h, g.canvas_w) > MAX_SIDE:
            raise DataError(None, f"geometry {list(g)}: canvas sides must be 1..{MAX_SIDE} and offsets "
                                  f"within +-{MAX_SIDE}")
        return g


def _hw(image_shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = int(image_shape[0]), int(image_shape[1])
    if h < 1 or w < 1:
        raise DataError(None, f"image shape must be positive H x W, got {tuple(image_shape)}")
    return h, w


def map_to_image(amap: np.ndarray, image_shape: tuple[int, ...], geometry: MapGeometry) -> np.ndarray:
    """The map resampled (bilinear) onto the H x W image: float32 H x W in the map's units."""
    h, w = _hw(image_shape)
    g = geometry
    full = cv2.resize(np.asarray(amap, dtype=np.float32), (g.canvas_w, g.canvas_h), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((h, w), np.float32)
    y0, x0 = max(0, -g.top), max(0, -g.left)  # first image row / column the canvas covers
    cy, cx = y0 + g.top, x0 + g.left  # the same on the canvas
    ny, nx = min(h - y0, g.canvas_h - cy), min(w - x0, g.canvas_w - cx)
    if ny > 0 and nx > 0:
        out[y0:y0 + ny, x0:x0 + nx] = full[cy:cy + ny, cx:cx + nx]
    return out


def sample_on_grid(arr: np.ndarray, map_shape: tuple[int, int], geometry: MapGeometry) -> np.ndarray:
    """``arr`` (H x W[, C], image pixels) nearest-sampled at each map cell's centre (the PIL
    NEAREST convention); cells in the padding get zeros."""
    arr = np.asarray(arr)
    g = geometry
    mh, mw = int(map_shape[0]), int(map_shape[1])
    ys = np.floor((np.arange(mh) + 0.5) * g.canvas_h / mh).astype(np.int64) - g.top
    xs = np.floor((np.arange(mw) + 0.5) * g.canvas_w / mw).astype(np.int64) - g.left
    iny = (ys >= 0) & (ys < arr.shape[0])
    inx = (xs >= 0) & (xs < arr.shape[1])
    sub = arr[np.clip(ys, 0, arr.shape[0] - 1)][:, np.clip(xs, 0, arr.shape[1] - 1)]
    out = np.zeros((mh, mw, *arr.shape[2:]), arr.dtype)
    out[np.ix_(iny, inx)] = sub[np.ix_(iny, inx)]
    return out


def gt_to_map(gt: np.ndarray, map_shape: tuple[int, int], geometry: MapGeometry) -> np.ndarray:
    """bool ground truth on the map grid (anything > 0 is anomalous; zeros in the padding)."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise DataError(None, f"gt: must be an H x W mask, got shape {gt.shape}")
    return sample_on_grid(gt > 0, map_shape, geometry)


def regions_from_map(amap: np.ndarray, threshold: float, image_shape: tuple[int, ...], geometry: MapGeometry,
                     min_area: int = 32, max_regions: int = 32) -> list[dict]:
    """Anomalous regions: 8-connected components of ``amap > threshold``, in image pixels.

    Grid cells whose centre falls outside the image (padding) are ignored. Returns at most
    ``max_regions`` dicts ``{"x", "y", "w", "h", "area", "max_score"}`` (bounding box and
    area in image pixels, area = cells x cell area capped at w*h; max_score = the region's
    peak), highest peak first; regions smaller than ``min_area`` pixels are dropped.
    """
    amap = np.asarray(amap)
    if amap.ndim != 2 or 0 in amap.shape:
        raise DataError(None, f"anomaly map must be a 2-D array, got shape {amap.shape}")
    h, w = _hw(image_shape)
    g = geometry
    cy, cx = g.canvas_h / amap.shape[0], g.canvas_w / amap.shape[1]  # image pixels per cell
    rows_in = ((np.arange(amap.shape[0]) + 0.5) * cy - g.top)
    cols_in = ((np.arange(amap.shape[1]) + 0.5) * cx - g.left)
    rows_in = (rows_in >= 0) & (rows_in < h)
    cols_in = (cols_in >= 0) & (cols_in < w)
    mask = (amap > threshold) & rows_in[:, None] & cols_in[None, :]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, labels[mask], amap[mask].astype(np.float64))
    gx, gy, gw, gh, cells = (stats[1:, i] for i in range(5))
    x0 = np.clip(np.floor(gx * cx - g.left), 0, w).astype(int)
    y0 = np.clip(np.floor(gy * cy - g.top), 0, h).astype(int)
    x1 = np.clip(np.ceil((gx + gw) * cx - g.left), 0, w).astype(int)
    y1 = np.clip(np.ceil((gy + gh) * cy - g.top), 0, h).astype(int)
    area = np.minimum(np.round(cells * cx * cy), (x1 - x0) * (y1 - y0)).astype(int)
    peak = peak[1:]
    keep = np.flatnonzero(area >= min_area)
    keep = keep[np.argsort(-peak[keep], kind="stable")][:max_regions]
    return [{"x": int(x0[i]), "y": int(y0[i]), "w": int(x1[i] - x0[i]), "h": int(y1[i] - y0[i]),
             "area": int(area[i]), "max_score": float(peak[i])} for i in keep]
