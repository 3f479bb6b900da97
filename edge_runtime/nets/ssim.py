"""Structural similarity (SSIM, Wang et al. 2004) as a per-pixel torch map.

``ssim_map(x, y)`` is the local SSIM of two N x C x H x W images in the same units
(``data_range`` = the span of those units, 1.0 for images in [0, 1]) with the usual
Gaussian window (11 taps, sigma 1.5) and constants ``C1 = (0.01 L)^2``,
``C2 = (0.03 L)^2``. The local means, variances and covariance are Gaussian-weighted
averages; borders replicate the edge pixels (so the map has the input's size and no
zero padding pulls the statistics down at the edge). The map is averaged over channels,
giving N x H x W, which losses weight per pixel (DBRN weights background, foreground
and simulated-defect pixels separately, docs/methods.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_window", "ssim_map", "ssim"]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """1-D normalised Gaussian taps (``size``,), centred."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian average of N x C x H x W with replicated borders."""
    c = x.shape[1]
    k = g.numel()
    pad = k // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Local SSIM of ``x`` and ``y`` (N x C x H x W), averaged over channels: N x H x W."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: need two N x C x H x W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = gaussian_window(window, sigma, x.dtype, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=1)


def ssim(x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """Mean SSIM per image (N,)."""
    return ssim_map(x, y, **kw).flatten(1).mean(dim=1)
