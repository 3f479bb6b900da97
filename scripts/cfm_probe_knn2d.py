"""Probe (not a product path): would a 2D nearest-neighbour map beside CFM's lift colour defects?

For each category, the cfm-tiny bundle's own frozen, standardised 2D features (the pixels
the mappers see) of 100 training images form a memory bank (30 000 random pixels); a test
pixel's kNN score is its distance to the nearest bank pixel, on the same grid, upsampled
and smoothed as CFM's map. Image scores: CFM's, the kNN map's max, and the two combined
after z-scoring each with the validation (good) images: ``zmax`` = max of the two z-scores,
``zsum`` = their sum. Prints a markdown table (image AUROC, mean and per defect type).

    python scripts/cfm_probe_knn2d.py --data runs/cfm_offline2/synth --bundles runs/cfm_offline2/bundles
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from edge_runtime.backends import load_detector
from edge_runtime.data.mvtec import MVTec3D
from edge_runtime.metrics import image_auroc

CATEGORIES = ("puck", "bagel", "box", "cookie", "cable")
BANK_IMAGES, BANK_PIXELS = 100, 30000


def auroc(scores: np.ndarray, labels: np.ndarray, keep: np.ndarray | None = None) -> float:
    """Image AUROC (``edge_runtime.metrics``) of the good parts against the defective ones in ``keep``."""
    sel = (labels == 0) | (True if keep is None else keep)
    return image_auroc(scores[sel], labels[sel])


def probe(data, category: str, bundle) -> dict:
    det = load_detector(bundle, backend="torch", device="cpu")
    model, ds = det.model, MVTec3D(data)

    def run(ref):
        s = ref.load()
        inp = det.preprocess(s.rgb, s.xyz)
        rgb, xyz = torch.from_numpy(inp["rgb"])[None], torch.from_numpy(inp["xyz"])[None]
        with torch.inference_mode():
            x2d, x3d, valid = model.pixel_features(rgb, xyz)
            score, _ = model.anomaly_map(*model.discrepancy(x2d, x3d), valid, xyz)
        return s, x2d, valid, xyz, float(score)

    bank = torch.cat([run(r)[1] for r in ds.index(category, "train")[:BANK_IMAGES]])
    bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:BANK_PIXELS]]

    def knn(x2d, valid, xyz) -> float:
        with torch.inference_mode():
            d = torch.cdist(x2d, bank).min(1).values
            return float(model.anomaly_map(d, torch.ones_like(d), valid, xyz)[0])  # x 1: the kNN map alone

    val = [run(r) for r in ds.index(category, "validation")]
    vc, vk = np.array([v[4] for v in val]), np.array([knn(v[1], v[2], v[3]) for v in val])
    rows = []
    for ref in ds.index(category, "test"):
        s, x2d, valid, xyz, cfm = run(ref)
        rows.append((s.label, s.defect_type, cfm, knn(x2d, valid, xyz)))
    labels = np.array([r[0] for r in rows])
    types = np.array([r[1] for r in rows])
    c, k = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    zc, zk = (c - vc.mean()) / (vc.std() + 1e-9), (k - vk.mean()) / (vk.std() + 1e-9)
    scores = {"cfm": c, "knn2d": k, "zsum": zc + zk, "zmax": np.maximum(zc, zk)}
    return {name: {"i_auroc": auroc(v, labels),
                   "per_defect": {t: auroc(v, labels, types == t) for t in sorted(set(types)) if t != "good"}}
            for name, v in scores.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--bundles", required=True, help="folder with off-tiny-<category> bundles")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {c: probe(args.data, c, f"{args.bundles}/off-tiny-{c}") for c in args.categories}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    types = sorted(next(iter(res.values()))["cfm"]["per_defect"])
    print("| image score | mean I-AUROC | per category (" + " ".join(args.categories) + ") | "
          + " | ".join(types) + " (mean over categories) |")
    print("|---|---|---|" + "---|" * len(types))
    for name in ("cfm", "knn2d", "zsum", "zmax"):
        per = [res[c][name]["i_auroc"] for c in args.categories]
        by_type = [np.mean([res[c][name]["per_defect"][t] for c in args.categories]) for t in types]
        print(f"| {name} | {np.mean(per):.3f} | {' '.join(f'{x:.2f}' for x in per)} | "
              + " | ".join(f"{x:.2f}" for x in by_type) + " |")


if __name__ == "__main__":
    main()
