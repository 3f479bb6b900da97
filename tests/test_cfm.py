"""CFM model: variant configs, shapes, alignment, scoring, loss, determinism (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.methods.cfm.model import (
    CFMConfig, CFMModel, Mapper, box_passes, cfm_config, gaussian_kernel1d, interpolate_centres, smooth,
)

R = 64
SMALL = {"resolution": R, "num_groups": 32, "group_size": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scene(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised random image and a dome-shaped part (metres) on an empty background."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(batch, 3, R, R, generator=g)
    v, u = torch.meshgrid(torch.arange(R, dtype=torch.float32), torch.arange(R, dtype=torch.float32),
                          indexing="ij")
    r2 = ((u - R / 2) ** 2 + (v - R / 2) ** 2) / (0.35 * R) ** 2
    part = r2 < 1
    xyz = torch.zeros(batch, R, R, 3)
    xyz[:, part, 0] = (u[part] - R / 2) * 5e-4
    xyz[:, part, 1] = (v[part] - R / 2) * 5e-4
    xyz[:, part, 2] = 0.5 - 0.01 * (1 - r2[part])
    xyz[:, part, 2] += 1e-4 * torch.rand(batch, int(part.sum()), generator=g)
    return rgb, xyz


@pytest.fixture(scope="module")
def tiny() -> CFMModel:
    torch.manual_seed(0)
    return CFMModel(cfm_config("tiny", **SMALL))


@pytest.mark.parametrize("variant,layers,dim_3d", [
    ("tiny", (0,), 384), ("small", (1, 2, 3), 1152), ("medium", (1, 4, 7), 1152), ("full", (3, 7, 11), 1152)])
def test_variant_config_layers_and_dims(variant, layers, dim_3d):
    cfg = cfm_config(variant)
    depth = {"tiny": 1, "small": 4, "medium": 8, "full": 12}[variant]
    assert (cfg.vit_depth, cfg.pm_depth, cfg.feature_layers, cfg.dim_3d) == (depth, depth, layers, dim_3d)
    assert cfg.resolution == cfg.mapper_resolution == 224 and cfg.dim_2d == 768
    assert CFMConfig.from_dict(cfg.to_dict()) == cfg


def test_config_overrides_and_validation():
    cfg = cfm_config("small", resolution=112)
    assert cfg.mapper_resolution == 112  # follows the resolution unless given
    assert cfm_config("small", resolution=112, mapper_resolution=56).mapper_resolution == 56
    cpu = cfm_config("full", "cpu")
    assert (cpu.num_groups, cpu.group_size, cpu.mapper_resolution, cpu.vit_depth) == (256, 32, 56, 12)
    assert cfm_config("tiny", "cpu", resolution=112).mapper_resolution == 28
    assert cfm_config("tiny", "cpu", mapper_resolution=224).mapper_resolution == 224  # overrides win
    with pytest.raises(ValueError, match="unknown CFM profile"):
        cfm_config("tiny", "gpu")
    with pytest.raises(ValueError, match="unknown CFM variant"):
        cfm_config("huge")
    with pytest.raises(ValueError, match="aggregation"):
        cfm_config("tiny", aggregation="mean")
    with pytest.raises(ValueError, match="mapper_resolution"):
        cfm_config("tiny", resolution=64, mapper_resolution=128)
    with pytest.raises(ValueError, match="dim_3d"):
        cfm_config("tiny", dim_3d=1152)
    with pytest.raises(ValueError, match="unknown CFM config keys"):
        CFMConfig.from_dict({**cfm_config("tiny").to_dict(), "extra": 1})


def test_mapper_widths_follow_feature_sizes():
    m = Mapper(768, 1152)  # paper: 768 -> 960 -> 960 -> 1152, ~2.77 M parameters
    assert [m.input.in_features, m.input.out_features, m.projection.out_features, m.output.out_features] == \
        [768, 960, 960, 1152]
    assert abs(sum(p.numel() for p in m.parameters()) - 2.77e6) < 0.01e6
    model = CFMModel(cfm_config("tiny", **SMALL))
    assert (model.map_2d_to_3d.input.in_features, model.map_2d_to_3d.input.out_features,
            model.map_2d_to_3d.output.out_features) == (768, 576, 384)
    assert (model.map_3d_to_2d.input.in_features, model.map_3d_to_2d.output.out_features) == (384, 768)


@pytest.mark.parametrize("variant", ["tiny", "small", "full"])  # medium = full's widths, fewer blocks
def test_shapes_per_variant(variant):
    torch.manual_seed(0)
    model = CFMModel(cfm_config(variant, **SMALL))
    rgb, xyz = scene()
    with torch.inference_mode():
        f2d, f3d, valid = model.features(rgb, xyz)
        x2d, x3d, valid_px = model.pixel_features(rgb, xyz)
        scores, maps = model(rgb, xyz)
    assert f2d.shape == (2, 768, R, R) and f3d.shape == (2, model.cfg.dim_3d, R, R)
    assert valid.shape == (2, R, R) and torch.equal(valid, (xyz != 0).any(-1)) and torch.equal(valid, valid_px)
    n = int(valid.sum())
    assert x2d.shape == (n, 768) and x3d.shape == (n, model.cfg.dim_3d)
    assert scores.shape == (2,) and maps.shape == (2, R, R)
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    assert torch.isfinite(maps).all() and (maps >= 0).all()


def test_frozen_extractors_stay_in_eval_mode(tiny):
    tiny.train()
    assert tiny.map_2d_to_3d.training and not tiny.backbone_2d.training and not tiny.backbone_3d.training
    assert all(not p.requires_grad for p in tiny.backbone_2d.parameters())
    assert all(p.requires_grad for p in tiny.map_3d_to_2d.parameters())
    tiny.eval()


def test_deterministic(tiny):
    rgb, xyz = scene()
    with torch.inference_mode():
        a = tiny(rgb, xyz)
        b = tiny(rgb, xyz)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(0)
    twin = CFMModel(cfm_config("tiny", **SMALL))  # same seed -> same random init
    with torch.inference_mode():
        c = twin(rgb, xyz)
    assert torch.equal(a[1], c[1])


def test_alignment_matches_dense_reference(tiny):
    """The valid-pixel alignment equals the dense recipe: bilinear upsampling of the tokens,
    3-NN features scattered into a zero grid, AvgPool2d(3, stride 1, padding 1)."""
    rgb, xyz = scene()
    F = torch.nn.functional
    with torch.inference_mode():
        tokens, centers, feats = tiny.extract(rgb, xyz)
        x2d, x3d, valid = tiny.align(tokens, centers, feats, xyz)
        dense_2d = F.interpolate(tokens, size=(R, R), mode="bilinear", align_corners=False)
        raw = torch.zeros(2, R, R, feats.shape[-1])
        for b in range(2):
            raw[b][valid[b]] = interpolate_centres(xyz[b][valid[b]], centers[b], feats[b])
        dense_3d = F.avg_pool2d(raw.permute(0, 3, 1, 2), 3, stride=1, padding=1)
        f2d, f3d, _ = tiny.features(rgb, xyz)
    assert torch.allclose(x2d, dense_2d.permute(0, 2, 3, 1)[valid], atol=1e-5)
    assert torch.allclose(x3d, dense_3d.permute(0, 2, 3, 1)[valid], atol=1e-5)
    assert torch.equal(f2d, dense_2d)
    assert (f3d.abs().sum(1)[valid] > 0).all() and (f3d.abs().sum(1)[~valid] == 0).all()


def test_interpolate_centres_weights():
    centers = torch.tensor([[0.0, 0.0, 0.5], [0.01, 0.0, 0.5], [0.0, 0.01, 0.5], [0.5, 0.5, 0.5]])
    feats = torch.eye(4)
    out = interpolate_centres(torch.tensor([[0.0, 0.0, 0.5], [0.005, 0.005, 0.5]]), centers, feats)
    assert torch.allclose(out[0], torch.tensor([1.0, 0, 0, 0]), atol=1e-3)  # on a centre: ~its feature (w 1e8 vs 1e4)
    # equidistant from the three near centres (d^2 = 5e-5, 5e-5, 5e-5): equal weights, far one unused
    assert torch.allclose(out[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0]), atol=1e-4)


def test_mapper_resolution_grid():
    torch.manual_seed(0)
    exact = CFMModel(cfm_config("tiny", **SMALL))
    coarse = CFMModel(cfm_config("tiny", **SMALL, mapper_resolution=R // 2))
    coarse.load_state_dict(exact.state_dict())
    rgb, xyz = scene()
    with torch.inference_mode():
        f2d, f3d, valid = coarse.features(rgb, xyz)
        x2d, _, _ = coarse.pixel_features(rgb, xyz)
        s_exact, m_exact = exact(rgb, xyz)
        s_coarse, m_coarse = coarse(rgb, xyz)
    assert f2d.shape[-1] == f3d.shape[-1] == valid.shape[-1] == R // 2
    assert torch.equal(valid, (xyz[:, ::2, ::2] != 0).any(-1))  # nearest = every 2nd pixel
    assert x2d.shape[0] == int(valid.sum())
    assert m_coarse.shape == (2, R, R)
    assert torch.corrcoef(torch.stack([m_exact.flatten(), m_coarse.flatten()]))[0, 1] > 0.8


def test_aggregations_combine_the_two_maps(tiny):
    rgb, xyz = scene(batch=1)
    with torch.inference_mode():
        x2d, x3d, valid = tiny.pixel_features(rgb, xyz)
        psi_2d, psi_3d = tiny.discrepancy(x2d, x3d)
        raw = torch.zeros(2, 1, R, R)
        raw[0][valid], raw[1][valid] = psi_2d, psi_3d
        expect = {"product": raw[0] * raw[1], "sum": raw[0] + raw[1], "max": raw.amax(0),
                  "2d": raw[0], "3d": raw[1]}
        for agg, combined in expect.items():
            tiny.set_scoring(aggregation=agg)
            score, amap = tiny.anomaly_map(psi_2d, psi_3d, valid, xyz)
            assert torch.allclose(amap, smooth(combined, tiny.cfg), atol=1e-6), agg
            assert score.item() == pytest.approx(amap.max().item())
    tiny.set_scoring(aggregation="product")
    assert ((psi_2d >= 0) & (psi_2d <= 2)).all() and ((psi_3d >= 0) & (psi_3d <= 2)).all()


def test_smoothing_kernels():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 33 and k.sum().item() == pytest.approx(1.0) and k.argmax().item() == 16
    assert box_passes(224) == [5] * 5 + [7] * 3
    assert box_passes(112) == [3] * 5 + [3] * 3
    cfg = cfm_config("tiny", resolution=R)
    flat = torch.full((1, R, R), 0.7)
    for mode in ("gaussian", "box"):
        c = cfg.with_overrides(smoothing=mode)
        assert torch.allclose(smooth(flat, c), flat, atol=1e-6)  # normalised filters keep constants
        spike = torch.zeros(1, R, R)
        spike[0, R // 2, R // 2] = 1.0
        out = smooth(spike, c)
        assert out.sum().item() == pytest.approx(1.0, abs=1e-4) and out.max() < 0.5


def test_loss_is_one_minus_cosine(tiny):
    g = torch.Generator().manual_seed(1)
    x2d, x3d = torch.randn(50, 768, generator=g), torch.randn(50, 384, generator=g)
    total, l23, l32 = tiny.loss(x2d, x3d)
    cos = torch.nn.functional.cosine_similarity
    assert l23.item() == pytest.approx(1 - cos(tiny.map_2d_to_3d(x2d), x3d).mean().item(), abs=1e-6)
    assert l32.item() == pytest.approx(1 - cos(tiny.map_3d_to_2d(x3d), x2d).mean().item(), abs=1e-6)
    assert total.item() == pytest.approx(l23.item() + l32.item(), abs=1e-6)
    total.backward()
    assert tiny.map_2d_to_3d.input.weight.grad is not None
    assert all(p.grad is None for p in tiny.backbone_2d.parameters())
    tiny.zero_grad(set_to_none=True)


def test_empty_cloud_gives_zero_map(tiny):
    rgb, xyz = scene(batch=2)
    xyz[1] = 0  # no 3D point at all in the second frame: nothing to compare, map stays zero
    with torch.inference_mode():
        x2d, x3d, valid = tiny.align(torch.randn(2, 768, R // 8, R // 8), torch.rand(2, 32, 3),
                                     torch.randn(2, 32, 384), xyz)
        psi = tiny.discrepancy(x2d, x3d)
        scores, maps = tiny.anomaly_map(*psi, valid, xyz)
    assert scores[1].item() == 0 and scores[0].item() > 0
    assert np.isfinite(maps.numpy()).all()
