"""EfficientNet-Lite0/1/2 and EfficientNet-B0..B7 as multi-scale feature extractors.

A pure ``nn.Module`` (no file I/O; weights are loaded by
:mod:`edge_runtime.nets.efficientnet_weights`). Parameter names follow the
``efficientnet_pytorch`` / ``efficientnet-lite-pytorch`` layout (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), so their state dicts load by name.

Differences between the two families, as in the reference implementations:

* Lite: ReLU6, no squeeze-excite, stem (32 channels) and head (1280) not width-scaled,
  first and last stage not depth-scaled.
* B-series: swish (SiLU), squeeze-excite (ratio 0.25 of the block's input channels).

Padding is TensorFlow "SAME" (output = ceil(input / stride); for an odd total padding the
extra row/column goes to the bottom/right), computed from the actual input size. The
reference packages build the same padding statically for the nominal resolution
(224 for Lite0/B0, 240 for Lite1 ...); both agree whenever every stride-2 layer sees an
input of the parity it has at the nominal resolution (always at the nominal size; for
Lite0/B0 at any multiple of 32). TensorFlow, where the weights were trained, computes the
padding per input, as done here.

The module keeps only the stem and the blocks up to ``max(out_blocks)``; there is no head.
It is always evaluated with frozen batch-norm statistics (``train()`` keeps BN in eval).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

ARCHS: tuple[str, ...] = ("lite0", "lite1", "lite2") + tuple(f"b{i}" for i in range(8))

# (width multiplier, depth multiplier, nominal resolution)
_SCALING: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
}

NOMINAL_RESOLUTION: dict[str, int] = {a: s[2] for a, s in _SCALING.items()}

# Input normalisation each weight set was trained with, as (mean, std) per RGB channel in
# 0..1 units: x = (rgb / 255 - mean) / std. The Lite weights come from the TensorFlow
# Lite builder, which uses mean 127 / std 128 on 0..255 pixels (about [-1, 1]); the
# efficientnet_pytorch B-series weights use the ImageNet mean/std.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_LITE = ((127.0 / 255,) * 3, (128.0 / 255,) * 3)
INPUT_NORMALISATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    a: (_LITE if a.startswith("lite") else _IMAGENET) for a in ARCHS
}

# Base (B0) stages: repeats, kernel, stride, expand ratio, in channels, out channels.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:  # never round down by more than 10 %
        new += divisor
    return int(new)


def _check_arch(arch: str) -> None:
    if arch not in _SCALING:
        raise ValueError(f"unknown EfficientNet variant {arch!r}; expected one of {', '.join(ARCHS)}")


def _stem_channels(arch: str) -> int:
    return 32 if arch.startswith("lite") else _round_filters(32, _SCALING[arch][0])


def _block_args(arch: str) -> list[dict]:
    """Per-block construction arguments, in order."""
    _check_arch(arch)
    width, depth, _ = _SCALING[arch]
    lite = arch.startswith("lite")
    blocks: list[dict] = []
    stride_total = 2  # the stem
    in_ch = _stem_channels(arch)
    for stage, (reps, k, s, e, _cin, cout) in enumerate(_STAGES):
        out_ch = _round_filters(cout, width)
        if lite and stage in (0, len(_STAGES) - 1):
            n = reps
        else:
            n = int(math.ceil(depth * reps))
        for i in range(n):
            stride = s if i == 0 else 1
            stride_total *= stride
            blocks.append(
                {
                    "index": len(blocks),
                    "stage": stage,
                    "stride": stride_total,
                    "channels": out_ch,
                    "in_channels": in_ch,
                    "kernel": k,
                    "conv_stride": stride,
                    "expand": e,
                    "se": not lite,
                }
            )
            in_ch = out_ch
    return blocks


def block_table(arch: str) -> list[dict]:
    """One row per block: ``index`` (0-based), ``stage`` (0-based), ``stride`` (cumulative
    w.r.t. the input image) and ``channels`` (output channels)."""
    return [{k: b[k] for k in ("index", "stage", "stride", "channels")} for b in _block_args(arch)]


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if k == 1 and s == 1:
            return F.conv2d(x, self.weight, self.bias, 1, 0, 1, self.groups)
        ih, iw = x.shape[-2:]
        pad_h = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pad_w = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0:  # symmetric: let the convolution pad
            return F.conv2d(x, self.weight, self.bias, s, (pad_h // 2, pad_w // 2), 1, self.groups)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, s, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv(.)) with the running statistics (eval mode), as one convolution with a bias."""
    w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight, bn.bias)
    conv.weight, conv.bias = nn.Parameter(w.detach(), requires_grad=False), nn.Parameter(b.detach(), requires_grad=False)


class MBConvBlock(nn.Module):
    """Inverted residual block (expand 1x1 -> depthwise kxk -> [squeeze-excite] -> project 1x1)."""

    def __init__(self, a: dict):
        super().__init__()
        cin, cout, e = a["in_channels"], a["channels"], a["expand"]
        mid = cin * e
        self.has_expand = e != 1
        self.has_se = a["se"]
        self.act = nn.SiLU() if a["se"] else nn.ReLU6()
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, a["kernel"], a["conv_stride"], groups=mid)
        self._bn1 = _bn(mid)
        if self.has_se:
            squeezed = max(1, int(cin * 0.25))
            self._se_reduce = nn.Conv2d(mid, squeezed, 1)
            self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = Conv2dSame(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = a["conv_stride"] == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        if self.has_se:
            s = F.adaptive_avg_pool2d(y, 1)
            s = self._se_expand(self.act(self._se_reduce(s)))
            y = torch.sigmoid(s) * y
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y

    def _fuse(self) -> None:
        """Fold each batch-norm into the convolution before it (see ``fuse_for_inference``)."""
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        if self.has_expand:
            pairs.insert(0, ("_expand_conv", "_bn0"))
        for conv, bn in pairs:
            _fold_bn(getattr(self, conv), getattr(self, bn))
            setattr(self, bn, nn.Identity())
        if isinstance(self.act, nn.ReLU6):
            self.act = nn.ReLU6(inplace=True)  # its input is always a fresh convolution output


class EfficientNetFeatures(nn.Module):
    """Stem + blocks ``0..max(out_blocks)``; ``forward`` returns the listed block outputs.

    Input: B x 3 x H x W, normalised with ``INPUT_NORMALISATION[arch]``.
    Output: a list, in the order of ``out_blocks``, of B x C_i x ceil(H/s_i) x ceil(W/s_i)
    with ``C_i = out_channels[i]`` and ``s_i = out_strides[i]``.
    """

    def __init__(self, arch: str, out_blocks: tuple[int, ...]):
        super().__init__()
        _check_arch(arch)
        args = _block_args(arch)
        out_blocks = tuple(int(i) for i in out_blocks)
        if not out_blocks:
            raise ValueError("out_blocks is empty")
        bad = [i for i in out_blocks if not 0 <= i < len(args)]
        if bad:
            raise ValueError(f"{arch} has blocks 0..{len(args) - 1}; out_blocks {bad} do not exist")
        self.arch = arch
        self.out_blocks = out_blocks
        self.out_channels = tuple(args[i]["channels"] for i in out_blocks)
        self.out_strides = tuple(args[i]["stride"] for i in out_blocks)
        self.normalisation = INPUT_NORMALISATION[arch]
        stem = _stem_channels(arch)
        self._conv_stem = Conv2dSame(3, stem, 3, 2)
        self._bn0 = _bn(stem)
        self.act = nn.SiLU() if not arch.startswith("lite") else nn.ReLU6()
        self._blocks = nn.ModuleList(MBConvBlock(a) for a in args[: max(out_blocks) + 1])
        self.eval()

    def train(self, mode: bool = True) -> "EfficientNetFeatures":
        # Frozen extractor: batch-norm always uses its running statistics.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def fuse_for_inference(self) -> "EfficientNetFeatures":
        """Fold every batch-norm into its convolution, in place, and return self.

        The extractor is frozen, so each batch-norm is a fixed per-channel affine map that
        the convolution before it can absorb: the outputs agree to float rounding (about
        1e-6 relative) and one CPU frame skips ~24 batch-norm passes over its activations.
        Inference only: the state dict no longer has the ``_bn*`` keys, so a fused module
        cannot load (or be saved as) a checkpoint. Calling it twice is a no-op.
        """
        if not isinstance(self._bn0, nn.BatchNorm2d):
            return self
        _fold_bn(self._conv_stem, self._bn0)
        self._bn0 = nn.Identity()
        if isinstance(self.act, nn.ReLU6):
            self.act = nn.ReLU6(inplace=True)
        for block in self._blocks:
            block._fuse()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        kept: dict[int, Tensor] = {}
        for idx, block in enumerate(self._blocks):
            x = block(x)
            if idx in self.out_blocks:
                kept[idx] = x
        return [kept[b] for b in self.out_blocks]
