"""Naive baseline on the synthetic station: is the task trivially solvable?

For each category the good training images give a per-pixel mean and standard
deviation of rgb (per channel, 0-255) and of z (metres, valid points only; no
alignment of any kind). A test image's anomaly maps are per-pixel z-scores:

* rgb:   sqrt(mean over channels of z_c^2);
* z:     |z-score| of the depth, 0 where the point is missing;
* rgb+z: their sum.

Image score = max of the map. Reported per category: I-AUROC, P-AUROC and AUPRO@30%
(``edge_runtime.metrics``), and the I-AUROC per defect type (good vs that type).
To show that the defects are there to be found, each defective frame is compared
with the same part rendered without its defect: the mean rgb change over the gt
(grey levels, largest channel) and the largest height change in the gt (mm).
The frames are rendered in memory with the same plan as ``generate_dataset`` /
``edge-synth``, so the numbers are those of a dataset written with the same options.

    python scripts/synth_baseline.py [--size 224] [--seed 0] [--categories ...]
        [--train 40] [--test-good 15] [--test-defect 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_runtime.data.synth import CATEGORIES, DEFECT_TYPES, SynthStation, dataset_plan
from edge_runtime.metrics import aupro, image_auroc, pixel_auroc

MAPS = ("rgb", "z", "rgb+z")
RGB_STD_FLOOR = 1.0  # grey levels
Z_STD_FLOOR = 1e-4  # metres


def fit(station: SynthStation, category: str, plan: list) -> dict[str, np.ndarray]:
    """Per-pixel mean / std of rgb (H x W x 3, grey levels) and z (H x W, metres) over
    the plan's train/good frames; z statistics over the valid points only."""
    n = 0
    s_rgb = s2_rgb = s_z = s2_z = n_z = 0.0
    for split, _, index, _ in plan:
        if split != "train":
            continue
        s = station.render(category, index, split)
        rgb = s.rgb.astype(np.float64)
        valid = np.any(s.xyz != 0, axis=-1)
        z = np.where(valid, s.xyz[..., 2], 0.0)
        n += 1
        s_rgb, s2_rgb = s_rgb + rgb, s2_rgb + rgb**2
        s_z, s2_z, n_z = s_z + z, s2_z + z**2, n_z + valid
    mean_rgb = s_rgb / n
    std_rgb = np.sqrt(np.maximum(s2_rgb / n - mean_rgb**2, 0.0))
    cnt = np.maximum(n_z, 1)
    mean_z = s_z / cnt
    std_z = np.where(n_z >= 2, np.sqrt(np.maximum(s2_z / cnt - mean_z**2, 0.0)), np.inf)
    return {"mean_rgb": mean_rgb, "std_rgb": np.maximum(std_rgb, RGB_STD_FLOOR),
            "mean_z": mean_z, "std_z": np.maximum(std_z, Z_STD_FLOOR)}


def score_maps(stats: dict, rgb: np.ndarray, xyz: np.ndarray) -> dict[str, np.ndarray]:
    """The three z-score maps (H x W float32, see module doc) of one frame."""
    zc = (rgb.astype(np.float64) - stats["mean_rgb"]) / stats["std_rgb"]
    m_rgb = np.sqrt((zc**2).mean(axis=-1))
    valid = np.any(xyz != 0, axis=-1)
    m_z = np.where(valid, np.abs(xyz[..., 2] - stats["mean_z"]) / stats["std_z"], 0.0)
    return {"rgb": m_rgb.astype(np.float32), "z": m_z.astype(np.float32), "rgb+z": (m_rgb + m_z).astype(np.float32)}


def evaluate(station: SynthStation, category: str, plan: list) -> dict:
    """Baseline metrics of one category (see module doc)."""
    stats = fit(station, category, plan)
    maps = {k: [] for k in MAPS}
    gts, kinds = [], []
    contrast = {t: [] for t in DEFECT_TYPES}
    for split, folder, index, _ in plan:
        if split != "test":
            continue
        layers = station.render_layers(category, index, split, None if folder == "good" else folder)
        s = layers.sample
        if folder != "good":
            good = station.render_layers(category, index, split)
            d_rgb = np.abs(s.rgb.astype(int) - good.sample.rgb).max(axis=-1)[s.gt].mean()
            d_h = np.abs(layers.height - good.height)[s.gt].max() * 1e3
            contrast[folder].append((float(d_rgb), float(d_h)))
        for k, m in score_maps(stats, s.rgb, s.xyz).items():
            maps[k].append(m)
        gts.append(s.gt)
        kinds.append(folder)
    gts_arr, kinds_arr = np.stack(gts), np.array(kinds)
    labels = (kinds_arr != "good").astype(int)
    out = {"contrast": contrast}
    for k in MAPS:
        m = np.stack(maps[k])
        scores = m.reshape(len(m), -1).max(axis=1)
        per_type = {}
        for t in DEFECT_TYPES:
            keep = (kinds_arr == "good") | (kinds_arr == t)
            per_type[t] = image_auroc(scores[keep], labels[keep])
        out[k] = {"i_auroc": image_auroc(scores, labels), "p_auroc": pixel_auroc(m, gts_arr),
                  "aupro_30": aupro(m, gts_arr, 0.3), "i_auroc_per_type": per_type}
    return out


def markdown(results: dict) -> str:
    """Two markdown tables: metrics per category and map, and I-AUROC per defect type (rgb+z)."""
    lines = ["| category | " + " | ".join(f"I-AUROC {k}" for k in MAPS) + " | "
             + " | ".join(f"P-AUROC {k}" for k in MAPS) + " | AUPRO@30% rgb+z |",
             "|---" * (2 * len(MAPS) + 2) + "|"]
    cats = list(results)
    rows = cats + ["mean"]
    for c in rows:
        sel = cats if c == "mean" else [c]

        def avg(k, metric):
            return np.mean([results[x][k][metric] for x in sel])

        lines.append(f"| {c} | " + " | ".join(f"{avg(k, 'i_auroc'):.3f}" for k in MAPS) + " | "
                     + " | ".join(f"{avg(k, 'p_auroc'):.3f}" for k in MAPS) + f" | {avg('rgb+z', 'aupro_30'):.3f} |")
    lines += ["", "I-AUROC per defect type (good vs that type), map rgb / z / rgb+z:", "",
              "| category | " + " | ".join(DEFECT_TYPES) + " |", "|---" * (len(DEFECT_TYPES) + 1) + "|"]
    for c in rows:
        sel = cats if c == "mean" else [c]
        cells = []
        for t in DEFECT_TYPES:
            cells.append(" / ".join(f"{np.mean([results[x][k]['i_auroc_per_type'][t] for x in sel]):.2f}"
                                    for k in MAPS))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Defect contrast vs the same part without the defect, all categories: median [10th-90th "
              "percentile] of the mean rgb change over the gt (grey levels) and of the largest height "
              "change in the gt (mm):", "", "| defect | rgb change | height change (mm) |", "|---|---|---|"]
    for t in DEFECT_TYPES:
        vals = np.array([v for c in cats for v in results[c]["contrast"][t]]).reshape(-1, 2)
        q = np.percentile(vals, [50, 10, 90], axis=0)
        lines.append(f"| {t} | {q[0, 0]:.1f} [{q[1, 0]:.1f}-{q[2, 0]:.1f}] "
                     f"| {q[0, 1]:.2f} [{q[1, 1]:.2f}-{q[2, 1]:.2f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--test-good", type=int, default=15)
    ap.add_argument("--test-defect", type=int, default=5, help="per defect type")
    ap.add_argument("--json", type=Path, help="write the full results as JSON")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    station = SynthStation(args.size, args.seed, args.categories)
    plan = dataset_plan(args.train, 0, args.test_good, args.test_defect)
    results = {c: evaluate(station, c, plan) for c in station.categories}
    print(markdown(results))
    print(f"\n({args.size} px, seed {args.seed}, {args.train} train, {args.test_good} test good, "
          f"{args.test_defect} per defect type; {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
