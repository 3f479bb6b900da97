"""DBRN: Dual-Branch Reconstruction Network (pure nn.Module; docs/methods.md, DBRN section).

    rgb (N x 3 x R x R) --> rec_rgb   (Swin-Unet) --> N x S x 3 x R x R ---+
    depth (N x 1 x R x R) -> rec_depth (Swin-Unet) --> N x S x 1 x R x R --+--> discriminator
                                                                            (PE + ISM + U-Net,
                                                                             scales batched)
    --> anomaly probability per scale --> mean over scales --> map (N x R x R) --> score

The discriminator's patch embedding (PE: 3x3 conv-BN-ReLU, or a strided ``disc_patch``
x ``disc_patch`` conv-BN-ReLU whose coarser U-Net logits are upsampled back) takes a 2-channel pair
(input, reconstruction) and is shared by every channel and modality: the three RGB
channels are embedded one at a time and averaged (F_rgb), the depth pair gives F_d. In
rgb+3d the importance scoring module (ISM: two 3x3 conv-BN-activation layers, hidden
width = input width 2C, last activation a sigmoid) maps [F_rgb, F_d] to two importance
maps S_rgb, S_d and the U-Net sees S_rgb * F_rgb + S_d * F_d. Single-modality models
have no ISM. The U-Net's 2-class logits go through a softmax; the anomaly channel of each
scale is averaged (``multiscale``) or only the full-size scale is used.

Image score: the map is box-filtered (``score_pool``) and its maximum over the valid
pixels (the depth foreground when the model has depth, else the whole image) is the score.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.methods.base import DYNAMIC, PartSpec
from edge_runtime.methods.dbrn.config import DBRNConfig
from edge_runtime.nets.swin_unet import SwinUnet
from edge_runtime.nets.unet import UNet, conv_bn_relu


def _no_stage(name: str):
    return nullcontext()


class ImportanceScoring(nn.Module):
    """ISM: [F_rgb, F_d] (N x 2C x H x W) -> two importance maps N x 2 x H x W in (0, 1)."""

    def __init__(self, width: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.Sigmoid())

    def forward(self, f_rgb, f_depth):
        return self.convs(torch.cat([f_rgb, f_depth], dim=1))


class Discriminator(nn.Module):
    """PE + (ISM) + U-Net. forward(*pairs) -> logits N x 2 x R x R, where pairs are
    (x_rgb, r_rgb) for rgb, (x_depth, r_depth) for 3d, all four for rgb+3d."""

    def __init__(self, modality: str, width: int, levels: int, patch: int = 1):
        super().__init__()
        self.modality = modality
        self.width = width
        self.patch = patch
        if patch == 1:
            self.patch_embed = conv_bn_relu(2, width)
        else:  # a strided patch embedding: the U-Net runs at R / patch, its logits are upsampled
            self.patch_embed = nn.Sequential(nn.Conv2d(2, width, patch, patch, bias=False), nn.BatchNorm2d(width),
                                             nn.ReLU(inplace=True))
        self.ism = ImportanceScoring(width) if modality == "rgb+3d" else None
        self.unet = UNet(width, width, levels, 2)

    def embed_rgb(self, x, r):
        n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        pairs = torch.stack([x, r], dim=2).reshape(-1, 2, h, w)  # (N*3) x 2 x H x W
        e = self.patch_embed(pairs)
        return e.reshape(-1, c, self.width, e.shape[-2], e.shape[-1]).mean(dim=1)

    def embed_depth(self, x, r):
        return self.patch_embed(torch.cat([x, r], dim=1))

    def features(self, *pairs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fused features N x C x R x R, importance maps N x 2 x R x R or None)."""
        if self.modality == "rgb":
            return self.embed_rgb(*pairs), None
        if self.modality == "3d":
            return self.embed_depth(*pairs), None
        f_rgb = self.embed_rgb(pairs[0], pairs[1])
        f_d = self.embed_depth(pairs[2], pairs[3])
        s = self.ism(f_rgb, f_d)
        return s[:, 0:1] * f_rgb + s[:, 1:2] * f_d, s

    def forward(self, *pairs) -> torch.Tensor:
        logits = self.unet(self.features(*pairs)[0])
        if self.patch > 1:
            logits = F.interpolate(logits, size=pairs[0].shape[-2:], mode="bilinear", align_corners=False)
        return logits


class DBRNModel(nn.Module):
    """The full DBRN model for one config (see the module doc)."""

    def __init__(self, cfg: DBRNConfig):
        super().__init__()
        self.cfg = cfg
        self.multiscale = cfg.multiscale
        kw = dict(img_size=cfg.resolution, patch=cfg.patch, embed_dim=cfg.embed_dim, depths=cfg.depths,
                  heads=cfg.heads, window=cfg.window, mlp_ratio=cfg.mlp_ratio, skip_dropout=cfg.skip_dropout,
                  n_scales=cfg.n_scales)
        self.branches = cfg.branches
        if "rgb" in self.branches:
            self.rec_rgb = SwinUnet(3, dropout_seed=cfg.dropout_seed, **kw)
        if "depth" in self.branches:
            self.rec_depth = SwinUnet(1, dropout_seed=cfg.dropout_seed + 100, **kw)
        self.discriminator = Discriminator(cfg.modality, cfg.disc_width, cfg.disc_levels, cfg.disc_patch)
        self.set_dropout_mode(cfg.dropout_mode)

    # ------------------------------------------------------------------ options
    def set_dropout_mode(self, mode: str) -> None:
        for b in self.branches:
            self.reconstructor(b).set_dropout_mode(mode)
        self.dropout_mode = mode

    def reconstructor(self, branch: str) -> SwinUnet:
        return getattr(self, f"rec_{branch}")

    # ------------------------------------------------------------------ pieces
    def discriminate(self, inputs: dict, recs: dict) -> torch.Tensor:
        """Anomaly probability per scale: N x S' x R x R (S' = the scales given in ``recs``).

        ``inputs[b]``: N x C x R x R; ``recs[b]``: N x S' x C x R x R. All scales run as one
        batch through the shared discriminator."""
        pairs = []
        n = s = 0
        for b in self.branches:
            rec = recs[b]
            n, s, c, h, w = rec.shape
            x = inputs[b][:, None].expand(n, s, c, h, w).reshape(n * s, c, h, w)
            pairs += [x, rec.reshape(n * s, c, h, w)]
        logits = self.discriminator(*pairs)
        return logits.softmax(dim=1)[:, 1].reshape(n, s, logits.shape[-2], logits.shape[-1])

    def score(self, amap: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        k = self.cfg.score_pool
        smooth = F.avg_pool2d(amap[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0] if k > 1 else amap
        if valid is not None:
            smooth = smooth * valid
        return smooth.flatten(1).amax(dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: dict, stage=_no_stage):
        recs = {}
        with stage("reconstruct"):
            for b in self.branches:
                recs[b] = self.reconstructor(b)(inputs[b])
        with stage("discriminate"):
            if not self.multiscale:
                recs = {b: r[:, :1] for b, r in recs.items()}
            prob = self.discriminate(inputs, recs)
        with stage("score"):
            amap = prob.mean(dim=1)
            valid = inputs.get("fg") if "depth" in self.branches else None
            scores = self.score(amap, valid)
        return scores, amap


def dense_parts(cfg: DBRNConfig) -> list[PartSpec]:
    """Both reconstructors (static batch 1) and the discriminator (dynamic batch = frames x scales)."""
    r, s = cfg.resolution, cfg.n_scales
    chans = {"rgb": 3, "depth": 1}
    parts = [PartSpec(f"rec_{b}", f"rec_{b}", [(b, [1, chans[b], r, r])], (f"rec_{b}", [1, s, chans[b], r, r]))
             for b in cfg.branches]
    inputs = []
    for b in cfg.branches:
        inputs += [(f"x_{b}", [DYNAMIC, chans[b], r, r]), (f"r_{b}", [DYNAMIC, chans[b], r, r])]
    parts.append(PartSpec("discriminator", "discriminator", inputs, ("logits", [DYNAMIC, 2, r, r]),
                          batch_one=False, dynamic_max=16 * s))
    return parts
