"""Heat-map overlay pictures of one decision, and a bounded-disk writer for them.

``render_overlay(image, amap, regions, score, threshold, decision, part_id, time)``
is a pure function returning PNG bytes (OpenCV only, no matplotlib):

    +--------------------------------------------------------------+
    | NOT_OK   part 417   2026-12-01 10:20:00.123 UTC               |  header, decision colour
    +------------------------------+-------------------------------+
    | the image, region boxes      | anomaly map (JET) blended,    |
    |                              | region boxes                  |
    +------------------------------+-------------------------------+
    | score 0.83 [=========|====>      ] threshold 0.50             |  score bar
    +--------------------------------------------------------------+

``OverlayWriter(directory, max_files, max_bytes)`` writes such files atomically and
deletes the oldest ones of its directory so that both bounds hold.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.errors import DataError

COLOURS_BGR = {"OK": (60, 160, 40), "NOT_OK": (40, 40, 220)}  # anything else: amber
OTHER_BGR = (0, 160, 230)
BOX_BGR = (255, 255, 255)
HEADER_PX, BAR_PX = 34, 30  # at 480 px panel width; scaled with the image
SUFFIX = ".png"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _box(region: dict) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (exclusive ends) from ``{"bbox": [x0, y0, x1, y1]}`` or
    ``regions_from_map``'s ``{"x", "y", "w", "h"}``."""
    if "bbox" in region:
        x0, y0, x1, y1 = (int(round(v)) for v in region["bbox"])
    elif all(k in region for k in ("x", "y", "w", "h")):
        x0, y0 = int(region["x"]), int(region["y"])
        x1, y1 = x0 + int(region["w"]), y0 + int(region["h"])
    else:
        raise DataError(None, f"region {region!r} needs 'bbox': [x0, y0, x1, y1] or x, y, w, h")
    if x1 <= x0 or y1 <= y0:
        raise DataError(None, f"region box {[x0, y0, x1, y1]} is empty (need x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def _when(t) -> str:
    if t is None:
        return ""
    if isinstance(t, str):
        return t
    if isinstance(t, (int, np.integer)):  # time.time_ns()
        t = datetime.fromtimestamp(int(t) / 1e9, tz=timezone.utc)
    if isinstance(t, datetime):
        return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d} UTC"
    raise DataError(None, f"time must be ns since the epoch, a datetime or a string, got {type(t).__name__}")


def _text(img, text, org, scale, colour=(255, 255, 255), thick=1) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)


def render_overlay(
    image: np.ndarray,
    amap: np.ndarray | None,
    regions: list[dict] | None,
    score: float | None,
    threshold: float | None,
    decision: str,
    part_id: int | str,
    time=None,
    *,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> bytes:
    """PNG bytes of the decision picture (module docstring).

    image: uint8 H x W x 3, RGB. amap: float H x W anomaly map already in image pixels
    (``alerts.map_to_image`` turns the model-grid map into one), or None. regions:
    boxes in image pixels. vmax: top of the colour scale (default ``2 x threshold``
    when there is one, else the map's max), so frames are comparable. time: ns since
    the epoch, a datetime or a string.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise DataError(None, f"overlay image must be uint8 H x W x 3 (RGB), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    left = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    right = left.copy()
    if amap is not None:
        amap = np.asarray(amap, dtype=np.float32)
        if amap.shape != (h, w):
            raise DataError(None, f"anomaly map must be in image pixels ({h} x {w}), got {amap.shape}")
        if not np.isfinite(amap).all():
            raise DataError(None, "anomaly map has NaN or Inf values")
        top = vmax if vmax is not None else (2 * threshold if threshold else float(amap.max()))
        scaled = np.clip(amap * (255.0 / top), 0, 255) if top and top > 0 else np.zeros_like(amap)
        colour = cv2.applyColorMap(scaled.astype(np.uint8), cv2.COLORMAP_JET)
        right = cv2.addWeighted(left, 1.0 - alpha, colour, alpha, 0.0)
    unit = max(w, 240) / 480.0  # text and band sizes follow the panel width
    thick = max(1, int(round(unit)))
    for r in regions or ():
        x0, y0, x1, y1 = _box(r)
        for panel in (left, right):
            cv2.rectangle(panel, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thick)
    body = np.concatenate([left, np.full((h, max(2, thick * 2), 3), 32, np.uint8), right], axis=1)
    width = body.shape[1]
    colour = COLOURS_BGR.get(decision, OTHER_BGR)
    header = np.full((int(HEADER_PX * unit), width, 3), colour, np.uint8)
    scale = 0.6 * unit
    _text(header, f"{decision}   part {part_id}   {_when(time)}", (int(8 * unit), int(24 * unit)), scale, thick=thick)
    bar = np.full((int(BAR_PX * unit), width, 3), 24, np.uint8)
    _score_bar(bar, score, threshold, unit, thick)
    return _png(np.concatenate([header, body, bar], axis=0))


def _score_bar(bar: np.ndarray, score, threshold, unit: float, thick: int) -> None:
    """Score vs threshold: a bar to 2 x threshold (or the score), the threshold tick."""
    bh, bw = bar.shape[:2]
    label = f"score {'-' if score is None else f'{score:.4g}'}   threshold {'-' if threshold is None else f'{threshold:.4g}'}"
    _text(bar, label, (int(8 * unit), int(bh * 0.7)), 0.5 * unit, thick=thick)
    x0, x1 = int(bw * 0.5), bw - int(10 * unit)
    y0, y1 = int(bh * 0.25), int(bh * 0.75)
    cv2.rectangle(bar, (x0, y0), (x1, y1), (90, 90, 90), 1)
    full = max(2 * (threshold or 0), score or 0, 1e-12)
    if score is not None:
        fill = x0 + int((x1 - x0) * min(max(score, 0) / full, 1.0))
        over = threshold is not None and score > threshold
        cv2.rectangle(bar, (x0, y0), (fill, y1), COLOURS_BGR["NOT_OK" if over else "OK"], -1)
    if threshold is not None:
        tx = x0 + int((x1 - x0) * min(threshold / full, 1.0))
        cv2.line(bar, (tx, y0 - int(4 * unit)), (tx, y1 + int(4 * unit)), (255, 255, 255), thick + 1)


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(SUFFIX, bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError(None, "OpenCV could not encode the overlay as PNG")
    return buf.tobytes()


class OverlayWriter:
    """Write overlay PNGs into ``directory``, keeping at most ``max_files`` files and
    ``max_bytes`` bytes of them (the oldest, by modification time, go first; the file
    just written always stays). Give it a directory of its own."""

    def __init__(self, directory: str | Path, max_files: int = 500, max_bytes: int = 256 * 2**20):
        if max_files < 1 or max_bytes < 1:
            raise ValueError(f"max_files and max_bytes must be >= 1, got {max_files}, {max_bytes}")
        self.dir, self.max_files, self.max_bytes = Path(directory), max_files, max_bytes
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(self.dir, f"cannot create the overlay directory: {exc.strerror or exc}") from None

    def write(self, name: str, png: bytes) -> Path:
        """Write ``png`` as ``<directory>/<name>.png`` atomically; returns the path."""
        if not _SAFE_NAME.match(name):
            raise DataError(None, f"overlay name {name!r} must be 1-128 characters of A-Z a-z 0-9 _ . -")
        path = self.dir / (name if name.endswith(SUFFIX) else name + SUFFIX)
        tmp = self.dir / f".{path.name}.tmp"
        try:
            tmp.write_bytes(png)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(path, f"cannot write overlay: {exc.strerror or exc}") from None
        self._bound(path)
        return path

    def _bound(self, keep: Path) -> None:
        files = []
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name.endswith(SUFFIX) and not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    files.append((st.st_mtime_ns, e.name, st.st_size))
        files.sort()
        count, total = len(files), sum(f[2] for f in files)
        for _, name, size in files:
            if count <= self.max_files and total <= self.max_bytes:
                break
            if name == keep.name:
                continue
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                pass
            count, total = count - 1, total - size
