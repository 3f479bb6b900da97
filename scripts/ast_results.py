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

# name -> run_one keywords: the tire variants tried ("options": fit's RGB-only options; None: the profile's)
PAPER_FRAME = {"roi": None, "rgb_foreground": False, "border": 0, "border_train": False}  # the whole frame, every cell
BORDER_TRAIN = {"roi": "auto", "rgb_foreground": False, "border": 1, "border_train": True}  # ring trained, not scored
BORDER_LOSS = {**BORDER_TRAIN, "border_train": False}  # the ring out of the losses too (the default before)
OPTION_KEYS = ("roi", "rgb_foreground", "border", "border_train")
TIRE_RUNS: dict[str, dict] = {
    # the cpu profile for rgb: Lite0 block 14 at 768 px, roi auto, border 1 (trained on), width 128, 10 + 40, top3
    "cpu": {},
    # the cpu profile before (all modalities' fields): Lite0 block 10 at 384 px, width 256, 20 + 20, whole frame
    "cpu-b10-384": {"epochs": 20, "student_epochs": 20, "options": PAPER_FRAME,
                    "overrides": {"out_blocks": (10,), "image_size": 384, "student_width": 256}},
    "reduced": {"epochs": 10, "student_epochs": 10, "options": PAPER_FRAME,
                "overrides": {"student_width": 128, "out_blocks": (10,), "image_size": 384}},
    "reduced-b14-768": {"epochs": 10, "student_epochs": 10, "options": PAPER_FRAME,
                        "overrides": {"student_width": 128, "out_blocks": (14,), "image_size": 768}},
    # the outer ring trained on, left out of the score only (--border-train yes, the cpu default since this
    # round; "cpu" is the same run), seeds, train + validation; and the default before (the ring out of the losses)
    "cpu-bt": {"options": BORDER_TRAIN},
    "cpu-bt-s1": {"options": BORDER_TRAIN, "seed": 1},
    "cpu-bt-s2": {"options": BORDER_TRAIN, "seed": 2},
    "cpu-bt-trval": {"options": BORDER_TRAIN, "splits": ("train", "validation")},
    "cpu-border-loss": {"options": BORDER_LOSS},
    "cpu-border-loss-s1": {"options": BORDER_LOSS, "seed": 1},
}


def run_one(args, name: str, data: Path, category: str, modality: str, profile: str = "cpu",
            backbone: str | None = None, spec: str | None = None, epochs: int | None = None,
            student_epochs: int | None = None, overrides: dict | None = None, shots: int | None = None,
            options: dict | None = None, seed: int = 0, splits: tuple[str, ...] = ("train",)) -> dict:
    """Train + evaluate one configuration (cached as ``--work/NAME.json``)."""
    out = args.work / f"{name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    import torch

    from edge_runtime.data.mvtec import MVTec3D, few_shot
    from edge_runtime.methods.ast.config import profile_config, profile_settings
    from edge_runtime.report import evaluate as report
    from train.ast_trainer import TrainSettings, evaluate, fit

    torch.set_num_threads(args.threads)
    cfg = profile_config(profile, modality, backbone=backbone, **{"seed": seed, **(overrides or {})})
    spec = spec or (f"efficientnet-{cfg.backbone}" if cfg.uses_rgb else None)
    ds = MVTec3D(data)
    refs = [r for split in splits for r in ds.index(category, split) if int(r.label) == 0]
    if shots:
        refs = few_shot(refs, shots)
    ps = profile_settings(profile, modality)
    settings = TrainSettings(epochs=epochs or ps["epochs"],
                             student_epochs=student_epochs or (None if epochs else ps["student_epochs"]), seed=seed)
    options = dict(ps["options"] if options is None else options)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {modality} {cfg.backbone or 'depth'} {cfg.image_size if cfg.uses_rgb else ''}"
          f" width {cfg.student_width}, {settings.epochs} epochs, {len(refs)} train images", flush=True)
    t_cpu = time.thread_time()
    model, fields = fit(cfg, refs, settings, backbone_spec=spec, progress=not args.quiet, **options)
    t_cpu = time.thread_time() - t_cpu
    test = ds.index(category, "test")
    result = {"name": name, "category": category, "modality": modality, "profile": profile,
              "config": cfg.to_dict(), "extractor": spec, "training": {k: v for k, v in fields["training"].items()
                                                                        if not k.endswith("_losses")},
              "final_losses": [fields["training"]["teacher_losses"][-1], fields["training"]["student_losses"][-1]],
              "options": {k: fields["preprocessing"].get(k) for k in OPTION_KEYS},
              "seed": seed, "splits": list(splits),
              "train_cpu_s": round(t_cpu, 1)}
    ev = evaluate(model, fields["preprocessing"], test)
    for score in ("max", "mean", "top3"):
        r = report(category, "ast", "", ev["scores_by"][score], ev["labels"], ev["maps"], ev["gts"], ev["types"])
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


# CFM (cfm-tiny, offline Lite0 + FPFH, FPFH grid 112 / windows 5 / 11, 30 epochs) on the same synthetic data:
# docs/_parts/results_offline.md, `python scripts/cfm_offline_results.py --work runs/cfm_offline --threads 1
# --categories puck box --sections fpfh` (I-AUROC per category; mean P-AUROC / AUPRO@30% over puck + box)
CFM_SYNTH = {"puck": 0.855, "box": 0.943, "mean_p_auroc": 0.980, "mean_aupro_30": 0.924}


def make_synth(args) -> Path:
    root = args.work / "synth"
    if not (root / args.categories[-1]).is_dir():
        cmd = [str(Path(sys.executable).parent / "edge-synth"), "--out", str(root), "--size", str(args.synth_size),
               "--categories", *args.categories, "--train", str(args.synth_train), "--val", "20",
               "--test-good", "20", "--test-defect", "6"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, capture_output=True)
    return root


def section_synth(args) -> list[str]:
    root = make_synth(args)
    rows = {}
    for cat in args.categories:
        for modality in ("rgb", "3d", "rgb+3d"):
            rows[(cat, modality)] = run_one(args, f"synth-{cat}-{modality}-e{args.synth_epochs}", root, cat, modality,
                                            epochs=args.synth_epochs)
    lines = [
        "### Synthetic station (cpu profile)",
        "",
        f"`edge-synth --size {args.synth_size} --categories {' '.join(args.categories)} --train {args.synth_train} "
        "--val 20 --test-good 20 --test-defect 6` (the data of CFM's offline table, seed 0): per category 20 good "
        "and 30 defective test parts (6 per type: color = RGB only, dent / bump = 3D only, crack / hole = both). "
        f"cpu profile, {args.synth_epochs} epochs teacher + {args.synth_epochs} student (the profile: 20 + 20). "
        "Image score max (default) and mean. CFM: cfm-tiny (offline Lite0 + FPFH), same data, from "
        "results_offline (it reports I-AUROC per category and P-AUROC / AUPRO@30% as the two-category mean).",
        "",
        "| category | modality | I-AUROC max | I-AUROC mean | P-AUROC | AUPRO@30% | AUPRO@1% | per defect I-AUROC (max) | train s | CFM I-AUROC (rgb+3d) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (cat, modality), r in rows.items():
        pd = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["max"]["per_defect"].items()))
        cfm = _fmt(CFM_SYNTH.get(cat)) if modality == "rgb+3d" else ""
        lines.append(f"| {cat} | {modality} | {_fmt(r['max']['i_auroc'])} | {_fmt(r['mean']['i_auroc'])} | "
                     f"{_fmt(r['max']['p_auroc'])} | {_fmt(r['max']['aupro_30'])} | {_fmt(r['max']['aupro_1'])} | "
                     f"{pd} | {r['training']['seconds']:.0f} | {cfm} |")
    for modality in ("rgb", "3d", "rgb+3d"):
        sel = [rows[(c, modality)] for c in args.categories]
        mean = {k: sum(r["max"][k] for r in sel) / len(sel) for k in METRICS}
        mean_i = sum(r["mean"]["i_auroc"] for r in sel) / len(sel)
        cfm = ""
        if modality == "rgb+3d" and all(c in CFM_SYNTH for c in args.categories):
            cfm = (f"{sum(CFM_SYNTH[c] for c in args.categories) / len(args.categories):.3f} "
                   f"(P {CFM_SYNTH['mean_p_auroc']:.3f}, AUPRO@30 {CFM_SYNTH['mean_aupro_30']:.3f})")
        lines.append(f"| **mean** | {modality} | {_fmt(mean['i_auroc'])} | {_fmt(mean_i)} | {_fmt(mean['p_auroc'])} | "
                     f"{_fmt(mean['aupro_30'])} | {_fmt(mean['aupro_1'])} | | | {cfm} |")
    return lines


def section_profiles(args) -> list[str]:
    """cpu vs paper profile (Lite0 extractor for both; B5 needs a user file) on one small synthetic category,
    few-shot and with the same reduced epochs for both, so the comparison fits the shared CPU."""
    root = make_synth(args)
    cat = args.categories[0]
    rows = []
    for profile in ("cpu", "paper"):
        backbone = "lite0" if profile == "paper" else None
        rows.append((profile, run_one(args, f"profile-{profile}-{cat}-s{args.profile_shots}-e{args.profile_epochs}",
                                      root, cat, "rgb", profile=profile, backbone=backbone,
                                      spec="efficientnet-lite0", epochs=args.profile_epochs,
                                      shots=args.profile_shots)))
    lines = [
        f"### cpu vs paper profile ({cat}, rgb, {args.profile_shots} training images, "
        f"{args.profile_epochs} + {args.profile_epochs} epochs for both)",
        "",
        "| profile | extractor, input | student width | I-AUROC max | I-AUROC mean | P-AUROC | AUPRO@30% | train s | ms/frame (model) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for profile, r in rows:
        c = r["config"]
        lines.append(f"| {profile} | {c['backbone']} block {c['out_blocks']}, {c['image_size']} px | {c['student_width']} | "
                     f"{_fmt(r['max']['i_auroc'])} | {_fmt(r['mean']['i_auroc'])} | {_fmt(r['max']['p_auroc'])} | "
                     f"{_fmt(r['max']['aupro_30'])} | {r['training']['seconds']:.0f} | {r['ms_per_frame']:.0f} |")
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
        "",
        "Metrics on the 192 x 192 map grid (with an roi: the map covers the roi box, so the pixel metrics count "
        "the box's pixels; every test defect lies inside it).",
        "",
        "| run | extractor, input | RGB-only options | student width | epochs (teacher + student) | I-AUROC max | "
        "I-AUROC mean | I-AUROC top3 | P-AUROC | AUPRO@30% | AUPRO@1% | train s (wall) | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, spec, r in rows:
        c = r["config"]
        o = r.get("options") or {}
        opts = ", ".join(f"{k} {o[k]}" for k in OPTION_KEYS if o.get(k)) or "none (paper)"
        if r.get("seed"):
            opts += f", seed {r['seed']}"
        if r.get("splits", ["train"]) != ["train"]:
            opts += f", trained on {' + '.join(r['splits'])} ({r['training']['n_images']} images)"
        lines.append(f"| {name} | {c['backbone']} blocks {c['out_blocks']}, {c['image_size']} px | {opts} | "
                     f"{c['student_width']} | {r['training']['epochs']} + {r['training']['student_epochs']} | "
                     f"{_fmt(r['max']['i_auroc'])} | {_fmt(r['mean']['i_auroc'])} | "
                     f"{_fmt((r.get('top3') or {}).get('i_auroc'))} | "
                     f"{_fmt(r['max']['p_auroc'])} | {_fmt(r['max']['aupro_30'])} | {_fmt(r['max']['aupro_1'])} | "
                     f"{r['training']['seconds']:.0f} | {r.get('train_cpu_s', '–')} |")
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
        f"{args.bench_threads} torch thread(s), on a 2-core CPU shared with other jobs (load average {load:.1f} from other jobs while "
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
    lines += ["", f"Command: `python scripts/ast_results.py --sections bench --bench-threads {args.bench_threads} "
                  f"--bench-frames {args.bench_frames}` "
                  "(writes docs/_parts/benchmarks_ast.md)."]
    return lines


# ----------------------------------------------------------------------------- tire exploration on cached features

EXPLORE_DOC = """Tire exploration: AST teacher + student trained on cached frozen features (exact: the extractor is
frozen, so caching changes nothing but the time). ``python scripts/ast_results.py explore --help``.
Features: EfficientNet-Lite0 at --size px, blocks 10 / 12 / 14 / 15 of train, validation and test images,
cached once in --work/tire_lite0_SIZE.pt. Prints the student-teacher image scores (max, mean, top-10 mean,
max of the Gaussian-smoothed 192 map, max over cells z-scored with the validation images' per-cell distance
statistics, max over the inner cells, max over a colour foreground mask) and P-AUROC / AUPRO of the max
map every --eval-every student epochs. The colour foreground mask (a diagnostic, not in the product): the
RGB analogue of AST's four-corner background: per image, the Mahalanobis distance of the blurred colour
(192 px, sigma 2) to the colour statistics of the four 10 % corner patches; foreground = distance > 6,
dilated by 16 px, any coverage of a grid cell counts."""


def colour_foreground(rgb, grid: int, side: int = 192, thr: float = 6.0, dilate: int = 16):
    """bool grid x grid: cells touched by pixels whose blurred colour is far from the four corners' colour."""
    import cv2
    import numpy as np

    small = cv2.GaussianBlur(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32),
                             (0, 0), 2.0)
    c = max(2, round(0.1 * side))
    cor = np.concatenate([small[:c, :c], small[:c, -c:], small[-c:, :c], small[-c:, -c:]]).reshape(-1, 3)
    diff = small - cor.mean(0)
    m = np.sqrt(np.einsum("hwc,cd,hwd->hw", diff, np.linalg.inv(np.cov(cor.T) + 0.25 * np.eye(3)), diff))
    fg = cv2.dilate((m > thr).astype(np.uint8), np.ones((dilate, dilate), np.uint8)).astype(np.float32)
    return cv2.resize(fg, (grid, grid), interpolation=cv2.INTER_AREA) > 0


def _tire_cache(work: Path, tire: Path, size: int, roi: bool = False) -> Path:
    import numpy as np
    import torch

    from edge_runtime.data.mvtec import MVTec3D
    from edge_runtime.geometry import gt_to_map
    from edge_runtime.nets.efficientnet import INPUT_NORMALISATION
    from edge_runtime.nets.efficientnet_weights import build_efficientnet

    from edge_runtime.methods.ast.config import ASTConfig
    from edge_runtime.methods.ast.preprocess import foreground_roi, make_preprocessor, preprocessing_params, roi_geometry

    path = work / f"tire_lite0_{size}{'_roi' if roi else ''}.pt"
    if path.is_file():
        return path
    blocks = (10, 12, 14, 15)
    net, _ = build_efficientnet("efficientnet-lite0", blocks)
    net.eval()
    mean, std = INPUT_NORMALISATION["lite0"]
    ds = MVTec3D(tire)
    out = {}
    box = foreground_roi(r.load().rgb for r in ds.index("tire", "train")) if roi else None
    # the product's preprocessing (fit's roi="auto" gives the same box from the same training images)
    prep = make_preprocessor(preprocessing_params(
        ASTConfig(modality="rgb", backbone="lite0", out_blocks=(14,), image_size=size, grid=size // 32),
        mean, std, roi=box))
    out["roi"] = box
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        feats = {b: [] for b in blocks}
        labels, types, gts = [], [], []
        for ref in ds.index("tire", split):
            s = ref.load()
            with torch.no_grad():
                fs = net(torch.from_numpy(prep(s.rgb, None)["image"])[None])
            for b, f in zip(blocks, fs):
                feats[b].append(f[0].half())
            if split == "test":
                labels.append(int(s.label))
                types.append(s.defect_type)
                gts.append(gt_to_map(s.gt, (192, 192), roi_geometry(s.gt.shape, box)))
        out[key] = {b: torch.stack(v) for b, v in feats.items()}
        if split == "test":
            out.update(labels=labels, types=types, gts=np.stack(gts))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return path


def explore(argv) -> int:
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from edge_runtime.methods.ast.config import ASTConfig
    from edge_runtime.methods.ast.model import ASTStudent, ASTTeacher, student_loss, teacher_loss
    from edge_runtime.report import evaluate as report

    ap = argparse.ArgumentParser(prog="ast_results.py explore", description=EXPLORE_DOC)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "ast_explore")
    ap.add_argument("--tire", type=Path, required=True)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--blocks", type=int, nargs="+", default=[14])
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--student-epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--student-blocks", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4, help="teacher lr (paper 2e-4)")
    ap.add_argument("--student-lr", type=float, default=None, help="default: --lr")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pos", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="run")
    ap.add_argument("--train-colour-fg", action="store_true",
                    help="mask the teacher and student losses with the colour foreground of the training images")
    ap.add_argument("--roi", choices=("none", "auto"), default="none",
                    help="auto: features of the frames cropped to the box of the training images' corner-colour "
                         "foreground (the product's --roi auto; cache tire_lite0_SIZE_roi.pt); the colour "
                         "foreground diagnostics are then made on the whole frame and cut to the box")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = torch.load(_tire_cache(a.work, a.tire, a.size, roi=a.roi == "auto"), weights_only=False)
    from edge_runtime.methods.ast.preprocess import colour_foreground as product_fg

    def colour_fg(rgb, grid):  # the diagnostic mask (colour fg, no fallback), cut to the roi when there is one
        if d.get("roi") is None:
            return colour_foreground(rgb, grid)
        return product_fg(rgb, grid, roi=d["roi"]) > 0
    grid = a.size // 32

    def get(split):
        fs = []
        for b in a.blocks:
            f = d[split][b].float()
            fs.append(F.avg_pool2d(f, f.shape[-1] // grid) if f.shape[-1] > grid else f)
        return torch.cat(fs, 1)

    xtr, xte, xva = get("train"), get("test"), get("val")
    labels, gts, types = np.array(d["labels"]), d["gts"], d["types"]
    from edge_runtime.data.mvtec import MVTec3D

    fg_test = torch.from_numpy(np.stack([colour_fg(r.load().rgb, grid)
                                         for r in MVTec3D(a.tire).index("tire", "test")]))
    cfg = ASTConfig(modality="rgb", backbone="lite0", out_blocks=(14,), image_size=a.size, grid=grid,
                    pos_channels=a.pos, student_width=a.width, student_blocks=a.student_blocks,
                    teacher_hidden=a.hidden)
    object.__setattr__(cfg, "out_blocks", tuple(a.blocks))  # channels of the concatenation
    torch.manual_seed(0)
    teacher, student = ASTTeacher(cfg), ASTStudent(cfg)
    fg = torch.ones(xtr.shape[0], grid, grid)  # RGB only: every cell counts
    if a.train_colour_fg:  # the paper's loss masking, with the colour foreground instead of depth
        fg = torch.from_numpy(np.stack([colour_fg(r.load().rgb, grid)
                                        for r in MVTec3D(a.tire).index("tire", "train")])).float()
        print(f"training foreground: {float(fg.mean()):.2f} of the cells", flush=True)
    gen = torch.Generator().manual_seed(0)

    def loop(mod, lossf, data, epochs, lr, desc, cb=None):
        opt = torch.optim.Adam([p for p in mod.parameters() if p.requires_grad], lr=lr, weight_decay=1e-5)
        n, t0 = data[0].shape[0], time.time()
        for ep in range(epochs):
            mod.train()
            order, tot = torch.randperm(n, generator=gen), 0.0
            for i in range(0, n, a.batch_size):
                idx = order[i:i + a.batch_size]
                if len(idx) < 2:
                    continue
                loss = lossf(*[v[idx] for v in data])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += loss.item() * len(idx)
            print(f"{desc} epoch {ep + 1} loss {tot / n:.4f} {time.time() - t0:.0f} s", flush=True)
            if cb and a.eval_every and (ep + 1) % a.eval_every == 0 and ep + 1 < epochs:
                cb(ep + 1)
        mod.eval()
        return time.time() - t0

    tt = loop(teacher, lambda x, f: teacher_loss(teacher, x, f), (xtr, fg), a.teacher_epochs, a.lr, "teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)

    def run(mod, x):
        with torch.no_grad():
            return torch.cat([mod(x[i:i + 16]) for i in range(0, len(x), 16)])

    ttr, tte, tva = run(teacher, xtr), run(teacher, xte), run(teacher, xva)

    def ev(ep):
        student.eval()
        dist = ((run(student, xte) - tte) ** 2).mean(1)
        dva = ((run(student, xva) - tva) ** 2).mean(1)
        zn = (dist - dva.mean(0)) / (dva.std(0) + 1e-6)
        maps = F.interpolate(dist[:, None], size=(192, 192), mode="bicubic", align_corners=False)[:, 0]
        maps = maps.clamp_min(0).numpy()
        smooth = np.stack([cv2.GaussianBlur(m, (0, 0), 4) for m in maps])
        flat = dist.flatten(1)
        scores = {"max": flat.max(1).values, "mean": flat.mean(1), "top10": flat.topk(10, 1).values.mean(1),
                  "smooth4_max": torch.from_numpy(smooth.reshape(len(smooth), -1).max(1)),
                  "val_z_max": zn.flatten(1).max(1).values, "inner_max": dist[:, 1:-1, 1:-1].flatten(1).max(1).values,
                  "colour_fg_max": (dist * fg_test).flatten(1).max(1).values,
                  "colour_fg_mean": (dist * fg_test).flatten(1).sum(1) / fg_test.flatten(1).sum(1),
                  "colour_fg_top3": (dist * fg_test).flatten(1).topk(3, 1).values.mean(1)}
        for k in (1, 2, 3):  # the outer k rings of cells left out (the product's border option, at score time)
            inner = dist[:, k:-k, k:-k].flatten(1)
            scores[f"border{k}_max"] = inner.max(1).values
            scores[f"border{k}_top3"] = inner.topk(3, 1).values.mean(1)
        res = {k: roc_auc_score(labels, v.numpy()) for k, v in scores.items()}
        r = report("tire", "ast", "", scores["max"].numpy(), labels, maps, gts, types)
        res.update(p_auroc=r["p_auroc"], aupro_30=r["aupro_30"], aupro_1=r["aupro_1"],
                   train_dist=float(((run(student, xtr[:32]) - ttr[:32]) ** 2).mean()),
                   test_good_dist=float(dist[labels == 0].mean()))
        np.save(a.work / f"dist_{a.name}_e{ep}.npy", dist.numpy())
        print(f"EVAL student epoch {ep}", json.dumps({k: round(float(v), 3) for k, v in res.items()}), flush=True)
        student.train()
        return res

    ts = loop(student, lambda x, t, f: student_loss(student, x, t, f), (xtr, ttr, fg), a.student_epochs,
              a.student_lr or a.lr, "student", ev)
    res = ev(a.student_epochs)
    res.update(name=a.name, args={k: str(v) for k, v in vars(a).items()}, seconds_teacher=tt, seconds_student=ts)
    with open(a.work / "explore.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "ast_results")
    ap.add_argument("--tire", type=Path, default=None, help="root holding the tire category (MVTec 3D-AD layout)")
    ap.add_argument("--sections", nargs="+", default=["synth", "tire"], choices=["synth", "tire", "profiles", "bench"])
    ap.add_argument("--bench-threads", type=int, default=2)
    ap.add_argument("--bench-frames", type=int, default=5)
    ap.add_argument("--bench-out", type=Path, default=REPO / "docs" / "_parts" / "benchmarks_ast.md")
    ap.add_argument("--categories", nargs="+", default=["puck", "box"])
    ap.add_argument("--synth-size", type=int, default=224)
    ap.add_argument("--synth-train", type=int, default=40)
    ap.add_argument("--synth-epochs", type=int, default=20)
    ap.add_argument("--profile-shots", type=int, default=8)
    ap.add_argument("--profile-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "_parts" / "results_ast.md")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--tire-run", nargs="+", default=None, metavar="NAME",
                    help="only these TIRE_RUNS (default: all)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["explore"]:
        return explore(argv[1:])
    args = ap.parse_args(argv)
    unknown = [n for n in args.tire_run or [] if n not in TIRE_RUNS]
    if unknown:
        ap.error(f"--tire-run: unknown {unknown} (known: {', '.join(TIRE_RUNS)})")
    args.tire_runs = {n: TIRE_RUNS[n] for n in (args.tire_run or TIRE_RUNS)}
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
    if "profiles" in args.sections:
        lines += section_profiles(args) + [""]
    lines.append(f"Command: `python scripts/ast_results.py --work {args.work} "
                 + (f"--tire {args.tire} " if args.tire else "") + f"--sections {' '.join(args.sections)}` "
                 f"({time.time() - t0:.0f} s this run, cached runs skipped).")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
