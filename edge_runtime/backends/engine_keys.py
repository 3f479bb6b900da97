"""What becomes an engine, and the cache keys of compiled engines stored in a bundle.

Dense parts. A method's forward composes tensor-in/tensor-out modules that hold the
weights (``Method.dense_parts``) with torch code that has data-dependent shapes. Only the
dense parts are exported (ONNX) and compiled (TensorRT); ``part_specs(method, cfg)`` gives
their input/output names and shapes (static batch-1 for fixed cameras, ``DYNAMIC`` for
sizes such as a valid-pixel count). ``get_part`` / ``set_part`` reach them by dotted
attribute path, so a backend swaps a part for an engine-backed module and reuses the
model's own scoring code unchanged.

A TensorRT engine is only valid on the GPU model (compute capability) and TensorRT
version it was built with, at the precision and input shapes it was built for. Each
built engine is recorded in ``manifest["engines"]`` under ``"tensorrt/<key>"`` with the
fields below; ``find_engine`` looks up the entry matching the running machine and, when
none matches, explains why each cached entry does not apply (e.g. "built on NVIDIA
GeForce RTX 4090 (sm 8.9) but this GPU is NVIDIA A100 (sm 8.0)"), so a bundle moved to
another GPU or TensorRT version is rebuilt with a clear message instead of failing
inside the TensorRT runtime.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

ENGINE_PREFIX = "tensorrt/"
DYNAMIC = "N"  # a dynamic dimension (edge_runtime.methods.base.DYNAMIC)


def part_specs(method, cfg) -> dict[str, dict]:
    """The dense parts of ``method``'s model for config ``cfg``, by dotted path:
    {path: {"stem", "inputs": [(name, shape)], "output": (name, shape), "outputs": [...],
    "batch_one": bool, "dynamic_max": int}}."""
    return {p.path: {"stem": p.stem, "inputs": list(p.inputs), "output": p.output, "outputs": p.all_outputs(),
                     "batch_one": p.batch_one, "dynamic_max": p.dynamic_max}
            for p in method.dense_parts(cfg)}


def get_part(model, path: str):
    """The submodule at dotted ``path`` (e.g. "backbone_3d.dense") of ``model``."""
    for name in path.split("."):
        model = getattr(model, name)
    return model


def set_part(model, path: str, module) -> None:
    """Replace the submodule at dotted ``path`` of ``model`` by ``module``."""
    *parents, last = path.split(".")
    for name in parents:
        model = getattr(model, name)
    setattr(model, last, module)


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is built for.

    gpu_name: e.g. "NVIDIA GeForce RTX 4090" (torch.cuda.get_device_name).
    compute_capability: "major.minor", e.g. "8.9".
    tensorrt_version: tensorrt.__version__, e.g. "10.3.0".
    precision: "fp16" or "fp32".
    input_shapes: part name -> input name -> shape; a dynamic dimension is written as
        [min, opt, max] (the optimisation profile), a static one as an int.
    """

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    input_shapes: dict

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict (stored in the manifest entry)."""
        return asdict(self)


def shapes_digest(input_shapes: dict) -> str:
    """First 10 hex digits of sha256 over the canonical JSON of ``input_shapes``."""
    blob = json.dumps(input_shapes, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def engine_key(gpu_name: str, compute_capability: str, tensorrt_version: str, precision: str,
               input_shapes: dict) -> str:
    """Stable, filesystem-safe key, e.g.
    "nvidia-geforce-rtx-4090_sm89_trt10.3.0_fp16_3f2a9c01de" (last part: shapes_digest)."""
    cc = compute_capability.replace(".", "")
    trt = re.sub(r"[^0-9A-Za-z.]+", "-", tensorrt_version)
    return f"{_slug(gpu_name)}_sm{cc}_trt{trt}_{precision}_{shapes_digest(input_shapes)}"


def target_key(target: EngineTarget) -> str:
    """``engine_key`` of an EngineTarget."""
    return engine_key(target.gpu_name, target.compute_capability, target.tensorrt_version,
                      target.precision, target.input_shapes)


def mismatch_reasons(entry: dict, target: EngineTarget) -> list[str]:
    """Why the cached engine ``entry`` (a manifest["engines"] value) cannot serve
    ``target``; empty when it can. Each reason is one plain sentence."""
    reasons = []
    if entry.get("gpu_name") != target.gpu_name or entry.get("compute_capability") != target.compute_capability:
        reasons.append(f"built on {entry.get('gpu_name')} (sm {entry.get('compute_capability')}) but this GPU is "
                       f"{target.gpu_name} (sm {target.compute_capability})")
    if entry.get("tensorrt_version") != target.tensorrt_version:
        reasons.append(f"built with TensorRT {entry.get('tensorrt_version')} but TensorRT "
                       f"{target.tensorrt_version} is installed (engines are not portable across versions)")
    if entry.get("precision") != target.precision:
        reasons.append(f"built for {entry.get('precision')}, {target.precision} asked")
    if entry.get("input_shapes") != target.input_shapes:
        reasons.append(f"built for input shapes {entry.get('input_shapes')}, this model needs {target.input_shapes}")
    return reasons


def find_engine(engines: dict, target: EngineTarget) -> tuple[dict | None, list[str]]:
    """Look up the TensorRT entry in ``engines`` (manifest["engines"]) that serves ``target``.

    Returns (entry, []) when one matches, else (None, reasons) with one line per cached
    TensorRT entry explaining the mismatch ("no TensorRT engine cached" when there is none).
    An entry whose stored key disagrees with its own fields counts as a mismatch too.
    """
    reasons = []
    for name, entry in sorted(engines.items()):
        if not name.startswith(ENGINE_PREFIX):
            continue
        why = mismatch_reasons(entry, target)
        if not why and name != ENGINE_PREFIX + target_key(target):
            why = [f"entry name {name!r} does not match its fields (expected {ENGINE_PREFIX + target_key(target)!r})"]
        if not why:
            return entry, []
        reasons.append(f"{name}: " + "; ".join(why))
    return None, reasons or ["no TensorRT engine cached in this bundle"]
