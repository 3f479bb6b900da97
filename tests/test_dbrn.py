"""DBRN: simulation, Swin-Unet pieces, SSIM, losses, export, meta-device rebuild (tiny sizes, CPU)."""

from __future__ import annotations

import argparse
import inspect
import warnings

import numpy as np
import pytest
import torch

from edge_runtime import methods
from edge_runtime.data.synth import SynthStation
from edge_runtime.methods.dbrn.config import DBRNConfig
from edge_runtime.methods.dbrn.model import DBRNModel, dense_parts
from edge_runtime.methods.dbrn.preprocess import LOW, prepare_depth, preprocess_frame
from edge_runtime.methods.dbrn.simulate import SimParams, anomaly_mask, augment, blend, procedural_texture, simulate
from edge_runtime.nets.ssim import ssim_map
from edge_runtime.nets.swin_unet import (PatchExpand, PatchMerging, SwinBlock, SwinUnet, shifted_window_mask,
                                         window_partition, window_reverse)

TINY = dict(resolution=32, embed_dim=8, heads=(1, 1, 2, 2), window=2, mlp_ratio=1.0, disc_width=4,
            disc_levels=2, disc_patch=1, score_pool=3)


@pytest.fixture(scope="module")
def synth_samples():
    st = SynthStation(64, seed=0, categories=["puck"])
    return [st.render("puck", i, "train") for i in range(4)]


# --------------------------------------------------------------------------- simulation


def test_simulation_stays_in_foreground_and_range():
    rng0 = np.random.default_rng(0)
    r = 48
    fg = np.zeros((r, r), bool)
    fg[8:40, 10:38] = True
    rgb = rng0.random((3, r, r)).astype(np.float32)
    depth = np.full((1, r, r), LOW, np.float32)
    depth[0][fg] = 0.6
    pool = [rgb.transpose(1, 2, 0).copy()]
    kinds = set()
    for seed in range(40):
        out = simulate(rgb, depth, fg, np.random.default_rng(seed), SimParams(), pool)
        m = out["mask"] > 0
        assert not (m & ~fg).any(), "a simulated defect outside the foreground"
        for key in ("rgb", "depth"):
            assert out[key].shape == (rgb if key == "rgb" else depth).shape
            assert out[key].min() >= 0 and out[key].max() <= 1
            changed = np.abs(out[key] - (rgb if key == "rgb" else depth)).max(axis=0) > 0
            assert not (changed & ~m).any(), f"{key} changed outside the mask"
            if not out["changed"][key]:
                assert not changed.any()
        kinds.add((out["changed"]["rgb"], out["changed"]["depth"]))
        if not (out["changed"]["rgb"] or out["changed"]["depth"]):
            assert not m.any()
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}
    a = simulate(rgb, depth, fg, np.random.default_rng(7), SimParams(), pool)
    b = simulate(rgb, depth, fg, np.random.default_rng(7), SimParams(), pool)
    assert np.array_equal(a["rgb"], b["rgb"]) and np.array_equal(a["mask"], b["mask"])


def test_depth_anomalies_leave_the_good_range():
    r = 32
    fg = np.ones((r, r), bool)
    depth = np.full((r, r, 1), 0.5, np.float32)
    tex = np.linspace(0, 1, r * r, dtype=np.float32).reshape(r, r, 1)
    mask = anomaly_mask(fg, np.random.default_rng(3))
    out, _ = blend(depth, mask, tex, np.random.default_rng(1), SimParams(p_scenario=(0.0, 1.0)), depth=True)
    assert np.allclose(out[mask], tex[mask])  # the opaque scenario pastes the texture
    assert ((out[mask] < 0.2) | (out[mask] > 0.8)).any()


def test_defect_strength_scales_the_change():
    """rgb_strength / depth_strength (k ~ U[lo, hi]) scale the simulated change; (1, 1) is the
    paper's full-strength blend, and the change stays inside the mask and in range."""
    rng0 = np.random.default_rng(2)
    r = 32
    fg = np.zeros((r, r), bool)
    fg[4:28, 4:28] = True
    rgb = rng0.random((3, r, r)).astype(np.float32)
    depth = np.where(fg, 0.6, LOW).astype(np.float32)[None]
    full = SimParams(p_modality=(0, 0, 0, 1))
    for seed in range(6):
        a = simulate(rgb, depth, fg, np.random.default_rng(seed), full)
        b = simulate(rgb, depth, fg, np.random.default_rng(seed), SimParams(p_modality=(0, 0, 0, 1),
                                                                             depth_strength=(0.1, 0.1)))
        assert np.array_equal(a["mask"], b["mask"]) and np.array_equal(a["rgb"], b["rgb"])
        assert np.allclose(b["depth"] - depth, 0.1 * (a["depth"] - depth), atol=1e-5)
        assert not (np.abs(b["depth"] - depth)[0] > 0)[b["mask"] == 0].any()
        c = simulate(rgb, depth, fg, np.random.default_rng(seed), SimParams(p_modality=(0, 0, 0, 1),
                                                                             rgb_strength=(0.25, 0.25)))
        assert np.array_equal(a["mask"], c["mask"])
        assert np.allclose(c["rgb"] - rgb, 0.25 * (a["rgb"] - rgb), atol=1e-5)
        assert c["rgb"].min() >= 0 and c["rgb"].max() <= 1


def test_blend_translucent_formula():
    rng = np.random.default_rng(5)
    img = rng.random((16, 16, 3)).astype(np.float32)
    tex = procedural_texture((16, 16), rng)
    mask = np.zeros((16, 16), bool)
    mask[4:10, 4:12] = True
    out, s = blend(img, mask, tex, np.random.default_rng(11), SimParams(p_scenario=(1.0, 1.0)))
    beta = np.random.default_rng(11).uniform(0.0, SimParams().max_opacity)
    assert s == 0
    expect = np.where(mask[..., None], (1 - beta) * tex + beta * img, img)
    assert np.allclose(out, expect, atol=1e-6)
    aug = augment(tex, rng)
    assert aug.shape == tex.shape and aug.min() >= 0 and aug.max() <= 1


def test_depth_preparation(synth_samples):
    s = synth_samples[0]
    d, fg = prepare_depth(s.xyz, 32, 0.002, 0.009)
    assert d.shape == (1, 32, 32) and fg.shape == (32, 32) and fg.dtype == bool
    assert 0 <= d.min() and d.max() <= 1
    assert 0.05 < fg.mean() < 0.8
    assert abs(np.median(d[0][~fg]) - LOW) < 0.05  # the table lies at 0.2
    assert np.median(d[0][fg]) > 0.5  # the part stands above it
    out = preprocess_frame(s.rgb, s.xyz, "rgb+3d", 32, {"fg_threshold_m": 0.002, "height_scale_m": 0.009})
    assert set(out) == {"rgb", "depth", "fg"} and out["rgb"].shape == (3, 32, 32)
    assert set(preprocess_frame(s.rgb, None, "rgb", 32, {})) == {"rgb"}


# --------------------------------------------------------------------------- Swin-Unet


def test_window_partition_roundtrip():
    x = torch.randn(2, 8, 12, 5)
    w = window_partition(x, 4, 8, 12)
    assert w.shape == (2 * 2 * 3, 16, 5)
    assert torch.equal(w[0].reshape(4, 4, 5), x[0, :4, :4])
    assert torch.equal(window_reverse(w, 4, 8, 12), x)


def test_shifted_window_mask_matches_wraparound():
    h = w = 8
    win, shift = 4, 2
    mask = shifted_window_mask(h, w, win, shift)
    assert mask.shape == (4, 16, 16)
    # independent rule: in the rolled map, token (y, x) came from the other border when
    # y >= h - shift (or x >= w - shift); two tokens may attend iff both flags agree
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    flags = np.stack([ys >= h - shift, xs >= w - shift], -1).astype(np.float32)
    fw = window_partition(torch.from_numpy(flags)[None], win, h, w).numpy()  # nW x N x 2
    same = (fw[:, :, None, :] == fw[:, None, :, :]).all(-1)
    assert np.array_equal(mask.numpy() == 0, same)


def test_shifted_block_sees_only_its_window():
    torch.manual_seed(0)
    blk = SwinBlock(4, (8, 8), heads=1, window=4, shift=2).eval()
    x = torch.randn(1, 64, 4, requires_grad=True)
    i = 0  # token (0, 0): rolled to (6, 6), the bottom-right shifted window, wrapped in both axes
    blk(x)[0, i].sum().backward()
    g = x.grad[0].abs().sum(-1)
    seen = (g > 1e-9 * g.max()).reshape(8, 8).numpy()  # masked logits get exp(-100), not exactly 0
    expect = np.zeros((8, 8), bool)
    expect[0:2, 0:2] = True  # only the tokens that wrapped with it in both axes
    assert np.array_equal(seen, expect)
    blk0 = SwinBlock(4, (8, 8), heads=1, window=4, shift=0).eval()
    x.grad = None
    blk0(x)[0, i].sum().backward()
    g0 = x.grad[0].abs().sum(-1)
    seen0 = (g0 > 1e-9 * g0.max()).reshape(8, 8).numpy()
    expect0 = np.zeros((8, 8), bool)
    expect0[:4, :4] = True
    assert np.array_equal(seen0, expect0)


def test_patch_merging_expanding_and_unet_shapes():
    x = torch.randn(2, 64, 6)
    m = PatchMerging((8, 8), 6)(x)
    assert m.shape == (2, 16, 12)
    e = PatchExpand((4, 4), 12)(m)
    assert e.shape == (2, 64, 6)
    net = SwinUnet(3, 32, patch=4, embed_dim=8, depths=(2, 2, 4, 2), heads=(1, 1, 2, 2), window=2, n_scales=3)
    outs = net.forward_scales(torch.rand(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 3, 3, 32, 32)
    assert [len(s) for s in net.encoder] == [2, 2, 4, 2]


def test_test_time_dropout_modes():
    torch.manual_seed(0)
    net = SwinUnet(1, 32, embed_dim=8, heads=(1, 1, 2, 2), window=2).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
        assert torch.equal(a, b)  # fixed masks: deterministic
        net.set_dropout_mode("random")
        c, d = net(x), net(x)
        assert not torch.equal(c, d)
        net.set_dropout_mode("off")
        assert not torch.equal(net(x), a)


# --------------------------------------------------------------------------- SSIM


def test_ssim_matches_independent_formula():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    x = rng.random((2, 2, 20, 24))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)

    def blur(a):
        return gaussian_filter(a, sigma=1.5, truncate=5 / 1.5, mode="nearest")

    expect = np.zeros((2, 20, 24))
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    for n in range(2):
        for c in range(2):
            a, b = x[n, c], y[n, c]
            ma, mb = blur(a), blur(b)
            va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
            expect[n] += ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)) / 2
    got = ssim_map(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    assert np.allclose(got, expect, atol=1e-6)
    same = ssim_map(torch.from_numpy(x), torch.from_numpy(x)).numpy()
    assert np.allclose(same, 1.0)


# --------------------------------------------------------------------------- model, training, export


def _tiny(modality="rgb+3d", **kw):
    return DBRNConfig(modality=modality, **{**TINY, **kw})


def _inputs(cfg, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = cfg.resolution
    return {"rgb": torch.rand(n, 3, r, r, generator=g), "depth": torch.rand(n, 1, r, r, generator=g),
            "fg": torch.ones(n, r, r)}


@pytest.mark.parametrize("modality", ["rgb", "3d", "rgb+3d"])
def test_forward_shapes_and_options(modality):
    m = methods.get("dbrn")
    cfg = _tiny(modality)
    model = m.build_model(cfg).eval()
    inp = _inputs(cfg, 2)
    with torch.no_grad():
        s, a = model(inp)
        assert s.shape == (2,) and a.shape == (2, 32, 32)
        assert 0 <= float(a.min()) and float(a.max()) <= 1
        m.apply_options(model, {"multiscale": "off"})
        s1, a1 = model(inp)
    assert not torch.equal(a1, a)
    assert (model.discriminator.ism is not None) == (modality == "rgb+3d")
    assert set(m.input_shapes(cfg)) == {"rgb+3d": {"rgb", "depth", "fg"}, "rgb": {"rgb"}, "3d": {"depth", "fg"}}[modality]
    with pytest.raises(ValueError):
        m.apply_options(model, {"multiscale": "maybe"})
    assert DBRNConfig.from_dict(cfg.to_dict()) == cfg


def test_meta_build_and_reload_identical():
    m = methods.get("dbrn")
    cfg = _tiny()
    torch.manual_seed(1)
    model = m.build_model(cfg).eval()
    sd = model.state_dict()
    with torch.device("meta"):
        clone = m.build_model(m.config_from_dict(cfg.to_dict()))
    clone.load_state_dict(sd, assign=True)
    clone.eval()
    assert not any(t.is_meta for t in clone.state_dict().values())
    inp = _inputs(cfg)
    with torch.no_grad():
        a, b = model(inp), clone(inp)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_losses_fall_on_a_tiny_category(synth_samples):
    from train.dbrn_trainer import Settings, fit, prepare_data

    cfg = _tiny()
    data = prepare_data(synth_samples, cfg)
    assert data.depth.shape == (4, 1, 32, 32) and 0.0015 <= data.preprocessing["fg_threshold_m"] <= 0.007
    torch.manual_seed(0)
    model = DBRNModel(cfg)
    hist = fit(model, data, Settings(epochs=8, batch_size=4, lr=3e-3, lr_ism=3e-2), progress=False)
    total = hist["epoch"]["total"]
    assert len(total) == 8 and set(hist["epoch"]) == {"rec_rgb", "rec_depth", "focal", "total"}
    assert np.mean(total[-2:]) < total[0]
    assert np.mean(hist["epoch"]["rec_rgb"][-2:]) < hist["epoch"]["rec_rgb"][0]


def test_checkpoint_resume_matches(synth_samples, tmp_path):
    from train.dbrn_trainer import Settings, fit, prepare_data

    cfg = _tiny("rgb")
    data = prepare_data(synth_samples[:2], cfg)
    ck = str(tmp_path / "ck.pt")
    torch.manual_seed(0)
    full = DBRNModel(cfg)
    fit(full, data, Settings(epochs=2, batch_size=2), progress=False)
    torch.manual_seed(0)
    part = DBRNModel(cfg)
    fit(part, data, Settings(epochs=2, batch_size=2, checkpoint_every=1, checkpoint_path=ck), progress=False,
        stop_after=1)
    torch.manual_seed(123)
    resumed = DBRNModel(cfg)
    h = fit(resumed, data, Settings(epochs=2, batch_size=2), progress=False, resume=ck)
    assert len(h["epoch"]["total"]) == 2
    for k, v in full.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-5), k


def test_onnx_export_of_parts_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = _tiny()
    torch.manual_seed(0)
    model = DBRNModel(cfg).eval()
    specs = dense_parts(cfg)
    assert [p.path for p in specs] == ["rec_rgb", "rec_depth", "discriminator"]
    tracer = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    g = torch.Generator().manual_seed(0)
    for spec in specs:
        part = getattr(model, spec.path)
        args = [torch.rand(*[3 if d == "N" else d for d in shape], generator=g) for _, shape in spec.inputs]
        path = tmp_path / f"{spec.stem}.onnx"
        names = [n for n, _ in spec.inputs]
        dyn = {n: {0: "N"} for n, s in spec.inputs if s[0] == "N"}
        if dyn:
            dyn[spec.output[0]] = {0: "N"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(part, tuple(args), str(path), opset_version=17, input_names=names,
                              output_names=[spec.output[0]], dynamic_axes=dyn or None, **tracer)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expect = part(*args).numpy()
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
        assert got.shape == expect.shape
        assert np.abs(got - expect).max() < 1e-4, spec.path
        if dyn:  # another batch size through the same graph
            args5 = [torch.rand(5, *a.shape[1:], generator=g) for a in args]
            with torch.no_grad():
                e5 = part(*args5).numpy()
            assert np.abs(sess.run(None, {n: a.numpy() for n, a in zip(names, args5)})[0] - e5).max() < 1e-4
        ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
        assert not ops & {"NonZero", "Loop", "If"}, ops


def test_trainer_flags():
    from train import dbrn_trainer

    p = argparse.ArgumentParser()
    dbrn_trainer.add_arguments(p.add_argument_group("dbrn"))
    a = p.parse_args(["--texture-source", "self", "--multiscale", "off"])
    assert a.texture_source == "self" and a.multiscale == "off" and a.p_same == 0.25
    cfg = dbrn_trainer.config_for("paper", "rgb")
    assert cfg.embed_dim == 96 and cfg.window == 7 and cfg.depths == (2, 2, 4, 2) and cfg.modality == "rgb"
    assert dbrn_trainer.settings_for("paper").lr_ism == pytest.approx(1e-3)
    cpu = dbrn_trainer.settings_for("cpu", 3, texture_source="self")
    assert cpu.epochs == 3 and cpu.texture_source == "self" and cpu.focal_alpha == (0.05, 0.95)
    assert cpu.sim["max_lattice_log2"] == 5 and dbrn_trainer.config_for("cpu", "rgb").score_pool == 1


def test_method_preprocessor_and_valid_mask(synth_samples):
    m = methods.get("dbrn")
    cfg = _tiny()
    man = {"config": cfg.to_dict(), "preprocessing": {"fg_threshold_m": 0.002, "height_scale_m": 0.009}}
    s = synth_samples[1]
    inp = m.preprocessor(man)(s.rgb, s.xyz)
    m.check_inputs(cfg, inp)
    valid = m.valid_mask(inp, (16, 16), man)
    assert valid.shape == (16, 16) and 0 < valid.mean() < 1
    assert m.needs_xyz(man) and m.modality(man) == "rgb+3d"
    rgb_man = {"config": _tiny("rgb").to_dict(), "preprocessing": {}}
    assert not m.needs_xyz(rgb_man)
    rgb_inp = m.preprocessor(rgb_man)(s.rgb, None)
    assert m.valid_mask(rgb_inp, (16, 16), rgb_man).all()
    names = [p.path for p in m.dense_parts(_tiny("3d"))]
    assert names == ["rec_depth", "discriminator"]


def test_results_script_diagnosis_and_report(tmp_path):
    """scripts/dbrn_results.py --diagnose helpers on a tiny untrained model, and the report's section."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "dbrn_results.py"
    spec = importlib.util.spec_from_file_location("dbrn_results_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = _tiny()
    torch.manual_seed(0)
    model = DBRNModel(cfg).eval()
    pp = {"fg_threshold_m": 0.002, "height_scale_m": 0.009}
    d = mod.diagnose(model, cfg, pp, "puck", size=64, n_good=2, n_defect=1)
    assert 0.0 <= d["simulated"]["i_auroc"] <= 1.0 and 0.0 <= d["simulated"]["prob_part"] <= 1.0
    assert {"good", "dent", "color"} <= set(d) and d["dent"]["branch"] == "depth" and d["color"]["branch"] == "rgb"
    assert d["dent"]["input_vs_clean"] > 0 and d["color"]["input_vs_clean"] > 0
    m = mod.defect_magnitudes("puck", pp, resolution=32, size=64, n_good=1, n_defect=1, n_sim=8)
    assert m["color"]["d_depth"] == 0.0 and m["dent"]["d_rgb"] == 0.0 and m["simulated"]["n"] > 0
    (tmp_path / "diag").mkdir()
    (tmp_path / "diag" / "puck.json").write_text(json.dumps(
        {"job": "puck:rgb+3d", "recipe": "cpu", "model": "m.pt", "epochs": 3, "diagnosis": d, "magnitudes": m}))
    text = "\n".join(mod.diagnosis_lines(tmp_path / "diag"))
    assert "### Diagnosis" in text and "--diagnose puck:rgb+3d=m.pt" in text and "| puck | simulated |" in text
    assert mod.diagnosis_lines(tmp_path / "none") == []


def test_smooth_depth_relief():
    from edge_runtime.methods.dbrn.simulate import smooth_relief

    r = 40
    fg = np.zeros((r, r), bool)
    fg[5:35, 5:35] = True
    depth = np.full((1, r, r), LOW, np.float32)
    depth[0][fg] = 0.6
    mask = np.zeros((r, r), bool)
    mask[10:24, 12:26] = True
    out = smooth_relief(depth.transpose(1, 2, 0), mask, np.random.default_rng(0), (0.05, 0.05))[..., 0]
    change = out - depth[0]
    assert not change[~mask].any() and abs(np.abs(change).max() - 0.05) < 1e-6
    assert np.abs(change[10, 12]) < np.abs(change[17, 19])  # zero-ish at the rim, largest inside
    sim = SimParams(p_modality=(0, 0, 1, 0), p_smooth_depth=1.0, smooth_depth_amp=(0.03, 0.1))
    seen = 0
    for seed in range(12):
        s = simulate(None, depth, fg, np.random.default_rng(seed), sim)
        if s["changed"]["depth"]:
            seen += 1
            d = np.abs(s["depth"] - depth)[0]
            assert s["scenario"]["depth"] == 3 and d.max() <= 0.1 + 1e-6 and not (d[s["mask"] == 0] > 0).any()
    assert seen > 6
    # off by default: the paper's blend, same draws as before the option existed
    assert SimParams().p_smooth_depth == 0.0
