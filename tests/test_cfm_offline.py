"""CFM on the offline extractors: EfficientNet-Lite tokens, FPFH per-pixel features,
standardisation, bundle round trip, export parts, and detection clearly above chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_runtime import methods
from edge_runtime.bundle import build_model, load_bundle
from edge_runtime.methods.cfm.model import CFMModel, EfficientNetTokens, cfm_config
from tests.test_cfm import R, scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OFFLINE = dict(resolution=R, extractor_2d="efficientnet-lite0", extractor_3d="fpfh", fpfh_stride=2)


@pytest.mark.parametrize("variant,blocks,dim_2d", [("tiny", (1, 2, 4), 88), ("small", (4, 7, 10), 232),
                                                   ("medium", (4, 10, 14), 344), ("full", (4, 10, 15), 472)])
def test_offline_variants_follow_the_feature_widths(variant, blocks, dim_2d):
    cfg = cfm_config(variant, extractor_2d="efficientnet-lite0", extractor_3d="fpfh")
    assert cfg.blocks_2d == blocks and cfg.dim_2d == dim_2d and cfg.dim_3d == 33 and cfg.standardize
    model = CFMModel(cfg)
    assert model.map_2d_to_3d.input.in_features == dim_2d and model.map_2d_to_3d.output.out_features == 33
    lite1 = cfm_config(variant, extractor_2d="efficientnet-lite1", extractor_3d="fpfh")
    assert len(lite1.blocks_2d) == len(blocks)  # the same stages on the deeper Lite1


def test_efficientnet_tokens_grid_and_renormalisation():
    torch.manual_seed(0)
    tokens = EfficientNetTokens("lite0", (2, 4, 7)).eval()  # strides 4, 8, 16 -> all on the stride-8 grid
    rgb = torch.randn(2, 3, R, R)
    with torch.inference_mode():
        out = tokens(rgb)
    assert out.shape == (2, 24 + 40 + 80, R // 8, R // 8)
    # ImageNet-normalised 0..1 white pixel -> Lite's (x - 127/255) / (128/255)
    white = (torch.ones(1, 3, 1, 1) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(white * tokens.scale + tokens.shift, torch.full((1, 3, 1, 1), 128 / 128), atol=1e-5)


def test_colour_channels_are_each_cells_mean_colour_repeated():
    tokens = EfficientNetTokens("lite0", (4, 7), colour=6).eval()
    rgb = torch.zeros(1, 3, R, R)
    rgb[:, 0, :8, :8] = 2.0  # one red cell in the corner
    rgb[:, 2, :, R // 2:] = -1.0  # the right half bluish-dark
    with torch.inference_mode():
        out = tokens(rgb)
    assert out.shape == (1, 6 + 40 + 80, R // 8, R // 8) and tokens.out_dim == 126
    colour = out[0, :6]
    assert torch.allclose(colour[:3], colour[3:])  # repeated, so colour weighs 6 channels
    assert colour[0, 0, 0] == 2.0 and colour[0, 0, 1] == 0.0 and colour[2, 0, -1] == -1.0 and colour[2, 0, 0] == 0.0
    cfg = cfm_config("tiny", colour_2d=6, **OFFLINE)
    assert cfg.dim_2d == 88 + 6 and CFMModel(cfg).backbone_2d.out_dim == 94
    with pytest.raises(ValueError, match="colour_2d must be a multiple of 3"):
        cfm_config("tiny", colour_2d=4, **OFFLINE)


def test_offline_model_shapes_stages_and_determinism():
    torch.manual_seed(0)
    model = CFMModel(cfm_config("tiny", **OFFLINE))
    rgb, xyz = scene()
    seen = []

    def stage(name):
        seen.append(name)
        import contextlib
        return contextlib.nullcontext()

    with torch.inference_mode():
        scores, maps = model(rgb, xyz, stage=stage)
        again = model(rgb, xyz)
    assert seen == ["2d", "3d", "align", "mappers", "score"]  # no grouping step for FPFH
    assert scores.shape == (2,) and maps.shape == (2, R, R) and torch.isfinite(maps).all()
    assert torch.equal(scores, again[0])


def test_standardisation_statistics_are_applied():
    torch.manual_seed(0)
    model = CFMModel(cfm_config("tiny", **OFFLINE))
    rgb, xyz = scene()
    with torch.inference_mode():
        x2d, x3d, _ = model.pixel_features(rgb, xyz)
        model.set_statistics(x2d, x3d)
        z2d, z3d, _ = model.pixel_features(rgb, xyz)
    assert torch.allclose(z2d.mean(0), torch.zeros(z2d.shape[1]), atol=1e-3)
    live = x3d.std(0) > 1e-3
    assert torch.allclose(z3d.std(0)[live], torch.ones(int(live.sum())), atol=1e-2)


def test_dense_parts_without_pointmae():
    cfm = methods.get("cfm")
    parts = [p.path for p in cfm.dense_parts(cfm_config("tiny", **OFFLINE))]
    assert parts == ["backbone_2d", "map_2d_to_3d", "map_3d_to_2d"]  # FPFH stays torch: nothing to export
    assert "backbone_3d.dense" in [p.path for p in cfm.dense_parts(cfm_config("tiny"))]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A 64 px dataset, cfm-tiny on Lite0 + FPFH trained through edge-train, evaluated by edge-eval."""
    from tests.conftest import write_mvtec_dataset
    from train import cli, eval_cli

    tmp = tmp_path_factory.mktemp("offline")
    data = write_mvtec_dataset(tmp / "data", n_train=8, n_validation=0, n_test_good=6,
                               defects=(("stain", 4), ("dent", 4)), seed=1)
    bundle, report = tmp / "bundle", tmp / "eval.json"
    assert cli.main(["--method", "cfm", "--variant", "tiny", "--resolution", "64", "--data", str(data),
                     "--category", "widget", "--out", str(bundle), "--epochs", "15", "--quiet"]) == 0
    assert eval_cli.main(["--model", str(bundle), "--data", str(data), "--category", "widget",
                          "--json", str(report), "--quiet"]) == 0
    return bundle, json.loads(report.read_text())


def test_offline_extractors_detect_clearly_above_chance(offline_run):
    _, report = offline_run
    # 6 good x 8 defective parts: chance is 0.5; real features separate colour stains and dents
    assert report["i_auroc"] >= 0.8, report["per_defect"]
    assert report["p_auroc"] >= 0.85


def test_offline_bundle_rebuilds_exactly(offline_run):
    bundle, _ = offline_run
    b = load_bundle(bundle)
    assert b.manifest["extractors"]["3d"]["name"] == "fpfh"
    rebuilt = build_model(b)
    assert float(rebuilt.std_3d.min()) > 0 and not torch.equal(rebuilt.std_2d, torch.ones_like(rebuilt.std_2d))
    rgb, xyz = scene(1)
    from edge_runtime.backends import load_detector

    det = load_detector(bundle, backend="torch")
    res = det.infer({"rgb": rgb[0].numpy(), "xyz": xyz[0].numpy()})
    with torch.inference_mode():
        ref = rebuilt(rgb, xyz)
    assert res.score == pytest.approx(float(ref[0][0]), rel=1e-5)
    assert np.allclose(res.amap, ref[1][0].numpy(), atol=1e-6)


def test_token_stride_4_gives_the_finer_grid_and_is_checked():
    cfg = cfm_config("tiny", blocks_2d=(1, 2, 4), token_stride=4, **OFFLINE)
    assert cfg.dim_2d == 24 + 24 + 40 and cfg.token_stride == 4
    model = CFMModel(cfg).eval()
    rgb, xyz = scene(1)
    with torch.inference_mode():
        tokens = model.backbone_2d(rgb)
        score, amap = model(rgb, xyz)
    assert tokens.shape == (1, 88, R // 4, R // 4) and amap.shape == (1, R, R) and torch.isfinite(score).all()
    (part,) = [p for p in methods.get("cfm").dense_parts(cfg) if p.path == "backbone_2d"]
    assert part.output[1] == [1, 88, R // 4, R // 4]
    assert cfm_config("tiny", **OFFLINE).token_stride == 4  # tiny's own blocks come with the R/4 grid
    assert cfm_config("small", **OFFLINE).token_stride == 8  # the ViT's grid
    assert cfm_config("tiny", blocks_2d=(4, 7), **OFFLINE).token_stride == 8  # explicit blocks: R/8 unless told
    with pytest.raises(ValueError, match="token_stride"):
        cfm_config("tiny", token_stride=2, **OFFLINE)
    with pytest.raises(ValueError, match="token_stride"):
        cfm_config("tiny", token_stride=4)  # the ViT's grid is fixed
