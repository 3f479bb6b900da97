"""A stand-in detector with (almost) no model cost, for pipeline tests and overhead benchmarks.

It honours the Detector interface (``edge_runtime.backends.base``) exactly, so the
streaming pipeline can be exercised and timed without weights:

* ``preprocess`` nearest-resizes rgb and xyz to R x R by index striding (pure numpy,
  microseconds) and returns float32 arrays of the same names and shapes a real
  backend would send over the wire.
* ``infer`` returns a cheap statistic as the score (the standard deviation of the
  resized rgb, in [0, 1] units) and an all-zero R x R map; ``delay_ms`` sleeps to
  simulate a slow model.

The bundle directory need not exist; when it holds a ``manifest.json`` it is read so
the detector carries the bundle's manifest (thresholds, provenance) like a real one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edge_runtime.backends.base import Result
from edge_runtime.errors import BundleError, DataError

DEFAULT_RESOLUTION = 64


def _read_manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest.json as a dict, or {} when the directory or file is absent."""
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest is not a JSON object")
    return manifest


def _nearest_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an H x W x C array to size x size by index striding."""
    h, w = img.shape[:2]
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    return img[rows[:, None], cols[None, :]]


class NoopDetector:
    """Detector with near-zero cost. See the module docstring."""

    def __init__(self, manifest: dict, resolution: int, delay_ms: float):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.name = "noop"
        self.manifest = manifest
        self.resolution = int(resolution)
        self.delay_ms = float(delay_ms)

    def preprocess(self, rgb: np.ndarray, xyz: np.ndarray | None) -> dict[str, np.ndarray]:
        """rgb uint8 H x W x 3 and xyz float32 H x W x 3 metres (or None) ->
        {"rgb": float32 R x R x 3 in [0, 1], "xyz": float32 R x R x 3 metres (zeros if None)}."""
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataError(None, f"rgb: expected an H x W x 3 array, got {getattr(rgb, 'shape', type(rgb))}")
        r = self.resolution
        out = {"rgb": _nearest_resize(rgb, r).astype(np.float32) * np.float32(1.0 / 255.0)}
        if xyz is None:
            out["xyz"] = np.zeros((r, r, 3), np.float32)
        else:
            if xyz.shape != rgb.shape:
                raise DataError(None, f"xyz: shape {xyz.shape} does not match rgb {rgb.shape}")
            out["xyz"] = np.ascontiguousarray(_nearest_resize(xyz, r), dtype=np.float32)
        return out

    def infer(self, inputs: dict[str, np.ndarray]) -> Result:
        """Score = std of inputs["rgb"] (unitless, [0, 1] scale); amap = zeros R x R float32.
        Sleeps ``delay_ms`` first; timings_ms["noop"] is the whole call in ms."""
        t0 = time.perf_counter()
        if "rgb" not in inputs:
            raise DataError(None, "inputs: missing 'rgb' (output of preprocess expected)")
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000.0)
        score = float(np.std(inputs["rgb"]))
        amap = np.zeros((self.resolution, self.resolution), np.float32)
        return Result(score=score, amap=amap, timings_ms={"noop": (time.perf_counter() - t0) * 1000.0})

    def infer_batch(self, batch: list[dict[str, np.ndarray]]) -> list[Result]:
        """One Result per input, in order (each sleeps ``delay_ms``, as a batch-1 model would)."""
        return [self.infer(inputs) for inputs in batch]


def load(bundle_dir: str | Path, device: str = "cpu", delay_ms: float = 0.0,
         resolution: int | None = None, **options) -> NoopDetector:
    """Build a NoopDetector. ``bundle_dir`` may be missing or weightless; ``device`` is
    accepted for interface compatibility and ignored. ``resolution`` (pixels a side)
    defaults to the manifest's "resolution" field if any, else 64. Unknown options are
    rejected so a typo is not silently ignored."""
    if options:
        raise TypeError(f"noop backend: unknown options {sorted(options)}; it takes delay_ms, resolution")
    manifest = _read_manifest(Path(bundle_dir))
    if resolution is None:
        resolution = int(manifest.get("resolution") or DEFAULT_RESOLUTION)
    return NoopDetector(manifest, resolution, delay_ms)
