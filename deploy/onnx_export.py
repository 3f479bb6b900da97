"""Export CFM's dense parts to ONNX inside the bundle (``BUNDLE/engines/onnx/<sha12>-opset<N>/*.onnx``).

What is exported (``edge_runtime.backends.engine_keys.part_specs``): the ViT 2D
extractor (static ``1 x 3 x R x R``), the Point-MAE dense part (static
``1 x G x K x 3`` + ``1 x G x 3``) and the two mappers (dynamic pixel count ``N``).
Grouping (FPS, KNN), 3-NN interpolation, scatter and smoothing have data-dependent
shapes and stay in PyTorch (docs/methods.md, deployment).

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer). It needs no
extra package (the dynamo exporter needs ``onnxscript``), works on every torch 2.x this
project supports (deprecated upstream since 2.9: re-check when upgrading torch), folds
constants (Point-MAE's BatchNorm folding becomes constant weights) and at opset >= 17 emits
``LayerNormalization`` as one op, which TensorRT can keep in FP32 (a decomposed
LayerNorm overflows in FP16 inside ViTs; docs/methods.md, deployment). Opset < 17 is refused.

Every part is checked right after export: ``onnx.checker`` and, on the example input,
onnxruntime (CPU) against the torch module (maximum absolute difference recorded).
"""

from __future__ import annotations

import datetime as dt
import inspect
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from edge_runtime.backends.engine_keys import DYNAMIC, get_part, part_specs

MIN_OPSET = 17
ONNX_DIR = Path("engines") / "onnx"


def export_dir(weights_sha256: str, opset: int) -> Path:
    """Folder of one export, relative to the bundle: ``engines/onnx/<sha12>-opset<N>``.
    Files a manifest lists are never rewritten in place (the bundle's sha256 check would
    flag them), so each (weights, opset) pair gets its own folder."""
    return ONNX_DIR / f"{weights_sha256[:12]}-opset{opset}"


def example_inputs(spec: dict, n_pixels: int, seed: int = 0) -> list[torch.Tensor]:
    """Random float32 tensors of a part's input shapes (``DYNAMIC`` -> ``n_pixels``), scaled
    like real inputs: normalised images ~N(0, 1), neighbourhoods ~mm offsets, centres ~0.5 m,
    features ~N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = {"neighborhood": 2e-3, "centers": 0.05}
    offset = {"centers": 0.5}
    out = []
    for name, shape in spec["inputs"]:
        dims = [n_pixels if d == DYNAMIC else d for d in shape]
        out.append(torch.randn(*dims, generator=g) * scale.get(name, 1.0) + offset.get(name, 0.0))
    return out


def _export_part(module: torch.nn.Module, spec: dict, args: list[torch.Tensor], path: Path, opset: int) -> None:
    """Trace ``module`` on ``args`` and write ONNX to ``path`` (through a temp file)."""
    names = [n for n, _ in spec["inputs"]]
    out_name, out_shape = spec["output"]
    dynamic = {n: {i: DYNAMIC for i, d in enumerate(s) if d == DYNAMIC} for n, s in spec["inputs"]}
    dynamic[out_name] = {i: DYNAMIC for i, d in enumerate(out_shape) if d == DYNAMIC}
    dynamic = {k: v for k, v in dynamic.items() if v}
    tmp = path.with_name(f".{path.name}.tmp")
    # torch >= 2.5 has the dynamo exporter (the default from 2.9); ask for the tracer explicitly
    tracer = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated upstream and warns about shape asserts it traces
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args), str(tmp), **tracer, opset_version=opset,
                          input_names=names, output_names=[out_name], dynamic_axes=dynamic or None,
                          do_constant_folding=True)
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)


def _ort_max_diff(path: Path, spec: dict, args: list[torch.Tensor], expected: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) on ``args``; max |ORT - torch|."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: a.numpy() for (name, _), a in zip(spec["inputs"], args)}
    got = sess.run(None, feeds)[0]
    return float(np.max(np.abs(got - expected.numpy())))


def export_onnx(model: torch.nn.Module, method, cfg, bundle_dir: str | Path, weights_sha256: str,
                opset: int = MIN_OPSET) -> dict:
    """Export the dense parts (``method.dense_parts(cfg)``) of ``model`` into ``bundle_dir/engines/onnx``.

    Returns the manifest["engines"]["onnx"] entry: {"format", "opset", "precision",
    "parts": {path: {"file" (relative to the bundle), "inputs", "output", "batch_one",
    "ops" (op-type counts), "max_abs_diff_vs_torch"}}, "weights_sha256" (the weights the
    export was made from; a backend refuses a stale export), "exporter", "versions",
    "created", "parity": None (filled by the parity check)}.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: LayerNorm would be decomposed into primitive ops "
                         "that overflow in FP16 (TensorRT); use --opset 17 or newer")
    import onnxruntime

    bundle_dir = Path(bundle_dir)
    rel_dir = export_dir(weights_sha256, opset)
    (bundle_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    parts = {}
    with torch.inference_mode():
        for path, spec in part_specs(method, cfg).items():
            module = get_part(model, path)
            args = example_inputs(spec, n_pixels=max(2, int(spec["dynamic_max"]) // 2))
            rel = rel_dir / f"{spec['stem']}.onnx"
            _export_part(module, spec, args, bundle_dir / rel, opset)
            graph = onnx.load(str(bundle_dir / rel), load_external_data=False).graph
            ops = Counter(node.op_type for node in graph.node)
            parts[path] = {
                "file": rel.as_posix(),
                "inputs": {name: shape for name, shape in spec["inputs"]},
                "output": {spec["output"][0]: spec["output"][1]},
                "batch_one": spec["batch_one"],
                "ops": dict(sorted(ops.items())),
                "max_abs_diff_vs_torch": _ort_max_diff(bundle_dir / rel, spec, args, module(*args)),
            }
    return {
        "format": "onnx",
        "opset": opset,
        "precision": "fp32",
        "parts": parts,
        "weights_sha256": weights_sha256,
        "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parity": None,
    }
