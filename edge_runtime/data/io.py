"""Reading and writing the MVTec 3D-AD file kinds, with errors that name the file.

rgb: 8-bit PNG (3 channels; grey or RGBA are converted), returned RGB-ordered uint8.
xyz: float32 H x W x 3 TIFF in metres, (0, 0, 0) = no point.
gt:  8-bit PNG mask, class-coded; anything > 0 is anomalous.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

from edge_runtime.errors import DataError


def _read_png(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(path, "file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(path, "not a readable PNG image (corrupt or truncated)")
    # libpng reports a truncated image on stderr but OpenCV may still return pixels;
    # a PNG must end with its IEND chunk.
    if data[:8].tobytes() == b"\x89PNG\r\n\x1a\n" and data[-8:-4].tobytes() != b"IEND":
        raise DataError(path, "truncated PNG (no IEND chunk at the end of the file)")
    return img


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 H x W x 3 in RGB order."""
    img = _read_png(path)
    if img.dtype != np.uint8:
        raise DataError(path, f"rgb image must be 8-bit, got {img.dtype}")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        raise DataError(path, f"rgb image must have 1, 3 or 4 channels, got shape {img.shape}")
    return np.ascontiguousarray(img)


def read_gt(path: str | Path) -> np.ndarray:
    """bool H x W, True where the class-coded mask is > 0."""
    img = _read_png(path)
    if img.ndim == 3:
        if img.shape[2] not in (3, 4):
            raise DataError(path, f"gt mask must be single-channel, got shape {img.shape}")
        img = img[..., :3].max(axis=2)
    return img > 0


def read_xyz(path: str | Path) -> np.ndarray:
    """float32 H x W x 3 organized point cloud in metres; zeros = missing point."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        arr = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for broken files
        raise DataError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(path, f"xyz must be H x W x 3, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(path, f"xyz must be floating point (float32 metres), got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        n = int(bad.any(axis=2).sum())
        raise DataError(path, f"xyz has {n} points with NaN or Inf coordinates")
    return arr


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{path}: rgb must be uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")


def write_gt(path: str | Path, gt: np.ndarray, value: int = 255) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.where(np.asarray(gt) > 0, value, 0).astype(np.uint8)
    if not cv2.imwrite(str(path), mask):
        raise OSError(f"{path}: could not write PNG")


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"{path}: xyz must be H x W x 3, got {xyz.shape}")
    tifffile.imwrite(path, xyz.astype(np.float32))
