"""Per-stage inference time of CFM variants on this machine (torch backend).

Renders synthetic-station frames (``SynthStation``, RGB + organized cloud), builds each
variant with random-initialised weights (timing does not depend on the weights), and
runs the exact runtime path: ``TorchDetector.preprocess`` (cfm_preprocess) then
``TorchDetector.infer``. Reports the median milliseconds of every stage over ``--frames``
frames after ``--warmup`` untimed ones, the p50 / p95 end-to-end frame time and the
number of valid 3D points the model saw.

    python scripts/bench_cfm_stages.py --variants tiny small medium full --frames 5
    python scripts/bench_cfm_stages.py --variants tiny small medium full --profile cpu --frames 5

Prints a markdown table (and writes JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from edge_runtime.backends.torch_backend import TorchDetector
from edge_runtime.data.synth import SynthStation
from edge_runtime.methods.cfm.model import PROFILES, STAGES, CFMModel, cfm_config, count_parameters


def bench_variant(variant: str, frames: list, args: argparse.Namespace) -> dict:
    """Median ms per stage of one variant over ``frames`` (list of (rgb, xyz))."""
    overrides = {k: v for k, v in (("resolution", args.resolution), ("num_groups", args.num_groups),
                                   ("group_size", args.group_size),
                                   ("mapper_resolution", args.mapper_resolution)) if v is not None}
    cfg = cfm_config(variant, args.profile, **overrides)
    torch.manual_seed(0)
    model = CFMModel(cfg)
    manifest = {"preprocessing": {"resolution": cfg.resolution, "clean": True}}
    det = TorchDetector(model, manifest, torch.device("cpu"), "fp32")
    stage_ms: dict[str, list[float]] = {}
    total_ms, valid = [], []
    for i in range(args.warmup + len(frames)):
        rgb, xyz = frames[i % len(frames)]
        t0 = time.perf_counter()
        inputs = det.preprocess(rgb, xyz)
        t1 = time.perf_counter()
        result = det.infer(inputs)
        t2 = time.perf_counter()
        if i < args.warmup:
            continue
        total_ms.append((t2 - t0) * 1e3)
        valid.append(int((inputs["xyz"] != 0).any(-1).sum()))
        for name, ms in {"preprocess": (t1 - t0) * 1e3, **result.timings_ms}.items():
            stage_ms.setdefault(name, []).append(ms)
    return {
        "variant": variant, "config": cfg.to_dict(), "parameters": count_parameters(model),
        "valid_points": int(np.median(valid)),
        "stages_ms": {k: round(float(np.median(v)), 1) for k, v in stage_ms.items()},
        "p50_ms": round(float(np.percentile(total_ms, 50)), 1),
        "p95_ms": round(float(np.percentile(total_ms, 95)), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["tiny", "small", "medium", "full"])
    p.add_argument("--frames", type=int, default=5, help="timed frames per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed frames first")
    p.add_argument("--size", type=int, default=400, help="synthetic camera image side (px)")
    p.add_argument("--category", default="puck", help="synthetic part")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--profile", choices=list(PROFILES), default="paper", help="cfm_config speed profile")
    p.add_argument("--mapper-resolution", type=int, default=None, help="override the profile's")
    p.add_argument("--num-groups", type=int, default=None, help="override the profile's")
    p.add_argument("--group-size", type=int, default=None, help="override the profile's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    station = SynthStation(args.size, seed=0, categories=[args.category])
    frames = [(s.rgb, s.xyz) for s in (station.render(args.category, i, "test") for i in range(args.frames))]
    load_before = os.getloadavg()[0]
    rows = [bench_variant(v, frames, args) for v in args.variants]
    load_after = os.getloadavg()[0]
    stages = ["preprocess", *STAGES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.resolution} px, "
          f"synthetic {args.category} {args.size} px, profile {args.profile}, {args.frames} frames (median ms "
          f"per stage), load average {load_before:.1f} -> {load_after:.1f}\n")
    print("| variant | groups x size | mapper grid | valid pts | " + " | ".join(stages)
          + " | frame p50 | frame p95 | fps |")
    print("|---" * (len(stages) + 7) + "|")
    for r in rows:
        c = r["config"]
        cells = [str(r["stages_ms"].get(s, "")) for s in stages]
        print(f"| {r['variant']} | {c['num_groups']} x {c['group_size']} | {c['mapper_resolution']} | "
              f"{r['valid_points']} | " + " | ".join(cells)
              + f" | {r['p50_ms']} | {r['p95_ms']} | {1000 / r['p50_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
                       "load_average": [load_before, load_after], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
