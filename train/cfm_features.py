"""Frozen-feature cache for CFM training: extract once per training image, reuse every epoch.

The released CFM code re-runs both frozen extractors on every image in every epoch (250
epochs); the extractors are frozen, so their output never changes and extracting once is
exact. What is cached is the *aligned per-pixel* features of the pixels that have a 3D
point, on the model's mapper grid, in float16: exactly the mapper inputs the training loss
sees (``CFMModel.pixel_features``), so training and inference share one code path (no
re-implementation of the alignment for sampled pixels).

Memory: one pixel costs ``2 * (dim_2d + dim_3d)`` bytes (2.3 KB tiny, 3.8 KB full). When
all valid pixels of all images would exceed ``cache_mb``, each image keeps a uniform random
subset of its valid pixels (the same cap for every image, fixed by ``seed``), which keeps
the per-image mean loss an unbiased estimate (``cfm_trainer``). ``FeatureCache.n_valid``
records how many valid pixels each image had before the cap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.errors import DataError
from edge_runtime.methods.cfm.model import CFMModel


@dataclass
class FeatureCache:
    """Per-image valid-pixel features: ``x2d[i]`` N_i x C2 and ``x3d[i]`` N_i x C3 (float16).

    n_valid: valid pixels of image i on the mapper grid before the memory cap.
    seconds: wall time of the extraction.
    """

    x2d: list[torch.Tensor]
    x3d: list[torch.Tensor]
    n_valid: list[int]
    seconds: float

    def __len__(self) -> int:
        return len(self.x2d)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.x2d, *self.x3d))

    def sample(self, images: Sequence[int], pixels: int | None, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch: for each image, ``pixels`` cached pixels drawn uniformly with
        replacement (``None``: all of them), concatenated -> (N x C2, N x C3) float32."""
        parts_2d, parts_3d = [], []
        for i in images:
            x2d, x3d = self.x2d[i], self.x3d[i]
            if pixels is not None:
                idx = torch.randint(x2d.shape[0], (pixels,), generator=generator).to(x2d.device)
                x2d, x3d = x2d[idx], x3d[idx]
            parts_2d.append(x2d)
            parts_3d.append(x3d)
        return torch.cat(parts_2d).float(), torch.cat(parts_3d).float()


def pixel_cap(n_images: int, dim_2d: int, dim_3d: int, cache_mb: float) -> int:
    """Most pixels per image that keep ``n_images`` images' float16 features within ``cache_mb`` MiB."""
    per_pixel = 2 * (dim_2d + dim_3d)
    return max(1, int(cache_mb * 2**20) // (max(1, n_images) * per_pixel))


def extract_features(model: CFMModel, inputs: Sequence[dict[str, np.ndarray]], device: torch.device,
                     batch_size: int = 4, cache_mb: float = 2048.0, seed: int = 0,
                     progress: bool = True, names: Sequence[str] | None = None) -> FeatureCache:
    """Run the frozen extractors + alignment once over preprocessed ``inputs``
    (``cfm_preprocess`` dicts) and keep each image's valid-pixel features (float16, on
    ``device``), capped per image to fit ``cache_mb`` MiB (see the module doc).
    ``names`` (file paths) label errors: an image without any valid pixel on the mapper
    grid raises ``DataError`` naming it."""
    t0 = time.perf_counter()
    cfg = model.cfg
    cap = pixel_cap(len(inputs), cfg.dim_2d, cfg.dim_3d, cache_mb)
    generator = torch.Generator().manual_seed(seed)
    cache = FeatureCache([], [], [], 0.0)
    bar = tqdm(total=len(inputs), desc="extracting features", unit="img", disable=not progress)
    with torch.inference_mode():
        for s in range(0, len(inputs), batch_size):
            chunk = inputs[s:s + batch_size]
            rgb = torch.from_numpy(np.stack([c["rgb"] for c in chunk])).to(device)
            xyz = torch.from_numpy(np.stack([c["xyz"] for c in chunk])).to(device)
            x2d_all, x3d_all, valid = model.pixel_features(rgb, xyz)
            counts = valid.flatten(1).sum(1).tolist()
            for i, (x2d, x3d) in enumerate(zip(x2d_all.split(counts), x3d_all.split(counts))):
                n = counts[i]
                if n == 0:
                    name = names[s + i] if names else f"training image #{s + i}"
                    raise DataError(name, f"no valid 3D point on the {cfg.mapper_resolution} x "
                                          f"{cfg.mapper_resolution} mapper grid")
                if n > cap:
                    keep = torch.randperm(n, generator=generator)[:cap].to(device)
                    x2d, x3d = x2d[keep], x3d[keep]
                cache.x2d.append(x2d.half().clone())
                cache.x3d.append(x3d.half().clone())
                cache.n_valid.append(n)
            bar.update(len(chunk))
    bar.close()
    cache.seconds = time.perf_counter() - t0
    return cache


def standardize_cache(model: CFMModel, cache: FeatureCache) -> None:
    """For ``cfg.standardize``: set the model's per-channel statistics from every cached
    (raw) training pixel, then standardise the cache in place, so training sees exactly
    what inference computes (``CFMModel.align`` applies the same statistics)."""
    x2d = torch.cat([x.float() for x in cache.x2d])
    x3d = torch.cat([x.float() for x in cache.x3d])
    model.set_statistics(x2d, x3d)
    for feats, mean, std in ((cache.x2d, model.mean_2d, model.std_2d), (cache.x3d, model.mean_3d, model.std_3d)):
        for i, x in enumerate(feats):
            feats[i] = ((x.float() - mean.to(x.device)) / std.to(x.device)).half()
