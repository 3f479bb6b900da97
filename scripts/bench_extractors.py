"""Speed of the shared extractors (EfficientNet-Lite features, FPFH) and FPFH agreement
with Open3D.

    python scripts/bench_extractors.py [--reps 5] [--threads 2] [--device cpu] [--skip-lite]

Prints one markdown table: median and p90 wall ms and median CPU ms per frame (batch 1) for Lite0/1/2
features at 224 and 320 px (blocks up to the end of the stride-16 stage) and for normals
+ FPFH on a 224 x 224 organized cloud; then, when ``open3d`` is importable, the per-point
cosine between this FPFH and ``open3d.pipelines.registration.compute_fpfh_feature`` on the
same cloud with the same normals and the same (radius) neighbourhood.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from edge_runtime.nets.efficientnet import EfficientNetFeatures, block_table
from edge_runtime.nets.fpfh import estimate_normals, fpfh


def synthetic_cloud(size: int = 224, seed: int = 0) -> torch.Tensor:
    """1 x size x size x 3 organized cloud (metres): a bumpy part ~0.5 m from a pinhole
    camera, a raised step, sensor noise and a patch of missed points."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    z = 0.5 + 0.004 * torch.sin(u / 9) * torch.cos(v / 13) + 0.0002 * torch.randn(size, size, generator=g, dtype=torch.float64)
    z = z - 0.01 * ((u > size * 0.6) & (v > size * 0.3) & (v < size * 0.7))  # a step towards the camera
    f = 2.2 * size  # ~0.45 mm per pixel at 0.5 m for 224 px
    xyz = torch.stack([(u - size / 2) / f * z, (v - size / 2) / f * z, z], -1).float()
    xyz[size // 5 : size // 5 + 12, size // 3 : size // 3 + 30] = 0  # missed points
    return xyz[None]


def timed(fn, reps: int) -> tuple[float, float, float]:
    """Median and p90 wall ms, and median process CPU ms (all threads), per call."""
    fn()  # warm-up
    times, cpu = [], []
    for _ in range(reps):
        c, t = time.process_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return statistics.median(times), p90, statistics.median(cpu)


def stage_ends(arch: str, max_stride: int) -> tuple[int, ...]:
    table = block_table(arch)
    ends = [r["index"] for i, r in enumerate(table) if i + 1 == len(table) or table[i + 1]["stage"] != r["stage"]]
    return tuple(i for i in ends if 8 <= table[i]["stride"] <= max_stride)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-lite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    with torch.inference_mode():
        if not args.skip_lite:
            for arch in ("lite0", "lite1", "lite2"):
                blocks = stage_ends(arch, 16)
                model = EfficientNetFeatures(arch, blocks).to(dev)  # speed does not depend on the weights
                for px in (224, 320):
                    x = torch.randn(1, 3, px, px, device=dev)
                    med, p90, cpu = timed(lambda: (model(x), sync()), args.reps)
                    rows.append((f"EfficientNet-{arch.capitalize()} blocks {blocks}", f"{px} px", med, p90, cpu))
        xyz = synthetic_cloud(224).to(dev)
        med, p90, cpu = timed(lambda: (estimate_normals(xyz, 5), sync()), args.reps)
        rows.append(("normals (window 5)", "224 px", med, p90, cpu))
        normals = estimate_normals(xyz, 5)
        med, p90, cpu = timed(lambda: (fpfh(xyz, feature_window=11, normals=normals), sync()), args.reps)
        rows.append(("FPFH (window 11, given normals)", "224 px", med, p90, cpu))
        med, p90, cpu = timed(lambda: (fpfh(xyz, 5, 11), sync()), args.reps)
        rows.append(("normals + FPFH (5, 11), default", "224 px", med, p90, cpu))

    print(f"torch {torch.__version__}, {args.threads} threads, device {dev}, {args.reps} reps, batch 1\n")
    print("| extractor | input | median ms | p90 ms | CPU ms |")
    print("|---|---|---:|---:|---:|")
    for name, size, med, p90, cpu in rows:
        print(f"| {name} | {size} | {med:.1f} | {p90:.1f} | {cpu:.1f} |")
    compare_open3d(xyz.cpu(), args.reps)


def compare_open3d(xyz: torch.Tensor, reps: int) -> None:
    try:
        import open3d as o3d
    except Exception as exc:  # not installed, or a missing optional dependency of open3d
        print(f"\nopen3d not importable ({type(exc).__name__}: {exc}); no comparison with Open3D")
        return
    spacing = float(xyz[0, 112, 113, 0] - xyz[0, 112, 112, 0])
    radius = 4.5 * spacing  # the 11 x 11 window holds the whole ball except at steep slopes
    normals = estimate_normals(xyz, 5)
    ours = fpfh(xyz, feature_window=11, radius=radius, normals=normals)[0].permute(1, 2, 0).reshape(-1, 33).numpy()
    valid = (xyz[0] != 0).any(-1).reshape(-1).numpy()
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(xyz[0].reshape(-1, 3).numpy()[valid].astype(np.float64))
    pc.normals = o3d.utility.Vector3dVector(normals[0].reshape(-1, 3).numpy()[valid].astype(np.float64))
    param = o3d.geometry.KDTreeSearchParamRadius(radius)
    ref = None

    def run():
        nonlocal ref
        ref = np.asarray(o3d.pipelines.registration.compute_fpfh_feature(pc, param).data).T

    med, _, _ = timed(run, max(1, reps // 2))
    a = ours[valid]
    cos = (a * ref).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    print(
        f"\nOpen3D {o3d.__version__} compute_fpfh_feature, radius {radius * 1e3:.2f} mm (~4.5 px), same normals,"
        f" {valid.sum()} points: {med:.1f} ms; per-point cosine to this FPFH (window 11 + same radius):"
        f" median {np.median(cos):.6f}, p10 {np.percentile(cos, 10):.6f}, min {cos.min():.6f};"
        f" max abs difference {np.abs(a - ref).max():.2e} (feature values 0..200)"
    )


if __name__ == "__main__":
    main()
