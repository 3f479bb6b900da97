"""Benchmark CFM's frozen extractors on the CPU and measure the fast-grouping approximations.

Prints markdown tables (ms per frame, batch 1, float32, ``torch.set_num_threads``):

1. DINO ViT-B/8 at 224 x 224 for each kept depth.
2. Point-MAE grouping (FPS, KNN) on synthetic 224 x 224 organized clouds, exact vs fast.
3. Point-MAE dense part (G = 1024 groups of K points, default 128) for each kept depth.
4. Effect of the fast grouping: FPS covering radius, KNN recall, and the cosine
   similarity of per-point features (CFM's 3-nearest-centre inverse-squared-distance
   interpolation) between exact and fast grouping, next to the same similarity between
   two exact runs that differ only in the FPS start point (the reference's own
   arbitrariness). Weights are random (no pretrained checkpoint ships offline).

Usage: ``python scripts/bench_backbones.py [--threads 2] [--repeats 3] [--depths 1 4 8 12]
[--group-size 128] [--skip-effect]`` (the approximation study always uses K = 128).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from edge_runtime.nets.pointmae import FEATURE_LAYERS, PointMAEExtractor, knn_exact, knn_window
from edge_runtime.nets.vit import ViTExtractor

RES = 224


def synthetic_cloud(kind: str, res: int = RES, seed: int = 0) -> torch.Tensor:
    """``res x res x 3`` organized cloud in metres, background missing (zeros).

    ``dome``: a 9.6 x 8 cm elliptical bumpy dome with a 4 mm raised plateau (depth step)
    and two missing patches, ~0.45 mm pixels, 0.05 mm noise (MVTec-3D-AD-like object
    after background removal). ``slanted``: the same object tilted 60 degrees about
    the x axis as a camera sees it: 3D spacing between pixel rows doubles (anisotropic
    pixel spacing, stresses the window KNN).
    """
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(-0.05, 0.05, res), torch.linspace(-0.05, 0.05, res), indexing="ij")
    inside = (u / 0.048) ** 2 + (v / 0.04) ** 2 < 1
    height = 0.01 * torch.sqrt(torch.clamp(1 - (u / 0.045) ** 2 - (v / 0.03) ** 2, min=0))
    height = height + 0.0008 * torch.sin(300 * u) * torch.cos(250 * v)
    height = height + 0.004 * ((u.abs() < 0.012) & (v.abs() < 0.01))
    z = 0.3 - height
    if kind == "slanted":
        z = z + v * float(np.tan(np.deg2rad(60.0)))
    xyz = torch.stack([u, v, z], -1) + 5e-5 * torch.randn(res, res, 3, generator=g)
    holes = ((u - 0.02) ** 2 + (v + 0.01) ** 2 < 0.006**2) | ((u + 0.025).abs() < 0.003)
    xyz[~inside | holes] = 0
    return xyz


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median wall ms, min wall ms, median process CPU ms) of ``fn`` over ``repeats`` runs.

    One warm-up run first. Process CPU time (all threads) is reported too because wall
    time on a shared machine moves with the other processes' load.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def bench_vit(depths: list[int], repeats: int) -> dict[int, float]:
    """Median ms of the ViT-B/8 forward at 224 per depth; prints a table."""
    print("\n### DINO ViT-B/8, 224 x 224, batch 1\n")
    print("| depth | median ms | min ms | CPU ms |\n|---|---|---|---|")
    x = torch.randn(1, 3, RES, RES)
    out = {}
    for depth in depths:
        model = ViTExtractor(depth=depth).eval()
        med, best, cpu = timed(lambda: model(x), repeats)
        out[depth] = med
        print(f"| {depth} | {med:.0f} | {best:.0f} | {cpu:.0f} |")
    return out


def bench_grouping(clouds: dict[str, torch.Tensor], repeats: int, group_size: int) -> dict[str, float]:
    """Median ms of FPS and KNN, exact vs fast, per cloud; prints a table. Returns fast totals."""
    print(
        f"\n### Point-MAE grouping (G = 1024, K = {group_size}), 224 x 224 cloud, batch 1\n\n"
        "| cloud | valid points | FPS exact | FPS fast | KNN exact | KNN fast "
        "| group() exact | group() fast |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    model = PointMAEExtractor(depth=1, feature_layers=(0,), group_size=group_size)
    totals = {}
    for name, xyz in clouds.items():
        valid = (xyz != 0).any(-1)
        batch = xyz[None]
        vb = valid[None]
        fps_exact = timed(lambda: model._fps(vb, batch, True), repeats)[0]  # private: FPS alone
        fps_fast = timed(lambda: model._fps(vb, batch, False), repeats)[0]
        pix = model._fps(vb, batch, False)[0]
        flat = xyz.reshape(-1, 3)
        pts = flat[valid.reshape(-1)]
        knn_ex = timed(lambda: knn_exact(flat[pix], pts, model.group_size), repeats)[0]
        knn_fa = timed(lambda: knn_window(xyz, valid, pix, model.group_size, model.knn_radius), repeats)[0]
        grp_ex = timed(lambda: model.group(batch, exact=True), repeats)[0]
        grp_fa = timed(lambda: model.group(batch, exact=False), repeats)[0]
        totals[name] = grp_fa
        print(
            f"| {name} | {int(valid.sum())} | {fps_exact:.1f} | {fps_fast:.1f} | {knn_ex:.1f} | {knn_fa:.1f} "
            f"| {grp_ex:.1f} | {grp_fa:.1f} |"
        )
    return totals


def bench_dense(depths: list[int], repeats: int, xyz: torch.Tensor, group_size: int) -> dict[int, float]:
    """Median ms of the Point-MAE dense part per depth; prints a table."""
    print(f"\n### Point-MAE dense part (group encoder + blocks + norm), G = 1024, K = {group_size}, "
          "batch 1\n")
    print("| depth | feature layers | out dim | median ms | min ms | CPU ms |\n|---|---|---|---|---|---|")
    probe = PointMAEExtractor(depth=1, feature_layers=(0,), group_size=group_size)
    centers, nbh = probe.group(xyz[None])
    out = {}
    for depth in depths:
        model = PointMAEExtractor(depth=depth, feature_layers=FEATURE_LAYERS[depth], group_size=group_size)
        model.eval()
        med, best, cpu = timed(lambda: model.encode(nbh, centers), repeats)
        out[depth] = med
        print(f"| {depth} | {FEATURE_LAYERS[depth]} | {model.out_dim} | {med:.0f} | {best:.0f} | {cpu:.0f} |")
    enc = probe.dense.encoder.eval()
    variants = {
        "ours (linear, folded BN, split)": lambda: enc(nbh),
        "official Conv1d formulation": lambda: official_encoder(enc, nbh),
    }
    for label, fn in variants.items():
        med, best, cpu = timed(fn, repeats)
        print(f"| group encoder only: {label} | | 384 | {med:.0f} | {best:.0f} | {cpu:.0f} |")
    return out


def official_encoder(enc: torch.nn.Module, nbh: torch.Tensor) -> torch.Tensor:
    """Point-MAE's own ``Encoder.forward`` (Conv1d, BatchNorm, concat) on our module's weights."""
    b, g, k, _ = nbh.shape
    x = enc.first_conv(nbh.reshape(b * g, k, 3).transpose(2, 1))
    glob = x.max(dim=2, keepdim=True)[0]
    x = enc.second_conv(torch.cat([glob.expand(-1, -1, k), x], dim=1))
    return x.max(dim=2)[0].reshape(b, g, -1)


def point_features(
    model: PointMAEExtractor, xyz: torch.Tensor, exact: bool, flip: bool = False
) -> torch.Tensor:
    """Per-valid-point features (row-major order of ``xyz``) as CFM interpolates them.

    Each valid point takes the inverse-squared-distance weighted mean of its 3 nearest
    centres' features. ``flip`` groups the left-right mirrored cloud (same points, FPS
    starts elsewhere) and maps the result back.
    """
    src = xyz.flip(1) if flip else xyz
    centers, nbh = model.group(src[None], exact=exact)
    feats = model.encode(nbh, centers)[0]
    valid = (xyz != 0).any(-1).reshape(-1)
    pts = xyz.reshape(-1, 3)[valid]
    d2, idx = (torch.cdist(pts, centers[0]) ** 2).topk(3, dim=1, largest=False)
    w = 1.0 / torch.clamp(d2, min=1e-12)
    return (feats[idx] * (w / w.sum(1, keepdim=True))[..., None]).sum(1)


def covering_radius_mm(xyz: torch.Tensor, centers: torch.Tensor) -> float:
    """Largest distance (mm) from a valid point to its nearest centre."""
    pts = xyz[(xyz != 0).any(-1)]
    return float(torch.cdist(pts, centers).min(1).values.max()) * 1e3


def knn_recall(xyz: torch.Tensor, pix: torch.Tensor, k: int, radius: int) -> tuple[float, float, int]:
    """Window KNN vs exact KNN at the centres ``pix``.

    Returns (mean recall of the raw window search over all centres, minimum recall of
    the result ``group()`` uses -- window rows that pass the checks, exact rows for the
    fallbacks --, number of fallbacks).
    """
    valid = (xyz != 0).any(-1)
    flat = xyz.reshape(-1, 3)
    vpix = torch.nonzero(valid.reshape(-1)).squeeze(1)
    exact = vpix[knn_exact(flat[pix], flat[vpix], k)]
    fast, ok = knn_window(xyz, valid, pix, k, radius)
    hits = (fast[:, :, None] == exact[:, None, :]).any(-1).float().mean(1)
    used = torch.where(ok, hits, torch.ones_like(hits))
    return float(hits.mean()), float(used.min()), int((~ok).sum())


def approximation_effect(clouds: dict[str, torch.Tensor]) -> None:
    """Prints coverage, KNN recall and feature-similarity tables for the fast grouping."""
    print("\n### Fast FPS: covering radius (mm; max distance from a valid point to its nearest centre)\n")
    print("| cloud | exact | stride 2 (default) | stride 3 | stride 4 |\n|---|---|---|---|---|")
    for name, xyz in clouds.items():
        row = []
        for stride, exact in ((1, True), (2, False), (3, False), (4, False)):
            model = PointMAEExtractor(depth=1, feature_layers=(0,), fps_stride=stride)
            row.append(covering_radius_mm(xyz, model.group(xyz[None], exact=exact)[0][0]))
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in row) + " |")

    print(
        "\n### Fast KNN: recall of the exact 128 neighbours "
        "(raw window mean / min after fallback; number of fallbacks out of 1024)\n"
    )
    print("| cloud | r = 10 (21x21) | r = 12 | r = 14 (default, 29x29) | r = 16 |\n|---|---|---|---|---|")
    for name, xyz in clouds.items():
        model = PointMAEExtractor(depth=1, feature_layers=(0,))
        pix = model.group(xyz[None], return_index=True)[2][0]
        cells = []
        for radius in (10, 12, 14, 16):
            raw, worst, fallback = knn_recall(xyz, pix, 128, radius)
            cells.append(f"{raw:.4f} / {worst:.3f}; {fallback}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    print(
        "\n### Per-point features (random weights, depth 12, 1152-d): cosine similarity after "
        "subtracting the exact run's mean feature\n\n"
        "| cloud | exact vs fast: mean | exact vs fast: 1st pct | exact vs exact-other-start: mean "
        "| exact vs exact-other-start: 1st pct |\n|---|---|---|---|---|"
    )
    torch.manual_seed(0)
    model = PointMAEExtractor(depth=12, feature_layers=FEATURE_LAYERS[12]).eval()
    for name, xyz in clouds.items():
        ref = point_features(model, xyz, exact=True)
        mean = ref.mean(0)  # random-weight features share a large common component
        cells = []
        others = (point_features(model, xyz, exact=False), point_features(model, xyz, exact=True, flip=True))
        for other in others:
            cos = torch.nn.functional.cosine_similarity(ref - mean, other - mean, dim=1)
            cells += [f"{float(cos.mean()):.4f}", f"{float(cos.quantile(0.01)):.4f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    """Parse arguments, run the benchmarks and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8, 12], choices=[1, 4, 8, 12])
    parser.add_argument("--group-size", type=int, default=128, help="K for the timings (released code 128)")
    parser.add_argument("--skip-effect", action="store_true", help="only time, skip the approximation study")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, median of {args.repeats} runs")
    clouds = {"dome": synthetic_cloud("dome"), "slanted": synthetic_cloud("slanted")}
    vit = bench_vit(args.depths, args.repeats)
    grouping = bench_grouping(clouds, args.repeats, args.group_size)
    dense = bench_dense(args.depths, args.repeats, clouds["dome"], args.group_size)
    print("\n### Extractors per frame (ViT + fast grouping on `dome` + Point-MAE dense)\n")
    print("| depth | ms | frames/s |\n|---|---|---|")
    for depth in args.depths:
        total = vit[depth] + grouping["dome"] + dense[depth]
        print(f"| {depth} | {total:.0f} | {1e3 / total:.2f} |")
    if not args.skip_effect:
        approximation_effect(clouds)


if __name__ == "__main__":
    main()
