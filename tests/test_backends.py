"""Backends: noop detector, auto selection, engine keys, clear failures without TensorRT."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from edge_runtime import methods
from edge_runtime.backends import select
from edge_runtime.backends import load_detector
from edge_runtime.backends.engine_keys import (
    ENGINE_PREFIX,
    EngineTarget,
    engine_key,
    find_engine,
    part_specs,
    target_key,
)
from edge_runtime.bundle import update_manifest
from tests.conftest import save_cfm_bundle
from edge_runtime.errors import BackendUnavailable, DataError
from edge_runtime.methods.cfm.model import CFMModel, cfm_config

TINY = dict(resolution=64, mapper_resolution=32, num_groups=32, group_size=16)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny CFM bundle (random weights), no exports."""
    torch.manual_seed(0)
    model = CFMModel(cfm_config("tiny", **TINY))
    return save_cfm_bundle(tmp_path_factory.mktemp("bundle") / "b", model, {"preprocessing": {"clean": True}})


# ----------------------------------------------------------------------------- noop


def test_noop_without_bundle(tmp_path):
    det = load_detector(tmp_path / "missing", backend="noop", resolution=32)
    rgb = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    xyz = np.random.default_rng(1).random((100, 80, 3), dtype=np.float32)
    inputs = det.preprocess(rgb, xyz)
    assert inputs["rgb"].shape == (32, 32, 3) and inputs["rgb"].dtype == np.float32
    assert inputs["xyz"].shape == (32, 32, 3) and 0 <= inputs["rgb"].min() <= inputs["rgb"].max() <= 1
    res = det.infer(inputs)
    assert res.amap.shape == (32, 32) and not res.amap.any()
    assert res.score == pytest.approx(float(np.std(inputs["rgb"])))
    assert det.manifest == {} and det.name == "noop"
    assert det.preprocess(rgb, None)["xyz"].shape == (32, 32, 3)
    assert len(det.infer_batch([inputs, inputs])) == 2


def test_noop_options_and_errors(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"resolution": 48, "thresholds": {"image": 0.1}}))
    det = load_detector(tmp_path, backend="noop", delay_ms=20)
    assert det.resolution == 48 and det.manifest["thresholds"]["image"] == 0.1
    res = det.infer(det.preprocess(np.zeros((10, 10, 3), np.uint8), None))
    assert res.timings_ms["noop"] >= 20.0  # the simulated model cost is real sleep
    with pytest.raises(DataError, match="rgb"):
        det.preprocess(np.zeros((10, 10), np.uint8), None)
    with pytest.raises(DataError, match="xyz"):
        det.preprocess(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5, 3), np.float32))
    with pytest.raises(TypeError, match="unknown options"):
        load_detector(tmp_path, backend="noop", delay=3)


# ----------------------------------------------------------------------------- engine keys


def _target(**changes) -> EngineTarget:
    fields = dict(gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9", tensorrt_version="10.3.0",
                  precision="fp16", input_shapes={"map_2d_to_3d": {"x2d": [[1, 2048, 4096], 768]}})
    fields.update(changes)
    return EngineTarget(**fields)


def test_engine_key_is_stable_and_safe():
    t = _target()
    key = target_key(t)
    assert key == engine_key(t.gpu_name, t.compute_capability, t.tensorrt_version, t.precision, t.input_shapes)
    assert key.startswith("nvidia-geforce-rtx-4090_sm89_trt10.3.0_fp16_")
    assert all(c.isalnum() or c in "-_." for c in key)
    assert target_key(_target(input_shapes={"x": [1]})) != key  # shapes are part of the key


def test_find_engine_matches_and_explains_mismatch():
    built = _target()
    key = target_key(built)
    engines = {"onnx": {"format": "onnx"}, ENGINE_PREFIX + key: {**built.as_dict(), "key": key}}
    entry, reasons = find_engine(engines, built)
    assert entry is not None and reasons == []
    # the bundle moved to another GPU with another TensorRT: rebuild, with both reasons
    moved = _target(gpu_name="NVIDIA A100-SXM4-40GB", compute_capability="8.0", tensorrt_version="10.5.0")
    entry, reasons = find_engine(engines, moved)
    assert entry is None and len(reasons) == 1
    assert "RTX 4090" in reasons[0] and "A100" in reasons[0] and "TensorRT 10.3.0" in reasons[0]
    assert "10.5.0" in reasons[0]
    entry, reasons = find_engine(engines, _target(precision="fp32"))
    assert entry is None and "fp16" in reasons[0]
    assert find_engine({}, built) == (None, ["no TensorRT engine cached in this bundle"])
    # an entry filed under a key that disagrees with its fields does not count
    forged = {ENGINE_PREFIX + "other": {**built.as_dict(), "key": "other"}}
    assert find_engine(forged, built)[0] is None


def test_part_specs_static_and_dynamic():
    specs = part_specs(methods.get("cfm"), cfm_config("tiny", **TINY))
    assert specs["backbone_2d"]["inputs"] == [("rgb", [1, 3, 64, 64])]
    assert specs["backbone_3d.dense"]["inputs"][0] == ("neighborhood", [1, 32, 16, 3])
    assert specs["map_2d_to_3d"]["inputs"] == [("x2d", ["N", 768])] and not specs["map_2d_to_3d"]["batch_one"]


# ----------------------------------------------------------------------------- failures


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_says_what_is_missing(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        load_detector(tiny_bundle, backend="tensorrt", device="cuda")


def test_onnx_backend_without_export(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="no ONNX export.*edge-deploy"):
        load_detector(tiny_bundle, backend="onnxruntime")


# ----------------------------------------------------------------------------- auto selection


def _set_engines(bundle, engines):
    update_manifest(bundle, engines=engines)


def test_auto_without_gpu_picks_cpu_backend_with_reasons(tiny_bundle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _set_engines(tiny_bundle, {})
    det = load_detector(tiny_bundle, backend="auto", device="auto")
    assert det.name == "torch-cpu-fp32"
    why = dict(det.selection.rejected)
    assert why["tensorrt cuda fp16"] == "no CUDA GPU visible to torch"
    assert why["torch cuda fp16"] == "no CUDA GPU visible to torch"
    assert "no ONNX export" in why["onnxruntime cpu fp32"]
    assert "torch cpu fp32" in det.selection.explain()


def test_auto_rejects_stale_or_failed_onnx(tiny_bundle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    weights = json.loads((tiny_bundle / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]
    _set_engines(tiny_bundle, {"onnx": {"weights_sha256": "0" * 64, "parity": {"onnxruntime-cpu": {"passed": True}}}})
    usable, rejected = select.candidates(tiny_bundle, "cpu")
    assert [c.label for c in usable] == ["torch cpu fp32"] and "stale" in dict(rejected)["onnxruntime cpu fp32"]
    _set_engines(tiny_bundle, {"onnx": {"weights_sha256": weights, "parity": {"onnxruntime-cpu": {"passed": False}}}})
    usable, rejected = select.candidates(tiny_bundle, "cpu")
    assert "parity check failed" in dict(rejected)["onnxruntime cpu fp32"]
    _set_engines(tiny_bundle, {"onnx": {"weights_sha256": weights, "parity": {"onnxruntime-cpu": {"passed": True}}}})
    usable, _ = select.candidates(tiny_bundle, "cpu")
    assert [c.label for c in usable] == ["onnxruntime cpu fp32", "torch cpu fp32"]
    # device "cpu" never considers GPU backends
    assert all("excludes" in why for label, why in select.candidates(tiny_bundle, "cpu")[1] if "cuda" in label)
    _set_engines(tiny_bundle, {})


def test_auto_order_with_gpu_but_no_tensorrt(tiny_bundle, monkeypatch):
    """A GPU without TensorRT (and without an engine) -> torch CUDA FP16 first, reasons given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(select.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt" else real(name, *a))
    usable, rejected = select.candidates(tiny_bundle, "auto")
    assert usable[0].label == "torch cuda fp16"
    assert dict(rejected)["tensorrt cuda fp16"] == "TensorRT is not installed"
    _set_engines(tiny_bundle, {"torch-cuda-fp16": {"parity": {"torch-cuda-fp16": {"passed": False}}}})
    usable, rejected = select.candidates(tiny_bundle, "cuda")
    assert "parity check failed" in dict(rejected)["torch cuda fp16"]
    assert [c.label for c in usable] == []  # cuda only, ORT has no export here
    _set_engines(tiny_bundle, {})


def test_torch_backend_fuses_the_extractor_only_when_asked(tmp_path):
    from tests.test_cfm import R, scene

    torch.manual_seed(0)
    model = CFMModel(cfm_config("tiny", resolution=R, extractor_2d="efficientnet-lite0", extractor_3d="fpfh",
                                fpfh_stride=2))
    bundle = save_cfm_bundle(tmp_path / "lite", model, {"preprocessing": {"clean": True}})
    fused = load_detector(bundle, backend="torch", device="cpu")
    plain = load_detector(bundle, backend="torch", device="cpu", fuse=False)
    bn = lambda det: sum(isinstance(m, torch.nn.BatchNorm2d) for m in det.model.modules())  # noqa: E731
    assert bn(fused) == 0 and bn(plain) > 0
    rgb, xyz = scene(1)
    inputs = {"rgb": rgb[0].numpy(), "xyz": xyz[0].numpy()}
    a, b = fused.infer(inputs), plain.infer(inputs)
    assert a.score == pytest.approx(b.score, rel=1e-4)
    assert np.allclose(a.amap, b.amap, rtol=1e-4, atol=1e-5)


def test_retain_freed_memory_is_switchable(monkeypatch):
    from edge_runtime import hostmem

    monkeypatch.setattr(hostmem, "_state", {})
    monkeypatch.setenv(hostmem.ENV_SWITCH, "0")
    assert hostmem.retain_freed_memory() is False
    monkeypatch.setattr(hostmem, "_state", {})
    monkeypatch.delenv(hostmem.ENV_SWITCH)
    on = hostmem.retain_freed_memory()
    import sys as _sys
    import ctypes.util as _cu
    glibc = _sys.platform.startswith("linux") and "libc.so" in (_cu.find_library("c") or "")
    assert on is glibc
    assert hostmem.retain_freed_memory() is on  # once per process
