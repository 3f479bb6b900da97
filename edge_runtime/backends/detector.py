"""The Detector interface: how the runtime and ``edge-eval`` see a model.

A detector is split in two so the pipeline can run the halves in different processes:

* ``preprocess(rgb, xyz) -> dict[str, np.ndarray]`` — pure numpy on the host (the
  "depth preprocessing" stage). What it returns is what crosses the wire.
* ``infer(inputs) -> Result`` — the model (torch / onnxruntime / TensorRT).
  ``infer_batch(list_of_inputs) -> list[Result]`` may batch on a GPU.

Backends register a loader under a name in ``edge_runtime.backends.registry``;
``load_detector`` there picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np



@dataclass
class Result:
    """One frame's model output.

    score: image anomaly score (higher = more anomalous).
    amap: float32 h x w anomaly map on the method's map grid (``Method.geometry``).
    timings_ms: per-step milliseconds inside ``infer`` (the method's stage names).
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
