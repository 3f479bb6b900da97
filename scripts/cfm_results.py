"""CFM accuracy on the synthetic station: variants, aggregation ablation, few-shot, CPU knobs.

Runs the product's own commands (``edge-synth``, ``edge-train``, ``edge-eval``) as
subprocesses, prints every command it runs, and prints markdown tables built from the
``edge-eval`` JSON reports (means over categories). The extractors are random-initialised
(no checkpoint files offline), so the numbers measure the pipeline, not CFM's published
accuracy (docs/methods.md, CFM is printed beside them for orientation only).

Sections (``--sections``):

- ``variants``: tiny / small / medium / full on every category, beside a model-free
  baseline map (the object mask) that shows what finding the part alone scores.
- ``ablation``: the aggregation ablation (product / sum / max / 2d / 3d) of one variant,
  re-scoring the ``variants`` bundles (``edge-eval --aggregation``; no retraining).
- ``fewshot``: 5 / 10 / 50 training shots (first N) of one variant on one category.
- ``knobs``: the CPU knobs on one variant: pixels per image per step and the mapper grid.

Every run is cached under ``--work`` (its JSON report); rerunning skips finished runs.

    python scripts/cfm_results.py --work runs/cfm_results
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

PAPER = {  # docs/methods.md, CFM: MVTec 3D-AD means, pretrained extractors
    "full": (0.954, 0.993, 0.971, 0.455), "medium": (0.960, 0.994, 0.972, 0.459),
    "small": (0.948, 0.994, 0.972, 0.451), "tiny": (0.899, 0.990, 0.961, 0.419),
}
PAPER_FEWSHOT = {5: 0.811, 10: 0.845, 50: 0.906}  # full CFM, I-AUROC
METRICS = ("i_auroc", "p_auroc", "aupro_30", "aupro_1")
BIN = Path(sys.executable).parent


def run(cmd: list[str], log: list[str]) -> None:
    """Run one product command (printed first); its output is shown only if it fails."""
    text = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {text}", flush=True)
    log.append(text)
    done = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}):\n{done.stderr}")


def train_eval(args, log, name: str, data: Path, category: str, train_opts: list[str],
               eval_opts: tuple[list[str], ...] = ([],)) -> list[dict]:
    """edge-train once (cached), then edge-eval once per option list; returns the reports."""
    bundle = args.work / "bundles" / name
    if not (bundle / "manifest.json").is_file():
        run(["edge-train", "--method", "cfm", "--data", str(data), "--category", category, "--out", str(bundle),
             "--epochs", str(args.epochs), "--threads", str(args.threads), "--quiet", *args.profile_opts,
             *train_opts, "--json", str(args.work / "train" / f"{name}.json")], log)
    reports = []
    for opts in eval_opts:
        tag = "_".join(o.lstrip("-") for o in opts) or "default"
        out = args.work / "eval" / f"{name}__{tag}.json"
        if not out.is_file():
            run(["edge-eval", "--model", str(bundle), "--data", str(data), "--category", category,
                 "--threads", str(args.threads), "--json", str(out), "--quiet", *opts], log)
        reports.append(json.loads(out.read_text()))
    return reports


def mean(reports: list[dict], key: str) -> float:
    vals = [r[key] for r in reports if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def row(label: str, reports: list[dict], extra: str = "") -> str:
    cells = " | ".join(f"{mean(reports, k):.3f}" for k in METRICS)
    ms = mean([r["speed"]["ms_per_frame"] for r in reports], "p50")
    return f"| {label} | {cells} | {ms:.0f} |{extra}"


def mask_baseline(data: Path, categories: list[str], resolution: int = 224) -> list[dict]:
    """Reports of a model-free map: 1 on every pixel with a 3D point after ``cfm_preprocess``,
    0 elsewhere, smoothed as CFM smooths. It shows what "localising the part" alone scores,
    since CFM maps are zero off the part by construction."""
    import numpy as np
    import torch

    from edge_runtime.methods.cfm.preprocess import cfm_gt, cfm_preprocess
    from edge_runtime.data.mvtec import MVTec3D
    from edge_runtime.methods.cfm.model import cfm_config, smooth
    from edge_runtime.report import evaluate

    cfg = cfm_config("tiny", resolution=resolution)
    reports = []
    for c in categories:
        samples = list(MVTec3D(data).samples(c, "test"))
        masks = np.stack([(cfm_preprocess(s.rgb, s.xyz, resolution)["xyz"] != 0).any(-1) for s in samples])
        maps = smooth(torch.from_numpy(masks.astype(np.float32)), cfg).numpy()
        reports.append(evaluate(c, "mask", "", maps.reshape(len(maps), -1).max(1), [s.label for s in samples],
                                maps, np.stack([cfm_gt(s.gt, resolution) for s in samples]),
                                [s.defect_type for s in samples]))
    return reports


def synth(args, log, out: Path, categories: list[str], n_train: int) -> Path:
    if not out.is_dir():
        run(["edge-synth", "--out", str(out), "--size", str(args.size), "--seed", "0", "--categories", *categories,
             "--train", str(n_train), "--val", "0", "--test-good", str(args.test_good),
             "--test-defect", str(args.test_defect)], log)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/cfm_results"))
    p.add_argument("--sections", nargs="+", default=["variants", "ablation", "fewshot", "knobs"])
    p.add_argument("--categories", nargs="+", default=["puck", "box", "cookie"])
    p.add_argument("--variants", nargs="+", default=["tiny", "small", "medium", "full"])
    p.add_argument("--size", type=int, default=224, help="synthetic image side (edge-synth default)")
    p.add_argument("--train", type=int, default=16, help="training images per category")
    p.add_argument("--test-good", type=int, default=6)
    p.add_argument("--test-defect", type=int, default=2, help="per defect type (5 types)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--profile", default="cpu", help="edge-train --profile for every run")
    p.add_argument("--focus-variant", default="tiny", help="variant of the ablation / few-shot / knobs")
    p.add_argument("--focus-category", default="puck", help="category of the few-shot / knobs runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per command (1: steady timings on a shared machine)")
    args = p.parse_args()
    args.profile_opts = ["--profile", args.profile]
    for sub in ("bundles", "train", "eval"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    t0 = time.perf_counter()
    data = synth(args, log, args.work / "data", args.categories, args.train)
    tables: list[str] = []
    header = "| run | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% | ms/frame p50 |"
    rule = "|---|---|---|---|---|---|"

    per_variant: dict[str, list[dict]] = {}
    if "variants" in args.sections or "ablation" in args.sections:
        variants = args.variants if "variants" in args.sections else [args.focus_variant]
        for v in variants:
            per_variant[v] = [train_eval(args, log, f"{v}_{c}", data, c, ["--variant", v])[0]
                              for c in args.categories]
    if "variants" in args.sections:
        lines = [f"Variants, mean over {', '.join(args.categories)} ({args.epochs} epochs, --profile {args.profile}, "
                 "random-init extractors); paper (MVTec 3D-AD, pretrained) in the last column "
                 "(I / P / AUPRO@30 / AUPRO@1)", "", header + " paper |", rule + "---|"]
        for v, reps in per_variant.items():
            lines.append(row(f"cfm-{v}", reps, " " + " / ".join(f"{x:.3f}" for x in PAPER[v]) + " |"))
        baseline = mask_baseline(data, args.categories)
        lines.append("| object mask, no model | " + " | ".join(f"{mean(baseline, k):.3f}" for k in METRICS)
                     + " | - | - |")
        lines += ["", "Per category I-AUROC:", "",
                  "| variant | " + " | ".join(args.categories) + " |", "|---" * (len(args.categories) + 1) + "|"]
        for v, reps in per_variant.items():
            lines.append(f"| cfm-{v} | " + " | ".join(f"{r['i_auroc']:.3f}" for r in reps) + " |")
        tables.append("\n".join(lines))

    if "ablation" in args.sections:
        v = args.focus_variant
        lines = [f"Aggregation ablation, cfm-{v}, mean over {', '.join(args.categories)} (same bundles re-scored)",
                 "", header, rule]
        for agg in ("product", "sum", "max", "2d", "3d"):
            reps = [train_eval(args, log, f"{v}_{c}", data, c, ["--variant", v], (["--aggregation", agg],))[0]
                    for c in args.categories]
            lines.append(row(agg, reps))
        tables.append("\n".join(lines))

    if "fewshot" in args.sections:
        v, c = args.focus_variant, args.focus_category
        fs_data = synth(args, log, args.work / "data_fewshot", [c], 50)
        lines = [f"Few-shot, cfm-{v}, {c} (first N training images; paper: full CFM I-AUROC on MVTec 3D-AD)",
                 "", header + " paper I-AUROC |", rule + "---|"]
        for shots in (5, 10, 50):
            rep = train_eval(args, log, f"{v}_{c}_shots{shots}", fs_data, c, ["--variant", v, "--shots", str(shots)])
            lines.append(row(f"{shots} shots", rep, f" {PAPER_FEWSHOT[shots]:.3f} |"))
        tables.append("\n".join(lines))

    if "knobs" in args.sections:
        v, c = args.focus_variant, args.focus_category
        lines = [f"CPU knobs, cfm-{v}, {c}: pixels drawn per image per step, mapper grid, Point-MAE groups",
                 "", "| pixels/image | mapper grid | groups x size | train s | I-AUROC | P-AUROC | AUPRO@30% | "
                 "AUPRO@1% | ms/frame p50 |", "|---|---|---|---|---|---|---|---|---|"]
        for pixels, grid, groups, size in (("128", "56", "256", "32"), ("512", "56", "256", "32"),
                                           ("all", "56", "256", "32"), ("512", "112", "256", "32"),
                                           ("512", "224", "256", "32"), ("512", "224", "1024", "128")):
            name = f"{v}_{c}_px{pixels}_grid{grid}_g{groups}x{size}"
            rep = train_eval(args, log, name, data, c, ["--variant", v, "--pixels-per-image", pixels,
                                                        "--mapper-resolution", grid, "--num-groups", groups,
                                                        "--group-size", size])[0]
            train_s = json.loads((args.work / "train" / f"{name}.json").read_text())["training"]["seconds"]["train"]
            cells = " | ".join(f"{rep[k]:.3f}" for k in METRICS)
            lines.append(f"| {pixels} | {grid} | {groups} x {size} | {train_s:.0f} | {cells} | "
                         f"{rep['speed']['ms_per_frame']['p50']:.0f} |")
        tables.append("\n".join(lines))

    print(f"\n{len(log)} commands run this time, {time.perf_counter() - t0:.0f} s\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
