"""Benchmark CFM backends per stage (torch vs onnxruntime on this machine), with parity.

For each variant a random-weight CFM model (weights do not change the cost) is saved as
a bundle in a temporary folder, exported with ``edge-deploy``'s ONNX path, and run on
synthetic-station frames by every requested backend through the Detector interface.
Reported per backend: median milliseconds per frame of ``preprocess`` (numpy) and of
each model stage (``Result.timings_ms``: 2d, group, 3d, align, mappers, score), the
whole ``infer`` call and preprocess + infer; and beside them the parity of each
non-reference backend against torch CPU FP32 (``deploy.parity``) on the same frames.

    python scripts/bench_backends.py --variants tiny,full --frames 5 --warmup 1 --json out.json

Backends: torch (cpu), onnxruntime (cpu); add "cuda" to --devices on a GPU machine to
time torch CUDA FP32/FP16 and onnxruntime CUDA too (and tensorrt if engines can be built).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deploy.cli import check_frames, deploy_onnx
from deploy.parity import run_parity
from edge_runtime.backends import load_detector
from edge_runtime.bundle import save_bundle
from edge_runtime.methods.cfm.model import CFMModel, cfm_config

STAGES = ("2d", "group", "3d", "align", "mappers", "score")


def time_backend(det, frames, warmup: int) -> dict:
    """Median ms per frame: preprocess, each stage, infer, total; over ``frames`` after
    ``warmup`` untimed frames (the first frames repeated)."""
    for rgb, xyz in frames[:warmup]:
        det.infer(det.preprocess(rgb, xyz))
    rows = []
    for rgb, xyz in frames:
        t0 = time.perf_counter()
        inputs = det.preprocess(rgb, xyz)
        t1 = time.perf_counter()
        res = det.infer(inputs)
        t2 = time.perf_counter()
        rows.append({"preprocess": (t1 - t0) * 1e3, **res.timings_ms, "infer": (t2 - t1) * 1e3,
                     "total": (t2 - t0) * 1e3})
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}


def bench_variant(variant: str, overrides: dict, n_frames: int, warmup: int, devices: list[str],
                  workdir: Path, compare_spin: bool = False) -> dict:
    """Export one variant (``cfm_config(variant, **overrides)``) and time / parity-check
    each available backend (with ``compare_spin`` also onnxruntime CPU with spinning threads)."""
    torch.manual_seed(0)
    cfg = cfm_config(variant, **overrides)
    bundle = save_bundle(workdir / variant, "cfm", cfg.to_dict(), CFMModel(cfg), {"preprocessing": {"clean": True}, "variant": variant})
    t0 = time.perf_counter()
    deploy_onnx(bundle, 17, log=lambda line: print(line, file=sys.stderr))
    export_s = time.perf_counter() - t0
    frames = check_frames(n_frames, cfg.resolution)["synthetic"]
    configs = [("torch", "cpu", {}), ("onnxruntime", "cpu", {})]
    if compare_spin:
        configs.append(("onnxruntime", "cpu", {"spin": True}))
    if "cuda" in devices:
        configs += [("torch", "cuda", {}), ("torch", "cuda", {"precision": "fp16"}), ("onnxruntime", "cuda", {})]
    reference = load_detector(bundle, backend="torch", device="cpu")
    out = {"config": cfg.to_dict(), "onnx_export_s": export_s, "backends": {}}
    for backend, device, options in configs:
        try:
            det = reference if (backend, device, options) == ("torch", "cpu", {}) else \
                load_detector(bundle, backend=backend, device=device, **options)
        except Exception as exc:  # report what could not run and go on with the rest
            out["backends"][f"{backend}-{device}"] = {"error": str(exc)}
            continue
        label = det.name + ("-spin" if options.get("spin") else "")
        print(f"timing {variant} {label} on {n_frames} frames", file=sys.stderr)
        row = {"ms": time_backend(det, frames, warmup)}
        if det is not reference:
            precision = options.get("precision", "fp32")
            p = run_parity(reference, det, frames, precision=precision)
            row["parity"] = {k: p[k] for k in ("passed", "amap_max_abs_diff", "amap_rel_max_abs_diff",
                                               "amap_pearson", "score_spearman", "score_max_abs_diff")}
        out["backends"][label] = row
    return out


def markdown(results: dict) -> str:
    """A table per variant: backend x stage (ms) + parity columns."""
    lines = []
    for variant, res in results["variants"].items():
        cfg = res["config"]
        lines.append(f"\n**cfm-{variant}** (R={cfg['resolution']}, G={cfg['num_groups']}, K={cfg['group_size']}; "
                     f"ONNX export {res['onnx_export_s']:.1f} s)\n")
        head = ["backend", "preprocess", *STAGES, "infer", "total", "map max abs diff", "map Pearson", "score Spearman"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for name, row in res["backends"].items():
            if "error" in row:
                lines.append(f"| {name} | not run: {row['error']} |")
                continue
            ms = row["ms"]
            p = row.get("parity")
            par = ([f"{p['amap_max_abs_diff']:.1e}", f"{p['amap_pearson']:.6f}", f"{p['score_spearman']:.4f}"]
                   if p else ["reference", "reference", "reference"])
            lines.append("| " + " | ".join([name, *(f"{ms.get(k, 0.0):.1f}" for k in ("preprocess", *STAGES)),
                                             f"{ms['infer']:.1f}", f"{ms['total']:.1f}", *par]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="tiny,full", help="comma list of tiny, small, medium, full")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--num-groups", type=int, help="override the variant's Point-MAE groups (default 1024)")
    ap.add_argument("--group-size", type=int, help="override the variant's group size (default 128)")
    ap.add_argument("--frames", type=int, default=5, help="timed frames per backend (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--devices", default="cpu", help="cpu or cpu,cuda")
    ap.add_argument("--compare-spin", action="store_true",
                    help="also time onnxruntime CPU with its threads spinning (onnxruntime's default)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    results = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()},
        "frames": args.frames, "warmup": args.warmup, "variants": {},
    }
    overrides = {"resolution": args.resolution}
    overrides.update({k: v for k, v in (("num_groups", args.num_groups), ("group_size", args.group_size)) if v})
    with tempfile.TemporaryDirectory(prefix="bench_backends_") as tmp:
        for variant in args.variants.split(","):
            results["variants"][variant] = bench_variant(variant, overrides, args.frames, args.warmup,
                                                         args.devices.split(","), Path(tmp), args.compare_spin)
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(markdown(results))
    print(f"\nload average (1, 5, 15 min) at start {results['machine']['loadavg_start']}, "
          f"end {results['machine']['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
