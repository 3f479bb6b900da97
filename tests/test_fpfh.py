"""FPFH on the organized grid against a plain, loop-over-points version of the definition
(Open3D's compute_fpfh_feature with pixel-window neighbourhoods)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime.nets.fpfh import FPFH, estimate_normals, fpfh


def _cloud(h=12, w=12, seed=0, holes=True):
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    z = 0.5 + 0.01 * torch.sin(u / 2.5) + 0.008 * torch.cos(v / 2.0) + 0.0003 * torch.randn(h, w, generator=g, dtype=torch.float64)
    f = 400.0
    xyz = torch.stack([(u - w / 2) / f * z, (v - h / 2) / f * z, z], -1).float()
    if holes:
        xyz[3, 4] = 0
        xyz[7:9, 8:10] = 0
        xyz[0, 0] = 0
        xyz[11, 5] = 0
    return xyz[None]


def _neighbours(xyz, i, j, r, radius, include_self):
    h, w, _ = xyz.shape
    out = []
    for a in range(max(0, i - r), min(h, i + r + 1)):
        for b in range(max(0, j - r), min(w, j + r + 1)):
            if (a, b) == (i, j) and not include_self:
                continue
            if not xyz[a, b].any():
                continue
            if radius is not None and np.sum((xyz[a, b] - xyz[i, j]) ** 2) >= radius**2:
                continue
            out.append((a, b))
    return out


def _brute_normals(xyz, window, radius=None):
    h, w, _ = xyz.shape
    out = np.zeros_like(xyz)
    for i in range(h):
        for j in range(w):
            p = xyz[i, j]
            if not p.any():
                continue
            nb = _neighbours(xyz, i, j, window // 2, radius, include_self=True)
            if len(nb) >= 3:
                pts = np.array([xyz[a, b] for a, b in nb])
                _, vecs = np.linalg.eigh(np.cov(pts.T, bias=True))
                n = vecs[:, 0]
            else:
                n = -p / np.linalg.norm(p)
            out[i, j] = -n if n @ p > 0 else n
    return out


def _pair_features(p1, n1, p2, n2):
    """Open3D's ComputePairFeatures, written out."""
    d = p2 - p1
    dist = np.linalg.norm(d)
    if dist == 0:
        return 0.0, 0.0, 0.0
    a1, a2 = n1 @ d / dist, n2 @ d / dist
    if math.acos(abs(a1)) > math.acos(abs(a2)):
        n1, n2, d, f3 = n2, n1, -d, -a2
    else:
        f3 = a1
    v = np.cross(d, n1)
    if np.linalg.norm(v) == 0:
        return 0.0, 0.0, 0.0
    v = v / np.linalg.norm(v)
    wv = np.cross(n1, v)
    return math.atan2(wv @ n2, n1 @ n2), v @ n2, f3


def _brute_fpfh(xyz, normals, window, radius=None):
    h, w, _ = xyz.shape
    r = window // 2
    spfh = np.zeros((h, w, 33))
    nbs = {}
    for i in range(h):
        for j in range(w):
            if not xyz[i, j].any():
                continue
            nb = nbs[i, j] = _neighbours(xyz, i, j, r, radius, include_self=False)
            for a, b in nb:
                f1, f2, f3 = _pair_features(xyz[i, j], normals[i, j], xyz[a, b], normals[a, b])
                for g, idx in enumerate(
                    (math.floor(11 * (f1 + math.pi) / (2 * math.pi)), math.floor(11 * (f2 + 1) / 2), math.floor(11 * (f3 + 1) / 2))
                ):
                    spfh[i, j, 11 * g + min(max(idx, 0), 10)] += 100.0 / len(nb)
    out = np.zeros_like(spfh)
    for (i, j), nb in nbs.items():
        if not nb:
            continue
        acc = np.zeros(33)
        for a, b in nb:
            d2 = np.sum((xyz[a, b] - xyz[i, j]) ** 2)
            if d2 > 0:
                acc += spfh[a, b] / d2
        for g in range(3):
            s = acc[11 * g : 11 * g + 11].sum()
            if s > 0:
                acc[11 * g : 11 * g + 11] *= 100.0 / s
        out[i, j] = acc + spfh[i, j]
    return out


def test_normals_match_brute_force_pca():
    xyz = _cloud()
    got = estimate_normals(xyz, window=5)[0].numpy()
    want = _brute_normals(xyz[0].double().numpy(), 5)
    assert np.abs(got - want).max() < 1e-3
    valid = xyz[0].numpy().any(-1)
    assert np.allclose(np.linalg.norm(got[valid], axis=1), 1, atol=1e-5)
    assert (got[~valid] == 0).all()
    assert ((got[valid] * xyz[0].numpy()[valid]).sum(1) < 0).all()  # towards the camera


def test_normals_with_radius_and_isolated_point():
    xyz = _cloud(seed=3)
    xyz[0, 5, 5, 2] += 0.05  # an outlier 5 cm behind the surface
    got = estimate_normals(xyz, window=3, radius=0.004)[0].numpy()
    want = _brute_normals(xyz[0].double().numpy(), 3, radius=0.004)
    assert np.abs(got - want).max() < 1e-3
    p = xyz[0, 5, 5].double().numpy()
    assert np.allclose(got[5, 5], -p / np.linalg.norm(p), atol=1e-6)  # no neighbours: viewing direction


@pytest.mark.parametrize("window,radius", [(5, None), (7, 0.004)])
def test_fpfh_matches_brute_force(window, radius):
    xyz = _cloud()
    normals = estimate_normals(xyz, 5, radius)
    got = fpfh(xyz, normal_window=5, feature_window=window, radius=radius)[0].permute(1, 2, 0).numpy()
    want = _brute_fpfh(xyz[0].double().numpy(), normals[0].double().numpy(), window, radius)
    assert got.shape == (12, 12, 33)
    assert np.abs(got - want).max() < 1e-2  # values are 0..200
    valid = xyz[0].numpy().any(-1)
    assert (got[~valid] == 0).all()
    sums = got[valid].reshape(-1, 3, 11).sum(2)
    assert np.allclose(sums, 200, atol=1e-2)  # SPFH part 100 + normalised neighbour part 100


def test_missed_points_never_contribute():
    xyz = _cloud()
    base = estimate_normals(xyz, 5)
    out = fpfh(xyz, normals=base, feature_window=5)
    # garbage stored at missed pixels (normals there) must not change anything
    noisy = base.clone()
    missed = ~(xyz != 0).any(-1)
    noisy[missed] = torch.tensor([0.6, 0.0, 0.8])
    assert torch.equal(fpfh(xyz, normals=noisy, feature_window=5), out)
    # removing a point changes only the points whose window holds it
    xyz2 = xyz.clone()
    xyz2[0, 2, 9] = 0
    out2 = fpfh(xyz2, normals=base * (xyz2 != 0).any(-1, keepdim=True), feature_window=5)
    changed = (out2 != out).any(1)[0]
    assert changed[2, 9] and (out2[0, :, 2, 9] == 0).all()
    rows, cols = torch.nonzero(changed, as_tuple=True)
    # within the window of the removed point, plus the windows of those (their SPFH changed)
    assert (rows - 2).abs().max() <= 4 and (cols - 9).abs().max() <= 4


def test_batch_and_module():
    a, b = _cloud(seed=1), _cloud(seed=2, holes=False)
    both = FPFH(normal_window=5, feature_window=7)(torch.cat([a, b]))
    assert both.shape == (2, 33, 12, 12) and both.dtype == torch.float32
    assert torch.allclose(both[:1], fpfh(a, 5, 7), atol=1e-4)
    assert torch.allclose(both[1:], fpfh(b, 5, 7), atol=1e-4)
    assert list(FPFH().parameters()) == []


def test_flat_plane_and_empty_cloud():
    v, u = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    plane = torch.stack([u * 1e-3, v * 1e-3, torch.full_like(u, 0.4)], -1)[None]
    n = estimate_normals(plane, 3)
    assert torch.allclose(n, torch.tensor([0.0, 0.0, -1.0]).expand_as(n), atol=1e-5)
    out = fpfh(plane, 3, 5)[0]
    # all pairs are coplanar with parallel normals: f1 = f2 = f3 = 0 -> the middle bin
    assert torch.allclose(out[[5, 16, 27]], torch.full((3, 9, 9), 200.0), atol=1e-3)
    assert fpfh(torch.zeros(1, 6, 6, 3)).abs().sum() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        fpfh(_cloud(), feature_window=4)
    with pytest.raises(ValueError, match="B x H x W x 3"):
        fpfh(torch.zeros(6, 6, 3))


def test_cfm_extractor_takes_denser_normals_than_its_histogram_grid():
    from edge_runtime.methods.cfm.model import CFMConfig, FPFHExtractor

    xyz = _cloud(h=16, w=16, seed=3)
    ext = FPFHExtractor(normal_window=5, feature_window=5, stride=4, normal_stride=2)
    got = ext(xyz)
    assert got.shape == (1, 33, 4, 4)
    dense = estimate_normals(xyz[:, ::2, ::2].contiguous(), 5)[:, ::2, ::2].contiguous()
    want = fpfh(xyz[:, ::4, ::4].contiguous(), feature_window=5, normals=dense)
    assert torch.equal(got, want)
    assert not torch.allclose(got, FPFHExtractor(5, 5, stride=4)(xyz))  # its own-grid normals differ
    with pytest.raises(ValueError, match="fpfh_normal_stride must divide"):
        CFMConfig(resolution=16, extractor_3d="fpfh", fpfh_stride=4, fpfh_normal_stride=3)


def test_window_sums_by_integral_image_match_a_direct_sum():
    from edge_runtime.nets.fpfh import _window_moments_box

    xyz = _cloud(h=9, w=11, seed=4, holes=False)
    xyz[0, 3, 4] = 0
    xyz[0, 7:9, 8:10] = 0
    got = _window_moments_box(xyz, 5).reshape(9, 11, 10)
    p = xyz[0].double()
    valid = (p != 0).any(-1)
    ref = p[valid].mean(0)
    for i, j in ((0, 0), (4, 5), (8, 10), (2, 9)):
        pts = [p[a, b] - ref for a in range(max(0, i - 2), min(9, i + 3)) for b in range(max(0, j - 2), min(11, j + 3))
               if valid[a, b]]
        q = torch.stack(pts)
        want = torch.cat([torch.tensor([float(len(pts))], dtype=torch.float64), q.sum(0),
                          torch.stack([(q[:, a] * q[:, b]).sum() for a, b in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))])])
        assert torch.allclose(got[i, j], want, atol=1e-12)
