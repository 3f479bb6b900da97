"""FPFH (Fast Point Feature Histograms) on an organized point cloud, in vectorised torch.

Input is an organized cloud ``B x H x W x 3`` (float, metres, pixel-registered with the
image); a missed point is exactly ``(0, 0, 0)``: it gets a zero feature and is never
anybody's neighbour. Neighbourhoods are pixel windows (``normal_window`` for the normals,
``feature_window`` for the histograms), optionally limited to a metric ``radius``
(a neighbour counts when its distance is ``< radius``, as in a k-d tree radius search).

The feature follows Open3D's ``compute_fpfh_feature`` (``pipelines/registration/
Feature.cpp``), which itself follows PCL:

* pair features ``(f1, f2, f3)`` from the Darboux frame of a pair: the point whose
  normal makes the smaller angle with the line joining them is the source (PCL's swap
  rule), ``f3 = n_s . d / |d|``, ``f2 = v . n_t`` with ``v = d x n_s / |d x n_s|``,
  ``f1 = atan2(w . n_t, n_s . n_t)`` with ``w = n_s x v``; a pair at distance 0 or with
  ``d`` parallel to ``n_s`` gives ``(0, 0, 0)``;
* SPFH: 11 bins per feature (``f1`` over ``[-pi, pi]``, ``f2`` and ``f3`` over
  ``[-1, 1]``), each neighbour adding ``100 / n_neighbours`` to each sub-histogram;
* FPFH(p) = SPFH(p) + the sum over neighbours q of SPFH(q) / |p - q|^2 (squared
  distance, as Open3D), each 11-bin part of that sum rescaled to sum 100.

Normals come from local PCA (eigenvector of the smallest eigenvalue of the covariance of
the valid neighbours, closed-form 3x3 solution in float64), oriented towards the camera
at the origin. A point with fewer than 3 valid neighbours gets the viewing direction
``-p / |p|`` as its normal.

Work is done per chunk of pixels on gathered neighbour tables (pixel-major), the
histograms with ``scatter_add_`` and the weighted neighbour sum as one sparse (CSR)
matrix product, so memory stays bounded for any image size. Runs on CPU and CUDA.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FPFH", "estimate_normals", "fpfh"]

N_BINS = 11
_CHUNK_PAIRS = 1 << 17  # pixels x neighbours per processing strip (keeps temporaries in cache)
_X, _N, _V = slice(0, 3), slice(3, 6), 6  # channels of the plane stack: xyz, normal, valid


def _check_window(window: int, name: str) -> int:
    if not isinstance(window, int) or isinstance(window, bool) or window < 3 or window % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 3, got {window!r}")
    return window // 2


def _check_cloud(xyz: Tensor) -> Tensor:
    if xyz.ndim != 4 or xyz.shape[-1] != 3:
        raise ValueError(f"expected an organized cloud B x H x W x 3, got shape {tuple(xyz.shape)}")
    return xyz.float()


def _padded_planes(xyz: Tensor, normals: Tensor | None, r: int) -> Tensor:
    """B x 7 x (H+2r) x (W+2r): x, y, z, nx, ny, nz, valid; zero padding (= missed points)."""
    valid = (xyz != 0).any(-1, keepdim=True).to(xyz.dtype)
    nrm = torch.zeros_like(xyz) if normals is None else normals.to(xyz.dtype) * valid
    planes = torch.cat([xyz, nrm, valid], -1).permute(0, 3, 1, 2)
    return F.pad(planes, (r, r, r, r))


def _strips(planes: Tensor, r: int):
    """Yield ``(b, y0, y1, centre, neighbours)`` over row strips: ``centre`` is
    7 x 1 x S (S = pixels of the strip), ``neighbours`` 7 x K x S (K = (2r+1)^2 window
    positions, the pixel itself included at index K // 2)."""
    bsz, ch, hp, wp = planes.shape
    h, w, k = hp - 2 * r, wp - 2 * r, (2 * r + 1) ** 2
    rows = max(1, _CHUNK_PAIRS // (k * w))
    for b in range(bsz):
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            sub = planes[b, :, y0 : y1 + 2 * r]
            sc, sh, sw = sub.stride()
            # all window positions of every pixel of the strip (im2col by strided view)
            nb = sub.as_strided((ch, 2 * r + 1, 2 * r + 1, y1 - y0, w), (sc, sh, sw, sh, sw), sub.storage_offset())
            nb = nb.contiguous().view(ch, k, -1)
            centre = planes[b, :, y0 + r : y1 + r, r : r + w].reshape(ch, 1, -1)
            yield b, y0, y1, centre, nb


def _smallest_eigenvector(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Unit eigenvector of the smallest eigenvalue of symmetric 3x3 matrices (N x 6:
    xx, xy, xz, yy, yz, zz), float64; second output: False where it is undefined."""
    scale = cov[:, [0, 3, 5]].sum(1).clamp_min(1e-300)
    a, b, c, d, e, f = (cov / scale[:, None]).unbind(1)
    q = (a + d + f) / 3
    p1 = b * b + c * c + e * e
    p2 = (a - q) ** 2 + (d - q) ** 2 + (f - q) ** 2 + 2 * p1
    p = torch.sqrt(p2 / 6)
    ps = torch.where(p > 0, p, torch.ones_like(p))
    ba, bd, bf = (a - q) / ps, (d - q) / ps, (f - q) / ps
    bb, bc, be = b / ps, c / ps, e / ps
    det = ba * (bd * bf - be * be) - bb * (bb * bf - be * bc) + bc * (bb * be - bd * bc)
    phi = torch.acos((det / 2).clamp(-1, 1)) / 3
    lam = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    r0 = torch.stack([a - lam, b, c], 1)
    r1 = torch.stack([b, d - lam, e], 1)
    r2 = torch.stack([c, e, f - lam], 1)
    cands = torch.stack([torch.cross(r0, r1, dim=1), torch.cross(r0, r2, dim=1), torch.cross(r1, r2, dim=1)], 1)
    norms = cands.norm(dim=2)
    best = norms.argmax(1)
    vec = cands[torch.arange(cands.shape[0], device=cov.device), best]
    nrm = norms.gather(1, best[:, None])
    ok = (p > 0) & (nrm[:, 0] > 1e-12)
    return vec / nrm.clamp_min(1e-300), ok


def _window_moments_box(xyz: Tensor, window: int) -> Tensor:
    """Per pixel, over the valid points of its window: count, sum of coordinates, sum of
    their products (B*H*W x 10), centred on each image's mean (float64 integral image)."""
    b, h, w, _ = xyz.shape
    p = xyz.double()
    valid = (p != 0).any(-1, keepdim=True).double()
    ref = (p * valid).sum((1, 2), keepdim=True) / valid.sum((1, 2), keepdim=True).clamp_min(1)
    x, y, z = ((p - ref) * valid).unbind(-1)
    cols = torch.stack([valid[..., 0], x, y, z, x * x, x * y, x * z, y * y, y * z, z * z], 1)
    # window sums from an integral image (float64 cumulative sums; zero padding = no point)
    r = window // 2
    ii = F.pad(cols, (r + 1, r, r + 1, r)).cumsum_(2).cumsum_(3)
    box = (ii[..., window:window + h, window:window + w] - ii[..., :h, window:window + w]
           - ii[..., window:window + h, :w] + ii[..., :h, :w])
    return box.permute(0, 2, 3, 1).reshape(-1, 10)


def _window_moments_pairs(xyz: Tensor, r: int, radius: float) -> Tensor:
    """As :func:`_window_moments_box`, restricted to neighbours closer than ``radius``
    (coordinates relative to each pixel, float32 sums of small numbers)."""
    b, h, w, _ = xyz.shape
    planes = _padded_planes(xyz, None, r)
    sums = torch.zeros(b, h * w, 10, dtype=torch.float64, device=xyz.device)
    for bi, y0, y1, centre, nb in _strips(planes, r):
        d = nb[_X] - centre[_X]  # local coordinates: no cancellation in float32
        m = nb[_V] * centre[_V] * ((d * d).sum(0) < radius * radius)
        dx, dy, dz = d * m
        cols = [m, dx, dy, dz, dx * dx, dx * dy, dx * dz, dy * dy, dy * dz, dz * dz]
        sums[bi, y0 * w : y1 * w] = torch.stack([t.sum(0) for t in cols], 1).double()
    return sums.reshape(-1, 10)


def estimate_normals(xyz: Tensor, window: int = 5, radius: float | None = None, step: int = 1) -> Tensor:
    """Unit normals (B x H x W x 3) by local PCA over a ``window`` x ``window`` pixel
    neighbourhood (optionally within ``radius`` metres), facing the camera at the origin.
    Zero at missed points. ``step`` > 1: the normals of every ``step``-th pixel only
    (B x H/step x W/step x 3, rounded up), their windows still on the full grid."""
    xyz = _check_cloud(xyz)
    r = _check_window(window, "window")
    if radius is None:
        sums = _window_moments_box(xyz, window)
    else:
        sums = _window_moments_pairs(xyz, r, radius)
    if step > 1:  # solve the 3x3 eigenproblems only where they are wanted
        sums = sums.reshape(*xyz.shape[:3], 10)[:, ::step, ::step]
        xyz = xyz[:, ::step, ::step]
    b, h, w, _ = xyz.shape
    sums = sums.reshape(-1, 10)
    cnt = sums[:, 0].clamp_min(1)
    mean = sums[:, 1:4] / cnt[:, None]
    second = sums[:, 4:] / cnt[:, None]
    i, j = [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]
    cov = second - mean[:, i] * mean[:, j]
    normal, ok = _smallest_eigenvector(cov)
    p = xyz.reshape(-1, 3).double()
    view = -p / p.norm(dim=1, keepdim=True).clamp_min(1e-300)
    normal = torch.where((ok & (sums[:, 0] >= 3))[:, None], normal, view)
    normal = torch.where(((normal * p).sum(1) > 0)[:, None], -normal, normal)  # face the camera
    normal = normal * (p != 0).any(1, keepdim=True)
    return normal.to(xyz.dtype).reshape(b, h, w, 3)


def _pair_bins(p: Tensor, n1: Tensor, q: Tensor, n2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bins (float, 0..10) of Open3D's pair features of (p, n1) -> (q, n2), and |q - p|^2.

    ``p``, ``n1``: 3 x 1 x S; ``q``, ``n2``: 3 x K x S. Closed form of the Darboux-frame
    construction for unit normals: with ``a1 = n1.d/|d|``, ``a2 = n2.d/|d|``,
    ``c = n1.n2`` and ``t = d.(n1 x n2)`` (all three unchanged by the swap), the swap
    happens when ``|a1| < |a2|`` and then ``f3 = a1 | -a2``, ``f2 = t / (|d| s)``,
    ``f1 = atan2(y, c s)`` with ``s = sqrt(1 - f3^2)`` and ``y = a2 - a1 c | a2 c - a1``.
    Degenerate pairs (``d = 0`` or ``d`` along the source normal) give the features
    (0, 0, 0), as in Open3D.
    """
    dx, dy, dz = q - p
    ax, ay, az = n1
    bx, by, bz = n2
    dd = (dx * dx).addcmul_(dy, dy).addcmul_(dz, dz)
    inv = dd.clamp_min(1e-30).rsqrt_()
    a1 = (ax * dx).addcmul_(ay, dy).addcmul_(az, dz).mul_(inv)
    a2 = (bx * dx).addcmul_(by, dy).addcmul_(bz, dz).mul_(inv)
    c = (ax * bx).addcmul_(ay, by).addcmul_(az, bz)
    # t = n2 . (d x n1)
    t = (bx * (dy * az - dz * ay)).addcmul_(by, dz * ax - dx * az).addcmul_(bz, dx * ay - dy * ax)
    swap = a1.abs() < a2.abs()
    f3 = torch.where(swap, -a2, a1)
    y = torch.where(swap, a2 * c - a1, a2 - a1 * c)
    s = (f3 * f3).neg_().add_(1)
    bad = (s <= 0) | (dd <= 0)
    s.clamp_min_(0).sqrt_()
    f1 = torch.atan2(y, c * s)
    f2 = t.mul_(inv).div_(s)
    b1 = f1.add_(math.pi).mul_(N_BINS / (2 * math.pi)).floor_().clamp_(0, N_BINS - 1)
    b2 = f2.add_(1).mul_(N_BINS / 2).floor_().clamp_(0, N_BINS - 1)
    b3 = f3.add_(1).mul_(N_BINS / 2).floor_().clamp_(0, N_BINS - 1)
    middle = float(N_BINS // 2)  # the bin of a zero feature in all three
    for b in (b1, b2, b3):
        b.masked_fill_(bad, middle)
    return b1, b2, b3, dd


def _spmm(crow: Tensor, col: Tensor, val: Tensor, n_cols: int, dense: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        mat = torch.sparse_csr_tensor(crow, col, val, size=(crow.shape[0] - 1, n_cols), check_invariants=False)
        return mat @ dense


def fpfh(
    xyz: Tensor,
    normal_window: int = 5,
    feature_window: int = 11,
    radius: float | None = None,
    normals: Tensor | None = None,
) -> Tensor:
    """FPFH of every point of an organized cloud: B x 33 x H x W (float32), zeros at
    missed points and at points without a valid neighbour.

    ``radius`` (metres, optional) limits both the normal and the feature neighbourhoods.
    ``normals`` (B x H x W x 3, unit, optional) replaces the estimated normals.
    """
    xyz = _check_cloud(xyz)
    r = _check_window(feature_window, "feature_window")
    if normals is None:
        normals = estimate_normals(xyz, normal_window, radius)
    b, h, w, _ = xyz.shape
    k, n, dev = (2 * r + 1) ** 2, b * h * w, xyz.device
    planes = _padded_planes(xyz, normals, r)
    hist = torch.zeros(b, 3 * N_BINS + 1, h * w, device=dev)  # slot 33: no pair
    count = torch.zeros(b, h * w, device=dev)
    weight = torch.zeros(b, h * w, k, device=dev)
    r2 = math.inf if radius is None else radius * radius
    for bi, y0, y1, centre, nb in _strips(planes, r):
        sl = slice(y0 * w, y1 * w)
        b1, b2, b3, dd = _pair_bins(centre[_X], centre[_N], nb[_X], nb[_N])
        m = (nb[_V] * centre[_V]) > 0
        m[k // 2] = False  # the point itself
        if radius is not None:
            m &= dd < r2
        none = ~m
        out = hist[bi, :, sl]
        ones = torch.ones(1, 1, device=dev).expand(k, y1 * w - y0 * w)
        for g, bins in enumerate((b1, b2, b3)):
            idx = bins.long().add_(g * N_BINS).masked_fill_(none, 3 * N_BINS)
            out.scatter_add_(0, idx, ones)
        count[bi, sl] = m.sum(0)
        none |= dd <= 0
        weight[bi, sl] = dd.clamp_min(1e-30).reciprocal_().masked_fill_(none, 0).T
    hist = hist.permute(0, 2, 1).reshape(n, -1)[:, : 3 * N_BINS]
    count = count.reshape(n)
    has = count > 0
    spfh = hist * torch.where(has, 100 / count.clamp_min(1), 0)[:, None]
    # weighted sum of the neighbours' SPFH: one sparse (pixels x padded grid) matrix product
    hp, wp = h + 2 * r, w + 2 * r
    centre_idx = (
        torch.arange(b, device=dev)[:, None, None] * (hp * wp)
        + (torch.arange(h, device=dev)[None, :, None] + r) * wp
        + (torch.arange(w, device=dev)[None, None, :] + r)
    ).reshape(-1)
    offsets = torch.tensor([dy * wp + dx for dy in range(-r, r + 1) for dx in range(-r, r + 1)], device=dev)
    spfh_pad = spfh.new_zeros(b * hp * wp, 3 * N_BINS)
    spfh_pad[centre_idx] = spfh
    crow = torch.arange(0, n * k + 1, k, device=dev)
    col = (centre_idx[:, None] + offsets[None, :]).reshape(-1)
    agg = _spmm(crow, col, weight.reshape(-1), spfh_pad.shape[0], spfh_pad).reshape(n, 3, N_BINS)
    sums = agg.sum(2, keepdim=True)
    agg = agg * torch.where(sums > 0, 100 / sums.clamp_min(1e-30), 0)
    feat = (agg.reshape(n, -1) + spfh) * has[:, None]
    return feat.reshape(b, h, w, 3 * N_BINS).permute(0, 3, 1, 2).contiguous()


class FPFH(nn.Module):
    """Parameter-free module around :func:`fpfh`: B x H x W x 3 -> B x 33 x H x W."""

    def __init__(self, normal_window: int = 5, feature_window: int = 11, radius: float | None = None):
        super().__init__()
        _check_window(normal_window, "normal_window")
        _check_window(feature_window, "feature_window")
        self.normal_window = normal_window
        self.feature_window = feature_window
        self.radius = radius
        self.out_channels = 3 * N_BINS

    def forward(self, xyz: Tensor) -> Tensor:
        return fpfh(xyz, self.normal_window, self.feature_window, self.radius)

    def extra_repr(self) -> str:
        return f"normal_window={self.normal_window}, feature_window={self.feature_window}, radius={self.radius}"
