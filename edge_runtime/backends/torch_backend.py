"""The PyTorch backend: a CFM bundle run by torch on CPU or CUDA.

``load(bundle_dir, device="cpu", precision="fp32", aggregation=None, smoothing=None,
verify=True)`` returns a :class:`TorchDetector`:

* ``preprocess(rgb, xyz)`` runs ``edge_runtime.data.depth.cfm_preprocess`` with the
  bundle's preprocessing parameters (numpy, host CPU).
* ``infer`` / ``infer_batch`` run ``CFMModel.forward`` under ``torch.inference_mode``;
  ``Result.timings_ms`` holds the milliseconds of each model stage (``CFMModel.STAGES``:
  "2d", "group", "3d", "align", "mappers", "score"), plus "h2d" (host -> device copy)
  and "d2h" (map back to host). On CUDA every stage boundary synchronises the device so
  the numbers are the stage's own. For a batch, each Result carries the batch's stage
  times divided by the batch size (the per-frame share).
* ``precision="fp16"`` (CUDA only) runs the dense stages ("2d", "3d", "mappers") under
  ``torch.autocast(float16)``; grouping (FPS, KNN), alignment and scoring stay float32
  (distances in metres lose too much in half precision).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_runtime.backends.base import Result
from edge_runtime.bundle import build_model, load_bundle
from edge_runtime.data.depth import cfm_preprocess
from edge_runtime.errors import BackendUnavailable, DataError

PRECISIONS = ("fp32", "fp16")
DENSE_STAGES = ("2d", "3d", "mappers")


class TorchDetector:
    """Detector interface (``edge_runtime.backends.base.Detector``) over a ``CFMModel``."""

    def __init__(self, model, manifest: dict, device: torch.device, precision: str):
        self.model = model
        self.manifest = manifest
        self.device = device
        self.precision = precision
        self.name = f"torch-{device.type}-{precision}"
        self.resolution = int(model.cfg.resolution)
        self._preprocessing = dict(manifest.get("preprocessing") or {})
        self._preprocessing.pop("function", None)
        self._preprocessing["resolution"] = self.resolution

    def preprocess(self, rgb: np.ndarray, xyz: np.ndarray | None) -> dict[str, np.ndarray]:
        """rgb uint8 H x W x 3, xyz float32 H x W x 3 metres -> {"rgb": float32 3 x R x R
        ImageNet-normalised, "xyz": float32 R x R x 3 metres} (``cfm_preprocess``)."""
        if xyz is None:
            raise DataError(None, "xyz: CFM needs a point cloud for every frame (got None)")
        return cfm_preprocess(rgb, xyz, **self._preprocessing)

    @contextlib.contextmanager
    def _stage(self, times: dict[str, float], name: str) -> Iterator[None]:
        """Time one model stage (synchronising CUDA) and autocast dense stages in fp16."""
        cuda = self.device.type == "cuda"
        autocast = (torch.autocast("cuda", dtype=torch.float16)
                    if cuda and self.precision == "fp16" and name in DENSE_STAGES
                    else contextlib.nullcontext())
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with autocast:
            yield
        if cuda:
            torch.cuda.synchronize(self.device)
        times[name] = times.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def _check(self, inputs: dict[str, np.ndarray], i: int) -> None:
        r = self.resolution
        for key, shape in (("rgb", (3, r, r)), ("xyz", (r, r, 3))):
            if key not in inputs:
                raise DataError(None, f"inputs[{i}]: missing {key!r} (the output of preprocess expected)")
            if tuple(inputs[key].shape) != shape:
                raise DataError(None, f"inputs[{i}][{key!r}]: shape {tuple(inputs[key].shape)}, "
                                      f"expected {shape}")

    def infer_batch(self, batch: list[dict[str, np.ndarray]]) -> list[Result]:
        """One Result per preprocessed frame, in order (score, R x R float32 map, timings)."""
        if not batch:
            return []
        for i, inputs in enumerate(batch):
            self._check(inputs, i)
        times: dict[str, float] = {}
        with torch.inference_mode():
            with self._stage(times, "h2d"):
                rgb = torch.from_numpy(np.stack([b["rgb"] for b in batch])).to(self.device, torch.float32)
                xyz = torch.from_numpy(np.stack([b["xyz"] for b in batch])).to(self.device, torch.float32)
            scores, maps = self.model(rgb, xyz, stage=lambda name: self._stage(times, name))
            with self._stage(times, "d2h"):
                scores = scores.float().cpu().numpy()
                maps = maps.float().cpu().numpy()
        share = {k: v / len(batch) for k, v in times.items()}
        return [Result(score=float(scores[i]), amap=maps[i], timings_ms=dict(share)) for i in range(len(batch))]

    def infer(self, inputs: dict[str, np.ndarray]) -> Result:
        """One preprocessed frame -> Result."""
        return self.infer_batch([inputs])[0]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> torch.device; BackendUnavailable if CUDA is absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} requested but torch sees no CUDA device "
                                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    if dev.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"device {device!r}: the torch backend runs on cpu or cuda")
    return dev


def load(bundle_dir: str | Path, device: str = "cpu", precision: str = "fp32",
         aggregation: str | None = None, smoothing: str | None = None, verify: bool = True,
         **options) -> TorchDetector:
    """Load a CFM bundle behind the torch backend.

    precision: "fp32", or "fp16" (CUDA only; see the module doc).
    aggregation / smoothing: override the bundle's scoring (ablations; weights unchanged).
    verify: check every bundle file's sha256 before loading (default).
    Unknown options are rejected so a typo is not silently ignored.
    """
    if options:
        raise TypeError(f"torch backend: unknown options {sorted(options)}; it takes precision, "
                        "aggregation, smoothing, verify")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise BackendUnavailable("precision 'fp16' needs a CUDA device (CPU half-precision matmuls are slow)")
    bundle = load_bundle(bundle_dir, verify=verify)
    model = build_model(bundle)
    model.set_scoring(aggregation=aggregation, smoothing=smoothing)
    return TorchDetector(model.to(dev), bundle.manifest, dev, precision)
