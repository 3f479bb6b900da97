"""Tests of CFM's frozen extractors (ViT, Point-MAE), their grouping and checkpoint adapters."""

from __future__ import annotations

import argparse
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.errors import DataError
from edge_runtime.nets.checkpoints import (
    CheckpointError,
    load_dino_vit,
    load_point_mae,
    read_checkpoint,
    sha256_file,
)
from edge_runtime.nets.pointmae import (
    FEATURE_LAYERS,
    PointMAEExtractor,
    farthest_point_sample,
    knn_exact,
    knn_window,
)
from edge_runtime.nets.vit import ViTExtractor



@pytest.fixture(autouse=True)
def _no_grad():
    """Extractors are frozen: run every test here without autograd (scoped to this module)."""
    with torch.no_grad():
        yield

SMALL_VIT = dict(embed_dim=64, num_heads=4, img_size=64)
SMALL_PMAE = dict(num_groups=32, group_size=16, trans_dim=48)


def tiny_vit(depth: int = 2, seed: int = 0) -> ViTExtractor:
    torch.manual_seed(seed)
    return ViTExtractor(depth=depth, **SMALL_VIT).eval()


def tiny_pmae(depth: int = 4, seed: int = 0, **kw) -> PointMAEExtractor:
    torch.manual_seed(seed)
    model = PointMAEExtractor(depth=depth, feature_layers=FEATURE_LAYERS[depth], **SMALL_PMAE, **kw).eval()
    for bn in (model.dense.encoder.first_conv[1], model.dense.encoder.second_conv[1]):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1, 0.1)
        bn.bias.normal_(0, 0.1)
    return model


def surface_cloud(size: int = 64, seed: int = 0, hole: tuple[int, int] | None = None) -> torch.Tensor:
    """Organized ``size x size x 3`` cloud of a bumpy surface (metres), noisy, with a zero border.

    ``hole=(r0, r1)`` zeroes rows r0..r1 (missing points) to vary the valid count.
    """
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(-0.05, 0.05, size), torch.linspace(-0.05, 0.05, size), indexing="ij")
    z = 0.3 + 0.01 * torch.sin(40 * u) * torch.cos(30 * v)
    xyz = torch.stack([u, v, z], -1) + 1e-4 * torch.randn(size, size, 3, generator=g)
    xyz[:3] = 0
    xyz[:, -2:] = 0
    if hole is not None:
        xyz[hole[0] : hole[1]] = 0
    return xyz


def step_cloud(size: int = 64, seed: int = 1) -> torch.Tensor:
    """Two planes at different depths side by side (a depth discontinuity)."""
    xyz = surface_cloud(size, seed)
    xyz[:, size // 2 :, 2] += 0.02
    return xyz


# ------------------------------------------------------------------------------- ViT

TIMM_BLOCK_KEYS = {
    "norm1.weight": (768,), "norm1.bias": (768,),
    "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,),
    "attn.proj.weight": (768, 768), "attn.proj.bias": (768,),
    "norm2.weight": (768,), "norm2.bias": (768,),
    "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
    "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,),
}  # fmt: skip


def test_vit_b8_matches_timm_layout_and_runs_at_small_resolution():
    model = ViTExtractor(depth=12).eval()
    expected = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 785, 768),
        "patch_embed.proj.weight": (768, 3, 8, 8),
        "patch_embed.proj.bias": (768,),
        "norm.weight": (768,),
        "norm.bias": (768,),
    }
    expected.update({f"blocks.{i}.{k}": s for i in range(12) for k, s in TIMM_BLOCK_KEYS.items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 768, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("depth", [1, 4, 8, 12])
def test_vit_output_shape_per_depth(depth):
    model = tiny_vit(depth)
    assert len(model.blocks) == depth
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64, 8, 8)


def _reference_vit(model: ViTExtractor, x: torch.Tensor) -> torch.Tensor:
    """Naive ViT forward (explicit softmax attention, per-patch unfold) for cross-checking."""
    b, _, hh, ww = x.shape
    p = model.patch_size
    h, w = hh // p, ww // p
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, h * w, -1)
    tok = patches @ model.patch_embed.proj.weight.reshape(model.out_dim, -1).T + model.patch_embed.proj.bias
    tok = torch.cat([model.cls_token.expand(b, -1, -1), tok], 1) + model.position_embedding(h, w)
    for blk in model.blocks:
        y = blk.norm1(tok)
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(y).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
        tok = tok + blk.attn.proj((att @ v).transpose(1, 2).reshape(b, -1, model.out_dim))
        tok = tok + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(tok))))
    tok = model.norm(tok)[:, 1:]
    return tok.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def test_vit_matches_naive_reference_and_is_deterministic():
    model = tiny_vit(3)
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert out.shape == (2, 64, 8, 6)
    torch.testing.assert_close(out, _reference_vit(model, x), rtol=1e-4, atol=1e-4)
    assert torch.equal(out, model(x))


def test_vit_pos_embed_interpolation():
    model = tiny_vit(1)
    grid = model.grid
    assert model.position_embedding(grid, grid) is model.pos_embed
    pe = model.position_embedding(16, 12)
    assert pe.shape == (1, 1 + 16 * 12, 64)
    assert torch.equal(pe[:, 0], model.pos_embed[:, 0])
    patch = model.pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(patch, size=(16, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pe[:, 1:], expect.flatten(2).transpose(1, 2))
    # a constant embedding stays constant under resizing
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.5
    assert torch.allclose(model.position_embedding(4, 4)[:, 1:], torch.full((1, 16, 64), 0.5), atol=1e-6)
    assert model(torch.randn(1, 3, 128, 96)).shape == (1, 64, 16, 12)


def test_vit_rejects_bad_input():
    model = tiny_vit(1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.randn(3, 64, 64))


# -------------------------------------------------------------------------- Point-MAE


def official_point_mae_keys(depth: int) -> dict[str, tuple[int, ...]]:
    """Encoder keys/shapes of the official Point-MAE (after stripping MAE_encoder.)."""
    keys = {
        "encoder.first_conv.0.weight": (128, 3, 1), "encoder.first_conv.0.bias": (128,),
        "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
        "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
        "encoder.second_conv.3.weight": (384, 512, 1), "encoder.second_conv.3.bias": (384,),
        "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (384, 128), "pos_embed.2.bias": (384,),
        "norm.weight": (384,), "norm.bias": (384,),
    }  # fmt: skip
    for name, c in (("first_conv.1", 128), ("second_conv.1", 512)):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            keys[f"encoder.{name}.{suffix}"] = (c,)
        keys[f"encoder.{name}.num_batches_tracked"] = ()
    block = {
        "norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384),
        "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
        "norm2.weight": (384,), "norm2.bias": (384,),
        "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
        "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,),
    }  # fmt: skip
    keys.update({f"blocks.blocks.{i}.{k}": s for i in range(depth) for k, s in block.items()})
    return keys


def test_point_mae_dense_keys_match_official_layout():
    model = PointMAEExtractor(depth=12)
    assert {k: tuple(v.shape) for k, v in model.dense.state_dict().items()} == official_point_mae_keys(12)
    assert model.out_dim == 1152
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize("depth", [1, 4, 8, 12])
def test_point_mae_output_shape_per_depth(depth):
    model = tiny_pmae(depth)
    centers, feats = model(surface_cloud()[None])
    assert model.out_dim == 48 * len(FEATURE_LAYERS[depth])
    assert centers.shape == (1, 32, 3)
    assert feats.shape == (1, 32, model.out_dim)
    assert torch.isfinite(feats).all()


def test_point_mae_rejects_feature_layers_beyond_depth():
    with pytest.raises(ValueError, match=r"feature_layers=\(1, 2, 3\)"):
        PointMAEExtractor(depth=4)  # default feature layers (3, 7, 11) need 12 blocks


def _reference_dense(model: PointMAEExtractor, nbh: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The official Point-MAE encoder forward (Conv1d + BatchNorm, concat) in eval mode."""
    enc = model.dense.encoder
    b, g, k, _ = nbh.shape
    x = enc.first_conv(nbh.reshape(b * g, k, 3).transpose(2, 1))
    glob = x.max(dim=2, keepdim=True)[0]
    x = enc.second_conv(torch.cat([glob.expand(-1, -1, k), x], dim=1))
    tokens = x.max(dim=2)[0].reshape(b, g, -1)
    pos = model.dense.pos_embed(centers)
    feats = []
    for i, blk in enumerate(model.dense.blocks.blocks):
        y = tokens + pos
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(y)).reshape(b, g, 3, heads, -1).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) * qkv.shape[-1] ** -0.5).softmax(-1)
        y = y + blk.attn.proj((att @ qkv[2]).transpose(1, 2).reshape(b, g, -1))
        tokens = y + blk.mlp(blk.norm2(y))
        if i in model.dense.feature_layers:
            feats.append(model.dense.norm(tokens))
    return torch.cat(feats, -1)


def test_point_mae_dense_matches_official_forward_and_ignores_train_mode():
    model = tiny_pmae(4)
    centers, nbh = model.group(surface_cloud()[None])
    feats = model.encode(nbh, centers)
    torch.testing.assert_close(feats, _reference_dense(model.eval(), nbh, centers), rtol=1e-4, atol=1e-4)
    assert torch.equal(feats, model.dense(nbh, centers))
    model.train()  # frozen extractor: BatchNorm keeps running statistics, nothing random
    assert torch.equal(model(surface_cloud()[None])[1], feats)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript exporter (onnxscript absent)
def test_point_mae_dense_exports_to_onnx_alone(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = tiny_pmae(1)
    centers, nbh = model.group(surface_cloud()[None])
    path = tmp_path / "dense.onnx"
    torch.onnx.export(
        model.dense, (nbh, centers), str(path), opset_version=17, dynamo=False,
        input_names=["neighborhood", "centers"], output_names=["feats"],
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feats,) = session.run(None, {"neighborhood": nbh.numpy(), "centers": centers.numpy()})
    np.testing.assert_allclose(feats, model.encode(nbh, centers).numpy(), rtol=1e-4, atol=1e-4)


def test_point_mae_deterministic_and_return_index():
    model = tiny_pmae(1)
    xyz = surface_cloud()[None]
    c1, f1 = model(xyz)
    c2, f2 = model(xyz)
    assert torch.equal(c1, c2) and torch.equal(f1, f2)
    centers, nbh, pix = model.group(xyz, return_index=True)
    assert torch.equal(centers[0], xyz[0].reshape(-1, 3)[pix[0]])
    assert torch.equal(nbh[0, :, 0], torch.zeros(32, 3))  # nearest neighbour of a centre is itself
    assert (nbh.norm(dim=-1).diff(dim=-1) >= 0).all()  # nearest first


@pytest.mark.parametrize("exact", [True, False])
def test_point_mae_batch_equals_items_with_different_valid_counts(exact):
    model = tiny_pmae(4)
    items = [surface_cloud(seed=0), surface_cloud(seed=1, hole=(10, 30))]
    batch_c, batch_n = model.group(torch.stack(items), exact=exact)
    batch_f = model.encode(batch_n, batch_c)
    for b, item in enumerate(items):
        c, n = model.group(item[None], exact=exact)
        assert torch.equal(batch_c[b], c[0]) and torch.equal(batch_n[b], n[0])
        torch.testing.assert_close(batch_f[b], model.encode(n, c)[0], rtol=1e-5, atol=1e-5)


def test_point_mae_small_clouds_keep_fixed_shapes_and_empty_is_an_error():
    model = tiny_pmae(1)
    sparse = torch.zeros(2, 64, 64, 3)
    sparse[0] = surface_cloud()
    sparse[1, 10, :20] = torch.linspace(0.1, 0.3, 20)[:, None]  # 20 valid points < groups and group size
    for exact in (True, False):
        centers, nbr = model.group(sparse, exact=exact)
        assert centers.shape == (2, model.num_groups, 3) and nbr.shape == (2, model.num_groups, model.group_size, 3)
        pts = sparse[1, 10, :20]
        # every centre and every neighbour of the small item is one of its 20 real points
        assert all(bool((pts == c).all(-1).any()) for c in centers[1])
        absolute = nbr[1] + centers[1][:, None]
        assert bool(((absolute[..., None, :] - pts).abs().sum(-1) < 1e-6).any(-1).all())
        # all 20 points are centres (FPS takes every point before repeating)
        assert len({tuple(c.tolist()) for c in centers[1]}) == 20
    centers, feats = model(sparse)
    assert torch.isfinite(feats).all()
    empty = torch.zeros(1, 64, 64, 3)
    with pytest.raises(ValueError, match="batch item 0: no valid 3D point"):
        model.group(empty)
    bad = surface_cloud()[None].clone()
    bad[0, 20, 20, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.group(bad)
    with pytest.raises(ValueError, match="B x H x W x 3"):
        model.group(surface_cloud())


# ------------------------------------------------------------------------ FPS and KNN


def _naive_fps(points: np.ndarray, g: int) -> list[int]:
    """Textbook FPS (start at 0, farthest from the chosen set, first index on ties)."""
    chosen = [0]
    d = ((points - points[0]) ** 2).sum(1)
    for _ in range(g - 1):
        nxt = int(np.argmax(d))
        chosen.append(nxt)
        d = np.minimum(d, ((points - points[nxt]) ** 2).sum(1))
    return chosen


def test_fps_matches_naive_reference_with_padding():
    rng = np.random.default_rng(0)
    a = rng.random((300, 3), dtype=np.float32)
    b = rng.random((200, 3), dtype=np.float32)
    pts = np.zeros((2, 3, 300), np.float32)
    pts[0], pts[1, :, :200] = a.T, b.T
    pts[1, :, 200:] = 100.0  # padding far away must never be picked
    idx = farthest_point_sample(pts, np.array([300, 200]), 40)
    assert idx[0].tolist() == _naive_fps(a, 40)
    assert idx[1].tolist() == _naive_fps(b, 40)


def test_knn_exact_matches_sorting():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(500, 3, generator=g)
    centres = pts[:70]
    idx = knn_exact(centres, pts, 12)
    d = torch.cdist(centres.double(), pts.double())
    assert torch.equal(idx, d.argsort(dim=1)[:, :12])


def test_fast_fps_stride_one_equals_exact_and_stride_two_keeps_coverage():
    xyz = surface_cloud(seed=3)[None]
    exact_c, _ = tiny_pmae(1).group(xyz, exact=True)
    assert torch.equal(tiny_pmae(1, fps_stride=1).group(xyz)[0], exact_c)
    fast_c, _ = tiny_pmae(1, fps_stride=2).group(xyz)
    pts = xyz[0][(xyz[0] != 0).any(-1)]

    def covering_radius(c):  # farthest any valid point lies from its nearest centre
        return torch.cdist(pts, c[0]).min(1).values.max()

    assert covering_radius(fast_c) <= 1.25 * covering_radius(exact_c)


def _neighbour_sets(model, xyz, exact):
    centers, nbh = model.group(xyz, exact=exact)
    return centers, [set(map(tuple, (n + c).tolist())) for n, c in zip(nbh[0], centers[0, :, None])]


def test_fast_knn_equals_exact_on_smooth_surface():
    model = tiny_pmae(1, fps_stride=1)
    xyz = surface_cloud(seed=4)[None]
    c_exact, exact = _neighbour_sets(model, xyz, True)
    c_fast, fast = _neighbour_sets(model, xyz, False)
    assert torch.equal(c_exact, c_fast)
    assert exact == fast


def test_fast_knn_equals_exact_at_depth_step_and_sparse_cloud():
    model = tiny_pmae(1, fps_stride=1)
    g = torch.Generator().manual_seed(5)
    sparse = surface_cloud(seed=5)
    sparse[torch.rand(64, 64, generator=g) > 0.08] = 0  # windows hold fewer than K points
    for xyz in (step_cloud(), sparse):
        _, exact = _neighbour_sets(model, xyz[None], True)
        _, fast = _neighbour_sets(model, xyz[None], False)
        assert exact == fast


def test_window_knn_certificate_rejects_neighbourhoods_reaching_across_a_gap():
    xyz = surface_cloud(seed=6)
    xyz[..., 1] *= 6  # rows 6x farther apart than columns: neighbourhoods run along rows
    xyz[:, 30:34] = 0  # a 4-column gap; true neighbours of its edge pixels lie across it
    valid = (xyz != 0).any(-1)
    edge = torch.nonzero(valid[:, 29] & valid[:, 34]).squeeze(1)
    centre_pix = torch.cat([edge * 64 + 29, edge * 64 + 34])
    raw, ok = knn_window(xyz, valid, centre_pix, 16, radius=5)
    flat = xyz.reshape(-1, 3)
    vpix = torch.nonzero(valid.reshape(-1)).squeeze(1)
    ref = vpix[knn_exact(flat[centre_pix], flat[vpix], 16)]
    missed = ~(raw[:, :, None] == ref[:, None, :]).any(-1).all(1)
    assert missed.all() and not ok.any()  # every raw result is wrong and none is accepted
    model = tiny_pmae(1, fps_stride=1, knn_radius=5)
    assert _neighbour_sets(model, xyz[None], True)[1] == _neighbour_sets(model, xyz[None], False)[1]


# ------------------------------------------------------------------------ checkpoints


def test_load_dino_backbone_full_checkpoint_and_timm_layouts():
    src = tiny_vit(2, seed=1)
    ref = src.state_dict()
    backbone = {k: v.clone() for k, v in ref.items()}  # dino_vitbase8_pretrain.pth
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in ref.items()}
    full = {
        "teacher": {**{f"backbone.{k}": v for k, v in ref.items()}, "head.mlp.0.weight": torch.ones(3, 64)},
        "student": {**student, "module.head.last_layer.weight_g": torch.ones(1)},
        "epoch": 100,
    }
    timm = {**ref, "head.weight": torch.ones(10, 64), "head.bias": torch.ones(10)}
    cases = ((backbone, ()), (full, ("head.mlp.0.weight",)), (timm, ("head.bias", "head.weight")))
    for state, dropped in cases:
        dst = tiny_vit(2, seed=2)
        result = load_dino_vit(dst, state)
        assert result.dropped == dropped
        assert set(result.loaded) == set(ref)
        assert all(torch.equal(dst.state_dict()[k], ref[k]) for k in ref)


def test_load_dino_prunes_blocks_and_pruned_output_is_a_cut_of_the_full_model():
    full = tiny_vit(12, seed=3)
    pruned = tiny_vit(4, seed=4)
    result = load_dino_vit(pruned, full.state_dict())
    assert {k.split(".")[1] for k in result.dropped} == {str(i) for i in range(4, 12)}
    x = torch.randn(1, 3, 64, 64)
    tok = full.patch_embed(x)
    tok = torch.cat([full.cls_token, tok], 1) + full.pos_embed
    for blk in full.blocks[:4]:
        tok = blk(tok)
    expect = full.norm(tok)[:, 1:].transpose(1, 2).reshape(1, 64, 8, 8)
    torch.testing.assert_close(pruned(x), expect)


def test_load_dino_mismatch_lists_keys():
    state = dict(tiny_vit(2).state_dict())
    del state["blocks.1.norm2.weight"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 785, 64)
    with pytest.raises(CheckpointError) as err:
        load_dino_vit(tiny_vit(2), state)
    msg = str(err.value)
    assert "1 missing keys: blocks.1.norm2.weight" in msg
    assert "1 unexpected keys: blocks.0.attn.extra" in msg
    assert "pos_embed (checkpoint (1, 785, 64), model (1, 65, 64))" in msg
    assert err.value.missing == ("blocks.1.norm2.weight",)


def _official_pretrain(model: PointMAEExtractor) -> dict:
    """A pretrain.pth-shaped dict built from a model (official key layout)."""
    base = {f"module.MAE_encoder.{k}": v.clone() for k, v in model.dense.state_dict().items()}
    base.update({
        "module.mask_token": torch.zeros(1, 1, 48),
        "module.MAE_decoder.blocks.0.norm1.weight": torch.ones(48),
        "module.decoder_pos_embed.0.weight": torch.ones(128, 3),
        "module.increase_dim.0.weight": torch.ones(48, 48, 1),
    })  # fmt: skip
    return {"base_model": base, "optimizer": {"state": {}}, "epoch": 300, "metrics": {}}


def test_load_point_mae_official_layout_and_pruning():
    src = tiny_pmae(12, seed=1)
    ckpt = _official_pretrain(src)
    same = tiny_pmae(12, seed=2)
    result = load_point_mae(same, ckpt)
    assert len(result.dropped) == 4
    xyz = surface_cloud()[None]
    assert torch.equal(same(xyz)[1], src(xyz)[1])
    pruned = tiny_pmae(4, seed=3)
    result = load_point_mae(pruned.dense, ckpt)
    assert any(k.startswith("module.MAE_encoder.blocks.blocks.11.") for k in result.dropped)
    src_state = src.dense.state_dict()
    assert all(torch.equal(v, src_state[k]) for k, v in pruned.dense.state_dict().items())
    # our own encoder-only layout loads too
    again = tiny_pmae(4, seed=4)
    assert load_point_mae(again, pruned.dense.state_dict()).dropped == ()


def test_load_point_mae_strict_on_encoder_keys():
    ckpt = _official_pretrain(tiny_pmae(4))
    base = ckpt["base_model"]
    del base["module.MAE_encoder.encoder.second_conv.3.weight"]
    base["module.MAE_encoder.blocks.blocks.0.attn.qkv.bias"] = torch.zeros(144)
    base["module.MAE_encoder.encoder.first_conv.1.num_batches_tracked"] = torch.tensor(5)
    del base["module.MAE_encoder.encoder.second_conv.1.num_batches_tracked"]  # tolerated
    with pytest.raises(CheckpointError) as err:
        load_point_mae(tiny_pmae(4), ckpt)
    assert err.value.missing == ("encoder.second_conv.3.weight",)
    assert err.value.unexpected == ("blocks.blocks.0.attn.qkv.bias",)


class _NotWeights:
    pass


def test_read_checkpoint_and_sha256(tmp_path):
    state = {"a": torch.arange(3.0), "args": argparse.Namespace(arch="vit_base", patch_size=8)}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    got = read_checkpoint(path)
    assert torch.equal(got["a"], state["a"]) and got["args"].patch_size == 8
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(st))
    assert torch.equal(read_checkpoint(st)["w"], torch.ones(2, 2))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(DataError, match="missing.pth: checkpoint file not found"):
        read_checkpoint(tmp_path / "missing.pth")
    torch.save({"obj": _NotWeights()}, tmp_path / "code.pth")
    with pytest.raises(DataError, match="code.pth: cannot read checkpoint"):
        read_checkpoint(tmp_path / "code.pth")
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")
    with pytest.raises(DataError, match="expected a dict of weights, got Tensor"):
        read_checkpoint(tmp_path / "tensor.pth")
    with pytest.raises(DataError, match="nope.bin: file not found"):
        sha256_file(tmp_path / "nope.bin")
