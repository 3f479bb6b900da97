"""Reading and writing the MVTec 3D-AD file kinds, with errors that name the file.

Formats (MVTec 3D-AD, Bergmann et al. 2022; see docs/data.md):

rgb: 8-bit PNG (3 channels; grey or RGBA are converted), returned RGB-ordered uint8.
xyz: float32 H x W x 3 TIFF in metres, (0, 0, 0) = no point.
gt:  8-bit PNG mask, class-coded (e.g. 255/254/253); anything > 0 is anomalous.

OpenCV's BGR order never leaves this module. Every reader raises
``edge_runtime.errors.DataError(path, problem)`` for a missing, unreadable or
malformed file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from edge_runtime.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# No industrial 3D sensor sees a part 100 m away: coordinates beyond this are taken
# as a unit error (millimetre data in a file that must hold metres).
MAX_COORD_M = 100.0


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an image's size, checked from the file header before any pixel is
    decoded (and by edge-run on every frame): longest side in pixels, pixel count,
    and aspect ratio (long side / short side). A 2448 x 2048 camera is 5 Mpx."""

    max_side: int = 16384
    max_pixels: int = 64_000_000
    max_aspect: float = 32.0

    def problem(self, h: int, w: int) -> str | None:
        """Why an H x W image is refused, or None when it fits."""
        h, w = int(h), int(w)
        if h < 1 or w < 1:
            return f"image is {h}x{w} (HxW): no pixels"
        if max(h, w) > self.max_side:
            return f"image is {h}x{w} (HxW): a side exceeds the limit of {self.max_side} pixels"
        if h * w > self.max_pixels:
            return f"image is {h}x{w} (HxW): {h * w} pixels exceed the limit of {self.max_pixels}"
        if max(h, w) / min(h, w) > self.max_aspect:
            return f"image is {h}x{w} (HxW): aspect ratio exceeds the limit of {self.max_aspect:g}"
        return None


DEFAULT_LIMITS = ImageLimits()


def _check_size(path: Path, h: int, w: int, limits: ImageLimits | None) -> None:
    problem = (limits or DEFAULT_LIMITS).problem(h, w)
    if problem is not None:
        raise DataError(path, problem)


def read_tiff_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of a TIFF's first image from its header, without reading the pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(n) for n in tif.pages[0].shape)
    except Exception as exc:  # tifffile raises many types for broken files
        raise DataError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None


def _read_png(path: str | Path, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode a PNG file as stored (any depth / channel count; OpenCV's BGR(A) order).

    Rejects missing, empty, non-PNG, corrupt and truncated files, and images outside
    ``limits`` (default ``DEFAULT_LIMITS``), the latter from the header, before decoding.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        size = read_png_size(path)
    except DataError:  # no readable header: the decoder below names the problem
        size = None
    if size is not None:
        _check_size(path, *size, limits)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(path, "file is empty")
    if data[:8].tobytes() != PNG_SIGNATURE:
        raise DataError(path, "not a PNG file (the PNG signature is missing)")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(path, "not a readable PNG image (corrupt or truncated)")
    # Some OpenCV 4.x builds return the pixels of a truncated file (libpng only warns
    # on stderr), so the chunk structure is checked too.
    if not _png_complete(data.tobytes()):
        raise DataError(path, "truncated PNG (the file ends before its IEND chunk)")
    return img


def _png_complete(data: bytes) -> bool:
    """True if the PNG chunk sequence reaches an IEND chunk inside ``data``.

    Source: PNG specification, chunk layout = 4-byte big-endian length, 4-byte type,
    data, 4-byte CRC. Bytes after IEND are ignored (as decoders do).
    """
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunk_type = data[pos + 4:pos + 8]
        pos += 12 + length
        if chunk_type == b"IEND":
            return pos <= len(data)
    return False


def read_png_size(path: str | Path) -> tuple[int, int]:
    """(height, width) in pixels from a PNG's IHDR chunk, without decoding the pixels.

    Source: PNG specification (signature, then IHDR: 4-byte length, b"IHDR",
    big-endian uint32 width and height).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(path, "not a PNG file (no PNG signature and IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


def read_rgb(path: str | Path, limits: ImageLimits | None = None) -> np.ndarray:
    """8-bit PNG -> uint8 H x W x 3 in RGB order (grey and RGBA are converted)."""
    img = _read_png(path, limits)
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
    """Class-coded PNG mask -> bool H x W, True where the mask value is > 0."""
    img = _read_png(path)
    if img.ndim == 3:
        if img.shape[2] not in (3, 4):
            raise DataError(path, f"gt mask must be single-channel, got shape {img.shape}")
        img = img[..., :3].max(axis=2)
    return img > 0


def read_xyz(path: str | Path, limits: ImageLimits | None = None, allow_nonfinite: bool = False) -> np.ndarray:
    """TIFF -> float32 H x W x 3 organized point cloud in metres; (0, 0, 0) = missing point.

    Rejects unreadable/truncated files, non-float data, a shape other than
    H x W x 3, images outside ``limits`` (checked on the header, before reading),
    NaN/Inf coordinates (unless ``allow_nonfinite``: the caller judges them) and
    coordinates beyond ``MAX_COORD_M`` metres.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        shape = read_tiff_shape(path)
    except DataError:  # no readable header: the reader below names the problem
        shape = ()
    if len(shape) >= 2:
        _check_size(path, *(shape[:2] if len(shape) == 3 and shape[2] == 3 else shape[-2:]), limits)
    try:
        arr = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for broken files
        raise DataError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if arr.size == 0:
        raise DataError(path, "TIFF holds no image data (empty or truncated file)")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(path, f"xyz must be H x W x 3, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(path, f"xyz must be floating point (float32 metres), got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any() and not allow_nonfinite:
        n = int(bad.any(axis=2).sum())
        raise DataError(path, f"xyz has {n} points with NaN or Inf coordinates")
    peak = float(np.abs(np.where(bad, np.float32(0.0), arr) if bad.any() else arr).max())
    if peak > MAX_COORD_M:
        raise DataError(
            path,
            f"xyz coordinates reach {peak:g}; they must be in metres "
            f"(limit {MAX_COORD_M:g} m; millimetre data?)",
        )
    return arr


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """uint8 H x W x 3 RGB -> 8-bit PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{path}: rgb must be uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")


def write_gt(path: str | Path, gt: np.ndarray, value: int = 255) -> None:
    """H x W mask -> 8-bit PNG holding ``value`` (the class code) where gt > 0, else 0."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.where(np.asarray(gt) > 0, value, 0).astype(np.uint8)
    if not cv2.imwrite(str(path), mask):
        raise OSError(f"{path}: could not write PNG")


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    """H x W x 3 point cloud in metres -> float32 TIFF (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"{path}: xyz must be H x W x 3, got {xyz.shape}")
    # three samples per pixel, interleaved: read back as H x W x 3 by tifffile
    tifffile.imwrite(path, xyz.astype(np.float32), photometric="minisblack", planarconfig="contig")
