"""AST accuracy: the synthetic station (rgb, 3d, rgb+3d) and the real MVTec 3D-AD tire (rgb).

Drives the AST trainer and the project's metrics directly from Python (``train.ast_trainer.fit``
/ ``evaluate``, ``edge_runtime.report.evaluate``), caches every run's JSON under ``--work``
(a rerun skips finished runs) and writes ``docs/_parts/results_ast.md``.

Sections (``--sections``):

- ``synth``: ``edge-synth`` categories (default puck, box, cookie), each modality, the cpu
  profile; test sets of 25 good + 25 defective parts (5 per defect type), so one image
  moves I-AUROC by at most 0.04.
- ``tire``: AST rgb on the real tire images (train split -> test split), the cpu profile
  and the extractor / size variants listed in ``TIRE_RUNS``; skipped when the folder is
  absent.
- ``profiles``: the cpu profile against a reduced paper profile (student width 1024, the
  paper's 72 epochs, 768 px) on the tire; the paper's B5 is a user file, so the
  extractor stays EfficientNet-Lite0 unless ``--b5 FILE`` is given.

    python scripts/ast_results.py --work runs/ast_results --tire ../shared/data/mvtec3d-tire-rgb
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("i_auroc", "p_auroc", "aupro_30", "aupro_1")
PAPER_TIRE = (  # image AUROC on MVTec 3D-AD tire, the papers' own numbers
    ("AST RGB (EfficientNet-B5, 768 px; AST paper)", 0.821),
    ("AST RGB+3D (AST paper)", 0.797),
    ("PatchCore RGB (AST paper's table, from the 3D-AD benchmark paper)", 0.702),
    ("DRAEM RGB (as re-run in the DBRN paper)", 0.880),
)

# name -> (trainer overrides, settings overrides): the tire variants tried
TIRE_RUNS: dict[str, dict] = {
    "cpu": {},
}


def run_one(args, name: str, data: Path, category: str, modality: str, profile: str = "cpu",
            backbone: str | None = None, spec: str | None = None, epochs: int | None = None,
            student_epochs: int | None = None, overrides: dict | None = None, shots: int | None = None) -> dict:
    """Train + evaluate one configuration (cached as ``--work/NAME.json``)."""
    out = args.work / f"{name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    import torch

    from edge_runtime.data.mvtec import MVTec3D, few_shot
    from edge_runtime.methods.ast.config import PROFILES, profile_config
    from edge_runtime.report import evaluate as report
    from train.ast_trainer import TrainSettings, evaluate, fit

    torch.set_num_threads(args.threads)
    cfg = profile_config(profile, modality, backbone=backbone, **(overrides or {}))
    spec = spec or (f"efficientnet-{cfg.backbone}" if cfg.uses_rgb else None)
    ds = MVTec3D(data)
    refs = ds.index(category, "train")
    if shots:
        refs = few_shot(refs, shots)
    settings = TrainSettings(epochs=epochs or PROFILES[profile]["epochs"], student_epochs=student_epochs)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {modality} {cfg.backbone or 'depth'} {cfg.image_size if cfg.uses_rgb else ''}"
          f" width {cfg.student_width}, {settings.epochs} epochs, {len(refs)} train images", flush=True)
    model, fields = fit(cfg, refs, settings, backbone_spec=spec, progress=not args.quiet)
    test = ds.index(category, "test")
    result = {"name": name, "category": category, "modality": modality, "profile": profile,
              "config": cfg.to_dict(), "extractor": spec, "training": {k: v for k, v in fields["training"].items()
                                                                        if not k.endswith("_losses")},
              "final_losses": [fields["training"]["teacher_losses"][-1], fields["training"]["student_losses"][-1]]}
    for score in ("max", "mean"):
        ev = evaluate(model, fields["preprocessing"], test, options={"image_score": score})
        r = report(category, "ast", "", ev["scores"], ev["labels"], ev["maps"], ev["gts"], ev["types"])
        result[score] = {k: r[k] for k in METRICS}
        result[score]["per_defect"] = {k: v["i_auroc"] for k, v in r["per_defect"].items()}
        result["n_good"], result["n_defect"] = r["n_good"], r["n_defect"]
        result["ms_per_frame"] = ev["ms_per_frame"]
    args.work.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"    -> I-AUROC max {result['max']['i_auroc']:.3f} mean {result['mean']['i_auroc']:.3f}, "
          f"P-AUROC {result['max']['p_auroc']:.3f}, {result['training']['seconds']:.0f} s", flush=True)
    return result


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def make_synth(args) -> Path:
    root = args.work / "synth"
    if not (root / args.categories[-1]).is_dir():
        cmd = [str(Path(sys.executable).parent / "edge-synth"), "--out", str(root), "--size", str(args.synth_size),
               "--categories", *args.categories, "--train", str(args.synth_train), "--val", "10",
               "--test-good", "25", "--test-defect", "5"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, capture_output=True)
    return root


def section_synth(args) -> list[str]:
    root = make_synth(args)
    rows = {}
    for cat in args.categories:
        for modality in ("rgb", "3d", "rgb+3d"):
            rows[(cat, modality)] = run_one(args, f"synth-{cat}-{modality}", root, cat, modality,
                                            epochs=args.synth_epochs)
    lines = [
        "### Synthetic station (cpu profile)",
        "",
        f"`edge-synth --size {args.synth_size} --categories {' '.join(args.categories)} --train {args.synth_train} "
        "--val 10 --test-good 25 --test-defect 5`: per category 25 good and 25 defective test parts (5 per type: "
        "color = RGB only, dent / bump = 3D only, crack / hole = both). cpu profile (EfficientNet-Lite0 block 10 at "
        f"384 px, student width 256), {args.synth_epochs} epochs teacher + {args.synth_epochs} student. "
        "Image score max (default) and mean.",
        "",
        "| category | modality | I-AUROC max | I-AUROC mean | P-AUROC | AUPRO@30% | AUPRO@1% | per defect I-AUROC (max) | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (cat, modality), r in rows.items():
        pd = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["max"]["per_defect"].items()))
        lines.append(f"| {cat} | {modality} | {_fmt(r['max']['i_auroc'])} | {_fmt(r['mean']['i_auroc'])} | "
                     f"{_fmt(r['max']['p_auroc'])} | {_fmt(r['max']['aupro_30'])} | {_fmt(r['max']['aupro_1'])} | "
                     f"{pd} | {r['training']['seconds']:.0f} |")
    for modality in ("rgb", "3d", "rgb+3d"):
        sel = [rows[(c, modality)] for c in args.categories]
        mean = {k: sum(r["max"][k] for r in sel) / len(sel) for k in METRICS}
        mean_i = sum(r["mean"]["i_auroc"] for r in sel) / len(sel)
        lines.append(f"| **mean** | {modality} | {_fmt(mean['i_auroc'])} | {_fmt(mean_i)} | {_fmt(mean['p_auroc'])} | "
                     f"{_fmt(mean['aupro_30'])} | {_fmt(mean['aupro_1'])} | | |")
    return lines


def section_tire(args) -> list[str]:
    if args.tire is None or not (args.tire / "tire").is_dir():
        return ["### Tire", "", "Skipped: no tire folder (`--tire`)."]
    rows = []
    for name, spec in args.tire_runs.items():
        rows.append((name, spec, run_one(args, f"tire-{name}", args.tire, "tire", "rgb", **spec)))
    lines = [
        "### MVTec 3D-AD tire, RGB only (real images)",
        "",
        "Train split (105 good) -> test split (14 good, 48 defective: combined, contamination, cut, hole). "
        "Metrics on the 192 x 192 map grid.",
        "",
        "| run | extractor, input | student width | epochs | I-AUROC max | I-AUROC mean | P-AUROC | AUPRO@30% | AUPRO@1% | train s (2 threads shared) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, spec, r in rows:
        c = r["config"]
        lines.append(f"| {name} | {c['backbone']} blocks {c['out_blocks']}, {c['image_size']} px | {c['student_width']} | "
                     f"{r['training']['epochs']} | {_fmt(r['max']['i_auroc'])} | {_fmt(r['mean']['i_auroc'])} | "
                     f"{_fmt(r['max']['p_auroc'])} | {_fmt(r['max']['aupro_30'])} | {_fmt(r['max']['aupro_1'])} | "
                     f"{r['training']['seconds']:.0f} |")
    lines += ["", "Published image AUROC on tire, for comparison (the papers' numbers, full training set of 210 "
                  "images; this copy of the data has 105):", ""]
    lines += [f"- {what}: {v:.3f}" for what, v in PAPER_TIRE]
    return lines


def section_bench(args) -> list[str]:
    """ms per frame per stage (CPU, batch 1) for the cpu and paper profiles, every modality."""
    import contextlib

    import numpy as np
    import torch

    from edge_runtime.data.synth import SynthStation
    from edge_runtime.methods.ast.config import profile_config
    from edge_runtime.methods.ast.model import ASTModel
    from edge_runtime.methods.ast.preprocess import make_preprocessor, preprocessing_params
    from edge_runtime.nets.efficientnet import INPUT_NORMALISATION

    torch.set_num_threads(args.bench_threads)
    sample = SynthStation(size=(800, 600), seed=0).render("puck", 0, "test")
    rows = []
    for profile in ("cpu", "paper"):
        for modality in ("rgb", "3d", "rgb+3d"):
            cfg = profile_config(profile, modality)
            torch.manual_seed(0)
            model = ASTModel(cfg).eval()  # random weights: the timing does not depend on them
            norm = INPUT_NORMALISATION[cfg.backbone] if cfg.uses_rgb else (None, None)
            prep = make_preprocessor(preprocessing_params(cfg, *norm))
            times: dict[str, list[float]] = {}

            @contextlib.contextmanager
            def stage(name):
                t = time.perf_counter()
                yield
                times.setdefault(name, []).append(1000 * (time.perf_counter() - t))

            for i in range(args.bench_frames + 1):
                t = time.perf_counter()
                inputs = prep(sample.rgb, sample.xyz)
                if i:
                    times.setdefault("preprocess", []).append(1000 * (time.perf_counter() - t))
                batch = {k: torch.from_numpy(v[None]) for k, v in inputs.items()}
                with torch.inference_mode():
                    if i == 0:
                        model(batch)  # warm-up
                    else:
                        model(batch, stage=stage)
            med = {k: float(np.median(v)) for k, v in times.items()}
            params = sum(p.numel() for p in model.student.parameters()) / 1e6
            rows.append((profile, modality, cfg, med, params))
    load = os.getloadavg()[0]
    lines = [
        "## AST: CPU time per frame by stage",
        "",
        f"Median of {args.bench_frames} frames after one warm-up, batch 1, torch {torch.__version__}, "
        f"{args.bench_threads} threads, on the shared 2-core CPU (load average {load:.1f} from other jobs while "
        "measuring: expect noise). A synthetic 800 x 600 frame (RGB + point cloud); random weights (timing only; "
        "the paper profile's B5 is built without its file). `preprocess` is the numpy stage (resize, normalise, "
        "AST depth), the others are the model's stages.",
        "",
        "| profile | modality | extractor, input | student width (M params) | preprocess | extract | teacher | student | score | model total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for profile, modality, cfg, med, params in rows:
        total = sum(med.get(k, 0.0) for k in ("extract", "teacher", "student", "score"))
        ext = f"{cfg.backbone} block {list(cfg.out_blocks)}, {cfg.image_size} px" if cfg.uses_rgb else "none (depth)"
        lines.append(f"| {profile} | {modality} | {ext} | {cfg.student_width} ({params:.1f}) | "
                     + " | ".join(f"{med.get(k, 0.0):.1f}" for k in ("preprocess", "extract", "teacher", "student", "score"))
                     + f" | {total:.1f} |")
    lines += ["", f"Command: `python scripts/ast_results.py --sections bench --bench-threads {args.bench_threads}` "
                  "(writes docs/_parts/benchmarks_ast.md)."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "ast_results")
    ap.add_argument("--tire", type=Path, default=None, help="root holding the tire category (MVTec 3D-AD layout)")
    ap.add_argument("--sections", nargs="+", default=["synth", "tire"], choices=["synth", "tire", "bench"])
    ap.add_argument("--bench-threads", type=int, default=2)
    ap.add_argument("--bench-frames", type=int, default=5)
    ap.add_argument("--bench-out", type=Path, default=REPO / "docs" / "_parts" / "benchmarks_ast.md")
    ap.add_argument("--categories", nargs="+", default=["puck", "box", "cookie"])
    ap.add_argument("--synth-size", type=int, default=256)
    ap.add_argument("--synth-train", type=int, default=40)
    ap.add_argument("--synth-epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "_parts" / "results_ast.md")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.tire_runs = TIRE_RUNS
    t0 = time.time()
    if "bench" in args.sections:
        args.bench_out.write_text("\n".join(section_bench(args)) + "\n")
        print(f"wrote {args.bench_out}")
        if args.sections == ["bench"]:
            return 0
    lines = ["## AST results", ""]
    if "tire" in args.sections:
        lines += section_tire(args) + [""]
    if "synth" in args.sections:
        lines += section_synth(args) + [""]
    lines.append(f"Command: `python scripts/ast_results.py --work {args.work} "
                 + (f"--tire {args.tire} " if args.tire else "") + f"--sections {' '.join(args.sections)}` "
                 f"({time.time() - t0:.0f} s this run, cached runs skipped).")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
