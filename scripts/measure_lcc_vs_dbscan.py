"""How often does ``largest_component`` keep the same points as CFM's DBSCAN step?

For synthetic station frames (``edge_runtime.data.synth``) the script runs the CFM
cleaning both ways and compares the kept points:

* reference (released CFM code): ``remove_background_plane`` at full resolution, then
  ``dbscan_largest_cluster`` (eps 0.006 m, 30 points) at full resolution, then the
  square pad + nearest resize to R, as the released code does;
* ours (``cfm_preprocess``): the same plane removal, square pad + resize to R, then
  ``largest_component`` on the R x R grid (several settings), and also
  ``largest_component`` at full resolution against the full-resolution DBSCAN.

Scenarios: ``plain`` (frames as rendered, good and every defect type) and three with a
foreign blob on the table: ``distractor`` (7-15 mm high, 10-20 mm beside the part:
both methods should drop it), ``near`` (7-12 mm high, 1-4 mm beside the part: within
DBSCAN's 6 mm reach, so DBSCAN may merge it with the part; grid components never
bridge a gap of missing pixels) and ``touching``
(15-30 mm high, touching the part in the image but not in 3D).
Per scenario and setting it reports the mean / min IoU of the kept point sets and the
fraction of frames with IoU > 0.99. ``--timings`` also measures ms per call of every
preprocessing function at 224 and 400 px (and ``cfm_preprocess`` at 800 x 600).

Usage: python scripts/measure_lcc_vs_dbscan.py [--size 400] [--per-category 6]
       [--resolution 224] [--timings] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from edge_runtime.data import depth as D
from edge_runtime.methods.cfm import preprocess as P
from edge_runtime.data.synth import CATEGORIES, DEFECT_TYPES, SynthStation

SETTINGS = {
    "lcc8": {"connectivity": 8},
    "lcc4": {"connectivity": 4},
    "lcc8_gap6mm": {"connectivity": 8, "max_gap_m": 0.006},
}


def lift(xyz: np.ndarray, where: np.ndarray, height_m: float) -> np.ndarray:
    """Move the points under ``where`` ``height_m`` towards the camera along their rays."""
    out = xyz.copy()
    z = out[..., 2:3]
    scale = np.where(z > 0, (z - height_m) / np.where(z > 0, z, 1), 1)
    out[where] = (out * scale)[where]
    return out


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """bool mask of a disc (pixels)."""
    r, c = np.ogrid[: shape[0], : shape[1]]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius**2


# scenario -> (lateral clearance from the part in mm, (lo, hi) or None = touching; height range in mm)
SCENARIOS = {
    "plain": None,
    "distractor": ((10.0, 20.0), (7.0, 15.0)),
    "near": ((1.0, 4.0), (7.0, 12.0)),
    "touching": (None, (15.0, 30.0)),
}


def add_blob(xyz: np.ndarray, part: np.ndarray, rng: np.random.Generator, scenario: str, pitch: float) -> np.ndarray:
    """A foreign disc-shaped blob standing on the table next to the part (``SCENARIOS``).

    ``part`` marks the part's pixels that survive the plane removal (higher than 6 mm);
    ``pitch`` is the pixel size on the table (metres). The blob is placed at the drawn
    lateral clearance from a random pixel of ``part`` (or touching it) and lifted to the
    drawn height above the table.
    """
    clearance, height_mm = SCENARIOS[scenario]
    h, w = part.shape
    radius = rng.uniform(0.04, 0.08) * min(h, w)
    free = D.valid_mask(xyz) & ~part
    rows, cols = np.nonzero(part)
    for _ in range(500):
        gap = 0.0 if clearance is None else rng.uniform(*clearance) * 1e-3 / pitch
        k = rng.integers(len(rows))
        ang = rng.uniform(0, 2 * np.pi)
        reach = radius + gap + 1
        centre = (rows[k] + np.sin(ang) * reach, cols[k] + np.cos(ang) * reach)
        blob = disc((h, w), centre, radius) & free
        if blob.sum() < 0.7 * np.pi * radius**2:
            continue
        if clearance is None:
            ok = (D.dilate_square(blob, 3) & part).any()
        else:
            near_px = int(clearance[0] * 1e-3 / pitch)
            ok = not (D.dilate_square(blob, 2 * near_px + 1) & part).any()
        if ok:
            return lift(xyz, blob, rng.uniform(*height_mm) * 1e-3)
    raise RuntimeError(f"could not place the {scenario} blob")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def compare(station: SynthStation, per_category: int, resolution: int, seed: int) -> dict:
    """IoU of kept points (ours vs DBSCAN) per scenario and setting, plus DBSCAN seconds."""
    rng = np.random.default_rng(seed)
    kinds = (None,) + DEFECT_TYPES
    results: dict[str, dict[str, list[float]]] = {}
    dbscan_s = []
    for cat in CATEGORIES:
        for i in range(per_category):
            layers = station.render_layers(cat, i, "test", kinds[i % len(kinds)])
            xyz, part = layers.sample.xyz, layers.height > 0.006
            for scenario in SCENARIOS:
                cloud = xyz if scenario == "plain" else add_blob(xyz, part, rng, scenario, station.pitch)
                planeless = D.remove_background_plane(cloud)
                t0 = time.perf_counter()
                ref_full = D.dbscan_largest_cluster(planeless)
                dbscan_s.append(time.perf_counter() - t0)
                small = D.resize_organized(D.square_pad(planeless), resolution)
                kept = np.where(ref_full[..., None], planeless, 0)
                ref_small = D.valid_mask(D.resize_organized(D.square_pad(kept), resolution))
                res = results.setdefault(scenario, {})
                for name, kw in SETTINGS.items():
                    res.setdefault(f"{name}@{resolution}", []).append(iou(D.largest_component(small, **kw), ref_small))
                    res.setdefault(f"{name}@full", []).append(iou(D.largest_component(planeless, **kw), ref_full))
    return {"results": results, "dbscan_s_median": float(np.median(dbscan_s))}


def time_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ts)), float(min(ts))


def timings(seed: int, repeats: int) -> dict:
    """ms per call of each preprocessing function on synthetic frames of several sizes."""
    out = {}
    for size in (224, 400, (600, 800)):
        s = SynthStation(size=size, seed=seed).render("cookie", 0, "test")
        rgb, xyz = s.rgb, s.xyz
        planeless = D.remove_background_plane(xyz)
        small = D.resize_organized(D.square_pad(planeless), 224)
        z = np.where(D.valid_mask(xyz), xyz[..., 2], 0).astype(np.float32)
        fns = {
            "valid_mask": lambda: D.valid_mask(xyz),
            "square_pad(xyz)": lambda: D.square_pad(xyz),
            "resize_organized(xyz -> 224)": lambda: D.resize_organized(xyz, 224),
            "fill_holes(z, 3)": lambda: D.fill_holes(z),
            "fill_holes(xyz, 3)": lambda: D.fill_holes(xyz),
            "remove_background_plane": lambda: D.remove_background_plane(xyz),
            "largest_component (full res)": lambda: D.largest_component(planeless),
            "largest_component gap 6mm (full res)": lambda: D.largest_component(planeless, max_gap_m=0.006),
            "largest_component (224 grid)": lambda: D.largest_component(small),
            "largest_component gap 6mm (224 grid)": lambda: D.largest_component(small, max_gap_m=0.006),
            "cfm_clean_cloud (gap 6mm, full res)": lambda: P.cfm_clean_cloud(xyz),
            "cfm_preprocess(224) default (gap 6mm)": lambda: P.cfm_preprocess(rgb, xyz),
            "cfm_preprocess(224, max_gap_m=None)": lambda: P.cfm_preprocess(rgb, xyz, max_gap_m=None),
            "cfm_preprocess(224, clean=False)": lambda: P.cfm_preprocess(rgb, xyz, clean=False),
            "cfm_gt(224)": lambda: P.cfm_gt(s.gt),
            "centred_depth_input(192)": lambda: D.centred_depth_input(xyz),
        }
        key = f"{size}x{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
        out[key] = {name: time_ms(fn, repeats) for name, fn in fns.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=400, help="synthetic frame side (px)")
    ap.add_argument("--per-category", type=int, default=6,
                    help="frames per category (good + defect types cycle); 0 skips the comparison")
    ap.add_argument("--resolution", type=int, default=224, help="model input side R")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timings", action="store_true", help="also time every function")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per function")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the RGB resize)")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    report: dict = {}
    if args.per_category > 0:
        station = SynthStation(size=args.size, seed=args.seed)
        report = compare(station, args.per_category, args.resolution, args.seed)
        n = len(CATEGORIES) * args.per_category
        print(f"{n} frames per scenario ({args.size} px, pitch {station.pitch * 1000:.3f} mm), "
              f"DBSCAN median {report['dbscan_s_median']:.2f} s per frame\n")
        print("| scenario | setting | mean IoU | min IoU | IoU > 0.99 |")
        print("|---|---|---|---|---|")
        for scenario, res in report["results"].items():
            for name, vals in res.items():
                v = np.asarray(vals)
                print(f"| {scenario} | {name} | {v.mean():.4f} | {v.min():.4f} | {(v > 0.99).mean():.0%} |")
    if args.timings:
        report["timings_ms"] = timings(args.seed, args.repeats)
        sizes = list(report["timings_ms"])
        print("\n| function | " + " | ".join(f"{s} median (min) ms" for s in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for name in report["timings_ms"][sizes[0]]:
            cells = [f"{report['timings_ms'][s][name][0]:.2f} ({report['timings_ms'][s][name][1]:.2f})" for s in sizes]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
