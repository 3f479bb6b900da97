"""A stand-in detector with (almost) no model cost, for pipeline tests and overhead benchmarks.

It honours the Detector interface (``edge_runtime.backends.detector``) exactly, so the
streaming pipeline can be exercised and timed without weights:

* ``preprocess`` nearest-resizes rgb and xyz to R x R by index striding (pure numpy,
  microseconds) and returns float32 arrays of the same names and shapes a real
  backend would send over the wire.
* ``infer`` returns a cheap statistic as the score (the standard deviation of the
  resized rgb, in [0, 1] units) and an all-zero R x R map; ``delay_ms`` sleeps to
  simulate a slow model.
* ``preprocessor(manifest, **options)`` is the same preprocessing as a plain function:
  what the pipeline's preprocess stage runs with ``--backend noop`` (it loads no model).

Fault hooks for the pipeline's fault tests (all off by default): ``load_delay_s`` (a
slow model load), ``exit_after`` (the process exits with status 3 on its (N+1)-th
``infer`` call: a crashing worker), ``hang_once_file`` (the first ``infer`` call in any
process that finds this file absent creates it and then sleeps for an hour: a hung
worker, once per file).

The bundle directory need not exist; when it holds a ``manifest.json`` it is read so
the detector carries the bundle's manifest (thresholds, provenance) like a real one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from edge_runtime.backends.detector import Result
from edge_runtime.errors import BundleError, DataError

DEFAULT_RESOLUTION = 64
OPTIONS = ("delay_ms", "resolution", "load_delay_s", "exit_after", "hang_once_file")


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

    def __init__(self, manifest: dict, resolution: int, delay_ms: float, exit_after: int | None = None,
                 hang_once_file: str | None = None):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.name = "noop"
        self.manifest = manifest
        self.resolution = int(resolution)
        self.delay_ms = float(delay_ms)
        self.exit_after = exit_after
        self.hang_once_file = hang_once_file
        self.calls = 0

    def preprocess(self, rgb: np.ndarray, xyz: np.ndarray | None) -> dict[str, np.ndarray]:
        """rgb uint8 H x W x 3 and xyz float32 H x W x 3 metres (or None) ->
        {"rgb": float32 R x R x 3 in [0, 1], "xyz": float32 R x R x 3 metres (zeros if None)}."""
        return _preprocess(rgb, xyz, self.resolution)

    def _faults(self) -> None:
        self.calls += 1
        if self.exit_after is not None and self.calls > self.exit_after:
            os._exit(3)
        if self.hang_once_file is not None and not os.path.exists(self.hang_once_file):
            Path(self.hang_once_file).touch()
            time.sleep(3600)

    def infer(self, inputs: dict[str, np.ndarray]) -> Result:
        """Score = std of inputs["rgb"] (unitless, [0, 1] scale); amap = zeros R x R float32.
        Sleeps ``delay_ms`` first; timings_ms["noop"] is the whole call in ms."""
        t0 = time.perf_counter()
        self._faults()
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


def _preprocess(rgb: np.ndarray, xyz: np.ndarray | None, r: int) -> dict[str, np.ndarray]:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(None, f"rgb: expected an H x W x 3 array, got {getattr(rgb, 'shape', type(rgb))}")
    out = {"rgb": _nearest_resize(rgb, r).astype(np.float32) * np.float32(1.0 / 255.0)}
    if xyz is None:
        out["xyz"] = np.zeros((r, r, 3), np.float32)
    else:
        if xyz.shape != rgb.shape:
            raise DataError(None, f"xyz: shape {xyz.shape} does not match rgb {rgb.shape}")
        out["xyz"] = np.ascontiguousarray(_nearest_resize(xyz, r), dtype=np.float32)
    return out


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"noop backend: unknown options {unknown}; it takes {', '.join(OPTIONS)}")


def _resolution(manifest: dict, resolution: int | None) -> int:
    return int(resolution if resolution is not None else manifest.get("resolution") or DEFAULT_RESOLUTION)


def preprocessor(manifest: dict, resolution: int | None = None, **options):
    """The no-op preprocessing as a function ``(rgb, xyz) -> {"rgb", "xyz"}`` (R x R
    float32, see ``NoopDetector.preprocess``); the other options are the detector's and
    are ignored here (validated)."""
    _check_options(options)
    r = _resolution(manifest, resolution)
    if r < 1:
        raise ValueError(f"resolution must be >= 1, got {r}")
    return lambda rgb, xyz: _preprocess(rgb, xyz, r)


def load(bundle_dir: str | Path, device: str = "cpu", delay_ms: float = 0.0,
         resolution: int | None = None, load_delay_s: float = 0.0, exit_after: int | None = None,
         hang_once_file: str | None = None, **options) -> NoopDetector:
    """Build a NoopDetector. ``bundle_dir`` may be missing or weightless; ``device`` is
    accepted for interface compatibility and ignored. ``resolution`` (pixels a side)
    defaults to the manifest's "resolution" field if any, else 64. Fault hooks: see the
    module doc. Unknown options are rejected so a typo is not silently ignored."""
    _check_options(options)
    manifest = _read_manifest(Path(bundle_dir))
    if load_delay_s:
        time.sleep(load_delay_s)
    return NoopDetector(manifest, _resolution(manifest, resolution), delay_ms, exit_after, hang_once_file)


def write_bundle(path: str | Path, thresholds: dict | None = None, resolution: int = DEFAULT_RESOLUTION) -> Path:
    """A weightless bundle directory the no-op backend runs (benchmarks, soak tests): a
    version 1 manifest (readable by ``edge_runtime.bundle.read_manifest``), thresholds
    default {"image": 0.2, "pixel": 0.5} (synthetic frames then give OK and NOT_OK)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from edge_runtime import methods

    # the method of the default demo (any would do: the no-op backend never builds a model)
    method = next((n for n in methods.names() if any(d.default for d in methods.get(n).demos)), methods.names()[0])
    manifest = {"schema_version": 1, "method": method, "variant": "noop", "config": {}, "resolution": resolution,
                "files": {"model.safetensors": {"sha256": "0" * 64, "bytes": 0}},
                "thresholds": thresholds or {"image": 0.2, "pixel": 0.5}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path
