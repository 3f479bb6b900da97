"""The backend registry: which loader serves a backend name, and ``load_detector``.

    from edge_runtime.backends import load_detector
    det = load_detector(bundle, backend="torch" | "onnxruntime" | "tensorrt" | "noop" | "auto", device="cpu")

Loaders are "module:function" strings imported lazily, so a missing optional dependency
(onnxruntime, TensorRT) only matters when that backend is asked for. ``backend="auto"``
tries the candidates ``edge_runtime.backends.select`` ranks, fastest first, and attaches
``.selection`` (what was chosen and why) to the detector.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable

from edge_runtime.backends.detector import Detector
from edge_runtime.errors import BackendUnavailable, EdgeError

log = logging.getLogger("edge_runtime.backends")

# name -> "module:function" taking (bundle_dir, device, **options) and returning a Detector.
BACKENDS: dict[str, str] = {
    "torch": "edge_runtime.backends.torch_backend:load",
    "onnxruntime": "edge_runtime.backends.onnx_backend:load",
    "tensorrt": "edge_runtime.backends.tensorrt_backend:load",
    "noop": "edge_runtime.backends.noop:load",
}
CHOICES = (*BACKENDS, "auto")  # what --backend accepts in every command


def loader(name: str) -> Callable[..., Detector]:
    """The load function of backend ``name``; BackendUnavailable when unknown or not importable."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'") from None
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} is not available here: {exc}") from None


def load_auto(bundle_dir: Path, device: str | None = "auto", **options) -> Detector:
    """The fastest usable backend for ``bundle_dir`` (``select.candidates``); the detector
    carries ``.selection``."""
    from edge_runtime.backends.select import PREFERENCE, Selection, candidates

    usable, rejected = candidates(bundle_dir, device)
    last_error: EdgeError | None = None
    for cand in usable:
        try:
            det = loader(cand.backend)(bundle_dir, device=cand.device, **{**cand.options, **options})
        except BackendUnavailable as exc:
            rejected.append((cand.label, f"failed to load: {exc}"))
            last_error = exc
            continue
        det.selection = Selection(cand, "first usable in the order " + PREFERENCE, rejected)
        log.info(det.selection.explain())
        return det
    raise BackendUnavailable("no usable backend: " + "; ".join(f"{label}: {why}" for label, why in rejected)) \
        from last_error


def load_detector(bundle_dir: str | Path, backend: str = "torch", device: str = "cpu", **options) -> Detector:
    """Load the bundle at ``bundle_dir`` behind the named backend.

    ``backend="auto"`` picks the fastest usable backend: with ``device="cpu"`` among the
    CPU backends, ``"cuda"`` among the GPU ones, ``"auto"`` among all.
    """
    if backend == "auto":
        return load_auto(Path(bundle_dir), device=device, **options)
    return loader(backend)(Path(bundle_dir), device=device, **options)
