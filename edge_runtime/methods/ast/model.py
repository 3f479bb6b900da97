"""AST model: frozen EfficientNet features (+ depth), normalizing-flow teacher, conv student.

Pure ``nn.Module``s, built from an :class:`ASTConfig` alone (random init, no file I/O; the
bundle or the trainer loads the weights, the frozen extractor's included: they are
parameters of ``ASTModel.features`` and so part of the state dict).

    inputs = {"image": B x 3 x S x S (normalised), "depth": B x 1 x D x D (cm, 0 = background),
              "fg": B x G x G (soft foreground fraction per grid cell)}
    scores, maps = model(inputs, stage=ctx)       # B, B x map_size x map_size

``image`` is absent for modality "3d", ``depth`` for "rgb" (whose ``fg`` is all ones).
Source: Rudolph et al., "Asymmetric Student-Teacher Networks for Industrial Anomaly
Detection", WACV 2023, and the authors' released code; see docs/methods.md (AST) for the
settings and every deviation.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_runtime.methods.ast.config import ASTConfig
from edge_runtime.nets.flows import CouplingFlow, nll_per_pixel

__all__ = ["positional_encoding_2d", "ImageFeatures", "ASTTeacher", "ASTStudent", "ASTModel",
           "teacher_loss", "student_loss"]


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """channels x height x width sine/cosine encoding: the first half encodes x (columns),
    the second half y (rows), each as interleaved sin / cos at frequencies
    ``10000^(-2i / (channels / 2))`` (the Transformer encoding per axis, as AST's code)."""
    if channels % 4:
        raise ValueError(f"positional encoding channels must be a multiple of 4, got {channels}")
    half = channels // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))  # half/2 frequencies
    pos_w = torch.arange(0.0, width)[:, None] * div[None]  # W x half/2
    pos_h = torch.arange(0.0, height)[:, None] * div[None]  # H x half/2
    pe = torch.zeros(channels, height, width)
    pe[0:half:2] = torch.sin(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(pos_h).T[:, :, None].expand(-1, -1, width)
    pe[half + 1::2] = torch.cos(pos_h).T[:, :, None].expand(-1, -1, width)
    return pe


class _PosEnc(nn.Module):
    """Holds the encoding as a (persistent) buffer so a bundle carries it like any weight."""

    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.register_buffer("pe", positional_encoding_2d(channels, grid, grid)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x with the encoding concatenated along channels."""
        return torch.cat([x, self.pe.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)

    def cond(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe.to(x.dtype).expand(x.shape[0], -1, -1, -1)


class ImageFeatures(nn.Module):
    """Frozen EfficientNet -> B x C x G x G: the listed blocks' outputs, the later ones
    resized to the first one's grid (average pooling when finer, bilinear when coarser)
    and concatenated. Tensor in, tensor out (an exportable dense part)."""

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        from edge_runtime.nets.efficientnet import EfficientNetFeatures

        self.grid = cfg.grid
        self.net = EfficientNetFeatures(cfg.backbone, cfg.out_blocks)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.net(image)
        out = []
        for f in feats:
            if f.shape[-1] > self.grid:
                f = F.avg_pool2d(f, f.shape[-1] // self.grid)
            elif f.shape[-1] < self.grid:
                f = F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            out.append(f)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


class ASTTeacher(nn.Module):
    """Conditional normalizing flow (``CouplingFlow``) on the input map, conditioned on the
    positional encoding. ``forward(x) -> z``; ``forward_logdet(x) -> (z, log|det J|)``."""

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.pos = _PosEnc(cfg.pos_channels, cfg.grid)
        self.flow = CouplingFlow(cfg.in_channels, cfg.pos_channels, cfg.teacher_hidden, cfg.teacher_kernels,
                                 cfg.clamp, seed=cfg.seed)

    def forward_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow(x, self.pos.cond(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_logdet(x)[0]


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        return y + x


class ASTStudent(nn.Module):
    """conv3x3 (in + pos -> width), LeakyReLU(0.2), ``student_blocks`` residual blocks,
    conv3x3 (width -> in): regresses the teacher's output."""

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.pos = _PosEnc(cfg.pos_channels, cfg.grid)
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.pos_channels, cfg.student_width, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.blocks = nn.Sequential(*[_ResBlock(cfg.student_width) for _ in range(cfg.student_blocks)])
        self.conv_out = nn.Conv2d(cfg.student_width, cfg.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.blocks(self.act(self.conv_in(self.pos(x)))))


def _null_stage(name: str):
    return contextlib.nullcontext()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of B x G x G ``values`` over the cells where ``mask`` (bool) is set, pooled over the batch."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def teacher_loss(teacher: ASTTeacher, x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per channel, ``(0.5 |z|^2 - log|det J|) / C``, averaged over the
    foreground cells (``fg > 0``) of the batch."""
    z, logdet = teacher.forward_logdet(x)
    return _masked_mean(nll_per_pixel(z, logdet), fg > 0)


def student_loss(student: ASTStudent, x: torch.Tensor, target: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Squared distance to the teacher's output, per channel, averaged over foreground cells."""
    return _masked_mean(((student(x) - target) ** 2).mean(dim=1), fg > 0)


class ASTModel(nn.Module):
    """The whole AST detector (see the module doc for inputs and outputs).

    Stages: "extract" (image features, depth unshuffle), "teacher", "student", "score".
    ``image_score`` ("max" / "mean" / "top3") may be changed on a built model (a scoring option).
    """

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.cfg = cfg
        self.image_score = cfg.image_score
        self.features = ImageFeatures(cfg) if cfg.uses_rgb else None
        self.teacher = ASTTeacher(cfg)
        self.student = ASTStudent(cfg)

    def train(self, mode: bool = True) -> "ASTModel":
        super().train(mode)
        if self.features is not None:
            self.features.eval()  # frozen extractor: batch norm keeps its statistics
        return self

    def teacher_input(self, inputs: dict) -> torch.Tensor:
        """B x in_channels x G x G: image features and / or the pixel-unshuffled depth."""
        parts = []
        if self.features is not None:
            parts.append(self.features(inputs["image"]))
        if self.cfg.uses_depth:
            depth = inputs["depth"]
            if depth.dim() == 3:
                depth = depth[:, None]
            parts.append(F.pixel_unshuffle(depth, self.cfg.depth_unshuffle))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def score(self, dist: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores B, maps B x map_size x map_size) from per-cell distances B x G x G."""
        mask = (fg > 0).to(dist.dtype)
        dist = dist * mask
        if self.image_score == "max":
            scores = dist.flatten(1).max(dim=1).values  # distances are >= 0: background (0) never wins
        elif self.image_score == "top3":  # mean of the 3 largest counted cells (fewer when fewer count)
            k = min(3, dist[0].numel())
            top = dist.flatten(1).topk(k, dim=1).values
            n = mask.flatten(1).sum(dim=1).clamp(1.0, float(k))
            scores = top.sum(dim=1) / n  # the zeros of uncounted cells only fill in when < 3 cells count
        else:
            scores = dist.flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp_min(1.0)
        maps = F.interpolate(dist[:, None], size=(self.cfg.map_size, self.cfg.map_size), mode="bicubic",
                             align_corners=False)[:, 0].clamp_min(0)  # bicubic may undershoot below 0
        return scores, maps

    def forward(self, inputs: dict, stage=None) -> tuple[torch.Tensor, torch.Tensor]:
        stage = stage or _null_stage
        with stage("extract"):
            x = self.teacher_input(inputs)
        with stage("teacher"):
            t = self.teacher(x)
        with stage("student"):
            s = self.student(x)
        with stage("score"):
            dist = ((s - t) ** 2).mean(dim=1)
            return self.score(dist, inputs["fg"].to(dist.dtype))
