"""CFM training: frozen extractors, cached features, two mappers trained with Adam.

Recipe (paper + released code, REFERENCE.md section 2): loss per direction = 1 - cosine
similarity between predicted and observed features at pixels with a 3D point, the two
directions summed; Adam, lr 1e-3, no scheduler, batch 4 images, 250 epochs.

Two CPU-minded choices, both documented in the bundle's training summary:

1. Features are extracted once per image and cached (``train.features``); exact, since the
   extractors are frozen (the released code re-extracts every epoch).
2. Pixel subsampling (``pixels_per_image`` P): each step draws P valid pixels uniformly
   (with replacement) from each of its images' cached pixels, and the loss is the mean
   over those pixels. Every image contributes P terms, so the batch loss is an unbiased
   estimate of the mean over the batch's images of each image's per-pixel mean loss
   (the paper pools pixels across the batch instead, weighting images by their point
   count; the two coincide when images have equal point counts). ``None`` uses every
   cached pixel (pooled, as the paper). Per-pixel MLPs over all ~25k-50k pixels of a 224
   image are the CPU bottleneck; neighbouring pixels' features are strongly correlated
   (2D features are bilinear upsamplings of a 28 x 28 token grid), so a few hundred
   pixels per image per step carry most of the signal. docs/_parts/results.md measures
   the effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.bundle import RANDOM_INIT
from edge_runtime.data.depth import cfm_preprocess
from edge_runtime.data.mvtec import MVTec3D, few_shot
from edge_runtime.errors import DataError
from edge_runtime.models import checkpoints
from edge_runtime.models.cfm import CFMConfig, CFMModel, mapper_parameters
from train.features import FeatureCache, extract_features

log = logging.getLogger("edge_train")

RANDOM_INIT_WARNING = """\
############################################################################
# WARNING: the {which} extractor(s) are RANDOMLY INITIALISED (no --backbone
# file given). CFM relies on pretrained DINO ViT-B/8 and Point-MAE features;
# with random frozen extractors the model is only a plumbing/speed check and
# its accuracy says nothing about CFM. The random weights are stored in the
# bundle (reproducible) and the manifest records "random-init".
############################################################################"""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (paper defaults except the CPU-minded pixel subsampling).

    epochs: passes over the training images (paper: 250).
    batch_size: images per step (paper: 4).
    lr: Adam learning rate (paper: 1e-3, no scheduler).
    pixels_per_image: valid pixels drawn per image per step; None = all cached pixels.
    cache_mb: MiB allowed for the float16 feature cache (see ``train.features``).
    seed: seeds model init, pixel caps, shuffling and pixel draws.
    """

    epochs: int = 250
    batch_size: int = 4
    lr: float = 1e-3
    pixels_per_image: int | None = 256
    cache_mb: float = 2048.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.cache_mb <= 0:
            raise ValueError(f"invalid training settings {self}")
        if self.pixels_per_image is not None and self.pixels_per_image < 1:
            raise ValueError(f"pixels_per_image must be >= 1 or None, got {self.pixels_per_image}")


def train_mappers(model: CFMModel, cache: FeatureCache, settings: TrainSettings,
                  progress: bool = True) -> dict:
    """Train ``model``'s two mappers on cached features; returns the loss history.

    Returns {"epoch_loss": [mean total loss per epoch], "loss_2d_to_3d", "loss_3d_to_2d"
    (last epoch means), "steps", "seconds"}.
    """
    t0 = time.perf_counter()
    device = next(model.map_2d_to_3d.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(mapper_parameters(model), lr=settings.lr)
    model.train()
    n = len(cache)
    history: list[float] = []
    steps = 0
    bar = tqdm(range(settings.epochs), desc="training mappers", unit="epoch", disable=not progress)
    for _epoch in bar:
        order = torch.randperm(n, generator=generator).tolist()
        totals = torch.zeros(3, device=device)
        n_batches = 0
        for s in range(0, n, settings.batch_size):
            x2d, x3d = cache.sample(order[s:s + settings.batch_size], settings.pixels_per_image, generator)
            loss, loss_23, loss_32 = model.loss(x2d.to(device), x3d.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.stack([loss, loss_23, loss_32]).detach()
            n_batches += 1
            steps += 1
        means = (totals / n_batches).tolist()
        history.append(means[0])
        bar.set_postfix(loss=f"{means[0]:.4f}")
    model.eval()
    return {"epoch_loss": history, "loss_2d_to_3d": means[1], "loss_3d_to_2d": means[2],
            "steps": steps, "seconds": time.perf_counter() - t0}


def load_backbones(model: CFMModel, backbone_2d: str | Path | None, backbone_3d: str | Path | None
                   ) -> tuple[dict, list[str]]:
    """Load pretrained extractor checkpoints into ``model`` where given.

    Returns (provenance ``{"2d": {"file", "sha256"} | "random-init", "3d": ...}``, warnings);
    a random-initialised extractor is logged with a loud multi-line WARNING.
    """
    provenance: dict = {}
    random_init = []
    for key, path in (("2d", backbone_2d), ("3d", backbone_3d)):
        if path is None:
            provenance[key] = RANDOM_INIT
            random_init.append({"2d": "2D (DINO ViT)", "3d": "3D (Point-MAE)"}[key])
            continue
        state = checkpoints.read_checkpoint(path)
        if key == "2d":
            checkpoints.load_dino_vit(model.backbone_2d, state)
        else:
            checkpoints.load_point_mae(model.backbone_3d, state)
        provenance[key] = {"file": Path(path).name, "sha256": checkpoints.sha256_file(path)}
    warnings = []
    if random_init:
        banner = RANDOM_INIT_WARNING.format(which=" and ".join(random_init))
        log.warning("\n%s", banner)
        warnings.append(f"random-init extractors: {', '.join(random_init)}; accuracy is not CFM's")
    return provenance, warnings


def prepare_inputs(data: str | Path, category: str, resolution: int, shots: int | None = None,
                   shot_mode: str = "first", seed: int = 0, clean: bool = True,
                   progress: bool = True) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Training images of ``category`` (train/good, optionally a few-shot subset),
    preprocessed by ``cfm_preprocess``; returns (inputs, rgb file paths). A frame that
    cannot be preprocessed raises ``DataError`` naming its xyz file."""
    refs = MVTec3D(data).index(category, "train")
    if shots is not None:
        refs = few_shot(refs, shots, shot_mode, seed)
    inputs, names = [], []
    for ref in tqdm(refs, desc="preprocessing", unit="img", disable=not progress):
        sample = ref.load()
        if sample.xyz is None:
            raise DataError(ref.paths["rgb"], "CFM needs xyz point clouds; this category is RGB-only")
        try:
            inputs.append(cfm_preprocess(sample.rgb, sample.xyz, resolution=resolution, clean=clean))
        except DataError as err:
            raise DataError(ref.paths.get("xyz", ref.paths["rgb"]), err.problem) from None
        names.append(ref.paths["rgb"])
    return inputs, names


def train_cfm(cfg: CFMConfig, data: str | Path, category: str, settings: TrainSettings,
              shots: int | None = None, shot_mode: str = "first", device: str = "cpu",
              backbone_2d: str | Path | None = None, backbone_3d: str | Path | None = None,
              progress: bool = True) -> tuple[CFMModel, dict]:
    """The whole ``edge-train --method cfm`` job; returns (trained model on CPU, the
    manifest fields for ``save_bundle``: preprocessing, backbones, warnings, training)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(settings.seed)  # random-init extractors and mappers are reproducible
    model = CFMModel(cfg)
    provenance, warnings = load_backbones(model, backbone_2d, backbone_3d)
    model.to(dev)
    preprocessing = {"function": "edge_runtime.data.depth.cfm_preprocess",
                     "resolution": cfg.resolution, "clean": True}
    inputs, names = prepare_inputs(data, category, cfg.resolution, shots, shot_mode, settings.seed,
                                   clean=preprocessing["clean"], progress=progress)
    t_prep = time.perf_counter() - t0
    cache = extract_features(model, inputs, dev, batch_size=settings.batch_size,
                             cache_mb=settings.cache_mb, seed=settings.seed, progress=progress, names=names)
    fit = train_mappers(model, cache, settings, progress=progress)
    training = {
        "category": category, "data": str(data), "n_images": len(inputs), "shots": shots,
        "shot_mode": shot_mode if shots is not None else None, **asdict(settings),
        "pixels_per_image_note": ("valid pixels drawn per image per step (unbiased estimate of the "
                                  "per-image mean loss); null = every cached pixel"),
        "cached_pixels": sum(x.shape[0] for x in cache.x2d), "valid_pixels": sum(cache.n_valid),
        "cache_mb_used": round(cache.nbytes / 2**20, 1),
        "steps": fit["steps"], "loss_first": fit["epoch_loss"][0], "loss_final": fit["epoch_loss"][-1],
        "loss_2d_to_3d": fit["loss_2d_to_3d"], "loss_3d_to_2d": fit["loss_3d_to_2d"],
        "epoch_loss": [round(v, 6) for v in fit["epoch_loss"]],
        "seconds": {"preprocess": round(t_prep, 2), "extract": round(cache.seconds, 2),
                    "train": round(fit["seconds"], 2), "total": round(time.perf_counter() - t0, 2)},
        "device": str(dev), "threads": torch.get_num_threads(),
    }
    fields = {"preprocessing": preprocessing, "backbones": provenance, "warnings": warnings,
              "training": training}
    return model.cpu(), fields


def summary_lines(training: dict, bundle: Path) -> Sequence[str]:
    """Human-readable final summary of a training run."""
    s = training["seconds"]
    return [
        f"trained cfm on {training['category']}: {training['n_images']} images, {training['epochs']} epochs, "
        f"{training['steps']} steps",
        f"loss first epoch {training['loss_first']:.4f} -> last epoch {training['loss_final']:.4f}",
        f"seconds: preprocess {s['preprocess']}, extract {s['extract']}, train {s['train']}, total {s['total']}",
        f"bundle: {bundle}",
    ]
