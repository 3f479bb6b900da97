"""Point-MAE encoder (CFM's frozen 3D extractor) with fast grouping on organized clouds.

Source: Pang et al., Point-MAE (repo ``Pang-Yatian/Point-MAE``, ``models/Point_MAE.py``)
as used by M3DM / CFM (docs/methods.md, CFM).

The extractor has two parts:

* :meth:`PointMAEExtractor.group` -- the data-dependent part: farthest point sampling
  (FPS) of ``num_groups`` centres among the valid points of an organized cloud, then the
  ``group_size`` nearest neighbours of each centre, made relative to it. It always runs
  on the CPU (numpy + torch) and returns tensors on the input's device; docs/methods.md
  section 6: data-dependent ops belong outside an engine.
* :attr:`PointMAEExtractor.dense` (:class:`PointMAEDense`) -- the dense part: the
  mini-PointNet group encoder, the centre position embedding, the transformer blocks
  and the shared final LayerNorm on the feature layers, concatenated. Static shapes, so
  it exports to ONNX on its own. Its ``state_dict`` keys are exactly the official
  Point-MAE encoder names after stripping ``module.`` and ``MAE_encoder.``
  (``encoder.first_conv.{0,1,3}``, ``encoder.second_conv.{0,1,3}``, ``pos_embed.{0,2}``,
  ``blocks.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``).

Choices (the released CFM code differs; recorded here):

* Frozen and deterministic: BatchNorm always uses its running statistics, there is no
  dropout and no drop path, whatever ``train()``/``eval()`` says. The released code never
  switched Point-MAE to eval mode, so it ran with batch-statistics BatchNorm and active
  drop path (stochastic features).
* FPS starts at the first candidate in row-major pixel order (exact path: the first
  valid point, index 0 of CFM's ``nonzero`` list, as the pointnet2 FPS kernel does) and
  breaks ties by the lowest index.
* An item with fewer valid points than ``num_groups`` gets every point as a centre, then
  the FPS kernel's own behaviour fills the rest (it re-picks the first point once all are
  chosen, as the pointnet2 kernel does); fewer than ``group_size`` points fill each group
  by repeating the farthest one. Shapes stay fixed (exported parts are static) and no
  frame becomes an error for being small; an item with no valid point raises ``ValueError``.
* Input coordinates are raw (metres), no centring or scaling, as in CFM.
* Fast grouping (default; ``exact=True`` gives the reference path):
  - FPS runs over the valid points on a ``fps_stride`` x ``fps_stride`` pixel sub-grid
    (1/4 of the points for stride 2) instead of all valid points; items whose sub-grid
    holds fewer than ``num_groups`` valid points use every valid point.
  - KNN searches the ``(2r+1) x (2r+1)`` pixel window around each centre
    (``r = knn_radius``, default ``ceil(1.2 sqrt(group_size))``, 14 for K = 128) instead of the whole
    cloud. The window result is kept only when its k-th neighbour is nearer than any
    pixel outside the window can be (lateral image-plane distance over ``r + 1``
    pixels, see :func:`knn_window`); otherwise (holes, depth steps, object borders,
    slanted surfaces) the centre falls back to the exact search. The result therefore
    equals the exact one whenever the cloud's lateral coordinates grow with pixel
    offsets at least 0.9 times as fast as its typical (1st-percentile) spacing.
  docs/_parts/backbones.md gives the measured effect of both approximations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.nets.vit import Block

#: Point-MAE blocks (0-based) whose normalised outputs CFM concatenates, per kept depth
#: (docs/methods.md, CFM, layer pruning).
FEATURE_LAYERS: dict[int, tuple[int, ...]] = {12: (3, 7, 11), 8: (1, 4, 7), 4: (1, 2, 3), 1: (0,)}

LN_EPS = 1e-5  # Point-MAE uses nn.LayerNorm's default epsilon
KNN_CHUNK = 64  # centres per chunk in the exact KNN (bounds the distance matrix to 64 x N)
WINDOW_SAFETY = 0.9  # margin on the window-KNN certificate (see knn_window)


# ----------------------------------------------------------------------------- grouping


def farthest_point_sample(points: np.ndarray, counts: np.ndarray, num_samples: int) -> np.ndarray:
    """Farthest point sampling of ``num_samples`` indices per batch item.

    Source: the pointnet2 ``furthest_point_sample`` kernel used by Point-MAE / M3DM / CFM:
    start at index 0, then repeatedly take the point with the largest squared distance
    to the already chosen set (ties -> lowest index).

    Args:
        points: ``B x 3 x N`` float32 coordinates (metres), item ``b`` valid in ``[:counts[b]]``.
        counts: ``B`` number of valid points per item (each >= 1).
        num_samples: number of centres ``G``.

    Returns:
        ``B x G`` int64 indices into the point axis. Runs one numpy loop of ``G`` steps
        vectorised over the batch (numpy has a far lower per-op overhead than torch for
        this sequential loop on CPU).
    """
    b, _, n = points.shape
    rows = np.arange(b)
    min_d = np.where(np.arange(n)[None, :] < counts[:, None], np.inf, -1.0).astype(np.float32)
    dist = np.empty((b, n), np.float32)
    tmp = np.empty((b, n), np.float32)
    out = np.zeros((b, num_samples), np.int64)
    cur = np.zeros(b, np.int64)
    for i in range(num_samples):
        out[:, i] = cur
        centre = points[rows, :, cur]  # B x 3
        np.subtract(points[:, 0], centre[:, 0:1], out=dist)
        np.multiply(dist, dist, out=dist)
        for axis in (1, 2):
            np.subtract(points[:, axis], centre[:, axis : axis + 1], out=tmp)
            np.multiply(tmp, tmp, out=tmp)
            dist += tmp
        np.minimum(min_d, dist, out=min_d)  # padding stays at -1 and is never chosen
        cur = min_d.argmax(axis=1)
    return out


def knn_exact(centres: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` nearest ``points`` to each centre, nearest first.

    Brute force over all points (the reference ``knn_cuda`` semantics), squared
    Euclidean distances from coordinate differences (no ``|a|^2 + |b|^2 - 2ab``
    cancellation), in chunks of :data:`KNN_CHUNK` centres.

    Args:
        centres: ``G x 3`` float32 (metres).
        points: ``N x 3`` float32 (metres), ``N >= 1``. With ``N < k`` every point is
            taken and the farthest one repeats to fill ``k`` (a frame with very few points
            still gets a fixed-shape group rather than an error).

    Returns:
        ``G x k`` int64 indices into ``points``.
    """
    if points.shape[0] < k:
        idx = knn_exact(centres, points, points.shape[0])
        return torch.cat([idx, idx[:, -1:].expand(-1, k - points.shape[0])], dim=1)
    out = []
    for start in range(0, centres.shape[0], KNN_CHUNK):
        c = centres[start : start + KNN_CHUNK]
        d = (c[:, 0:1] - points[:, 0]).square_()
        d += (c[:, 1:2] - points[:, 1]).square_()
        d += (c[:, 2:3] - points[:, 2]).square_()
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def lateral_span(grid: torch.Tensor, valid: torch.Tensor, span: int) -> float:
    """Smallest typical lateral distance (metres) between valid pixels ``span`` apart.

    The 1st percentile, over all valid pixel pairs ``span`` columns or ``span`` rows
    apart, of their distance in (x, y) -- the camera's image-plane axes. It lower-bounds
    how far in 3D a point at least ``span`` pixels away lies; measured over a long
    baseline it is robust to per-point noise. 0.0 when no such pair exists.
    """
    xy = grid[..., :2]
    across = (xy[:, span:] - xy[:, :-span]).norm(dim=-1)[valid[:, span:] & valid[:, :-span]]
    down = (xy[span:] - xy[:-span]).norm(dim=-1)[valid[span:] & valid[:-span]]
    pairs = torch.cat([across, down])
    if pairs.numel() == 0:
        return 0.0
    return float(pairs.kthvalue(max(1, pairs.numel() // 100)).values)


def knn_window(
    grid: torch.Tensor, valid: torch.Tensor, centre_pix: torch.Tensor, k: int, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate KNN on an organized cloud: search the pixel window around each centre.

    A window result is accepted only when its k-th neighbour is nearer than
    ``WINDOW_SAFETY * lateral_span(radius + 1)``: every pixel outside the window is at
    least ``radius + 1`` pixels away, so (with lateral coordinates proportional to pixel
    offsets, as in a camera-frame organized cloud) it lies at least that far in 3D and
    cannot be a nearer neighbour. The safety factor absorbs perspective (pixel pitch
    grows with depth) and off-axis effects.

    Args:
        grid: ``H x W x 3`` float32 organized cloud (metres).
        valid: ``H x W`` bool, True where the pixel has a point.
        centre_pix: ``G`` int64 flat (row-major) pixel index of each centre.
        k: neighbours per centre.
        radius: window half-size ``r`` in pixels (window ``(2r+1)^2``).

    Returns:
        ``(idx, ok)``: ``G x k`` int64 flat pixel indices of the neighbours (nearest
        first) and ``G`` bool ``ok``, False where the window result is not certified
        (fewer than ``k`` valid points in the window, or k-th neighbour too far); those
        rows must be recomputed exactly.
    """
    h, w = valid.shape
    side = 2 * radius + 1
    wp = w + 2 * radius
    grid_p = grid.new_zeros(h + 2 * radius, wp, 3)
    grid_p[radius : radius + h, radius : radius + w] = grid
    valid_p = valid.new_zeros(h + 2 * radius, wp)
    valid_p[radius : radius + h, radius : radius + w] = valid
    grid_p, valid_p = grid_p.reshape(-1, 3), valid_p.reshape(-1)
    off = torch.arange(side)
    offsets = (off[:, None] * wp + off[None, :]).reshape(-1)  # window offsets from its top-left
    top_left = (centre_pix // w) * wp + centre_pix % w  # centre (y, x) -> padded (y, x) - (r, r)
    cand = top_left[:, None] + offsets[None, :]  # G x side^2 padded flat indices
    d = (grid_p[cand] - grid_p[top_left + radius * wp + radius][:, None]).square_().sum(-1)
    d.masked_fill_(~valid_p[cand], math.inf)
    dist, nearest = d.topk(k, dim=1, largest=False)
    sel = cand.gather(1, nearest)
    idx = (sel // wp - radius) * w + (sel % wp - radius)
    bound = WINDOW_SAFETY * lateral_span(grid, valid, radius + 1)
    return idx, dist[:, -1] < bound * bound


# -------------------------------------------------------------------------- dense part


def _fold_bn(conv: nn.Conv1d, bn: nn.BatchNorm1d | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 Conv1d (optionally followed by eval-mode BatchNorm) as one linear map.

    Returns ``(weight out x in, bias out)`` with the BatchNorm's running statistics and
    affine folded in: ``s = gamma / sqrt(var + eps)``, ``W' = s W``, ``b' = s (b - mean) + beta``.
    """
    weight, bias = conv.weight.squeeze(-1), conv.bias
    if bn is None:
        return weight, bias
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return weight * scale[:, None], (bias - bn.running_mean) * scale + bn.bias


class GroupEncoder(nn.Module):
    """Point-MAE's mini-PointNet (official class ``Encoder``): ``B x G x K x 3`` -> ``B x G x C``.

    Conv1d 3->128, BN, ReLU, Conv1d 128->256; max over the K points; concatenate
    [global, per-point] (512); Conv1d 512->512, BN, ReLU, Conv1d 512->C; max over K.

    Computed channels-last with ``F.linear`` (2-5x faster than Conv1d on CPU) with the
    BatchNorms folded into the convolutions (running statistics, always), and the
    512->512 layer split into its global and per-point halves so the global half is
    computed once per group instead of once per point (exact up to float rounding; a
    third fewer multiply-adds for the whole encoder).
    """

    def __init__(self, encoder_channel: int = 384):
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1),
        )

    def forward(self, neighborhood: torch.Tensor) -> torch.Tensor:
        """``B x G x K x 3`` group coordinates relative to their centre -> ``B x G x C`` tokens."""
        b, g, k, _ = neighborhood.shape
        x = neighborhood.reshape(b * g, k, 3)
        w1, b1 = _fold_bn(self.first_conv[0], self.first_conv[1])
        w2, b2 = _fold_bn(self.first_conv[3])
        w3, b3 = _fold_bn(self.second_conv[0], self.second_conv[1])
        w4, b4 = _fold_bn(self.second_conv[3])
        feat = F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2)  # BG x K x 256
        glob = feat.amax(dim=1)  # BG x 256
        half = glob.shape[-1]  # official concat order: [global, per-point]
        hidden = F.linear(feat, w3[:, half:]) + F.linear(glob, w3[:, :half], b3)[:, None, :]
        out = F.linear(torch.relu(hidden), w4).amax(dim=1) + b4  # bias commutes with the max
        return out.reshape(b, g, -1)


class TransformerEncoder(nn.Module):
    """Holder of the blocks, so their keys read ``blocks.blocks.N`` as in Point-MAE."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=False, eps=LN_EPS) for _ in range(depth)
        )


class PointMAEDense(nn.Module):
    """Dense part of the Point-MAE encoder: ``(neighborhood, centers) -> B x G x out_dim``.

    Tokens = group encoder(neighborhood); pos = pos_embed(centers) (Linear 3->128, GELU,
    Linear 128->trans_dim); each block ``i`` computes ``x = block(x + pos)``; the outputs
    of the blocks in ``feature_layers`` go through the shared final LayerNorm and are
    concatenated along channels (M3DM / CFM feature extraction).
    """

    def __init__(self, depth: int, feature_layers: tuple[int, ...], trans_dim: int, num_heads: int):
        super().__init__()
        self.feature_layers = tuple(feature_layers)
        self.out_dim = trans_dim * len(self.feature_layers)
        self.encoder = GroupEncoder(trans_dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads)
        self.norm = nn.LayerNorm(trans_dim, eps=LN_EPS)

    def forward(self, neighborhood: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """``B x G x K x 3`` (relative, metres), ``B x G x 3`` (metres) -> ``B x G x out_dim``."""
        x = self.encoder(neighborhood)
        pos = self.pos_embed(centers)
        feats = []
        for i, block in enumerate(self.blocks.blocks):
            x = block(x + pos)
            if i in self.feature_layers:
                feats.append(self.norm(x))
        return torch.cat(feats, dim=-1)


# ---------------------------------------------------------------------------- extractor


class PointMAEExtractor(nn.Module):
    """Point-MAE encoder cut after ``depth`` blocks, with grouping of organized clouds.

    Args:
        depth: transformer blocks kept (CFM: 1, 4, 8, 12).
        feature_layers: 0-based blocks whose normalised outputs are concatenated; must be
            < depth. :data:`FEATURE_LAYERS` gives CFM's choice per depth.
        num_groups: FPS centres ``G`` (CFM 1024).
        group_size: neighbours per group ``K`` (released CFM code 128; the paper says 32).
        trans_dim, num_heads: transformer width and heads (384, 6).
        exact: default grouping path (False: fast approximations, see module docs).
        fps_stride: pixel sub-grid stride of the fast FPS candidates.
        knn_radius: half-size of the fast KNN pixel window (None: ``ceil(1.2 sqrt(group_size))``:
            the K nearest pixels of a flat, camera-facing patch form a disc of radius
            ``sqrt(K / pi) ~ 0.56 sqrt(K)``; the margin covers slanted surfaces).

    Attributes:
        out_dim: ``trans_dim * len(feature_layers)`` (1152 for the full model).
        min_points: fewest valid points an item may have (``max(group_size, num_groups)``).
        dense: the :class:`PointMAEDense` (all parameters live there).
    """

    def __init__(
        self,
        depth: int = 12,
        feature_layers: tuple[int, ...] = (3, 7, 11),
        num_groups: int = 1024,
        group_size: int = 128,
        trans_dim: int = 384,
        num_heads: int = 6,
        *,
        exact: bool = False,
        fps_stride: int = 2,
        knn_radius: int | None = None,
    ):
        super().__init__()
        feature_layers = tuple(int(i) for i in feature_layers)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not feature_layers or any(i < 0 or i >= depth for i in feature_layers):
            hint = ""
            if depth in FEATURE_LAYERS:
                hint = f" (CFM uses feature_layers={FEATURE_LAYERS[depth]} at depth {depth})"
            raise ValueError(
                f"feature_layers {feature_layers} must be non-empty and within 0..{depth - 1}{hint}"
            )
        if fps_stride < 1:
            raise ValueError(f"fps_stride must be >= 1, got {fps_stride}")
        self.depth = depth
        self.num_groups = num_groups
        self.group_size = group_size
        self.exact = exact
        self.fps_stride = fps_stride
        self.knn_radius = math.ceil(1.2 * math.sqrt(group_size)) if knn_radius is None else int(knn_radius)
        self.min_points = 1
        self.dense = PointMAEDense(depth, feature_layers, trans_dim, num_heads)
        self.out_dim = self.dense.out_dim

    def group(
        self, xyz: torch.Tensor, exact: bool | None = None, return_index: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """FPS centres and KNN groups of each item's valid points.

        Args:
            xyz: ``B x H x W x 3`` organized clouds in metres; a pixel whose three
                coordinates are exactly 0 is missing. Items may have different numbers of
                valid points; each is grouped independently.
            exact: True for the reference path (FPS over all valid points, brute-force
                KNN), False for the fast one; None uses the module's ``exact``.
            return_index: also return the centres' flat pixel indices.

        Returns:
            ``centers`` ``B x G x 3`` (metres), ``neighborhood`` ``B x G x K x 3`` (each
            group's points minus its centre, nearest first), and, with ``return_index``,
            ``center_pix`` ``B x G`` int64 row-major pixel indices into ``H x W``. All on
            ``xyz``'s device, float32.

        Raises:
            ValueError: wrong shape, non-finite coordinates, or an item with no valid point.
        """
        exact = self.exact if exact is None else exact
        if xyz.ndim != 4 or xyz.shape[-1] != 3:
            raise ValueError(f"xyz must be a B x H x W x 3 organized cloud, got shape {tuple(xyz.shape)}")
        cloud = xyz.detach().to("cpu", torch.float32)
        if not torch.isfinite(cloud).all():
            raise ValueError(
                "xyz contains NaN or infinite coordinates; missing points must be exactly (0, 0, 0)"
            )
        bsz, h, w, _ = cloud.shape
        valid = (cloud != 0).any(dim=-1)  # B x H x W
        counts = valid.flatten(1).sum(1)
        for b, n in enumerate(counts.tolist()):
            if n < self.min_points:
                raise ValueError(
                    f"batch item {b}: no valid 3D point (num_groups={self.num_groups}, "
                    f"group_size={self.group_size})"
                )
        centre_pix = self._fps(valid, cloud, exact)  # B x G flat pixel indices
        flat = cloud.reshape(bsz, h * w, 3)
        nbr_pix = torch.empty(bsz, self.num_groups, self.group_size, dtype=torch.long)
        for b in range(bsz):
            centres_b = flat[b, centre_pix[b]]
            if exact:
                nbr_pix[b] = self._knn_exact_pix(flat[b], valid[b], centres_b)
            else:
                idx, ok = knn_window(cloud[b], valid[b], centre_pix[b], self.group_size, self.knn_radius)
                if not bool(ok.all()):
                    idx[~ok] = self._knn_exact_pix(flat[b], valid[b], centres_b[~ok])
                nbr_pix[b] = idx
        rows = torch.arange(bsz)[:, None]
        centers = flat[rows, centre_pix]  # B x G x 3
        neighborhood = flat[rows[:, :, None], nbr_pix] - centers[:, :, None, :]
        out = (centers.to(xyz.device), neighborhood.to(xyz.device))
        return out + (centre_pix.to(xyz.device),) if return_index else out

    def _fps(self, valid: torch.Tensor, cloud: torch.Tensor, exact: bool) -> torch.Tensor:
        """``B x G`` flat pixel indices of the FPS centres (candidates per the module docs)."""
        bsz, h, w = valid.shape
        cand_mask = valid
        if not exact and self.fps_stride > 1:
            sub = torch.zeros(h, w, dtype=torch.bool)
            sub[:: self.fps_stride, :: self.fps_stride] = True
            sparse = valid & sub
            enough = sparse.flatten(1).sum(1) >= self.num_groups
            cand_mask = torch.where(enough[:, None, None], sparse, valid)
        cand_pix = [torch.nonzero(m.reshape(-1)).squeeze(1) for m in cand_mask]  # row-major order
        counts = np.array([len(c) for c in cand_pix])
        pts = np.zeros((bsz, 3, counts.max()), np.float32)
        flat = cloud.reshape(bsz, h * w, 3).numpy()
        for b, pix in enumerate(cand_pix):
            pts[b, :, : len(pix)] = flat[b, pix.numpy()].T
        sel = torch.from_numpy(farthest_point_sample(pts, counts, self.num_groups))
        return torch.stack([pix[s] for pix, s in zip(cand_pix, sel)])

    def _knn_exact_pix(self, flat: torch.Tensor, valid: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Exact KNN of ``centres`` (``M x 3``) among one item's valid points.

        Returns ``M x K`` flat pixel indices, nearest first.
        """
        pix = torch.nonzero(valid.reshape(-1)).squeeze(1)
        return pix[knn_exact(centres, flat[pix], self.group_size)]

    def encode(self, neighborhood: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Dense part (:class:`PointMAEDense`): ``B x G x K x 3``, ``B x G x 3`` -> ``B x G x out_dim``."""
        return self.dense(neighborhood, centers)

    def forward(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B x H x W x 3`` organized clouds -> ``(centers B x G x 3, feats B x G x out_dim)``."""
        centers, neighborhood = self.group(xyz)
        return centers, self.dense(neighborhood, centers)
