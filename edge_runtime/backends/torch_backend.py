"""The PyTorch backend: any method's bundle run by torch on CPU or CUDA.

``load(bundle_dir, device="cpu", precision="fp32", verify=True, **scoring_options)``
returns a :class:`TorchDetector`:

* ``preprocess(rgb, xyz)`` runs the method's preprocessor (``Method.preprocessor``) with
  the bundle's preprocessing parameters (numpy, host CPU).
* ``infer`` / ``infer_batch`` run the model under ``torch.inference_mode``;
  ``Result.timings_ms`` holds the milliseconds of each of the model's named stages plus
  "h2d" (host -> device copy) and "d2h" (map back to host). On CUDA every stage boundary
  synchronises the device so the numbers are the stage's own. For a batch, each Result
  carries the batch's stage times divided by the batch size (the per-frame share).
* ``precision="fp16"`` (CUDA only) runs the method's dense stages (``Method.fp16_stages``)
  under ``torch.autocast(float16)``; the rest stays float32.
* scoring options (e.g. an aggregation rule) are validated and applied by the method.
* on CPU the model's 4-D weights are stored channels-last (``CPU_MEMORY_FORMAT``): the
  same results, and about a quarter less time in EfficientNet-Lite0's convolutions on one
  core (docs/benchmarks.md).
* ``fuse=True`` (default): every submodule that offers ``fuse_for_inference()`` (a frozen
  extractor folding its batch-norms into its convolutions) is fused after loading; the
  outputs agree to float rounding. ``fuse=False`` runs the modules as built.
* on CPU the process keeps freed heap memory (``edge_runtime.hostmem``), so a frame's
  large activations do not page-fault afresh on every frame.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_runtime.backends.detector import Result
from edge_runtime.bundle import build_model, load_bundle, method_of
from edge_runtime.errors import BackendUnavailable
from edge_runtime.hostmem import retain_freed_memory

PRECISIONS = ("fp32", "fp16")
CPU_MEMORY_FORMAT = torch.channels_last  # oneDNN's fast layout for convolutions on CPU


class TorchDetector:
    """Detector interface (``edge_runtime.backends.detector.Detector``) over a method's model."""

    def __init__(self, model, manifest: dict, device: torch.device, precision: str):
        self.model = model
        self.manifest = manifest
        self.device = device
        self.precision = precision
        self.name = f"torch-{device.type}-{precision}"
        self.method = method_of(manifest)
        self.cfg = self.method.config_from_dict(manifest["config"])
        self._preprocess = self.method.preprocessor(manifest)

    def preprocess(self, rgb: np.ndarray, xyz: np.ndarray | None) -> dict[str, np.ndarray]:
        """One camera frame -> the model's inputs (the method's preprocessor)."""
        return self._preprocess(rgb, xyz)

    @contextlib.contextmanager
    def _stage(self, times: dict[str, float], name: str) -> Iterator[None]:
        """Time one model stage (synchronising CUDA) and autocast dense stages in fp16."""
        cuda = self.device.type == "cuda"
        autocast = (torch.autocast("cuda", dtype=torch.float16)
                    if cuda and self.precision == "fp16" and name in self.method.fp16_stages
                    else contextlib.nullcontext())
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with autocast:
            yield
        if cuda:
            torch.cuda.synchronize(self.device)
        times[name] = times.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def infer_batch(self, batch: list[dict[str, np.ndarray]]) -> list[Result]:
        """One Result per preprocessed frame, in order (score, float32 map, timings)."""
        if not batch:
            return []
        for i, inputs in enumerate(batch):
            self.method.check_inputs(self.cfg, inputs, i)
        times: dict[str, float] = {}
        with torch.inference_mode():
            with self._stage(times, "h2d"):
                tensors = {k: torch.from_numpy(np.stack([b[k] for b in batch])).to(self.device)
                           for k in self.method.input_shapes(self.cfg)}
                tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
            scores, maps = self.method.run(self.model, tensors, lambda name: self._stage(times, name))
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


def fuse_for_inference(model: torch.nn.Module) -> int:
    """Call ``fuse_for_inference()`` on every submodule that offers it; the number fused."""
    fusable = [m for m in model.modules() if callable(getattr(m, "fuse_for_inference", None))]
    for m in fusable:
        m.fuse_for_inference()
    return len(fusable)


def load(bundle_dir: str | Path, device: str = "cpu", precision: str = "fp32", verify: bool = True,
         fuse: bool = True, **options) -> TorchDetector:
    """Load a bundle behind the torch backend.

    precision: "fp32", or "fp16" (CUDA only; see the module doc).
    verify: check every bundle file's sha256 before loading (default).
    fuse: fold frozen extractors' batch-norms into their convolutions (see the module doc).
    options: the method's scoring options (``Method.scoring_options``), validated by the
    method, so a typo is an error rather than silently ignored. None values are dropped.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise BackendUnavailable("precision 'fp16' needs a CUDA device (CPU half-precision matmuls are slow)")
    bundle = load_bundle(bundle_dir, verify=verify)
    model = build_model(bundle)
    method = method_of(bundle.manifest)
    method.apply_options(model, method.check_options({k: v for k, v in options.items() if v is not None}))
    if fuse:
        fuse_for_inference(model)
    model = model.to(dev)
    if dev.type == "cpu":
        retain_freed_memory()
        model = model.to(memory_format=CPU_MEMORY_FORMAT)
    return TorchDetector(model, bundle.manifest, dev, precision)
