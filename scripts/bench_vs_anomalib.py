"""Side-by-side speed: this project's CFM (tiny and full) against anomalib's CFM.

Same frames (synthetic station, preprocessed once by ``cfm_preprocess`` at 224), same
machine, same run, random weights on both sides (no pretrained file can be had
offline), model forward only (decoded + preprocessed tensors in, score and map out).
anomalib has no pruned variants, so both of ours are compared against its full model.
Ours runs with the paper's settings (1024 groups x 128 points, mappers on the full grid),
with the ``cpu`` profile (256 x 32, mappers on a 56 x 56 grid), and with the offline
extractors that are the default (EfficientNet-Lite0 + FPFH, cpu profile).

anomalib needs a torch/torchvision pair that the project's own venv does not carry,
so this runs in a separate venv that has anomalib and sees this repo on PYTHONPATH:

    python3 -m venv /tmp/anomalib-venv && . /tmp/anomalib-venv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0 tifffile safetensors pyzmq msgpack
    PYTHONPATH=. python scripts/bench_vs_anomalib.py --frames 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


OFFLINE = dict(extractor_2d="efficientnet-lite0", extractor_3d="fpfh", fpfh_stride=4, fpfh_normal_stride=2,
               fpfh_normal_window=5, fpfh_feature_window=5)  # train/cfm_trainer.py defaults


def anomalib_cfm():
    """anomalib's CFMModel with random weights and no download (offline machine)."""
    import timm
    from anomalib.models.image.cfm import components, torch_model

    real_create = timm.create_model

    def create_random(*args, **kwargs):
        kwargs["pretrained"] = False  # DINO weights would be a hub download
        return real_create(*args, **kwargs)

    components.timm.create_model = create_random
    # no Point-MAE file: a path that does not exist makes anomalib use random init
    components._resolve_pointmae_weights = lambda _path: Path("/nonexistent/pointmae.pth")
    return torch_model.CFMModel().eval()


def frames(n: int, resolution: int):
    from edge_runtime.methods.cfm.preprocess import cfm_preprocess
    from edge_runtime.data.synth import SynthStation

    station = SynthStation(size=400, seed=7)
    category = station.categories[0]
    out = []
    for i, sample in zip(range(n), station.stream(category, defect_rate=0.5)):
        p = cfm_preprocess(sample.rgb, sample.xyz, resolution=resolution)
        out.append((torch.from_numpy(p["rgb"])[None], torch.from_numpy(p["xyz"])[None]))
    return out


def time_frames(fn, inputs, warmup: int = 1) -> list[float]:
    for rgb, xyz in inputs[:warmup]:
        fn(rgb, xyz)
    ms = []
    for rgb, xyz in inputs:
        t = time.perf_counter()
        fn(rgb, xyz)
        ms.append((time.perf_counter() - t) * 1e3)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from edge_runtime.methods.cfm.model import CFMModel, cfm_config

    inputs = frames(args.frames, 224)
    rows = {}
    with torch.inference_mode():
        theirs = anomalib_cfm()
        rows["anomalib CFM (full)"] = time_frames(
            lambda rgb, xyz: theirs(rgb, xyz.permute(0, 3, 1, 2).contiguous()), inputs)
        for profile in ("paper", "cpu"):
            for variant in ("full", "tiny"):
                ours = CFMModel(cfm_config(variant, profile=profile)).eval()
                rows[f"edge_runtime cfm-{variant}, {profile} profile"] = time_frames(
                    lambda rgb, xyz: ours(rgb, xyz), inputs)
        # the default since the offline extractors (what edge-train --method cfm builds without
        # files): EfficientNet-Lite0 + FPFH, with the trainer's default FPFH grids and windows
        for variant in ("full", "tiny"):
            ours = CFMModel(cfm_config(variant, profile="cpu", **OFFLINE)).eval()
            rows[f"edge_runtime cfm-{variant}, cpu profile, Lite0 + FPFH (default)"] = time_frames(
                lambda rgb, xyz: ours(rgb, xyz), inputs)
    base = statistics.median(rows["anomalib CFM (full)"])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.frames} frames at 224")
    print("| model | median ms/frame | speed-up vs anomalib |")
    print("|---|---|---|")
    for name, ms in rows.items():
        med = statistics.median(ms)
        print(f"| {name} | {med:.0f} | {base / med:.1f}x |")


if __name__ == "__main__":
    main()
