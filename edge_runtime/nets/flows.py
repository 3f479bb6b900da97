"""Conditional normalizing flows of affine coupling blocks on feature maps (pure nn.Modules).

A flow maps a feature map ``x`` (B x C x H x W) bijectively to ``z`` of the same shape and
returns the per-pixel log-determinant of its Jacobian, so the exact negative
log-likelihood of a pixel under a standard normal base distribution is
``0.5 * |z|^2 - log|det J|`` (``nll_per_pixel``). Every pixel's C channels are one sample:
the subnets are convolutions, so neighbouring pixels condition each other's transform, but
the Jacobian of a pixel's output w.r.t. its own input is block-triangular per coupling,
which is what the log-determinant sums (see ``AffineCoupling``).

Structure (Real-NVP / GLOW coupling, as used by AST and CS-Flow; see docs/methods.md):

* a fixed random channel permutation before each coupling (a buffer, seeded, stored in
  the state dict so a bundle rebuilds the same flow);
* the coupling splits the channels into halves ``x1, x2``; a subnet on ``[x2, c]``
  (``c`` = the condition, e.g. a positional encoding) gives log-scale and shift for
  ``x1``: ``y1 = x1 * exp(s2) + t2``; a second subnet on ``[y1, c]`` transforms ``x2``:
  ``y2 = x2 * exp(s1) + t1``;
* each subnet is conv k x k -> hidden, ReLU, conv k x k -> 2 x half, its output scaled by
  a learnable scalar ``gamma`` initialised to 0 (the "gamma trick": every block starts
  as the identity);
* the log-scale is soft-clamped, ``alpha * 0.636 * atan(s / alpha)`` (|s| < ~alpha).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["soft_clamp", "CouplingSubnet", "AffineCoupling", "CouplingFlow", "nll_per_pixel"]


def soft_clamp(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * 0.636 * atan(s / alpha)``: a smooth clamp of a log-scale to about +-alpha.

    0.636 ~ 2 / pi, the constant of the FrEIA "ATAN" clamp; slope 0.636 at 0.
    """
    return alpha * 0.636 * torch.atan(s / alpha)


class CouplingSubnet(nn.Module):
    """conv k x k (c_in -> hidden), ReLU, conv k x k (hidden -> c_out), times gamma (init 0)."""

    def __init__(self, c_in: int, c_out: int, hidden: int, kernel: int):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"coupling subnet kernel must be odd, got {kernel}")
        pad = kernel // 2
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel, padding=pad),
        )
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.gamma


class AffineCoupling(nn.Module):
    """One affine coupling block with a static condition (see the module doc).

    channels: C of the transformed map (split into ceil(C/2) and floor(C/2)).
    cond_channels: channels of the condition concatenated to each subnet's input (0: none).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, kernel: int, clamp: float):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling block needs at least 2 channels, got {channels}")
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        self.c1 = (channels + 1) // 2
        self.c2 = channels - self.c1
        self.clamp = float(clamp)
        self.sub2 = CouplingSubnet(self.c2 + cond_channels, 2 * self.c1, hidden, kernel)  # acts on x1
        self.sub1 = CouplingSubnet(self.c1 + cond_channels, 2 * self.c2, hidden, kernel)  # acts on x2

    @staticmethod
    def _cat(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return x if cond is None else torch.cat([x, cond], dim=1)

    def _scale_shift(self, sub: CouplingSubnet, x: torch.Tensor, cond):
        s, t = sub(self._cat(x, cond)).chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, log|det J| per pixel B x H x W)."""
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        s2, t2 = self._scale_shift(self.sub2, x2, cond)
        y1 = x1 * torch.exp(s2) + t2
        s1, t1 = self._scale_shift(self.sub1, y1, cond)
        y2 = x2 * torch.exp(s1) + t1
        return torch.cat([y1, y2], dim=1), s2.sum(dim=1) + s1.sum(dim=1)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y1, y2 = y[:, : self.c1], y[:, self.c1 :]
        s1, t1 = self._scale_shift(self.sub1, y1, cond)
        x2 = (y2 - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.sub2, x2, cond)
        x1 = (y1 - t2) * torch.exp(-s2)
        return torch.cat([x1, x2], dim=1)


class CouplingFlow(nn.Module):
    """Permute -> coupling, ``len(kernels)`` times (the AST teacher: kernels 3, 3, 3, 5).

    channels: C of the map; cond_channels: C of the condition (0: unconditional);
    hidden: subnet hidden channels; kernels: one subnet kernel size per block;
    clamp: soft-clamp alpha; seed: seeds the fixed permutations (numpy, so the same on
    every platform; they are buffers, hence also in the state dict).
    """

    def __init__(self, channels: int, cond_channels: int = 0, hidden: int = 64,
                 kernels: Sequence[int] = (3, 3, 3, 5), clamp: float = 1.9, seed: int = 0):
        super().__init__()
        self.channels = int(channels)
        self.blocks = nn.ModuleList()
        rng = np.random.RandomState(seed)
        for k, kernel in enumerate(kernels):
            perm = rng.permutation(self.channels)
            self.register_buffer(f"perm_{k}", torch.as_tensor(perm, dtype=torch.long))
            self.register_buffer(f"inv_perm_{k}", torch.as_tensor(np.argsort(perm), dtype=torch.long))
            self.blocks.append(AffineCoupling(self.channels, cond_channels, hidden, int(kernel), clamp))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, log|det dz/dx| per pixel, B x H x W). ``cond`` is B x Cc x H x W (or None)."""
        logdet = x.new_zeros(x.shape[0], *x.shape[2:])
        for k, block in enumerate(self.blocks):
            x = x.index_select(1, getattr(self, f"perm_{k}"))  # a permutation: |det| = 1
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for k in reversed(range(len(self.blocks))):
            z = self.blocks[k].inverse(z, cond)
            z = z.index_select(1, getattr(self, f"inv_perm_{k}"))
        return z


def nll_per_pixel(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per pixel and channel, B x H x W:
    ``(0.5 * |z|^2 - log|det J|) / C`` (the constant ``0.5 * log(2 pi)`` per channel is
    dropped, as the AST code does; dividing by C keeps the loss scale independent of C)."""
    return (0.5 * (z ** 2).sum(dim=1) - logdet) / z.shape[1]


# the dropped constant, for anyone who wants the exact density
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
