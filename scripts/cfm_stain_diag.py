"""Diagnosis (not a product path): are the synthetic colour stains visible, and where is CFM's map on them?

For every category: the colour contrast of each stain (mean RGB of its eroded mask against
a 4-pixel ring around it, 0..255, Euclidean), and, with the category's bundle, the map's
maximum inside each stain's mask against the maxima of the good test parts' maps.

    python scripts/cfm_stain_diag.py --data runs/cfm_offline2/synth --bundles runs/cfm_offline2/bundles --name off-tiny

Prints a markdown table (docs/results.md, CFM third pass).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from edge_runtime.backends import load_detector
from edge_runtime.data.mvtec import MVTec3D
from edge_runtime.geometry import gt_to_map

CATEGORIES = ("puck", "bagel", "box", "cookie", "cable")


def contrast(rgb: np.ndarray, gt: np.ndarray) -> float:
    """|mean colour inside the (eroded) mask - mean colour of a 4-pixel ring around it| (0..255)."""
    mask = (gt > 0).astype(np.uint8)
    ring = cv2.dilate(mask, np.ones((9, 9), np.uint8)).astype(bool) & ~mask.astype(bool)
    core = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
    core = core if core.any() else mask.astype(bool)
    img = rgb.astype(np.float32)
    return float(np.linalg.norm(img[core].mean(0) - img[ring].mean(0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--name", default="off-tiny", help="bundle name prefix: <bundles>/<name>-<category>")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| category | stains | contrast median (p25-p75), 0-255 | map max inside the stain (min-max) | "
          "good parts' map max (min-max) |\n|---|---|---|---|---|")
    for cat in args.categories:
        det = load_detector(args.bundles / f"{args.name}-{cat}", backend="torch", device="cpu")
        con, inside, good = [], [], []
        for ref in MVTec3D(args.data).index(cat, "test"):
            s = ref.load()
            if s.defect_type not in ("good", "color"):
                continue
            inp = det.preprocess(s.rgb, s.xyz)
            r = det.infer(inp)
            if s.defect_type == "good":
                good.append(r.score)
                continue
            con.append(contrast(s.rgb, s.gt))
            mask = gt_to_map(s.gt, r.amap.shape, getattr(inp, "geometry", None)) > 0
            inside.append(float(r.amap[mask].max()) if mask.any() else 0.0)
        c = np.array(con)
        print(f"| {cat} | {len(c)} | {np.median(c):.1f} ({np.percentile(c, 25):.1f}-{np.percentile(c, 75):.1f}) | "
              f"{min(inside):.2f}-{max(inside):.2f} | {min(good):.2f}-{max(good):.2f} |", flush=True)


if __name__ == "__main__":
    main()
