"""DBRN results on the synthetic station and the MVTec 3D-AD tire images -> docs/_parts/results_dbrn.md.

Until edge-train / edge-eval drive every method, this script calls the DBRN trainer
(``train.dbrn_trainer.fit``) and ``edge_runtime.metrics`` directly. Every run is one job
(category, modality, texture source, epochs) whose figures go to ``--runs DIR/<job>.json``,
so jobs can run in separate processes and ``--report`` assembles whatever is there.

    python scripts/dbrn_results.py --data /tmp/synth --jobs puck:rgb+3d box:rgb+3d --epochs 25
    python scripts/dbrn_results.py --tire /path/to/mvtec3d/tire --jobs tire:rgb --epochs 25
    python scripts/dbrn_results.py --report            # runs/dbrn/*.json -> docs/_parts/results_dbrn.md
    python scripts/dbrn_results.py --picture           # docs/img/dbrn_simulation.png

The synthetic data is ``edge-synth --size 160 --categories puck box cookie --train 40
--val 10 --test-good 12 --test-defect 5`` (12 good + 25 defective test images per
category). CPU runs use one torch thread per job (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.data.mvtec import MVTec3D  # noqa: E402
from edge_runtime.geometry import MapGeometry, gt_to_map  # noqa: E402
from edge_runtime.methods.dbrn.model import DBRNModel  # noqa: E402
from edge_runtime.methods.dbrn.preprocess import preprocess_frame  # noqa: E402
from edge_runtime.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from train.dbrn_trainer import config_for, fit, plot_losses, prepare_data, settings_for  # noqa: E402

PAPER_TIRE = {"DBRN RGB": 0.810, "DBRN RGB+3D": 0.696, "DBRN RGB+3D (MS)": 0.710, "DRAEM RGB": 0.880}


def evaluate(model: DBRNModel, refs, cfg, preprocessing: dict, multiscale: bool, dropout: str = "fixed") -> dict:
    """Scores, maps and metrics of ``model`` on ``refs`` (test split)."""
    model.eval()
    model.multiscale = multiscale
    model.set_dropout_mode(dropout)
    scores, labels, maps, gts, types, ms = [], [], [], [], [], []
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
    maps_a, gts_a = np.stack(maps), np.stack(gts)
    per_type = {}
    for t in sorted(set(types) - {"good"}):
        keep = [i for i, x in enumerate(types) if x in (t, "good")]
        per_type[t] = image_auroc([scores[i] for i in keep], [labels[i] for i in keep])
    return {"i_auroc": image_auroc(scores, labels), "p_auroc": pixel_auroc(maps_a, gts_a),
            "aupro30": aupro(maps_a, gts_a, 0.3), "per_type": per_type, "scores": scores, "labels": labels,
            "ms_per_frame": float(np.median(ms)), "n_good": labels.count(0), "n_defect": labels.count(1)}


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
    overrides = {}
    if args.resolution:
        overrides["resolution"] = args.resolution
    cfg = config_for("cpu", modality, overrides)
    t0 = time.perf_counter()
    data = prepare_data([r.load() for r in train_refs], cfg)
    prep_s = time.perf_counter() - t0
    settings = settings_for("cpu", args.epochs, None, args.lr, texture_source=texture, seed=args.seed)
    torch.manual_seed(args.seed)
    model = DBRNModel(cfg)
    hist = fit(model, data, settings, progress=not args.quiet)
    tag = job.replace(":", "_").replace("+", "")
    if args.loss_plot_dir:
        plot_losses(hist, Path(args.loss_plot_dir) / f"dbrn_losses_{tag}.png", f"DBRN {modality} on {cat}")
    res = {"job": job, "category": cat, "modality": modality, "texture": texture, "epochs": settings.epochs,
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


def _f(x):
    return "-" if x is None else f"{x:.3f}"


def report(runs_dir: Path, out: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    lines = ["## DBRN (Dual-Branch Reconstruction Network)", "",
             "Trained from scratch on good parts with simulated anomalies (no pretrained weights), "
             "`cpu` profile (128 px, Swin-Unet width 32, U-Net width 16 on 2x2 patches), one torch "
             "thread per run on a shared 2-core CPU, `scripts/dbrn_results.py`. I-AUROC / P-AUROC / "
             "AUPRO@30% on the test split; MS = the three reconstruction scales averaged, SS = the "
             "full-size scale only. Test-time skip dropout: the fixed seeded mask (default).", "",
             "Budget. These runs shared the 2-core machine with up to ten other jobs, so each got a "
             "small share of one core (the `train min` column is wall time under that load, several "
             "times what the same run takes alone; an uncontended rgb+3d epoch of 40 images at 128 px is "
             "about 17 s on one thread). To finish at all they stop at the epochs listed, far short of "
             "the `cpu` profile's 60 and very far from the paper's schedule; DBRN's reconstructors "
             "learn from scratch and were still improving when stopped (see the loss curves), so read "
             "these figures as a lower bound of what the method reaches, not as its accuracy.", ""]
    syn = [r for r in runs if r["category"] != "tire" and r["texture"] == "mixed"]
    if syn:
        lines += ["### Synthetic station", "",
                  "| category | modality | epochs | train min | test good/defective | I-AUROC MS | I-AUROC SS | "
                  "P-AUROC MS | P-AUROC SS | AUPRO@30% MS |", "|---|---|---|---|---|---|---|---|---|---|"]
        order = {"rgb": 0, "3d": 1, "rgb+3d": 2}
        for r in sorted(syn, key=lambda r: (r["category"], order[r["modality"]])):
            m, s = r["multiscale"], r["single"]
            lines.append(f"| {r['category']} | {r['modality']} | {r['epochs']} | {r['train_seconds'] / 60:.1f} | "
                         f"{m['n_good']}/{m['n_defect']} | {_f(m['i_auroc'])} | {_f(s['i_auroc'])} | "
                         f"{_f(m['p_auroc'])} | {_f(s['p_auroc'])} | {_f(m['aupro30'])} |")
        for mod in ("rgb", "3d", "rgb+3d"):
            sel = [r for r in syn if r["modality"] == mod]
            if len(sel) > 1:
                lines.append(f"| mean | {mod} | | | | {_f(np.mean([r['multiscale']['i_auroc'] for r in sel]))} | "
                             f"{_f(np.mean([r['single']['i_auroc'] for r in sel]))} | "
                             f"{_f(np.mean([r['multiscale']['p_auroc'] for r in sel]))} | "
                             f"{_f(np.mean([r['single']['p_auroc'] for r in sel]))} | "
                             f"{_f(np.mean([r['multiscale']['aupro30'] for r in sel]))} |")
        lines += ["", "I-AUROC per defect type (each type's images against the good ones, MS):", "",
                  "| category | modality | " + " | ".join(["color (rgb)", "dent (3d)", "bump (3d)", "crack (both)",
                                                          "hole (both)"]) + " |", "|---|---|---|---|---|---|---|"]
        for r in sorted(syn, key=lambda r: (r["category"], order[r["modality"]])):
            pt = r["multiscale"]["per_type"]
            lines.append(f"| {r['category']} | {r['modality']} | " + " | ".join(
                _f(pt.get(t)) for t in ("color", "dent", "bump", "crack", "hole")) + " |")
        lines.append("")
    tex = [r for r in runs if r["category"] != "tire"]
    by = {}
    for r in tex:
        by.setdefault((r["category"], r["modality"], r["epochs"]), {})[r["texture"]] = r
    pairs = {k: v for k, v in by.items() if len(v) > 1}
    if pairs:
        lines += ["### Texture source for the simulated defects", "",
                  "No natural-image texture set is available offline. `procedural` = fractal noise / stripes / "
                  "checkerboards in random colours; `self` = augmented crops of the category's own good training "
                  "images; `mixed` = either, 50/50 (the default).", "",
                  "| category | modality | epochs | texture | I-AUROC MS | P-AUROC MS | AUPRO@30% MS |",
                  "|---|---|---|---|---|---|---|"]
        for (cat, mod, ep), v in sorted(pairs.items()):
            for t, r in sorted(v.items()):
                m = r["multiscale"]
                lines.append(f"| {cat} | {mod} | {ep} | {t} | {_f(m['i_auroc'])} | {_f(m['p_auroc'])} | "
                             f"{_f(m['aupro30'])} |")
        lines.append("")
    drop = [r for r in runs if "random_dropout" in r]
    if drop:
        lines += ["### Test-time dropout", "",
                  "The paper keeps the skip dropout (0.6 / 0.4 / 0.2) active at test time. With fresh masks per "
                  "call (`random`) the same frame scores differently on every pass; the default `fixed` mode "
                  "draws one seeded mask per skip at construction and stores it with the weights (deterministic, "
                  "one exportable graph).", "",
                  "| run | fixed I-AUROC | random: I-AUROC over passes | random: mean score std per image | "
                  "random: mean of passes I-AUROC | off I-AUROC |", "|---|---|---|---|---|---|"]
        for r in drop:
            d = r["random_dropout"]
            lines.append(f"| {r['category']} {r['modality']} | {_f(r['multiscale']['i_auroc'])} | "
                         f"{min(d['i_auroc']):.3f} .. {max(d['i_auroc']):.3f} ({d['passes']} passes) | "
                         f"{d['score_std_mean']:.4f} | {_f(d['i_auroc_of_mean'])} | "
                         f"{_f(r['dropout_off']['i_auroc'])} |")
        lines.append("")
    tire = [r for r in runs if r["category"] == "tire"]
    if tire:
        lines += ["### MVTec 3D-AD tire (RGB only)", "",
                  "The shared tire images carry no point clouds, so only the rgb mode runs; with no depth "
                  "foreground, simulated defects may land anywhere in the image.", "",
                  "| run | epochs | train images | train min | I-AUROC MS | I-AUROC SS | P-AUROC MS | AUPRO@30% MS |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tire:
            m, s = r["multiscale"], r["single"]
            lines.append(f"| DBRN rgb (ours, cpu profile, {r['texture']}) | {r['epochs']} | {r['n_train']} | "
                         f"{r['train_seconds'] / 60:.1f} | {_f(m['i_auroc'])} | {_f(s['i_auroc'])} | "
                         f"{_f(m['p_auroc'])} | {_f(m['aupro30'])} |")
        for k, v in PAPER_TIRE.items():
            lines.append(f"| {k} (paper, Table I) | | | | {v:.3f} | | | |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")


# --------------------------------------------------------------------------- picture


def picture(data_root: Path, out: Path, category: str = "cookie", n: int = 6, resolution: int = 128) -> None:
    """Simulated training samples: rows of rgb | depth | mask (cv2 only)."""
    import cv2

    from edge_runtime.methods.dbrn.simulate import SimParams, simulate

    ds = MVTec3D(data_root)
    cfg = config_for("cpu", "rgb+3d", {"resolution": resolution})
    data = prepare_data([r.load() for r in ds.index(category, "train")[:8]], cfg)
    tiles = []
    names = {None: "-", 0: "translucent", 1: "opaque", 2: "fill"}
    for i in range(n):
        rng = np.random.default_rng([7, i])
        j = i % len(data)
        s = simulate(data.rgb[j], data.depth[j], data.fg[j], rng, SimParams(), data.pool)
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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dropout-passes", type=int, default=0, help="also score with fresh dropout masks N times")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "dbrn")
    p.add_argument("--save-model", type=Path, default=None)
    p.add_argument("--loss-plot-dir", type=Path, default=None)
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
        tag = job.replace(":", "_").replace("+", "")
        (args.runs / f"{tag}_e{res['epochs']}.json").write_text(json.dumps(res, indent=1) + "\n")
        m, s = res["multiscale"], res["single"]
        print(f"{job}: I-AUROC MS {m['i_auroc']:.3f} SS {s['i_auroc']:.3f}  P-AUROC MS {m['p_auroc']:.3f}  "
              f"train {res['train_seconds'] / 60:.1f} min", flush=True)
    if args.picture:
        picture(args.data, ROOT / "docs" / "img" / "dbrn_simulation.png")
    if args.report:
        report(args.runs, args.out)
    if args.bench:
        bench(ROOT / "docs" / "_parts" / "benchmarks_dbrn.md", args.bench_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
