"""DBRN results on the synthetic station and the MVTec 3D-AD tire images -> docs/_parts/results_dbrn.md.

Until edge-train / edge-eval drive every method, this script calls the DBRN trainer
(``train.dbrn_trainer.fit``) and ``edge_runtime.metrics`` directly. Every run is one job
(category, modality, texture source, epochs) whose figures go to ``--runs DIR/<job>.json``,
so jobs can run in separate processes and ``--report`` assembles whatever is there.

    python scripts/dbrn_results.py --data /tmp/synth --jobs puck:rgb+3d box:rgb+3d --epochs 25
    python scripts/dbrn_results.py --tire /path/to/mvtec3d/tire --jobs tire:rgb --epochs 25
    python scripts/dbrn_results.py --data /tmp/synth --epochs 60 --diagnose cookie:rgb+3d=/tmp/m/cookie_rgb3d.pt
    python scripts/dbrn_results.py --report            # runs/dbrn/*.json -> docs/_parts/results_dbrn.md
    python scripts/dbrn_results.py --picture           # docs/img/dbrn_simulation.png

``--diagnose JOB=PATH`` takes a model saved by ``--save-model`` and writes
``runs/dbrn_diag/<job>.json``: detection of simulated defects on the good test images,
the trained discriminator with a perfect (oracle) reconstruction, and, per real defect
type, how strong the defect is and what the reconstruction does to it (the station
re-renders each defective part without its defect, so --data must be the
``edge-synth --size 160 --seed 0`` dataset with 40 good / 10 per type test images);
``--report`` adds them as the "Diagnosis" subsection.

The synthetic data is ``edge-synth --size 160 --categories puck box cookie --train 40
--val 10 --test-good 12 --test-defect 5`` (12 good + 25 defective test images per
category). CPU runs use one torch thread per job (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.data.mvtec import MVTec3D  # noqa: E402
from edge_runtime.geometry import MapGeometry, gt_to_map  # noqa: E402
from edge_runtime.methods.dbrn.config import DBRNConfig  # noqa: E402
from edge_runtime.methods.dbrn.model import DBRNModel  # noqa: E402
from edge_runtime.methods.dbrn.preprocess import preprocess_frame  # noqa: E402
from edge_runtime.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from train.dbrn_trainer import config_for, fit, plot_losses, prepare_data, settings_for  # noqa: E402

PAPER_TIRE = {"DBRN RGB": 0.810, "DBRN RGB+3D": 0.696, "DBRN RGB+3D (MS)": 0.710, "DRAEM RGB": 0.880}


SCORE_VARIANTS = ("max", "max-box9", "max-box21", "top100", "max-box9-all", "max-box9-minus-median")


def score_variants(maps: np.ndarray, fgs: list[np.ndarray]) -> dict[str, list[float]]:
    """Alternative image scores of the same anomaly maps (N x R x R), restricted to the
    valid pixels ``fgs`` unless the name ends in ``-all``: the raw maximum, the maximum
    of a k x k box-filtered map (the model's default is k = 9), the mean of the 100
    highest pixels, and the box-9 maximum minus the median over the valid pixels."""
    import cv2

    out: dict[str, list[float]] = {k: [] for k in SCORE_VARIANTS}
    for a, fg in zip(maps.astype(np.float32), fgs):
        b9, b21 = cv2.blur(a, (9, 9)), cv2.blur(a, (21, 21))
        v = a[fg] if fg.any() else a.ravel()
        v9 = b9[fg] if fg.any() else b9.ravel()
        out["max"].append(float(v.max()))
        out["max-box9"].append(float(v9.max()))
        out["max-box21"].append(float((b21[fg] if fg.any() else b21.ravel()).max()))
        out["top100"].append(float(np.sort(v)[-100:].mean()))
        out["max-box9-all"].append(float(b9.max()))
        out["max-box9-minus-median"].append(float(v9.max() - np.median(v9)))
    return out


def fg_pixel_auroc(maps: np.ndarray, gts: np.ndarray, fgs: list[np.ndarray]) -> float | None:
    """P-AUROC over the foreground pixels only (None without a depth foreground). A map that
    merely lights up the part already scores a high plain P-AUROC on this data; this one
    asks whether the map finds the defect on the part."""
    fg = np.stack(fgs)
    if fg.all():
        return None
    return pixel_auroc(maps[fg][None], gts[fg][None])


def evaluate(model: DBRNModel, refs, cfg, preprocessing: dict, multiscale: bool, dropout: str = "fixed") -> dict:
    """Scores, maps and metrics of ``model`` on ``refs`` (test split)."""
    model.eval()
    model.multiscale = multiscale
    model.set_dropout_mode(dropout)
    scores, labels, maps, gts, types, ms, fgs = [], [], [], [], [], [], []
    for ref in refs:
        s = ref.load()
        inp = preprocess_frame(s.rgb, s.xyz, cfg.modality, cfg.resolution, preprocessing)
        t0 = time.perf_counter()
        with torch.no_grad():
            sc, am = model({k: torch.from_numpy(v)[None] for k, v in inp.items()})
        ms.append((time.perf_counter() - t0) * 1e3)
        scores.append(float(sc[0]))
        labels.append(s.label)
        maps.append(am[0].numpy())
        gts.append(gt_to_map(s.gt, am.shape[1:], MapGeometry.identity(s.rgb.shape)))
        types.append(s.defect_type)
        fgs.append(inp["fg"] > 0.5 if "fg" in inp else np.ones(am.shape[1:], bool))
    maps_a, gts_a = np.stack(maps), np.stack(gts)
    variants = score_variants(maps_a, fgs)
    per_type = {}
    for t in sorted(set(types) - {"good"}):
        keep = [i for i, x in enumerate(types) if x in (t, "good")]
        per_type[t] = image_auroc([scores[i] for i in keep], [labels[i] for i in keep])
    return {"i_auroc": image_auroc(scores, labels), "p_auroc": pixel_auroc(maps_a, gts_a),
            "aupro30": aupro(maps_a, gts_a, 0.3), "per_type": per_type, "scores": scores, "labels": labels,
            "score_variants": {k: image_auroc(v, labels) for k, v in variants.items()},
            "p_auroc_fg": fg_pixel_auroc(maps_a, gts_a, fgs),
            "p_auroc_mask_only": pixel_auroc(np.stack(fgs).astype(np.float32), gts_a),
            "ms_per_frame": float(np.median(ms)), "n_good": labels.count(0), "n_defect": labels.count(1)}


# Named training recipes (the cpu profile's config and settings, overridden): "cpu" is the
# profile as it stands; "v1" is the recipe before the simulation / class-weight change
# (DRAEM-sized masks 2^0..2^4 cells, full-strength defects, focal class weights 0.25 / 0.75,
# image score = max of the 9 x 9 box-filtered map).
RECIPES: dict[str, dict] = {
    "cpu": {},
    "v1": {"config": {"score_pool": 9}, "settings": {"focal_alpha": (0.25, 0.75), "sim": {}}},
    # round 3: the depth simulation closer to the station's dents / bumps (fainter textured
    # blends, and half of the depth defects a smooth raised-cosine relief of peak 0.02..0.15)
    "v3": {"settings": {"sim": {"min_lattice_log2": 2, "max_lattice_log2": 5, "rgb_strength": (0.2, 1.0),
                                "depth_strength": (0.05, 0.5), "p_smooth_depth": 0.5,
                                "smooth_depth_amp": (0.02, 0.15)}}},
}


def job_tag(job: str, recipe: str = "cpu") -> str:
    tag = job.replace(":", "_").replace("+", "")
    return tag if recipe == "cpu" else f"{tag}_{recipe}"


def run_job(job: str, args) -> dict:
    """Train and evaluate one job "category:modality[:texture]"."""
    parts = job.split(":")
    cat, modality = parts[0], parts[1]
    texture = parts[2] if len(parts) > 2 else "mixed"
    root = args.tire.parent if cat == "tire" else args.data
    ds = MVTec3D(root)
    train_refs = ds.index(cat, "train")
    if args.shots:
        train_refs = train_refs[:args.shots]
    test_refs = ds.index(cat, "test")
    recipe = RECIPES[args.recipe]
    overrides = dict(recipe.get("config", {}))
    if args.resolution:
        overrides["resolution"] = args.resolution
    cfg = config_for("cpu", modality, overrides)
    settings = settings_for("cpu", args.epochs, None, args.lr, texture_source=texture, seed=args.seed,
                            **recipe.get("settings", {}))
    saved = dict(x.split("=", 1) for x in args.saved)
    t0 = time.perf_counter()
    if job in saved:  # a model an earlier run saved (--save-model): evaluate only
        st = torch.load(saved[job], map_location="cpu", weights_only=True)
        cfg = DBRNConfig.from_dict(st["config"])
        data = prepare_data([r.load() for r in train_refs], cfg, st["preprocessing"])
        model = DBRNModel(cfg)
        model.load_state_dict(st["state"])
        hist = {"epoch": {}, "seconds": None}
    else:
        data = prepare_data([r.load() for r in train_refs], cfg)
    prep_s = time.perf_counter() - t0
    if job not in saved:
        torch.manual_seed(args.seed)
        model = DBRNModel(cfg)
        hist = fit(model, data, settings, progress=not args.quiet)
    tag = job_tag(job, args.recipe)
    if args.loss_plot_dir and hist["epoch"]:
        plot_losses(hist, Path(args.loss_plot_dir) / f"dbrn_losses_{tag}.png", f"DBRN {modality} on {cat}")
    res = {"job": job, "recipe": args.recipe, "category": cat, "modality": modality, "texture": texture,
           "data": str(args.tire if cat == "tire" else args.data),
           "epochs": settings.epochs, "settings": {k: v for k, v in asdict(settings).items() if k != "checkpoint_path"},
           "score_pool": cfg.score_pool, "saved": saved.get(job),
           "n_train": len(data), "resolution": cfg.resolution, "train_seconds": hist["seconds"],
           "prep_seconds": prep_s, "threads": torch.get_num_threads(), "losses": hist["epoch"],
           "preprocessing": data.preprocessing}
    for ms in (True, False):
        res["multiscale" if ms else "single"] = evaluate(model, test_refs, cfg, data.preprocessing, ms)
    if args.dropout_passes:
        runs = [evaluate(model, test_refs, cfg, data.preprocessing, True, "random") for _ in range(args.dropout_passes)]
        sc = np.array([r["scores"] for r in runs])
        res["random_dropout"] = {"passes": args.dropout_passes, "i_auroc": [r["i_auroc"] for r in runs],
                                 "score_std_mean": float(sc.std(0).mean()),
                                 "score_spread": float(np.mean(sc.max(0) - sc.min(0))),
                                 "i_auroc_of_mean": image_auroc(sc.mean(0), runs[0]["labels"])}
        res["dropout_off"] = evaluate(model, test_refs, cfg, data.preprocessing, True, "off")
    if args.save_model:
        Path(args.save_model).mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg.to_dict(), "preprocessing": data.preprocessing, "state": model.state_dict()},
                   Path(args.save_model) / f"{tag}.pt")
    return res


# --------------------------------------------------------------------------- report


def _min(r: dict) -> str:
    return "-" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f}"


def _f(x):
    return "-" if x is None else f"{x:.3f}"


SYNTH_CMD = ("edge-synth --out /tmp/dbrn_synth2 --size 160 --categories puck box cookie --train 40 --val 0 "
             "--test-good 40 --test-defect 10")
TYPES = ("color", "dent", "bump", "crack", "hole")


def _cmd(r: dict) -> str:
    """The command line that produced one run (as the docs quote it)."""
    src = ("--tire /work/shared/data/mvtec3d-tire-rgb/tire" if r["category"] == "tire"
           else f"--data {r.get('data', '/tmp/dbrn_synth2')}")
    rec = "" if r.get("recipe", "cpu") == "cpu" else f" --recipe {r['recipe']}"
    saved = f" --saved {r['job']}={r['saved']}" if r.get("saved") else ""
    passes = f" --dropout-passes {r['random_dropout']['passes']}" if "random_dropout" in r else ""
    return f"python scripts/dbrn_results.py {src}{rec} --jobs {r['job']} --epochs {r['epochs']}{saved}{passes}"


def _diag_cmd(d: dict) -> str:
    rec = "" if d.get("recipe", "cpu") == "cpu" else f" --recipe {d['recipe']}"
    ep = f" --epochs {d['epochs']}" if d.get("epochs") else ""
    return f"python scripts/dbrn_results.py --data /tmp/dbrn_synth2{rec}{ep} --diagnose {d['job']}={d['model']}"


def diagnosis_lines(diag_dir: Path | None) -> list[str]:
    """The "Diagnosis" subsection from ``--diagnose`` JSON files (empty when there are none)."""
    diags = [json.loads(p.read_text()) for p in sorted(diag_dir.glob("*.json"))] if diag_dir and diag_dir.is_dir() else []
    if not diags:
        return []
    name = lambda d: f"{d['job'].split(':')[0]} {d['job'].split(':')[1]} ({d.get('recipe', 'cpu')}, {d.get('epochs')} epochs)"  # noqa: E731
    lines = ["### Diagnosis (`--diagnose`)", "",
             "(a) Simulated defects (the `cpu` profile's simulation, every sample anomalous, `mixed` textures, "
             "seeded) pasted on the 40 good test images, scored against the same 40 images clean: does the "
             "discriminator learn its own training task? Probabilities = mean of the map (MS).", "",
             "Oracle = the real test set with a perfect reconstruction: the discriminator is given the "
             "defect-free render of the same part as every scale's reconstruction (a good image: itself), so "
             "its pair differs exactly inside the gt (an upper bound on what a better reconstruction could "
             "give this discriminator).", "",
             "| model | simulated I-AUROC | simulated P-AUROC on the part | prob. in the simulated defect | "
             "prob. elsewhere on the part | oracle I-AUROC | oracle P-AUROC on the part | "
             "oracle I-AUROC color / dent / bump / crack / hole | command |", "|---|---|---|---|---|---|---|---|---|"]
    for d in diags:
        a, o = d["diagnosis"]["simulated"], d["diagnosis"].get("oracle", {})
        per = " / ".join(_f(o.get("per_type", {}).get(t)) for t in TYPES) if o else "-"
        lines.append(f"| {name(d)} | {_f(a['i_auroc'])} | {_f(a['p_auroc_fg'])} | {_f(a['prob_defect'])} | "
                     f"{_f(a['prob_part'])} | {_f(o.get('i_auroc'))} | {_f(o.get('p_auroc_fg'))} | {per} | "
                     f"`{_diag_cmd(d)}` |")
    lines += ["", "(b) The real test defects against the defect-free render of the same part (the station renders "
              "it exactly; identical outside the gt), in the branch that sees the defect (depth for dent / bump, "
              "else RGB), medians over each type's 10 images: mean |input - clean| inside the gt (how strong "
              "the defect is), |reconstruction - clean| (did the reconstruction remove it: small = yes), "
              "|input - reconstruction| inside the gt and elsewhere on the part (the contrast the discriminator "
              "gets), and the map's mean probability inside the gt and elsewhere on the part. `good`: mean "
              "|input - reconstruction| on the part of the good test images (rgb / depth).", "",
              "| model | type | branch | \\|x - clean\\| in gt | \\|rec - clean\\| in gt | \\|x - rec\\| in gt | "
              "\\|x - rec\\| elsewhere | prob. in gt | prob. elsewhere |", "|---|---|---|---|---|---|---|---|---|"]
    for d in diags:
        g = d["diagnosis"].get("good", {})
        lines.append(f"| {name(d)} | good | rgb / depth | | | | {_f(g.get('res_rgb'))} / {_f(g.get('res_depth'))} | | "
                     f"{_f(g.get('prob_part'))} |")
        for t in TYPES:
            x = d["diagnosis"].get(t)
            if x:
                lines.append(f"| {name(d)} | {t} | {x['branch']} | {_f(x['input_vs_clean'])} | {_f(x['rec_vs_clean'])} | "
                             f"{_f(x['res_defect'])} | {_f(x['res_part'])} | {_f(x['prob_defect'])} | "
                             f"{_f(x['prob_part'])} |")
    mags = {d["job"].split(":")[0]: d["magnitudes"] for d in diags if d.get("magnitudes")}
    if mags:
        lines += ["", "(c) Real vs simulated defects in the model's inputs (128 px, the trained model's depth "
                  "normalisation): gt area in pixels, mean |change| inside the gt of the RGB (largest channel) and "
                  "of the normalised depth (good surface in [0.2, 0.8]). Simulated: 200 simulations (the `cpu` "
                  "profile's, and the `v3` recipe's) on the first 10 training images (median; p10 in brackets). Same figures in every model of a "
                  "category (they depend on the data and the depth constants only).", "",
                  "| category | defect | n | area px | \\|d rgb\\| | \\|d depth\\| |", "|---|---|---|---|---|---|"]
        for cat, m in sorted(mags.items()):
            for t in TYPES:
                if t in m:
                    lines.append(f"| {cat} | {t} | {m[t]['n']} | {m[t]['area_px']:.0f} | {_f(m[t]['d_rgb'])} | "
                                 f"{_f(m[t]['d_depth'])} |")
            for label in [k for k in m if k.startswith("simulated")]:
                sm = m[label]
                lines.append(f"| {cat} | {label} | {sm['n']} | {sm['area_px']:.0f} ({sm['area_px_p10']:.0f}) | "
                             f"{_f(sm['d_rgb'])} ({_f(sm['d_rgb_p10'])}) | {_f(sm['d_depth'])} "
                             f"({_f(sm['d_depth_p10'])}) |")
    lines.append("")
    return lines


def report(runs_dir: Path, out: Path, diag_dir: Path | None = None) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    for r in runs:
        r.setdefault("recipe", "cpu")
    order = {"rgb": 0, "3d": 1, "rgb+3d": 2}
    key = lambda r: (r["category"], order[r["modality"]], r["recipe"], r["texture"], -r["epochs"])  # noqa: E731
    lines = ["## DBRN (Dual-Branch Reconstruction Network)", "",
             "Trained from scratch on good parts with simulated anomalies (no pretrained weights), `cpu` "
             "profile: 128 px, Swin-Unet width 32, U-Net width 16 on 2x2 patches, batch 4, Adam 1e-3 (ISM 1e-2), "
             "one torch thread per run on a 2-core CPU shared with other jobs (load average 2-5 while these ran). "
             "I-AUROC / P-AUROC / AUPRO@30% on the test split; MS = the three reconstruction scales averaged, "
             "SS = the full-size scale only; test-time skip dropout = the fixed seeded mask (default). "
             "`P-AUROC fg` counts only the pixels on the part (the depth foreground): a map that merely lights "
             "up the part already reaches a high plain P-AUROC on this data (column `P-AUROC of the bare part "
             "mask`: the binary foreground itself as the map), so only `P-AUROC fg` says whether the map finds "
             "the defect on the part.", "",
             f"Synthetic data: `{SYNTH_CMD}` (40 train images; 40 good + 50 defective test images per category, "
             "so one image moves I-AUROC by at most 0.025). Each row's command is in its last column; "
             "`python scripts/dbrn_results.py --report` rebuilds this section from the runs' JSON files "
             "(`runs/dbrn/`).", "",
             "Recipes: `cpu` = the profile now (Perlin blobs of 2^2..2^5 lattice cells, defects of random "
             "strength: RGB 0.2..1, depth 0.1..1 of the full blend, focal class weights 0.05 / 0.95, image "
             "score = raw maximum of the map over the part); `v1` = the profile before (blobs 2^0..2^4 cells, "
             "full-strength blends, focal weights 0.25 / 0.75, score = maximum of the 9 x 9 box-filtered "
             "map); `v3` = `cpu` with the depth simulation made closer to the station's dents / bumps (textured "
             "depth blends at 0.05..0.5 of full strength instead of 0.1..1, and half of the depth defects a "
             "smooth raised-cosine relief of peak 0.02..0.15 normalised depth; tried in round 3, not adopted).", ""]
    syn = [r for r in runs if r["category"] != "tire"]
    mask_only = {r["category"]: r["multiscale"]["p_auroc_mask_only"] for r in syn  # depends on the data only
                 if r["modality"] != "rgb" and r["multiscale"].get("p_auroc_mask_only") is not None}
    if syn:
        lines += ["### Synthetic station", "",
                  "| category | modality | recipe | texture | epochs | train images | train min | test good/defective | I-AUROC MS | "
                  "I-AUROC SS | P-AUROC MS | P-AUROC fg MS | AUPRO@30% MS | P-AUROC of the bare part mask | command |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(syn, key=key):
            m, s = r["multiscale"], r["single"]
            lines.append(f"| {r['category']} | {r['modality']} | {r['recipe']} | {r['texture']} | {r['epochs']} | "
                         f"{r['n_train']} | {_min(r)} | {m['n_good']}/{m['n_defect']} | {_f(m['i_auroc'])} | "
                         f"{_f(s['i_auroc'])} | {_f(m['p_auroc'])} | {_f(m.get('p_auroc_fg'))} | "
                         f"{_f(m['aupro30'])} | "
                         f"{_f(mask_only.get(r['category']) if r['modality'] != 'rgb' else None)} | "
                         f"`{_cmd(r)}` |")
        lines += ["", "Image score variants, same maps re-scored (I-AUROC; `max` is the `cpu` recipe's score, "
                  "`max-box9` the `v1` one; all over the part unless `-all`; MS / SS):", "",
                  "| category | modality | recipe | texture | epochs | " + " | ".join(f"`{v}`" for v in SCORE_VARIANTS)
                  + " |", "|---|---|---|---|---|" + "---|" * len(SCORE_VARIANTS)]
        for r in sorted(syn, key=key):
            if "score_variants" not in r["multiscale"]:
                continue
            vm, vs = r["multiscale"]["score_variants"], r["single"]["score_variants"]
            lines.append(f"| {r['category']} | {r['modality']} | {r['recipe']} | {r['texture']} | {r['epochs']} | "
                         + " | ".join(f"{vm[v]:.3f} / {vs[v]:.3f}" for v in SCORE_VARIANTS) + " |")
        lines += ["", "I-AUROC per defect type (each type's 10 images against the 40 good ones, MS):", "",
                  "| category | modality | recipe | texture | epochs | " + " | ".join(
                      ["color (rgb)", "dent (3d)", "bump (3d)", "crack (both)", "hole (both)"]) + " |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(syn, key=key):
            pt = r["multiscale"]["per_type"]
            lines.append(f"| {r['category']} | {r['modality']} | {r['recipe']} | {r['texture']} | {r['epochs']} | "
                         + " | ".join(_f(pt.get(t)) for t in TYPES) + " |")
        lines.append("")
    by: dict[tuple, dict] = {}
    for r in syn:
        by.setdefault((r["category"], r["modality"], r["recipe"], r["epochs"]), {})[r["texture"]] = r
    pairs = {k: v for k, v in by.items() if len(v) > 1}
    if pairs:
        lines += ["### Texture source for the simulated defects", "",
                  "No natural-image texture set is available offline. `procedural` = fractal noise / stripes / "
                  "checkerboards in random colours; `self` = augmented crops of the category's own good training "
                  "images; `mixed` = either, 50 / 50 (the default). Same runs as in the table above.", "",
                  "| category | modality | recipe | epochs | texture | I-AUROC MS | I-AUROC SS | P-AUROC MS | "
                  "final focal loss | command |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (cat, mod, rec, ep), v in sorted(pairs.items()):
            for t, r in sorted(v.items()):
                m, s_ = r["multiscale"], r["single"]
                focal = r["losses"].get("focal", [None])[-1] if r.get("losses") else None
                lines.append(f"| {cat} | {mod} | {rec} | {ep} | {t} | {_f(m['i_auroc'])} | {_f(s_['i_auroc'])} | "
                             f"{_f(m['p_auroc'])} | {'-' if focal is None else f'{focal:.4f}'} | `{_cmd(r)}` |")
        lines.append("")
    drop = [r for r in runs if "random_dropout" in r]
    if drop:
        lines += ["### Test-time dropout", "",
                  "The paper keeps the skip dropout (0.6 / 0.4 / 0.2) active at test time. With fresh masks per "
                  "call (`random`) the same frame scores differently on every pass; the default `fixed` mode "
                  "draws one seeded mask per skip at construction and stores it with the weights (deterministic, "
                  "one exportable graph); `off` disables it.", "",
                  "| run | fixed I-AUROC | random: I-AUROC over passes | random: mean score std per image | "
                  "random: mean of passes I-AUROC | off I-AUROC | command |", "|---|---|---|---|---|---|---|"]
        for r in drop:
            d = r["random_dropout"]
            lines.append(f"| {r['category']} {r['modality']} ({r['recipe']}, {r['epochs']} epochs) | "
                         f"{_f(r['multiscale']['i_auroc'])} | "
                         f"{min(d['i_auroc']):.3f} .. {max(d['i_auroc']):.3f} ({d['passes']} passes) | "
                         f"{d['score_std_mean']:.4f} | {_f(d['i_auroc_of_mean'])} | "
                         f"{_f(r['dropout_off']['i_auroc'])} | `{_cmd(r)}` |")
        lines.append("")
    tire = [r for r in runs if r["category"] == "tire"]
    if tire:
        lines += ["### MVTec 3D-AD tire (RGB only)", "",
                  "The shared tire images carry no point clouds, so only the rgb mode runs; with no depth "
                  "foreground, simulated defects may land anywhere in the image. 105 train images; test: "
                  "14 good + 48 defective, so one good image moves I-AUROC by up to 0.07.", "",
                  "| run | epochs | train images | train min | I-AUROC MS | I-AUROC SS | P-AUROC MS | "
                  "AUPRO@30% MS | command |", "|---|---|---|---|---|---|---|---|---|"]
        for r in tire:
            m, s = r["multiscale"], r["single"]
            lines.append(f"| DBRN rgb (ours, {r['recipe']} recipe, {r['texture']}) | {r['epochs']} | {r['n_train']} | "
                         f"{r['train_seconds'] / 60:.1f} | {_f(m['i_auroc'])} | {_f(s['i_auroc'])} | "
                         f"{_f(m['p_auroc'])} | {_f(m['aupro30'])} | `{_cmd(r)}` |")
        for k, v in PAPER_TIRE.items():
            lines.append(f"| {k} (paper, Table I) | | | | {v:.3f} | | | | |")
        lines.append("")
    lines += diagnosis_lines(diag_dir)
    # the hand-written findings below the marker survive a rebuild
    marker = "<!-- findings (hand-written; kept by --report) -->"
    if out.exists() and marker in out.read_text():
        lines += [marker + out.read_text().split(marker, 1)[1].rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")


# --------------------------------------------------------------------------- diagnosis


def _gt_small(gt, r: int) -> np.ndarray:
    import cv2

    return cv2.resize((np.asarray(gt) > 0).astype(np.float32), (r, r), interpolation=cv2.INTER_AREA) > 0.25


def _forward_parts(model: DBRNModel, inp: dict):
    """(image score, anomaly map R x R, {branch: full-size reconstruction C x R x R})."""
    with torch.no_grad():
        x = {k: torch.from_numpy(v)[None] for k, v in inp.items()}
        recs = {b: model.reconstructor(b)(x[b]) for b in model.branches}
        amap = model.discriminate(x, recs).mean(1)
        sc = model.score(amap, x.get("fg") if "depth" in model.branches else None)
    return float(sc[0]), amap[0].numpy(), {b: r[0, 0].numpy() for b, r in recs.items()}


def defect_magnitudes(category: str, preprocessing: dict, resolution: int = 128, size: int = 160, n_good: int = 40,
                      n_defect: int = 10, n_sim: int = 200, texture: str = "mixed", sims: dict | None = None) -> dict:
    """How large and how strong the station's real defects are in the model's inputs, against
    the simulated ones. Real: each test defect frame against the defect-free render of the
    same part (``SynthStation(size, seed 0)``; identical outside the gt): gt area in pixels at
    R, mean |change| of RGB (max over channels) and of the normalised depth inside the gt.
    Simulated: ``n_sim`` cpu-profile simulations on the first training images, same figures
    inside the mask."""
    from edge_runtime.data.synth import SynthStation, dataset_plan
    from edge_runtime.methods.dbrn.simulate import SimParams, simulate

    st = SynthStation(size, 0, [category])
    real: dict[str, list] = {}
    for split, folder, idx, _ in dataset_plan(0, 0, n_good, n_defect):
        if folder == "good":
            continue
        d, g = st.render(category, idx, "test", folder), st.render(category, idx, "test")
        pd, pg = (preprocess_frame(x.rgb, x.xyz, "rgb+3d", resolution, preprocessing) for x in (d, g))
        gt = _gt_small(d.gt, resolution)
        if gt.any():
            real.setdefault(folder, []).append((int(gt.sum()), float(np.abs(pd["rgb"] - pg["rgb"]).max(0)[gt].mean()),
                                                float(np.abs(pd["depth"] - pg["depth"])[0][gt].mean())))
    pre = [preprocess_frame(x.rgb, x.xyz, "rgb+3d", resolution, preprocessing)
           for x in (st.render(category, i, "train") for i in range(10))]
    pool = [p["rgb"].transpose(1, 2, 0) for p in pre]
    found = {}
    for label, sim_kw in (sims or {"simulated": settings_for("cpu").sim}).items():
        sim = SimParams(**{**sim_kw, "texture_source": texture})
        rows = []
        for j in range(n_sim):
            p = pre[j % len(pre)]
            s = simulate(p["rgb"], p["depth"], p["fg"] > 0.5, np.random.default_rng([1, j]), sim, pool)
            m = s["mask"] > 0.5
            if m.any():
                rows.append((int(m.sum()), float(np.abs(s["rgb"] - p["rgb"]).max(0)[m].mean()) if s["changed"]["rgb"] else None,
                             float(np.abs(s["depth"] - p["depth"])[0][m].mean()) if s["changed"]["depth"] else None))
        found[label] = rows

    def med(v):
        v = [x for x in v if x is not None]
        return None if not v else float(np.median(v))

    def p10(v):
        v = [x for x in v if x is not None]
        return None if not v else float(np.percentile(v, 10))

    out = {t: {"n": len(v), "area_px": med([x[0] for x in v]), "d_rgb": med([x[1] for x in v]),
               "d_depth": med([x[2] for x in v])} for t, v in real.items()}
    for label, sims_ in found.items():
        out[label] = {"n": len(sims_), "area_px": med([x[0] for x in sims_]), "area_px_p10": p10([x[0] for x in sims_]),
                      "d_rgb": med([x[1] for x in sims_]), "d_rgb_p10": p10([x[1] for x in sims_]),
                      "d_depth": med([x[2] for x in sims_]), "d_depth_p10": p10([x[2] for x in sims_])}
    return out


def diagnose(model: DBRNModel, cfg: DBRNConfig, preprocessing: dict, category: str, size: int = 160,
             n_good: int = 40, n_defect: int = 10, texture: str = "mixed") -> dict:
    """Why a model does (not) detect: (a) simulated defects (the cpu profile's simulation,
    every sample anomalous) on the good test images against the same images clean:
    I-AUROC, P-AUROC on the part, mean probability inside the defect / elsewhere on the part;
    (b) the real test defects: mean |reconstruction - defect-free render| and |input -
    reconstruction| inside the gt against |input - reconstruction| elsewhere on the part,
    mean probability inside the gt / elsewhere on the part; good images: mean |input -
    reconstruction| on the part."""
    from edge_runtime.data.synth import SynthStation, dataset_plan
    from edge_runtime.methods.dbrn.simulate import SimParams, simulate

    r = cfg.resolution
    st = SynthStation(size, 0, [category])
    plan = dataset_plan(0, 0, n_good, n_defect)
    pool = [preprocess_frame(x.rgb, x.xyz, cfg.modality, r, preprocessing)["rgb"].transpose(1, 2, 0)
            for x in (st.render(category, i, "train") for i in range(10))] if "rgb" in cfg.branches else None
    p_mod = (0.0, 1 / 3, 1 / 3, 1 / 3) if len(cfg.branches) == 2 else (0.0, 1.0, 1.0, 0.0)
    sim = SimParams(**{**settings_for("cpu").sim, "texture_source": texture, "p_modality": p_mod})
    sc, lab, maps, gts, fgs = [], [], [], [], []
    for j in range(n_good):
        g = st.render(category, j, "test")
        p = preprocess_frame(g.rgb, g.xyz, cfg.modality, r, preprocessing)
        fg = p["fg"] > 0.5 if "fg" in p else np.ones((r, r), bool)
        s = simulate(p.get("rgb"), p.get("depth"), fg, np.random.default_rng([99, j]), sim, pool)
        q = {**p, **{k: s[k] for k in ("rgb", "depth") if s[k] is not None}}
        for inp, gt in ((p, np.zeros((r, r), bool)), (q, s["mask"] > 0.5)):
            s0, a0, _ = _forward_parts(model, inp)
            sc.append(s0)
            lab.append(int(gt.any()))
            maps.append(a0)
            gts.append(gt)
            fgs.append(fg)
    maps_a, gts_a, fg_a = np.stack(maps), np.stack(gts), np.stack(fgs)
    out = {"simulated": {"i_auroc": image_auroc(sc, lab), "p_auroc_fg": pixel_auroc(maps_a[fg_a][None], gts_a[fg_a][None]),
                         "prob_defect": float(maps_a[gts_a].mean()), "prob_part": float(maps_a[fg_a & ~gts_a].mean())}}
    rows: dict[str, list] = {}
    for split, folder, idx, _ in plan:
        d = st.render(category, idx, "test", None if folder == "good" else folder)
        pd = preprocess_frame(d.rgb, d.xyz, cfg.modality, r, preprocessing)
        fg = pd["fg"] > 0.5 if "fg" in pd else np.ones((r, r), bool)
        _, a, rec = _forward_parts(model, pd)
        if folder == "good":
            rows.setdefault("good", []).append({f"res_{b}": float(np.abs(rec[b] - pd[b]).mean(0)[fg].mean()) for b in rec}
                                               | {"prob_part": float(a[fg].mean())})
            continue
        gt = _gt_small(d.gt, r)
        if not gt.any():
            continue
        pg = preprocess_frame(*(lambda x: (x.rgb, x.xyz))(st.render(category, idx, "test")), cfg.modality, r, preprocessing)
        b = "depth" if folder in ("dent", "bump") and "depth" in rec else ("rgb" if "rgb" in rec else "depth")
        err = lambda u, v: np.abs(u - v).mean(0)  # noqa: E731
        rows.setdefault(folder, []).append({"branch": b, "rec_vs_clean": float(err(rec[b], pg[b])[gt].mean()),
                                            "input_vs_clean": float(err(pd[b], pg[b])[gt].mean()),
                                            "res_defect": float(err(rec[b], pd[b])[gt].mean()),
                                            "res_part": float(err(rec[b], pd[b])[fg & ~gt].mean()),
                                            "prob_defect": float(a[gt].mean()), "prob_part": float(a[fg & ~gt].mean())})
    for t, v in rows.items():
        out[t] = {k: (v[0][k] if k == "branch" else float(np.median([x[k] for x in v]))) for k in v[0]}
    out["oracle"] = oracle_reconstruction(model, cfg, preprocessing, category, size, n_good, n_defect)
    return out


def oracle_reconstruction(model: DBRNModel, cfg: DBRNConfig, preprocessing: dict, category: str, size: int = 160,
                          n_good: int = 40, n_defect: int = 10) -> dict:
    """The trained discriminator given a perfect reconstruction: every scale's "reconstruction"
    is the defect-free render of the same part (for a good image: the image itself), so the pair
    differs exactly inside the gt. I-AUROC, P-AUROC on the part and I-AUROC per type: an upper
    bound on what a better reconstruction could give this discriminator."""
    from edge_runtime.data.synth import SynthStation, dataset_plan

    r = cfg.resolution
    st = SynthStation(size, 0, [category])
    sc, lab, types, maps, gts, fgs = [], [], [], [], [], []
    for split, folder, idx, _ in dataset_plan(0, 0, n_good, n_defect):
        d = st.render(category, idx, "test", None if folder == "good" else folder)
        pd = preprocess_frame(d.rgb, d.xyz, cfg.modality, r, preprocessing)
        pg = pd if folder == "good" else preprocess_frame(*(lambda x: (x.rgb, x.xyz))(st.render(category, idx, "test")),
                                                           cfg.modality, r, preprocessing)
        x = {k: torch.from_numpy(v)[None] for k, v in pd.items()}
        recs = {b: torch.from_numpy(pg[b])[None, None].expand(1, cfg.n_scales if model.multiscale else 1, *pg[b].shape)
                for b in model.branches}
        with torch.no_grad():
            amap = model.discriminate(x, recs).mean(1)
            s = model.score(amap, x.get("fg") if "depth" in model.branches else None)
        fg = pd["fg"] > 0.5 if "fg" in pd else np.ones((r, r), bool)
        sc.append(float(s[0]))
        lab.append(int(folder != "good"))
        types.append(folder)
        maps.append(amap[0].numpy())
        gts.append(_gt_small(d.gt, r) if folder != "good" else np.zeros((r, r), bool))
        fgs.append(fg)
    maps_a, gts_a, fg_a = np.stack(maps), np.stack(gts), np.stack(fgs)
    per = {t: image_auroc([sc[i] for i in range(len(sc)) if types[i] in (t, "good")],
                          [lab[i] for i in range(len(sc)) if types[i] in (t, "good")]) for t in TYPES if t in types}
    return {"i_auroc": image_auroc(sc, lab), "p_auroc_fg": pixel_auroc(maps_a[fg_a][None], gts_a[fg_a][None]),
            "per_type": per}


# --------------------------------------------------------------------------- picture


def picture(data_root: Path, out: Path, category: str = "cookie", n: int = 6, resolution: int = 128) -> None:
    """Simulated training samples: rows of rgb | depth | mask (cv2 only)."""
    import cv2

    from edge_runtime.methods.dbrn.simulate import SimParams, simulate

    ds = MVTec3D(data_root)
    sim = SimParams(**settings_for("cpu").sim)  # the cpu profile's simulation
    cfg = config_for("cpu", "rgb+3d", {"resolution": resolution})
    data = prepare_data([r.load() for r in ds.index(category, "train")[:8]], cfg)
    tiles = []
    names = {None: "-", 0: "translucent", 1: "opaque", 2: "fill", 3: "smooth relief"}
    for i in range(n):
        rng = np.random.default_rng([7, i])
        j = i % len(data)
        s = simulate(data.rgb[j], data.depth[j], data.fg[j], rng, sim, data.pool)
        rgb = (s["rgb"].transpose(1, 2, 0) * 255).astype(np.uint8)[..., ::-1]
        dep = cv2.applyColorMap((s["depth"][0] * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
        msk = cv2.cvtColor((s["mask"] * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        row = np.concatenate([rgb, dep, msk], 1)
        row = cv2.resize(row, (row.shape[1] * 2, row.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
        label = f"rgb: {names[s['scenario']['rgb']]}  depth: {names[s['scenario']['depth']]}"
        cv2.putText(row, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(row)
    head = np.zeros((24, tiles[0].shape[1], 3), np.uint8)
    w = tiles[0].shape[1] // 3
    for k, t in enumerate(("rgb (simulated)", "depth, normalised (turbo)", "defect mask")):
        cv2.putText(head, t, (k * w + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.concatenate([head] + tiles, 0))
    print(f"wrote {out}")


# --------------------------------------------------------------------------- benchmark


def bench(out: Path, threads: list[int], repeats: int = 10) -> None:
    """ms per frame and per stage (median of ``repeats``) for the cpu / paper configs, rgb+3d,
    random weights (speed does not depend on them), batch 1, torch eager on the CPU."""
    import platform
    from contextlib import contextmanager

    from edge_runtime.data.synth import SynthStation
    from edge_runtime.methods.dbrn.preprocess import estimate_depth_params
    from edge_runtime.nets.swin_unet import n_params

    frames = {}
    for size in (160, (800, 600)):
        st = SynthStation(size, seed=0, categories=["cookie"])
        frames[size] = st.render("cookie", 0, "test", "hole")
    params = estimate_depth_params([frames[160].xyz])
    rows = []
    for prof in ("cpu", "paper"):
        cfg = config_for(prof, "rgb+3d")
        torch.manual_seed(0)
        model = DBRNModel(cfg).eval()
        n_rec = n_params(model.rec_rgb) + n_params(model.rec_depth)
        n_disc = n_params(model.discriminator)
        for size, f in frames.items():
            pre = []
            for _ in range(3):
                t0 = time.perf_counter()
                inp = preprocess_frame(f.rgb, f.xyz, "rgb+3d", cfg.resolution, params)
                pre.append((time.perf_counter() - t0) * 1e3)
            if size != 160:
                rows.append({"profile": prof, "what": f"preprocess {size[1]}x{size[0]} frame", "threads": 1,
                             "ms": float(np.median(pre))})
                continue
            rows.append({"profile": prof, "what": "preprocess 160x160 frame", "threads": 1, "ms": float(np.median(pre))})
            x = {k: torch.from_numpy(v)[None] for k, v in inp.items()}
            for th in threads:
                torch.set_num_threads(th)
                for msc in (True, False):
                    model.multiscale = msc
                    times: dict[str, list[float]] = {}

                    @contextmanager
                    def stage(name):
                        t0 = time.perf_counter()
                        yield
                        times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

                    with torch.no_grad():
                        model(x, stage)
                        times.clear()
                        tot = []
                        for _ in range(repeats if prof == "cpu" else max(2, repeats // 4)):
                            t0 = time.perf_counter()
                            model(x, stage)
                            tot.append((time.perf_counter() - t0) * 1e3)
                    row = {"profile": prof, "what": f"model ({'MS' if msc else 'SS'})", "threads": th,
                           "ms": float(np.median(tot)), "params_rec": n_rec, "params_disc": n_disc,
                           **{k: float(np.median(v)) for k, v in times.items()}}
                    rows.append(row)
    lines = ["## DBRN speed (CPU)", "",
             f"`python scripts/dbrn_results.py --bench` on {platform.processor() or platform.machine()} "
             f"({torch.get_num_threads()} threads max here), torch {torch.__version__} eager, batch 1, float32, "
             "rgb+3d, fixed test-time dropout; median ms per frame. The machine was shared with other jobs "
             "while measuring, so treat the figures as upper bounds. The paper reports 48.9 fps "
             "(20.4 ms per frame) for Swin-Unet + U-Net on an RTX 3060 (GPU).", "",
             "| profile | what | threads | ms | reconstruct | discriminate | score | params (2 rec / disc) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        par = f"{r['params_rec'] / 1e6:.1f} M / {r['params_disc'] / 1e6:.2f} M" if "params_rec" in r else ""
        lines.append(f"| {r['profile']} | {r['what']} | {r['threads']} | {r['ms']:.1f} | "
                     + " | ".join(f"{r[k]:.1f}" if k in r else "" for k in ("reconstruct", "discriminate", "score"))
                     + f" | {par} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/dbrn_synth"), help="synthetic dataset root")
    p.add_argument("--tire", type=Path, default=None, help="MVTec 3D-AD tire category folder (RGB + gt)")
    p.add_argument("--jobs", nargs="*", default=[], help="category:modality[:texture] runs")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--shots", type=int, default=None, help="train on the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=tuple(RECIPES), default="cpu", help="training recipe (see RECIPES)")
    p.add_argument("--saved", nargs="*", default=[], metavar="JOB=PATH",
                   help="evaluate the model saved at PATH (--save-model) for JOB instead of training it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dropout-passes", type=int, default=0, help="also score with fresh dropout masks N times")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "dbrn")
    p.add_argument("--save-model", type=Path, default=None)
    p.add_argument("--loss-plot-dir", type=Path, default=None)
    p.add_argument("--diagnose", nargs="*", default=[], metavar="JOB=PATH",
                   help="diagnose the model saved at PATH (--save-model): simulated-defect detection, "
                        "reconstruction of real defects, defect magnitudes -> --diag-runs DIR/<job>.json")
    p.add_argument("--diag-runs", type=Path, default=ROOT / "runs" / "dbrn_diag")
    p.add_argument("--report", action="store_true")
    p.add_argument("--picture", action="store_true")
    p.add_argument("--bench", action="store_true", help="CPU ms per frame and stage -> docs/_parts/benchmarks_dbrn.md")
    p.add_argument("--bench-threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "_parts" / "results_dbrn.md")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for job in args.jobs:
        res = run_job(job, args)
        args.runs.mkdir(parents=True, exist_ok=True)
        tag = job_tag(job, args.recipe)
        (args.runs / f"{tag}_e{res['epochs']}.json").write_text(json.dumps(res, indent=1) + "\n")
        m, s = res["multiscale"], res["single"]
        print(f"{job}: I-AUROC MS {m['i_auroc']:.3f} SS {s['i_auroc']:.3f}  P-AUROC MS {m['p_auroc']:.3f}  "
              f"train {_min(res)} min", flush=True)
    for spec in args.diagnose:
        job, path = spec.split("=", 1)
        st = torch.load(path, map_location="cpu", weights_only=True)
        cfg = DBRNConfig.from_dict(st["config"])
        model = DBRNModel(cfg)
        model.load_state_dict(st["state"])
        model.eval()
        cat = job.split(":")[0]
        res = {"job": job, "recipe": args.recipe, "model": path, "epochs": args.epochs,
               "diagnosis": diagnose(model, cfg, st["preprocessing"], cat)}
        if "depth" in cfg.branches:
            res["magnitudes"] = defect_magnitudes(cat, st["preprocessing"], cfg.resolution, sims={
                "simulated (cpu)": settings_for("cpu").sim,
                "simulated (v3)": RECIPES["v3"]["settings"]["sim"]})
        args.diag_runs.mkdir(parents=True, exist_ok=True)
        tag = job_tag(job, args.recipe) + (f"_e{args.epochs}" if args.epochs else "")
        (args.diag_runs / f"{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["diagnosis"], indent=1), flush=True)
    if args.picture:
        picture(args.data, ROOT / "docs" / "img" / "dbrn_simulation.png")
    if args.report:
        report(args.runs, args.out, args.diag_runs)
    if args.bench:
        bench(ROOT / "docs" / "_parts" / "benchmarks_dbrn.md", args.bench_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
