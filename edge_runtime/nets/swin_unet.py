"""Swin-Unet (Cao et al., ECCV 2022 workshops): a U-shaped Swin Transformer, as an image
reconstructor with several output scales (the DBRN reconstruction branch, docs/methods.md).

Layout (as the Swin-Unet reference design):

* ``patch_embed``: ``patch`` x ``patch`` convolution, ``in_chans`` -> ``embed_dim``, LayerNorm.
* encoder stage i (i = 0..3): ``depths[i]`` Swin blocks at (R/patch) / 2^i tokens a side,
  width ``embed_dim * 2^i``, alternating plain and shifted windows; ``PatchMerging``
  (2x2 -> 1, width x2) between stages. The skip of stage i is its *input*.
* decoder: ``PatchExpand`` (1 -> 2x2, width /2) up from the bottleneck; at each level the
  skip is concatenated, a linear layer halves the width back, ``depths[i]`` Swin blocks
  run, and ``PatchExpand`` goes up; the last level is expanded x4 to the input size
  (``FinalPatchExpand``) and a 1x1 convolution gives the image.

Reconstruction additions (DBRN):

* dropout on the encoder skips (shallow -> deep ``skip_dropout``, e.g. 0.6 / 0.4 / 0.2),
  kept at test time. ``dropout_mode`` chooses how it acts outside training: ``"fixed"``
  multiplies each skip by a fixed seeded mask stored as a buffer (deterministic, one
  graph, exports to ONNX), ``"random"`` draws fresh masks every call (the paper's
  reading; scores then vary from call to call), ``"off"`` disables it. In training mode
  masks are always fresh.
* ``n_scales`` outputs: scale 0 is the full-resolution image; scale k >= 1 comes from a
  head on the decoder level with (R/patch) / 2^k tokens a side and is an image of R / 2^k
  pixels (linear to ``in_chans * 16`` + 4x4 pixel shuffle). ``forward_scales`` returns the
  native sizes (for the loss); ``forward`` returns them all resized (bilinear) to R x R,
  stacked: N x S x C x R x R (the discriminator's input).

Export. Every shape is fixed at construction (the token grid of each stage, the window
partition, the relative-position index and the shifted-window attention masks are
buffers), so the module traces to ONNX (opset >= 17) with a dynamic batch and no
data-dependent op. ``torch.roll`` becomes Slice + Concat.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.nets.vit import Mlp  # the same fc1 -> GELU -> fc2 block

__all__ = [
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_mask",
    "WindowAttention",
    "SwinBlock",
    "PatchMerging",
    "PatchExpand",
    "FinalPatchExpand",
    "SwinUnet",
]


# --------------------------------------------------------------------------- window helpers


def window_partition(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """B x H x W x C -> (B * nW) x window^2 x C, windows in raster order."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * nW) x window^2 x C -> B x H x W x C (inverse of ``window_partition``)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """int64 window^2 x window^2: index into the (2w-1)^2 relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """float32 nW x window^2 x window^2: 0 where two tokens of a shifted window come from
    the same region of the un-shifted map, -100 where the cyclic shift brought them
    together from opposite borders (they must not attend to each other)."""
    region = np.zeros((h, w), np.float32)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[hs, ws] = cnt
            cnt += 1
    nh, nw = h // window, w // window  # numpy only (the mask is also built under torch.device("meta"))
    r = region.reshape(nh, window, nw, window).transpose(0, 2, 1, 3).reshape(nh * nw, window * window)
    diff = r[:, None, :] - r[:, :, None]
    return torch.from_numpy(np.where(diff != 0, -100.0, 0.0).astype(np.float32))


# --------------------------------------------------------------------------- blocks


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.window, self.heads = dim, window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW) x N x C; mask: nW x N x N (additive) or None."""
        n, c, h = x.shape[1], self.dim, self.heads
        qkv = self.qkv(x).reshape(-1, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)  # B' x h x N x N
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, h).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.reshape(-1, nw, h, n, n) + mask[None, :, None]).reshape(-1, h, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(out)




class SwinBlock(nn.Module):
    """One Swin Transformer block on a fixed ``res`` = (H, W) token grid (B x H*W x C).

    When the grid is not larger than the window, the window shrinks to the grid and no
    shift is applied (as the reference implementation)."""

    def __init__(self, dim: int, res: tuple[int, int], heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        h, w = res
        if min(res) <= window:
            window, shift = min(res), 0
        if h % window or w % window:
            raise ValueError(f"token grid {h}x{w} is not divisible by the window {window}")
        self.res, self.window, self.shift = (h, w), window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("attn_mask", shifted_window_mask(h, w, window, shift) if shift else None, persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.res
        c = x.shape[-1]
        y = self.norm1(x).reshape(-1, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_partition(y, self.window, h, w)
        y = self.attn(y, self.attn_mask)
        y = window_reverse(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """B x (H*W) x C -> B x (H/2 * W/2) x 2C: each 2x2 group concatenated, normed, projected."""

    def __init__(self, res: tuple[int, int], dim: int):
        super().__init__()
        if res[0] % 2 or res[1] % 2:
            raise ValueError(f"patch merging needs an even token grid, got {res}")
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        h, w = self.res
        c = x.shape[-1]
        x = x.reshape(-1, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(-1, (h // 2) * (w // 2), 4 * c)))


def _expand(x: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """B x (H*W) x (p*p*c) -> B x (pH * pW) x c (pixel shuffle of tokens, (p1 p2 c) order)."""
    x = x.reshape(-1, h, w, p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h * p * w * p, c)


class PatchExpand(nn.Module):
    """B x (H*W) x C -> B x (2H * 2W) x C/2."""

    def __init__(self, res: tuple[int, int], dim: int):
        super().__init__()
        self.res, self.dim = res, dim
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x):
        h, w = self.res
        return self.norm(_expand(self.expand(x), h, w, 2, self.dim // 2))


class FinalPatchExpand(nn.Module):
    """B x (H*W) x C -> B x (pH * pW) x C (x``p`` up, width kept)."""

    def __init__(self, res: tuple[int, int], dim: int, p: int = 4):
        super().__init__()
        self.res, self.dim, self.p = res, dim, p
        self.expand = nn.Linear(dim, p * p * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h, w = self.res
        return self.norm(_expand(self.expand(x), h, w, self.p, self.dim))


class SkipDropout(nn.Module):
    """Dropout on one encoder skip (B x L x C), active in training and, per ``mode``, at test.

    ``fixed_mask`` (1 x L x C, values 0 or 1/(1-p)) is drawn once from ``seed`` and stored."""

    def __init__(self, p: float, tokens: int, dim: int, seed: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = float(p)
        self.mode = "fixed"
        mask = torch.empty(1, tokens, dim)
        if mask.device.type != "meta":
            keep = np.random.default_rng(seed).random((1, tokens, dim)) >= self.p
            mask.copy_(torch.from_numpy(keep.astype(np.float32) / (1.0 - self.p)))
        self.register_buffer("fixed_mask", mask, persistent=True)

    def forward(self, x):
        if self.p == 0.0:
            return x
        if self.training or self.mode == "random":
            return F.dropout(x, self.p, training=True)
        if self.mode == "fixed":
            return x * self.fixed_mask
        return x


# --------------------------------------------------------------------------- the network


class SwinUnet(nn.Module):
    """Swin-Unet reconstructor (see the module doc). Input N x ``in_chans`` x R x R."""

    def __init__(self, in_chans: int, img_size: int, patch: int = 4, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 4, 2), heads: tuple[int, ...] = (3, 6, 12, 24),
                 window: int = 7, mlp_ratio: float = 4.0, skip_dropout: tuple[float, ...] = (0.6, 0.4, 0.2),
                 n_scales: int = 3, dropout_seed: int = 0):
        super().__init__()
        n = len(depths)
        if len(heads) != n or len(skip_dropout) != n - 1:
            raise ValueError(f"need one head count per stage ({n}) and one skip dropout per skip ({n - 1})")
        g0 = img_size // patch
        if img_size % patch or g0 % (2 ** (n - 1)):
            raise ValueError(f"image size {img_size} must be divisible by patch {patch} x 2^{n - 1}")
        if not 1 <= n_scales <= n - 1:
            raise ValueError(f"n_scales must be in 1..{n - 1}, got {n_scales}")
        if patch != 4:
            raise ValueError("the final x4 expansion and the scale heads assume patch 4")
        self.in_chans, self.img_size, self.n_scales = in_chans, img_size, n_scales
        self.grids = [g0 // 2 ** i for i in range(n)]
        dims = [embed_dim * 2 ** i for i in range(n)]

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch, patch)
        self.patch_norm = nn.LayerNorm(embed_dim)

        def stage(i):
            g = self.grids[i]
            return nn.Sequential(*[SwinBlock(dims[i], (g, g), heads[i], window, 0 if j % 2 == 0 else window // 2,
                                             mlp_ratio) for j in range(depths[i])])

        self.encoder = nn.ModuleList(stage(i) for i in range(n))
        self.merge = nn.ModuleList(PatchMerging((self.grids[i],) * 2, dims[i]) for i in range(n - 1))
        self.norm = nn.LayerNorm(dims[-1])
        self.skip_drop = nn.ModuleList(
            SkipDropout(skip_dropout[i], self.grids[i] ** 2, dims[i], dropout_seed + i) for i in range(n - 1))
        # decoder level i (i = n-2 .. 0) works at grid i, width dims[i]
        self.expand = nn.ModuleList(PatchExpand((self.grids[i + 1],) * 2, dims[i + 1]) for i in range(n - 1))
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(n - 1))
        self.decoder = nn.ModuleList(stage(i) for i in range(n - 1))
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = FinalPatchExpand((g0, g0), dims[0], 4)
        self.output = nn.Conv2d(dims[0], in_chans, 1)
        # scale k >= 1: head on decoder level k (grid g0 / 2^k, width dims[k]) -> R / 2^k image
        self.scale_heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dims[k]), nn.Linear(dims[k], 16 * in_chans)) for k in range(1, n_scales))
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_dropout_mode(self, mode: str) -> None:
        """"fixed" | "random" | "off": how the skip dropout acts outside training."""
        if mode not in ("fixed", "random", "off"):
            raise ValueError(f"dropout mode must be fixed, random or off, got {mode!r}")
        for d in self.skip_drop:
            d.mode = mode

    def forward_scales(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions at their native sizes: [N x C x R x R, N x C x R/2 x R/2, ...]."""
        g0 = self.grids[0]
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = self.patch_norm(t)
        skips = []
        for i, blocks in enumerate(self.encoder):
            if i < len(self.merge):
                skips.append(t)
                t = self.merge[i](blocks(t))
            else:
                t = blocks(t)
        t = self.norm(t)
        outs: dict[int, torch.Tensor] = {}
        for i in reversed(range(len(self.decoder))):
            t = self.expand[i](t)
            t = self.concat_back[i](torch.cat([t, self.skip_drop[i](skips[i])], dim=-1))
            t = self.decoder[i](t)
            if 1 <= i < self.n_scales:
                g = self.grids[i]
                y = _expand(self.scale_heads[i - 1](t), g, g, 4, self.in_chans)  # N x (4g)^2 x C
                outs[i] = y.reshape(-1, 4 * g, 4 * g, self.in_chans).permute(0, 3, 1, 2)
        t = self.final_expand(self.norm_up(t))  # N x (4 g0)^2 x C0
        full = t.reshape(-1, 4 * g0, 4 * g0, t.shape[-1]).permute(0, 3, 1, 2)
        outs[0] = self.output(full)
        return [outs[k] for k in range(self.n_scales)]

    def upsample(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """Native-size reconstructions -> N x S x C x R x R (bilinear, no corner alignment)."""
        r = self.img_size
        ups = [s if s.shape[-1] == r else F.interpolate(s, size=(r, r), mode="bilinear", align_corners=False)
               for s in scales]
        return torch.stack(ups, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x R x R -> N x S x C x R x R (every scale resized to R x R)."""
        return self.upsample(self.forward_scales(x))


def n_params(module: nn.Module) -> int:
    return int(sum(math.prod(p.shape) for p in module.parameters()))
