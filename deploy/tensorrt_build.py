"""Build TensorRT engines from the bundle's ONNX export (TensorRT 10 Python API).

For each dense part (``engine_keys.part_specs``): parse the ONNX file into a network
(``trt.Builder`` -> ``create_network`` -> ``trt.OnnxParser``), configure
(``BuilderConfig``: workspace pool limit; ``BuilderFlag.FP16`` for fp16 with
``OBEY_PRECISION_CONSTRAINTS`` and LayerNorm / Softmax layers pinned to FP32, since
ViT LayerNorm overflows in FP16 — docs/methods.md, deployment; an optimisation profile for
the mappers' dynamic pixel count), ``build_serialized_network``, and write the plan to
``engines/tensorrt/<key>/<weights sha12>/<stem>.plan``. The key (``engine_keys.engine_key``) names the
GPU, compute capability, TensorRT version, precision and input shapes.

Needs ``tensorrt`` (10.x) and a CUDA GPU; written against the documented API and not
executed in this repository's CI (no GPU there).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from edge_runtime.backends.engine_keys import ENGINE_PREFIX, EngineTarget, part_specs, target_key
from edge_runtime.backends.tensorrt_backend import import_tensorrt

ENGINE_DIR = Path("engines") / "tensorrt"
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")  # kept in FP32 inside FP16 engines
WORKSPACE_BYTES = 4 << 30


def build_engine(onnx_path: Path, input_shapes: dict, precision: str, workspace_bytes: int = WORKSPACE_BYTES
                 ) -> tuple[bytes, int]:
    """Serialized engine (plan bytes) for one ONNX file, and how many layers were pinned
    to FP32. input_shapes: input name -> shape, a dynamic dim as [min, opt, max]."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    pinned = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
    dynamic = {name: shape for name, shape in input_shapes.items() if any(isinstance(d, list) for d in shape)}
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, shape in dynamic.items():
            lo, opt, hi = ([d[i] if isinstance(d, list) else d for d in shape] for i in range(3))
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(plan), pinned


def build_engines(bundle_dir: str | Path, onnx_entry: dict, method, cfg, target: EngineTarget) -> tuple[str, dict]:
    """Build every dense part's engine for ``target`` from the ONNX export described by
    ``onnx_entry``; returns (manifest["engines"] name "tensorrt/<key>", its entry).

    The entry holds the target's fields (GPU name, compute capability, TensorRT version,
    precision, input shapes), "key", "parts" {path: {"file", "bytes", "fp32_layers"}},
    "weights_sha256" (from the ONNX export), "onnx_opset", "created" and "parity": None.
    """
    bundle_dir = Path(bundle_dir)
    key = target_key(target)
    # one folder per (key, weights): files a manifest lists are never rewritten in place
    rel_dir = ENGINE_DIR / key / onnx_entry["weights_sha256"][:12]
    (bundle_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    parts = {}
    for path, spec in part_specs(method, cfg).items():
        plan, pinned = build_engine(bundle_dir / onnx_entry["parts"][path]["file"],
                                    target.input_shapes[spec["stem"]], target.precision)
        rel = rel_dir / f"{spec['stem']}.plan"
        tmp = bundle_dir / rel.with_name(f".{rel.name}.tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, bundle_dir / rel)
        parts[path] = {"file": rel.as_posix(), "bytes": len(plan), "fp32_layers": pinned}
    entry = {
        "format": "tensorrt",
        "key": key,
        **target.as_dict(),
        "parts": parts,
        "weights_sha256": onnx_entry["weights_sha256"],
        "onnx_opset": onnx_entry["opset"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parity": None,
    }
    return ENGINE_PREFIX + key, entry
