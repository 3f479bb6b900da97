"""DINO ViT-B/8 feature extractor (CFM's frozen 2D extractor), cut after ``depth`` blocks.

Architecture and parameter names follow timm's ``vit_base_patch8_224`` (identical to the
official DINO ``vision_transformer.py``), so the official ``dino_vitbase8_pretrain.pth``
and timm's ``vit_base_patch8_224.dino`` state dicts load through
:func:`edge_runtime.nets.checkpoints.load_dino_vit` without renaming:

``patch_embed.proj.{weight,bias}``, ``cls_token``, ``pos_embed``,
``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``,
``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``.

CFM (docs/methods.md, CFM) takes the output of the last kept block after the final
LayerNorm, drops the CLS token and reshapes to a ``768 x R/8 x R/8`` map. Layer pruning
(CFM section 3.4) keeps only the first ``l`` blocks (l = 1, 4, 8, 12); here the model
simply has ``depth = l`` blocks, so pruned variants neither store nor run the rest.

The module is a frozen inference model: no dropout, no drop path, no classifier head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # timm / DINO ViT LayerNorm epsilon


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` patches -> ``embed_dim`` tokens (timm layout)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x (H/p * W/p) x embed_dim`` tokens, row-major patch order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm ``Attention``).

    Uses :func:`torch.nn.functional.scaled_dot_product_attention` with the default
    ``head_dim ** -0.5`` scale, which is the scale timm and DINO use.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x C`` tokens -> ``B x N x C``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1`` -> GELU (exact erf form, as timm/DINO/Point-MAE) -> ``fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x dim`` -> ``... x dim``."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Shared by the ViT (qkv bias, LayerNorm eps 1e-6) and Point-MAE (no qkv bias,
    LayerNorm eps 1e-5); parameter names match both official layouts.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x dim`` -> ``B x N x dim``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTExtractor(nn.Module):
    """DINO ViT-B/8 cut after ``depth`` blocks; ``forward`` returns the patch-token feature map.

    Args:
        depth: number of transformer blocks kept (CFM: 1 Tiny, 4 Small, 8 Medium, 12 Full).
        embed_dim, num_heads, patch_size, mlp_ratio: ViT-B/8 defaults.
        img_size: the side the position embedding was trained for (224 -> 28 x 28 grid).

    Attributes:
        out_dim: channels of the output map (``embed_dim``).
        patch_size: output stride in pixels.
    """

    def __init__(
        self,
        depth: int = 12,
        embed_dim: int = 768,
        num_heads: int = 12,
        patch_size: int = 8,
        img_size: int = 224,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.depth = depth
        self.out_dim = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, eps=LN_EPS) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an ``h x w`` token grid: ``1 x (1 + h*w) x C``.

        At the trained grid the parameter is returned as is. Otherwise the patch part is
        resized bicubically (align_corners=False, no antialias), as DINO's
        ``interpolate_pos_encoding`` does; the CLS entry is kept. DINO passes a
        ``scale_factor`` nudged by 0.1 while we pass the target size, so off-grid
        values can differ from DINO's by a fraction of a sample; CFM always runs at
        224 px, where no interpolation happens.
        """
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        c = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, c)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised ``B x 3 x H x W`` image -> ``B x embed_dim x H/p x W/p`` features.

        ``H`` and ``W`` must be multiples of ``patch_size`` (CFM: 224 x 224 -> 28 x 28).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W image tensor, got shape {tuple(x.shape)}")
        b, _, hh, ww = x.shape
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {self.patch_size}")
        h, w = hh // self.patch_size, ww // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h, w)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)[:, 1:]
        return tokens.transpose(1, 2).reshape(b, self.out_dim, h, w)
