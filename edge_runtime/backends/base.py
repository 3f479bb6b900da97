"""The Detector interface: how the runtime and ``edge-eval`` see a model.

A detector is split in two so the pipeline can run the halves in different processes:

* ``preprocess(rgb, xyz) -> dict[str, np.ndarray]`` — pure numpy on the host (the
  "depth preprocessing" stage). What it returns is what crosses the wire.
* ``infer(inputs) -> Result`` — the model (torch / onnxruntime / TensorRT).
  ``infer_batch(list_of_inputs) -> list[Result]`` may batch on a GPU.

Backends register a loader under a name; ``load_detector`` picks one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from edge_runtime.errors import BackendUnavailable


@dataclass
class Result:
    """One frame's model output.

    score: image anomaly score (higher = more anomalous; max of the map for CFM).
    amap: float32 R x R anomaly map at the model's working resolution.
    timings_ms: per-step milliseconds inside ``infer`` (e.g. "2d", "group", "3d",
        "align", "mappers", "score").
    """

    score: float
    amap: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Detector(Protocol):
    name: str  # backend name, e.g. "torch-cpu-fp32", "onnxruntime-cpu"
    manifest: dict  # the bundle manifest (thresholds, provenance...)

    def preprocess(self, rgb: np.ndarray, xyz: np.ndarray | None) -> dict[str, np.ndarray]: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> Result: ...

    def infer_batch(self, batch: list[dict[str, np.ndarray]]) -> list[Result]: ...


# name -> "module:function" taking (bundle_dir, device, **options) and returning a Detector.
# Modules are imported lazily so a missing optional dependency only matters when asked for.
BACKENDS: dict[str, str] = {
    "torch": "edge_runtime.backends.torch_backend:load",
    "onnxruntime": "edge_runtime.backends.onnx_backend:load",
    "tensorrt": "edge_runtime.backends.tensorrt_backend:load",
    "noop": "edge_runtime.backends.noop:load",
}


def _loader(name: str) -> Callable[..., Detector]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'") from None
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} is not available here: {exc}") from None


def load_detector(bundle_dir: str | Path, backend: str = "torch", device: str = "cpu", **options) -> Detector:
    """Load the bundle at ``bundle_dir`` behind the named backend.

    ``backend="auto"`` picks the fastest usable backend (``edge_runtime.backends.select``):
    with ``device="cpu"`` among the CPU backends, ``"cuda"`` among the GPU ones, ``"auto"``
    among all; the detector then carries ``.selection`` (what was chosen and why).
    """
    if backend == "auto":
        from edge_runtime.backends.select import load_auto

        return load_auto(Path(bundle_dir), device=device, **options)
    return _loader(backend)(Path(bundle_dir), device=device, **options)
