"""Time the metrics on a test set of MVTec 3D-AD size (1197 maps of 224 x 224).

    python scripts/bench_metrics.py [--n 1197] [--size 224]
"""

import argparse
import time

import numpy as np

from edge_runtime.metrics import aupro, image_auroc, pixel_auroc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1197)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    maps = rng.random((args.n, args.size, args.size), dtype=np.float32)
    gts = np.zeros(maps.shape, bool)
    n_def = args.n * 3 // 4
    yy, xx = np.mgrid[: args.size, : args.size]
    for i in range(n_def):  # one blob per defective image
        cy, cx, r = rng.integers(20, args.size - 20, 2).tolist() + [int(rng.integers(3, 15))]
        gts[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    maps[gts] += 0.5
    scores = maps.reshape(args.n, -1).max(1)
    labels = (np.arange(args.n) < n_def).astype(int)
    print(f"| metric | {args.n} maps of {args.size}x{args.size} | seconds |")
    print("|---|---|---|")
    for name, fn in [
        ("I-AUROC", lambda: image_auroc(scores, labels)),
        ("P-AUROC", lambda: pixel_auroc(maps, gts)),
        ("AUPRO@30% exact", lambda: aupro(maps, gts, 0.3)),
        ("AUPRO@1% exact", lambda: aupro(maps, gts, 0.01)),
        ("AUPRO@30% 99 thresholds", lambda: aupro(maps, gts, 0.3, num_thresholds=99)),
    ]:
        t = time.perf_counter()
        value = fn()
        print(f"| {name} | {value:.4f} | {time.perf_counter() - t:.2f} |")


if __name__ == "__main__":
    main()
