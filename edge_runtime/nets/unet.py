"""A plain convolutional U-Net (Ronneberger et al., MICCAI 2015) for dense classification.

``UNet(in_ch, width, levels, out_ch)``: an encoder of ``levels`` stages (two 3x3
conv-BN-ReLU each; 2x2 max pooling between stages; width doubling up to 8x), a
mirrored decoder (bilinear 2x upsampling, 3x3 conv-BN-ReLU, concatenation with the
encoder stage of the same size, two 3x3 conv-BN-ReLU) and a 1x1 output convolution.
Shapes are static and the ops are plain (Conv, BatchNorm, Relu, MaxPool, Resize,
Concat), so it exports to ONNX with a dynamic batch. Inputs need a side divisible by
2^(levels-1).

DBRN uses it as the discriminative network behind its patch embedding and importance
scoring module (``edge_runtime/methods/dbrn/model.py``, docs/methods.md); ``stem=False``
lets the caller provide the first stage's input features itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_bn_relu", "UNet"]


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = conv_bn_relu(cin, cout)
        self.block = nn.Sequential(conv_bn_relu(cout + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([self.reduce(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net: N x in_ch x H x W -> N x out_ch x H x W logits."""

    def __init__(self, in_ch: int, width: int = 64, levels: int = 5, out_ch: int = 2):
        super().__init__()
        if levels < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got {levels}")
        self.levels = levels
        widths = [width * min(2 ** i, 8) for i in range(levels)]
        self.widths = widths
        self.down = nn.ModuleList()
        cin = in_ch
        for w in widths:
            self.down.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(levels - 1)))
        self.head = nn.Conv2d(widths[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)
