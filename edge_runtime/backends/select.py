"""``--backend auto``: pick the fastest backend that is available for a bundle, and say why.

Preference order (fastest first; see docs/deploy.md and the deploy section of docs/benchmarks.md):

1. ``tensorrt`` FP16 — TensorRT importable, a CUDA GPU, and an engine in the bundle built
   for this GPU + TensorRT version (``engine_keys``) that passed parity;
2. ``torch`` CUDA FP16 — a CUDA GPU (and, when the bundle records a torch-cuda-fp16
   parity check, it passed);
3. ``onnxruntime`` CUDA — onnxruntime with CUDAExecutionProvider and a current ONNX
   export that passed parity;
4. ``onnxruntime`` CPU — a current ONNX export that passed parity;
5. ``torch`` CPU FP32 — always.

``device`` narrows the choice: "cpu" considers only CPU backends, "cuda" only GPU ones,
"auto" (or None) all. Each candidate is checked cheaply (imports, manifest), then loaded;
a candidate that fails to load falls through to the next one with the reason recorded.
The chosen detector carries the :class:`Selection` as ``detector.selection``, and the
choice and reasons are logged (logger ``edge_runtime.backends.select``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_runtime.errors import EdgeError

log = logging.getLogger(__name__)
PREFERENCE = "tensorrt fp16 > torch cuda fp16 > onnxruntime cuda > onnxruntime cpu > torch cpu"


@dataclass
class Candidate:
    """One backend configuration: loader name, device and options (e.g. precision)."""

    backend: str
    device: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """e.g. "onnxruntime cpu fp32"."""
        precision = self.options.get("precision", "fp32")
        return f"{self.backend} {self.device} {precision}"


@dataclass
class Selection:
    """The outcome: the chosen candidate, why it was chosen, and why each better one was not."""

    chosen: Candidate
    reason: str
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (candidate label, why not)

    def explain(self) -> str:
        """One line per decision, e.g. for a CLI banner."""
        lines = [f"backend auto -> {self.chosen.label}: {self.reason}"]
        lines += [f"  not {label}: {why}" for label, why in self.rejected]
        return "\n".join(lines)


def _manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest, or {} when unreadable (the chosen loader then reports it)."""
    from edge_runtime.bundle import read_manifest

    try:
        return read_manifest(bundle_dir)
    except EdgeError:
        return {}  # the chosen loader reports the bundle problem properly


def _parity_ok(entry: dict | None) -> tuple[bool, str]:
    """(passed, why not) for an engine entry's recorded parity {candidate: {"passed"}}."""
    if not entry:
        return False, "not exported"
    parity = entry.get("parity")
    if not parity:
        return False, "no parity check recorded (run edge-deploy)"
    failed = [name for name, p in parity.items() if not p.get("passed")]
    if failed:
        return False, f"parity check failed for {', '.join(failed)}"
    return True, ""


def _onnx_status(manifest: dict, provider_device: str) -> str | None:
    """None when an ONNX export usable on ``provider_device`` exists, else why not."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    entry = (manifest.get("engines") or {}).get("onnx")
    if not entry:
        return "the bundle has no ONNX export (edge-deploy --target onnx)"
    from edge_runtime.bundle import export_is_current

    if not export_is_current(manifest, entry):
        return "the ONNX export is stale (made from other weights)"
    ok, why = _parity_ok(entry)
    if not ok:
        return why
    parity = entry["parity"]
    if provider_device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider"
        if "onnxruntime-cuda" not in parity:
            return "ONNX Runtime CUDA was never parity-checked (edge-deploy --target onnx --device cuda)"
    elif "onnxruntime-cpu" not in parity:
        return "ONNX Runtime CPU was never parity-checked"
    return None


def _tensorrt_status(manifest: dict) -> str | None:
    """None when a parity-checked engine for this GPU + TensorRT exists, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    from edge_runtime.backends.engine_keys import find_engine
    from edge_runtime.backends.tensorrt_backend import current_target, import_tensorrt
    from edge_runtime.bundle import method_of

    trt = import_tensorrt()
    try:
        method = method_of(manifest)
        cfg = method.config_from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError):
        return "the bundle has no valid model config"
    target = current_target(method, cfg, "fp16", torch.device("cuda"), trt.__version__)
    entry, reasons = find_engine(manifest.get("engines") or {}, target)
    if entry is None:
        return "no engine for this GPU/TensorRT: " + " | ".join(reasons)
    ok, why = _parity_ok(entry)
    return None if ok else why


def candidates(bundle_dir: Path, device: str | None) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Usable candidates, fastest first, and the (label, reason) of each one ruled out."""
    manifest = _manifest(bundle_dir)
    want_gpu = device in (None, "auto") or str(device).startswith("cuda")
    want_cpu = device in (None, "auto", "cpu")
    gpu = str(device) if str(device).startswith("cuda") else "cuda"
    cuda = torch.cuda.is_available()
    ordered = [
        (Candidate("tensorrt", gpu, {"precision": "fp16"}), want_gpu),
        (Candidate("torch", gpu, {"precision": "fp16"}), want_gpu),
        (Candidate("onnxruntime", gpu), want_gpu),
        (Candidate("onnxruntime", "cpu"), want_cpu),
        (Candidate("torch", "cpu"), want_cpu),
    ]
    usable, rejected = [], []
    for cand, wanted in ordered:
        if not wanted:
            rejected.append((cand.label, f"device {device!r} excludes it"))
            continue
        if cand.device.startswith("cuda") and cand.backend != "onnxruntime" and not cuda:
            rejected.append((cand.label, "no CUDA GPU visible to torch"))
            continue
        why = None
        if cand.backend == "tensorrt":
            why = _tensorrt_status(manifest)
        elif cand.backend == "onnxruntime":
            why = _onnx_status(manifest, "cuda" if cand.device.startswith("cuda") else "cpu")
        elif cand.options.get("precision") == "fp16":
            # torch FP16 needs no export; only a recorded failed parity check rules it out
            recorded = (manifest.get("engines") or {}).get("torch-cuda-fp16")
            if recorded and recorded.get("parity"):
                ok, reason = _parity_ok(recorded)
                why = None if ok else reason
        if why:
            rejected.append((cand.label, why))
        else:
            usable.append(cand)
    return usable, rejected
