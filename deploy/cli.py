"""``edge-deploy``: export a bundle's dense parts (ONNX), build TensorRT engines, check parity.

    edge-deploy --model BUNDLE --target onnx|tensorrt [--precision fp32|fp16]
                [--device cuda[:N]] [--opset 17] [--check-frames N] [--json FILE|-]

--target onnx: exports the method's dense parts (``Method.dense_parts``: for CFM the ViT,
the Point-MAE dense part and both mappers) to ``BUNDLE/engines/onnx/*.onnx`` (``deploy.onnx_export``), records them in
manifest["engines"]["onnx"] and checks onnxruntime (CPU; CUDA too when this onnxruntime
has the CUDA execution provider) against PyTorch FP32.

--target tensorrt: needs TensorRT and a CUDA GPU; says exactly which is missing and
exits 2 otherwise. Makes (or reuses) the ONNX export, then reuses the engine cached for
this GPU + TensorRT version + precision + shapes, or builds it (saying why a cached
engine does not apply), stores it under manifest["engines"]["tensorrt/<key>"] and checks
it against PyTorch FP32.

Parity (``deploy.parity``) runs on ``--check-frames`` fresh random frames and as many
synthetic-station frames; results go into the engine entry's "parity" and are printed.
Whenever a CUDA GPU is visible, torch CUDA FP16 is checked as well and recorded under
manifest["engines"]["torch-cuda-fp16"].

Exit status: 0 exported and parity passed; 2 refused (missing TensorRT / GPU, bad
arguments, bad bundle); 3 exported but parity failed (the entry records the failure
and ``--backend auto`` will not pick it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deploy.onnx_export import MIN_OPSET, export_onnx
from deploy.parity import format_parity, random_frames, run_parity
from edge_runtime.backends import onnx_backend, tensorrt_backend, torch_backend
from edge_runtime.backends.engine_keys import find_engine
from edge_runtime.bundle import (
    WEIGHTS,
    build_model,
    export_is_current,
    load_bundle,
    method_of,
    read_manifest,
    update_manifest,
)
from edge_runtime.data.synth import CATEGORIES, DEFECT_TYPES, SynthStation
from edge_runtime.errors import EdgeError
from edge_runtime.outputs import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, add_json_flag, write_json
from edge_runtime.pipeline.store import resolve_model

EXIT_REFUSED = EXIT_USAGE
EXIT_PARITY = 3  # the export was made but failed its parity check (recorded in the bundle)
Log = Callable[[str], None]


class MissingRequirement(EdgeError):
    """TensorRT and/or a CUDA GPU are missing; ``missing`` lists each as a sentence."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def frame_size(manifest: dict) -> int:
    """Side of the parity-check frames: the model's input resolution when it has one."""
    return int((manifest.get("config") or {}).get("resolution") or 224)


def check_frames(n: int, resolution: int, seed: int = 0) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The parity check sets: ``n`` random frames and ``n`` synthetic-station frames
    (R x R px; the odd ones defective, cycling over the station's categories and defect types)."""
    station = SynthStation(resolution, seed=seed)
    synth = []
    for i in range(n):
        defect = DEFECT_TYPES[(i // 2) % len(DEFECT_TYPES)] if i % 2 else None
        sample = station.render(CATEGORIES[i % len(CATEGORIES)], i, "test", defect)
        synth.append((sample.rgb, sample.xyz))
    return {"random": random_frames(n, resolution, seed), "synthetic": synth}


def parity_block(reference, candidate, frames: dict, precision: str, thresholds: dict | None,
                 log: Log = print) -> dict:
    """Parity of ``candidate`` vs ``reference`` on each frame set, logged; {"sets": {...},
    "passed": all sets passed, "reference", "candidate", "checked" (UTC time)}."""
    sets = {}
    for name, fr in frames.items():
        sets[name] = run_parity(reference, candidate, fr, precision=precision, thresholds=thresholds)
        log(format_parity(f"  parity {candidate.name} vs {reference.name} [{name}]", sets[name]))
    return {"reference": reference.name, "candidate": candidate.name, "sets": sets,
            "passed": all(s["passed"] for s in sets.values()),
            "checked": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _onnx_fresh(manifest: dict) -> bool:
    """True when the bundle's ONNX export was made from its current weights."""
    return export_is_current(manifest, (manifest.get("engines") or {}).get("onnx"))


def _method_cfg(manifest: dict):
    method = method_of(manifest)
    return method, method.config_from_dict(manifest["config"])


def deploy_onnx(bundle_dir: Path, opset: int, log: Log = print) -> dict:
    """Export and record the ONNX parts; returns manifest["engines"]["onnx"]. An export from
    the current weights at the same opset is reused (its files are sha256-checked on load)."""
    bundle = load_bundle(bundle_dir)
    current = (bundle.manifest.get("engines") or {}).get("onnx")
    if _onnx_fresh(bundle.manifest) and current.get("opset") == opset:
        log(f"ONNX export of these weights at opset {opset} exists: reusing it (parity re-checked)")
        return current
    method, cfg = _method_cfg(bundle.manifest)
    entry = export_onnx(build_model(bundle), method, cfg, bundle_dir, bundle.manifest["files"][WEIGHTS]["sha256"],
                        opset)
    engines = dict(bundle.manifest.get("engines") or {})
    engines["onnx"] = entry
    update_manifest(bundle_dir, files=[p["file"] for p in entry["parts"].values()], engines=engines)
    log(f"exported {len(entry['parts'])} dense parts (opset {opset}); "
        "the data-dependent steps and the scoring stay in PyTorch")
    for path, part in entry["parts"].items():
        log(f"  {path:18s} -> {part['file']}  inputs {part['inputs']}  "
            f"LayerNormalization ops {part['ops'].get('LayerNormalization', 0)}  "
            f"max|ORT-torch| {part['max_abs_diff_vs_torch']:.2e}")
    return entry


def _record_parity(bundle_dir: Path, name: str, parity: dict) -> None:
    """Store ``parity`` ({candidate: block}) in manifest["engines"][name]["parity"]."""
    engines = dict(read_manifest(bundle_dir).get("engines") or {})
    engines[name] = {**engines.get(name, {}), "parity": parity}
    update_manifest(bundle_dir, engines=engines)


def _gpu_parity(bundle_dir: Path, reference, frames: dict, thresholds, log: Log) -> dict:
    """torch CUDA FP16 vs torch CPU FP32, when a GPU is visible; recorded in the manifest."""
    if not torch.cuda.is_available():
        log("  torch CUDA FP16 parity: not run (no CUDA GPU visible)")
        return {}
    cand = torch_backend.load(bundle_dir, device="cuda", precision="fp16")
    parity = {cand.name: parity_block(reference, cand, frames, "fp16", thresholds, log)}
    engines = dict(read_manifest(bundle_dir).get("engines") or {})
    engines["torch-cuda-fp16"] = {"format": "torch", "precision": "fp16", "parity": parity}
    update_manifest(bundle_dir, engines=engines)
    return parity


def run_onnx(args, bundle_dir: Path, log: Log) -> tuple[int, dict]:
    """--target onnx: export, record, parity (see the module doc); (exit code, JSON result)."""
    if args.precision not in (None, "fp32"):
        raise ValueError("ONNX export is fp32 (FP16 is TensorRT's job: --target tensorrt)")
    entry = deploy_onnx(bundle_dir, args.opset, log)
    manifest = read_manifest(bundle_dir)
    reference = torch_backend.load(bundle_dir, device="cpu")
    frames = check_frames(args.check_frames, frame_size(manifest))
    parity = {}
    for device in ("cpu", "cuda"):  # ONNX Runtime CUDA whenever this onnxruntime has it
        try:
            cand = onnx_backend.load(bundle_dir, device=device)
        except EdgeError as exc:
            log(f"  onnxruntime-{device} parity: not run ({exc})")
            continue
        parity[cand.name] = parity_block(reference, cand, frames, "fp32", manifest.get("thresholds"), log)
    _record_parity(bundle_dir, "onnx", parity)
    parity.update(_gpu_parity(bundle_dir, reference, frames, manifest.get("thresholds"), log))
    passed = all(p["passed"] for p in parity.values())
    return (EXIT_OK if passed else EXIT_PARITY), {"target": "onnx", "engine": "onnx", "entry": entry,
                                                  "parity": parity, "passed": passed}


def run_tensorrt(args, bundle_dir: Path, log: Log) -> tuple[int, dict]:
    """--target tensorrt: check TensorRT + GPU, export ONNX if needed, reuse or build the
    engine for this machine, parity (see the module doc); (exit code, JSON result)."""
    from deploy.tensorrt_build import build_engines

    precision = args.precision or "fp16"
    if not args.device.startswith("cuda"):
        raise ValueError(f"--device {args.device}: TensorRT engines run on a CUDA device (cuda or cuda:N)")
    missing = []
    try:
        trt = tensorrt_backend.import_tensorrt()
    except EdgeError as exc:
        trt = None
        missing.append(str(exc))
    problem = tensorrt_backend.cuda_problem()
    if problem:
        missing.append(f"no CUDA GPU: {problem}")
    if missing:
        raise MissingRequirement("cannot build TensorRT engines here: " + "; ".join(missing), missing)
    if not _onnx_fresh(read_manifest(bundle_dir)):
        log("no ONNX export from the current weights: exporting first")
        deploy_onnx(bundle_dir, args.opset, log)
    manifest = read_manifest(bundle_dir)
    method, cfg = _method_cfg(manifest)
    device = torch.device(args.device)
    target = tensorrt_backend.current_target(method, cfg, precision, device, trt.__version__)
    engines = dict(manifest.get("engines") or {})
    cached, reasons = find_engine(engines, target)
    if cached and export_is_current(manifest, cached):
        name, entry = "tensorrt/" + cached["key"], cached
        log(f"reusing the TensorRT engine cached for this machine: {name}")
    else:
        why = reasons if cached is None else ["cached engine was built from other weights"]
        log(f"building TensorRT {precision} engines for {target.gpu_name} (sm {target.compute_capability}, "
              f"TensorRT {target.tensorrt_version}); cached engines do not apply: " + " | ".join(why))
        name, entry = build_engines(bundle_dir, engines["onnx"], method, cfg, target)
        engines[name] = entry
        update_manifest(bundle_dir, files=[p["file"] for p in entry["parts"].values()], engines=engines)
        log(f"  built {name}: " + ", ".join(f"{p} {e['bytes'] / 1e6:.1f} MB ({e['fp32_layers']} layers kept FP32)"
                                            for p, e in entry["parts"].items()))
    reference = torch_backend.load(bundle_dir, device="cpu")
    frames = check_frames(args.check_frames, frame_size(manifest))
    cand = tensorrt_backend.load(bundle_dir, device=str(device), precision=precision)
    parity = {cand.name: parity_block(reference, cand, frames, precision, manifest.get("thresholds"), log)}
    _record_parity(bundle_dir, name, parity)
    parity.update(_gpu_parity(bundle_dir, reference, frames, manifest.get("thresholds"), log))
    passed = all(p["passed"] for p in parity.values())
    return (EXIT_OK if passed else EXIT_PARITY), {"target": "tensorrt", "engine": name,
                                                  "entry": read_manifest(bundle_dir)["engines"][name],
                                                  "parity": parity, "passed": passed}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``edge-deploy``."""
    p = argparse.ArgumentParser(prog="edge-deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="bundle directory or model-store name")
    p.add_argument("--target", required=True, choices=["onnx", "tensorrt"],
                   help="onnx: portable export + parity; tensorrt: FP16/FP32 engines for this GPU + parity")
    p.add_argument("--precision", choices=["fp32", "fp16"], help="onnx: fp32 only; tensorrt: default fp16")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N]; tensorrt: the CUDA device to build for (default cuda); onnx: ignored "
                        "(parity on cpu always, cuda too whenever available)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default)")
    p.add_argument("--check-frames", type=int, default=8,
                   help="frames per parity set (random and synthetic; default 8)")
    add_json_flag(p, "the deployment result")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edge-deploy``; returns the exit status (0 ok, 2 refused, 3 parity failed)."""
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if args.target == "tensorrt" else "cpu")
    # with --json - stdout carries the JSON alone; human lines go to stderr
    stream = sys.stderr if args.json == "-" else sys.stdout
    log: Log = functools.partial(print, file=stream, flush=True)
    out: dict = {"target": args.target}
    try:
        if args.check_frames < 2:
            raise ValueError("--check-frames must be >= 2 (rank agreement needs two frames)")
        args.model = resolve_model(args.model, build=False)
        read_manifest(args.model)
        code, result = (run_onnx if args.target == "onnx" else run_tensorrt)(args, args.model, log)
        out.update(result)
        log("parity: " + ("passed" if out["passed"] else "FAILED: the engine is recorded as failing parity"))
    except MissingRequirement as exc:
        print(f"edge-deploy: refused: {exc}", file=sys.stderr)
        code, out["missing"] = EXIT_REFUSED, exc.missing
    except (EdgeError, ValueError) as exc:
        print(f"edge-deploy: refused: {exc}", file=sys.stderr)
        code, out["error"] = EXIT_REFUSED, str(exc)
    except (RuntimeError, OSError) as exc:
        print(f"edge-deploy: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code, out["error"] = EXIT_RUNTIME, str(exc)
    write_json(args.json, {"bundle": str(args.model), "exit_code": code, **out})
    return code


if __name__ == "__main__":
    sys.exit(main())
