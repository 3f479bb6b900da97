"""DBRN training (docs/methods.md, DBRN section): from scratch, on good parts with simulated anomalies.

Each step: simulate anomalies on a batch of good samples (``edge_runtime.methods.dbrn.
simulate``, seeded by (seed, epoch, image)), reconstruct each modality with its
Swin-Unet at every scale, discriminate all scales in one batch, and minimise

    sum over modalities and scales of  lambda_b L(B) + lambda_f L(F) + lambda_m L(M)
    + focal loss of the discriminator's 2-class map against the simulated mask,

where L(S) is the mean of (squared error + 1 - SSIM) over the pixel set S (B background,
F foreground without the defect, M the simulated defect) against the *clean* image; a
coarse scale is compared with the clean image area-downsampled to its size. In rgb+3d a
sample's pair for one modality is, with probability ``p_same``, its input twice instead
of (input, reconstruction), and the target mask is then what the other modality still
shows: this teaches the importance scoring module to follow the modality with a
difference. Adam with three learning rates (reconstructors, discriminator, ISM); the
learning rate drops x0.2 at 80 % and 90 % of the epochs.

Profiles: ``cpu`` (128 px, width 32, small U-Net; one category in <= 30 min on 2 CPU
cores) and ``paper`` (224 px, Swin-Unet width 96, heads 3/6/12/24, window 7; a GPU
station). The ``cpu`` profile also changes the simulation and the loss (measured in
docs/results.md, DBRN): smaller Perlin blobs (2^2..2^5 cells), defects of random strength
(RGB 0.2..1, depth 0.1..1 of the full blend), focal class weights 0.05 / 0.95 (normal /
anomaly; a simulated defect covers ~1 % of the pixels), and the raw maximum of the map
as the image score. The paper's learning-rate values did not survive in the text we have; we use
1e-4 (reconstructors and discriminator, as DRAEM) and 10x that for the ISM on ``paper``,
and 10x larger rates on the short ``cpu`` schedule.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.methods.dbrn.config import DBRNConfig
from edge_runtime.methods.dbrn.preprocess import DEFAULTS, estimate_depth_params, prepare_depth, prepare_rgb
from edge_runtime.methods.dbrn.simulate import TEXTURE_SOURCES, SimParams, simulate
from edge_runtime.nets.ssim import ssim_map

log = logging.getLogger("edge_train.dbrn")

PROFILES: dict[str, dict] = {
    "cpu": {"config": {"score_pool": 1}, "epochs": 60, "batch_size": 4, "lr": 1e-3, "lr_ism": 1e-2,
            "settings": {"focal_alpha": (0.05, 0.95),
                         "sim": {"min_lattice_log2": 2, "max_lattice_log2": 5, "rgb_strength": (0.2, 1.0),
                                 "depth_strength": (0.1, 1.0)}}},
    "paper": {"config": {"resolution": 224, "embed_dim": 96, "heads": (3, 6, 12, 24), "window": 7,
                         "mlp_ratio": 4.0, "disc_width": 64, "disc_levels": 5, "disc_patch": 1, "score_pool": 21},
              "epochs": 700, "batch_size": 8, "lr": 1e-4, "lr_ism": 1e-3},
}


@dataclass
class Settings:
    """Optimisation settings (see the module doc)."""

    epochs: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    lr_disc: float | None = None  # None: = lr
    lr_ism: float = 1e-2
    loss_weights: tuple[float, float, float] = (0.5, 1.0, 2.0)  # background, foreground, defect
    focal_gamma: float = 2.0
    focal_alpha: tuple[float, float] = (0.25, 0.75)  # normal, anomaly class weights
    p_same: float = 0.25
    texture_source: str = "mixed"
    sim: dict = field(default_factory=dict)  # SimParams overrides (mask scales, defect strengths)
    seed: int = 0
    checkpoint_every: int | None = None
    checkpoint_path: str | None = None


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Preprocessed good training samples: rgb N x 3 x R x R, depth N x 1 x R x R, fg N x R x R
    (bool; all True when there is no depth), pool (RGB images R x R x 3 for "self" textures)."""

    rgb: np.ndarray | None
    depth: np.ndarray | None
    fg: np.ndarray
    preprocessing: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.fg)

    @property
    def pool(self) -> list[np.ndarray] | None:
        if self.rgb is None:
            return None
        return [np.ascontiguousarray(x.transpose(1, 2, 0)) for x in self.rgb]


def prepare_data(samples, cfg: DBRNConfig, preprocessing: dict | None = None) -> TrainData:
    """Preprocess good samples (``Sample`` objects) for ``cfg``.

    Depth constants (per-object foreground threshold, height scale) are estimated from
    the samples unless ``preprocessing`` gives them. An RGB-only model still uses the
    clouds, when present, for the foreground that confines simulated defects."""
    samples = list(samples)
    r = cfg.resolution
    has_xyz = all(s.xyz is not None for s in samples)
    if "depth" in cfg.branches and not has_xyz:
        raise ValueError(f"modality {cfg.modality} needs point clouds; this training set has none")
    params = dict(DEFAULTS)
    params.update(preprocessing or {})
    if has_xyz and not (preprocessing and "height_scale_m" in preprocessing):
        params.update(estimate_depth_params(s.xyz for s in samples))
    rgb = np.stack([prepare_rgb(s.rgb, r) for s in samples]) if "rgb" in cfg.branches else None
    depth, fg = None, np.ones((len(samples), r, r), bool)
    if has_xyz:
        pairs = [prepare_depth(s.xyz, r, params["fg_threshold_m"], params["height_scale_m"], params["fill_passes"],
                               params["corner_patch"], params["fg_dilate"]) for s in samples]
        fg = np.stack([p[1] for p in pairs])
        if "depth" in cfg.branches:
            depth = np.stack([p[0] for p in pairs])
    if not has_xyz:
        params = {}
    return TrainData(rgb, depth, fg, params)


def simulate_batch(data: TrainData, idx: list[int], epoch: int, settings: Settings, sim: SimParams,
                   duplicate: bool) -> dict:
    """Simulated batch (numpy -> torch): "rgb"/"depth" (inputs), "clean_rgb"/"clean_depth",
    "fg", "mask" (the simulated defect), "gt" (what the discriminator must find), "same"
    (N x 2 bool: the modality whose pair is its input twice)."""
    pool = data.pool if settings.texture_source != "procedural" else None
    out = {k: [] for k in ("rgb", "depth", "mask", "gt", "same")}
    for i in idx:
        rng = np.random.default_rng([settings.seed, epoch, i])
        s = simulate(None if data.rgb is None else data.rgb[i], None if data.depth is None else data.depth[i],
                     data.fg[i], rng, sim, pool)
        same = [False, False]
        shows = dict(s["changed"])
        if duplicate and rng.random() < settings.p_same:
            k = int(rng.integers(2))
            same[k] = True
            shows["rgb" if k == 0 else "depth"] = False
        gt = s["mask"] * float(shows["rgb"] or shows["depth"])
        out["rgb"].append(s["rgb"])
        out["depth"].append(s["depth"])
        out["mask"].append(s["mask"])
        out["gt"].append(gt)
        out["same"].append(same)
    batch = {"mask": torch.from_numpy(np.stack(out["mask"])), "gt": torch.from_numpy(np.stack(out["gt"])),
             "fg": torch.from_numpy(data.fg[idx].astype(np.float32)), "same": torch.tensor(out["same"])}
    if data.rgb is not None:
        batch["rgb"] = torch.from_numpy(np.stack(out["rgb"]))
        batch["clean_rgb"] = torch.from_numpy(data.rgb[idx])
    if data.depth is not None:
        batch["depth"] = torch.from_numpy(np.stack(out["depth"]))
        batch["clean_depth"] = torch.from_numpy(data.depth[idx])
    return batch


# --------------------------------------------------------------------------- losses


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, fg: torch.Tensor, mask: torch.Tensor,
                        weights: tuple[float, float, float]) -> torch.Tensor:
    """lambda_b L(B) + lambda_f L(F) + lambda_m L(M) at ``pred``'s size (module doc).

    pred: N x C x h x w; target: N x C x R x R (clean); fg, mask: N x R x R (0 / 1)."""
    h = pred.shape[-1]
    if target.shape[-1] != h:
        f = target.shape[-1] // h
        target = F.avg_pool2d(target, f)
        fg = F.avg_pool2d(fg[:, None], f)[:, 0]
        mask = F.avg_pool2d(mask[:, None], f)[:, 0]
    per_pixel = (pred - target).pow(2).mean(dim=1) + (1 - ssim_map(pred, target))
    w_m = mask
    w_f = (fg - mask).clamp(min=0)
    w_b = (1 - fg).clamp(min=0)
    total = pred.new_zeros(())
    for lam, w in zip(weights, (w_b, w_f, w_m)):
        total = total + lam * (per_pixel * w).sum() / w.sum().clamp(min=1.0)
    return total


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: tuple[float, float] = (0.25, 0.75)) -> torch.Tensor:
    """Class-weighted focal loss of 2-class logits N x 2 x H x W against a 0 / 1 target N x H x W."""
    logp = F.log_softmax(logits, dim=1)
    t = (target > 0.5).long()
    logpt = logp.gather(1, t[:, None])[:, 0]
    pt = logpt.exp()
    a = torch.where(t == 1, torch.tensor(alpha[1], device=logits.device), torch.tensor(alpha[0], device=logits.device))
    return (-a * (1 - pt) ** gamma * logpt).mean()


def training_step(model, batch: dict, settings: Settings) -> dict[str, torch.Tensor]:
    """Loss terms of one simulated batch: {"rec_rgb", "rec_depth", "focal", "total"}."""
    terms: dict[str, torch.Tensor] = {}
    recs_full, inputs = {}, {}
    for b in model.branches:
        x = batch[b]
        scales = model.reconstructor(b).forward_scales(x)
        terms[f"rec_{b}"] = sum(reconstruction_loss(p, batch[f"clean_{b}"], batch["fg"], batch["mask"],
                                                     settings.loss_weights) for p in scales) / len(scales)
        full = model.reconstructor(b).upsample(scales)  # N x S x C x R x R
        same = batch["same"][:, 0 if b == "rgb" else 1].to(x.device)
        if same.any():  # the ISM lesson: this modality's pair is its input twice
            full = torch.where(same[:, None, None, None, None], x[:, None].expand_as(full), full)
        recs_full[b], inputs[b] = full, x
    pairs = []
    n, s = batch["gt"].shape[0], next(iter(recs_full.values())).shape[1]
    for b in model.branches:
        _, _, c, h, w = recs_full[b].shape
        pairs += [inputs[b][:, None].expand(n, s, c, h, w).reshape(n * s, c, h, w), recs_full[b].reshape(n * s, c, h, w)]
    logits = model.discriminator(*pairs)
    gt = batch["gt"][:, None].expand(n, s, h, w).reshape(n * s, h, w)
    terms["focal"] = focal_loss(logits, gt, settings.focal_gamma, settings.focal_alpha)
    terms["total"] = sum(terms.values())
    return terms


# --------------------------------------------------------------------------- loop


def parameter_groups(model, settings: Settings) -> list[dict]:
    ism = list(model.discriminator.ism.parameters()) if model.discriminator.ism is not None else []
    ism_ids = {id(p) for p in ism}
    disc = [p for p in model.discriminator.parameters() if id(p) not in ism_ids]
    rec = [p for b in model.branches for p in model.reconstructor(b).parameters()]
    groups = [{"params": rec, "lr": settings.lr, "name": "reconstruction"},
              {"params": disc, "lr": settings.lr_disc or settings.lr, "name": "discriminator"}]
    if ism:
        groups.append({"params": ism, "lr": settings.lr_ism, "name": "ism"})
    return groups


def _save(path: str, state: dict) -> None:
    try:
        from train.common import save_checkpoint
    except ImportError:  # the shared helper is not there yet: the same atomic torch.save
        def save_checkpoint(p, st):
            tmp = f"{p}.tmp"
            torch.save(st, tmp)
            os.replace(tmp, p)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)


def _load(path: str) -> dict:
    try:
        from train.common import load_checkpoint
    except ImportError:
        def load_checkpoint(p):
            return torch.load(p, map_location="cpu", weights_only=True)
    return load_checkpoint(path)


def fit(model, data: TrainData, settings: Settings, sim: SimParams | None = None, device="cpu",
        progress: bool = True, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train ``model`` in place on ``data``; returns the loss history and timing.

    ``resume``: a checkpoint of this run (same settings) to continue from; ``stop_after``:
    stop once that many epochs are done (an interrupted run, for a later resume). The
    checkpoint holds the weights, optimiser, scheduler, history and the torch RNG state,
    so a resumed run retraces the uninterrupted one (simulation is seeded per epoch).

    History: {"epoch": {term: [mean per epoch]}, "steps", "seconds", "epochs"}."""
    from tqdm import tqdm

    sim = sim or SimParams(**{**settings.sim, "texture_source": settings.texture_source})
    if len(model.branches) == 1:
        sim = SimParams(**{**asdict(sim), "p_modality": (0.5, 0.5, 0.5, 0.0)})
    device = torch.device(device)
    model.to(device)
    torch.manual_seed(settings.seed)
    opt = torch.optim.Adam(parameter_groups(model, settings))
    milestones = [int(0.8 * settings.epochs), int(0.9 * settings.epochs)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
    history: dict[str, list[float]] = {}
    start, steps, seconds = 0, 0, 0.0
    if resume:
        st = _load(resume)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start, steps, seconds = int(st["epoch"]), int(st["steps"]), float(st["seconds"])
        history = {k: list(v) for k, v in st["history"].items()}
        torch.set_rng_state(st["rng"])
        log.info("resumed from %s at epoch %d", resume, start)
    duplicate = len(model.branches) == 2
    n = len(data)
    g = torch.Generator().manual_seed(settings.seed)
    for _ in range(start):  # the same shuffles as an uninterrupted run
        torch.randperm(n, generator=g)
    bar = tqdm(range(start, settings.epochs), desc="dbrn", unit="epoch", disable=not progress,
               initial=start, total=settings.epochs)
    for epoch in bar:
        if stop_after is not None and epoch >= stop_after:
            break
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=g).tolist()
        sums: dict[str, float] = {}
        nb = 0
        for s0 in range(0, n, settings.batch_size):
            idx = order[s0:s0 + settings.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm needs two samples
                idx = order[-2:]
            batch = {k: v.to(device) for k, v in simulate_batch(data, idx, epoch, settings, sim, duplicate).items()}
            terms = training_step(model, batch, settings)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            nb += 1
            steps += 1
            bar.set_postfix({k: f"{v / nb:.4f}" for k, v in sums.items()})
        sched.step()
        for k, v in sums.items():
            history.setdefault(k, []).append(v / nb)
        seconds += time.perf_counter() - t0
        done = epoch + 1
        if settings.checkpoint_every and settings.checkpoint_path and (
                done % settings.checkpoint_every == 0 or done == settings.epochs):
            _save(settings.checkpoint_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "scheduler": sched.state_dict(), "epoch": done, "steps": steps,
                                             "seconds": seconds, "history": history, "rng": torch.get_rng_state()})
    model.eval()
    return {"epoch": history, "steps": steps, "seconds": seconds, "epochs": settings.epochs}


def plot_losses(history: dict, path: str | Path, title: str = "DBRN training") -> None:
    """Loss curves (one line per term, log scale) to a PNG (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k, v in history["epoch"].items():
        ax.plot(range(1, len(v) + 1), v, label=k, lw=2 if k == "total" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the trainer protocol


def config_for(profile: str | None, modality: str | None, overrides: dict | None = None) -> DBRNConfig:
    p = PROFILES[profile or "cpu"]
    d = {**p["config"], **(overrides or {})}
    d["modality"] = modality or "rgb+3d"
    return DBRNConfig(**d)


def settings_for(profile: str | None, epochs=None, batch_size=None, lr=None, **kw) -> Settings:
    p = PROFILES[profile or "cpu"]
    lr = lr if lr is not None else p["lr"]
    ism = kw.pop("lr_ism", None)
    kw = {**p.get("settings", {}), **kw}
    return Settings(epochs=epochs or p["epochs"], batch_size=batch_size or p["batch_size"], lr=lr,
                    lr_ism=ism if ism is not None else lr * p["lr_ism"] / p["lr"], **kw)


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    """DBRN's own flags (the common ones come from edge-train)."""
    parser.add_argument("--texture-source", choices=TEXTURE_SOURCES, default="mixed",
                        help="simulated-defect textures: procedural, crops of the training images, or both")
    parser.add_argument("--resolution", type=int, default=None, help="model side in pixels (default: the profile's)")
    parser.add_argument("--lr-ism", type=float, default=None, help="learning rate of the ISM (default: 10x --lr)")
    parser.add_argument("--p-same", type=float, default=0.25,
                        help="probability that one modality's discriminator pair is its input twice (rgb+3d)")
    parser.add_argument("--multiscale", choices=("on", "off"), default="on", help="score with every scale or the full one")
    parser.add_argument("--test-dropout", choices=("fixed", "random", "off"), default="fixed",
                        help="skip dropout at test time: a fixed seeded mask, fresh masks, or none")
    parser.add_argument("--loss-plot", type=Path, default=None, help="loss curves PNG (default: <out>/dbrn_losses.png)")


def train(args: argparse.Namespace, common) -> "object":
    """edge-train entry point (see train/cli.py and the trainer protocol)."""
    from train.common import Trained
    from train.common import progress as progress_bar

    profile = args.profile or "cpu"
    if profile not in PROFILES:
        raise ValueError(f"dbrn: unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    overrides = {"multiscale": args.multiscale == "on", "dropout_mode": args.test_dropout}
    if args.resolution:
        overrides["resolution"] = args.resolution
    cfg = config_for(profile, args.modality, overrides)
    refs = common.train_refs(args)
    show = bool(common.progress) and not args.quiet
    samples = [r.load() for r in progress_bar(refs, "loading", show)]
    data = prepare_data(samples, cfg)
    ckpt = None
    if args.checkpoint_every:
        ckpt = str(Path(args.out) / "checkpoint.pt") if args.out else "dbrn_checkpoint.pt"
    settings = settings_for(profile, args.epochs, args.batch_size, args.lr, lr_ism=args.lr_ism, p_same=args.p_same,
                            texture_source=args.texture_source, seed=args.seed,
                            checkpoint_every=args.checkpoint_every, checkpoint_path=ckpt)
    torch.manual_seed(args.seed)
    from edge_runtime.methods.dbrn.model import DBRNModel

    model = DBRNModel(cfg)
    history = fit(model, data, settings, device=common.device, progress=show,
                  resume=str(args.resume) if args.resume else None)
    plot = args.loss_plot or (Path(args.out) / "dbrn_losses.png" if args.out else None)
    warnings = []
    if plot:
        try:
            plot_losses(history, plot, f"DBRN {cfg.modality} on {args.category}")
        except ImportError:
            warnings.append("matplotlib missing: no loss plot")
    last = {k: v[-1] for k, v in history["epoch"].items()}
    training = {"category": args.category, "n_images": len(data), "epochs": settings.epochs, "profile": profile,
                "seconds": history["seconds"], "steps": history["steps"], "losses": last,
                "loss_history": history["epoch"], "settings": {k: v for k, v in asdict(settings).items()
                                                               if k not in ("checkpoint_path",)}}
    fields_ = {"preprocessing": data.preprocessing, "extractors": {}, "warnings": warnings, "training": training}
    return Trained(model=model.cpu().eval(), config=cfg, fields=fields_)
