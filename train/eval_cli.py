"""``edge-eval``: run a bundle over a category's test split through the Detector interface.

    edge-eval --model BUNDLE|NAME --data DIR --category C [--json FILE|-]
              [--backend torch|onnxruntime|tensorrt|auto] [--device cpu] [--precision fp32|fp16]
              [--option KEY=VALUE ...] [--plots DIR] [--threads N] [--limit N]

Every test image goes through ``det.preprocess`` then ``det.infer`` (exactly what the
runtime does), so the metrics are the deployed model's. The JSON is the evaluation report
(``edge_runtime.report``: i_auroc, p_auroc, aupro_30, aupro_1, per_defect, ...) plus:

- ``speed``: ``ms_per_frame`` {p50, p95, mean} end to end from decoded arrays to score
  (preprocess + infer, host wall clock; file decoding excluded), ``fps`` = 1000 / mean,
  ``stages_ms`` (mean ms of "preprocess" and of each model stage the backend reports),
  backend name, device, torch threads, frames timed. The first test frame is run once
  more before timing (warm-up: allocator, lazy init) and that extra run is not counted.
- ``scoring``: the method's scoring options in effect (ablations: ``--option``),
  ``modality``, ``bundle``: path, hash, extractors.

Ground truth is placed on the map grid through the method's geometry
(``edge_runtime.geometry``: the same padding and resize as its preprocessing). A bundle
whose preprocessing crops each frame around the part (per-frame geometry) has its maps
brought back onto the image and sampled on the method's whole-frame grid first, so pixel
metrics of cropped and whole-frame bundles count the same pixels.
Exit status: 0 done, 2 bad arguments / bundle / data, 1 a failure while evaluating.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime import methods
from edge_runtime.backends import CHOICES, load_detector
from edge_runtime.bundle import bundle_hash, read_manifest
from edge_runtime.data.mvtec import MVTec3D
from edge_runtime.errors import DataError, EdgeError
from edge_runtime.geometry import gt_to_map, map_to_image, sample_on_grid
from edge_runtime.outputs import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, add_json_flag
from edge_runtime.pipeline.store import resolve_model
from edge_runtime.report import write_report


def _option(text: str) -> tuple[str, str]:
    """--option KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle directory or model-store name")
    p.add_argument("--data", required=True, type=Path, help="dataset root (MVTec 3D-AD layout)")
    p.add_argument("--category", required=True, help="category to evaluate (its test split)")
    add_json_flag(p, "the evaluation report")
    p.add_argument("--backend", default="torch", choices=CHOICES, help="inference backend (default torch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16"], help="backend precision")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a scoring option of the bundle's method, e.g. aggregation=sum (repeatable; "
                        "the method lists and validates its options)")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="also write ROC / PRO curves, score histograms and worst-case grids to DIR")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def percentile(values: list[float], q: float) -> float:
    """``q``-th percentile (linear interpolation, numpy's default) of ``values``, in their unit."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def evaluate_bundle(args: argparse.Namespace) -> dict:
    """Run the test split through the detector; returns the report dict (also written)."""
    bundle = resolve_model(args.model, build=False)
    method = methods.for_manifest(read_manifest(bundle))
    scoring = method.check_options(dict(args.option))
    options = {**scoring, **({"precision": args.precision} if args.precision else {})}
    det = load_detector(bundle, backend=args.backend, device=args.device, **options)
    manifest = det.manifest
    refs = MVTec3D(args.data).index(args.category, "test")
    if args.limit is not None:
        refs = refs[:args.limit]
    if not refs:
        raise DataError(Path(args.data) / args.category / "test", "no test images")
    scores, labels, types, maps, gts, images = [], [], [], [], [], []
    frame_ms: list[float] = []
    stage_ms: dict[str, list[float]] = {}
    for k, ref in enumerate(tqdm(refs, desc="evaluating", unit="img", disable=args.quiet)):
        sample = ref.load()
        runs = 2 if k == 0 else 1  # the first frame once more as warm-up (not timed)
        for _ in range(runs):
            t0 = time.perf_counter()
            try:
                inputs = det.preprocess(sample.rgb, sample.xyz)
            except DataError as err:
                raise DataError(ref.paths.get("xyz", ref.paths["rgb"]), err.problem) from None
            t1 = time.perf_counter()
            result = det.infer(inputs)
            t2 = time.perf_counter()
        frame_ms.append((t2 - t0) * 1e3)
        for name, ms in {"preprocess": (t1 - t0) * 1e3, **result.timings_ms}.items():
            stage_ms.setdefault(name, []).append(ms)
        scores.append(result.score)
        labels.append(sample.label)
        types.append(sample.defect_type)
        frame_geometry = method.geometry(sample.rgb.shape, manifest)
        geometry = getattr(inputs, "geometry", None) or frame_geometry
        amap = result.amap
        if geometry != frame_geometry:  # a per-frame crop: scored on the whole frame's grid like any bundle
            amap = sample_on_grid(map_to_image(amap, sample.rgb.shape, geometry), amap.shape, frame_geometry)
            geometry = frame_geometry
        maps.append(amap)
        gts.append(gt_to_map(sample.gt, amap.shape, geometry))
        if args.plots is not None:
            images.append(sample_on_grid(sample.rgb, result.amap.shape, geometry))
    mean_ms = float(np.mean(frame_ms))
    extra = {
        "speed": {
            "ms_per_frame": {"p50": round(percentile(frame_ms, 50), 3), "p95": round(percentile(frame_ms, 95), 3),
                             "mean": round(mean_ms, 3)},
            "fps": round(1000.0 / mean_ms, 3),
            "stages_ms": {k: round(float(np.mean(v)), 3) for k, v in stage_ms.items()},
            "backend": det.name, "device": args.device, "threads": torch.get_num_threads(),
            "frames": len(frame_ms),
        },
        "scoring": {k: scoring.get(k, manifest["config"].get(k)) for k in method.scoring_options},
        "modality": method.modality(manifest),
        "bundle": {"path": str(bundle), "hash": bundle_hash(manifest), "extractors": manifest.get("extractors")},
    }
    report = write_report(args.json, args.category, manifest["method"], manifest.get("variant") or "",
                          scores, labels, np.stack(maps), np.stack(gts), types, extra=extra)
    if args.plots is not None:
        from edge_runtime.line.plots import write_eval_plots

        threshold = (manifest.get("thresholds") or {}).get("image")
        report["plots"] = [str(p) for p in write_eval_plots(args.plots, scores, labels, np.stack(maps),
                                                             np.stack(gts), threshold, images=images)]
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate_bundle(args)
    except (EdgeError, ValueError, FileNotFoundError) as err:
        print(f"edge-eval: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:
        print(f"edge-eval: evaluation failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    if args.json != "-":
        sp = report["speed"]
        print(f"{report['category']} {report['method']}-{report['variant']}: I-AUROC {report['i_auroc']} "
              f"P-AUROC {report['p_auroc']} AUPRO@30% {report['aupro_30']} AUPRO@1% {report['aupro_1']} | "
              f"{sp['ms_per_frame']['p50']:.1f} ms/frame p50 ({sp['fps']:.2f} fps)"
              + (f" -> {args.json}" if args.json else ""), file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
