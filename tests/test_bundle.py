"""Model bundle: round trip, tamper detection, manifest updates, the torch backend's loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_runtime.backends.base import load_detector
from edge_runtime.bundle import (
    MANIFEST, WEIGHTS, build_model, bundle_hash, load_bundle, save_bundle, update_manifest,
)
from edge_runtime.errors import BackendUnavailable, BundleError, DataError
from edge_runtime.models.cfm import CFMModel, cfm_config
from tests.test_cfm import R, SMALL, scene

FIELDS = {"preprocessing": {"function": "edge_runtime.data.depth.cfm_preprocess", "resolution": R, "clean": True},
          "backbones": {"2d": "random-init", "3d": "random-init"},
          "training": {"category": "puck", "n_images": 0}}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this module with one torch thread (restored after): on the shared 2-core machine
    two threads oversubscribed by other jobs ran these tests 3-6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = CFMModel(cfm_config("tiny", **SMALL))
    return save_bundle(tmp_path / "bundle", model, FIELDS), model


def test_round_trip_same_outputs(saved):
    path, model = saved
    bundle = load_bundle(path)
    m = bundle.manifest
    assert m["schema_version"] == 1 and m["method"] == "cfm" and m["variant"] == "tiny"
    assert m["config"] == model.cfg.to_dict() and m["backbones"]["2d"] == "random-init"
    assert m["files"][WEIGHTS]["bytes"] == (path / WEIGHTS).stat().st_size
    assert m["thresholds"] is None and m["normalisation"] is None and m["engines"] == {}
    assert set(m["versions"]) >= {"torch", "numpy", "edge_runtime"} and m["created"]
    assert (path / WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    rebuilt = build_model(bundle)
    rgb, xyz = scene()
    with torch.inference_mode():
        a, b = model(rgb, xyz), rebuilt(rgb, xyz)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _flip_byte(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-100])


@pytest.mark.parametrize("tamper,message", [
    (lambda d: _flip_byte(d / WEIGHTS), "sha256"),
    (lambda d: _truncate(d / WEIGHTS), "size"),
    (lambda d: (d / WEIGHTS).unlink(), "missing"),
])
def test_tampered_weights_refused(saved, tamper, message):
    path, _ = saved
    tamper(path)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(path)
    assert WEIGHTS in str(err.value)
    with pytest.raises(BundleError):
        load_detector(path, backend="torch")


def test_edited_manifest_files_section_refused(saved):
    path, _ = saved
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][WEIGHTS]["sha256"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{WEIGHTS}.*sha256"):
        load_bundle(path)
    manifest["files"] = {}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="must list"):
        load_bundle(path)
    manifest["files"] = {"../outside.bin": {"sha256": "0" * 64, "bytes": 1}, WEIGHTS: {"sha256": "", "bytes": 0}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="inside the bundle"):
        load_bundle(path)


def test_missing_or_broken_manifest(tmp_path, saved):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    path, _ = saved
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=f"{MANIFEST}.*not valid JSON"):
        load_bundle(path)
    (path / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest"):
        load_bundle(path)


def test_update_manifest_and_hash(saved):
    path, _ = saved
    before = bundle_hash(path)
    m = update_manifest(path, thresholds={"score": 1.5}, normalisation={"mean": 0.1, "std": 0.2})
    assert m["thresholds"] == {"score": 1.5} and load_bundle(path).manifest["normalisation"]["std"] == 0.2
    assert bundle_hash(path) == before  # thresholds do not change the files section
    (path / "engines").mkdir()
    (path / "engines" / "mapper.onnx").write_bytes(b"engine bytes")
    m = update_manifest(path, files=["engines/mapper.onnx"], engines={"onnx": "engines/mapper.onnx"})
    assert m["files"]["engines/mapper.onnx"]["bytes"] == 12
    assert bundle_hash(path) != before
    load_bundle(path)  # consistent after the update
    (path / "engines" / "mapper.onnx").write_bytes(b"other bytes!")
    with pytest.raises(BundleError, match="mapper.onnx"):
        load_bundle(path)
    with pytest.raises(BundleError, match="mapper.onnx"):  # an update never blesses a tampered file
        update_manifest(path, thresholds=None)
    with pytest.raises(ValueError, match="cannot set"):
        update_manifest(path, config={})


def test_save_refuses_own_fields(tmp_path):
    with pytest.raises(ValueError, match="itself"):
        save_bundle(tmp_path / "b", CFMModel(cfm_config("tiny", **SMALL)), {**FIELDS, "files": {}})


def test_torch_backend_options(saved):
    path, model = saved
    det = load_detector(path, backend="torch", device="cpu", aggregation="2d", smoothing="box")
    assert det.name == "torch-cpu-fp32" and det.manifest["variant"] == "tiny"
    assert det.model.cfg.aggregation == "2d" and det.model.cfg.smoothing == "box"
    with pytest.raises(TypeError, match="unknown options"):
        load_detector(path, backend="torch", precsion="fp16")
    with pytest.raises(BackendUnavailable):
        load_detector(path, backend="torch", device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            load_detector(path, backend="torch", device="cuda")


def test_torch_backend_infer_matches_model(saved):
    path, model = saved
    det = load_detector(path, backend="torch")
    rgb, xyz = scene()
    batch = [{"rgb": rgb[i].numpy(), "xyz": xyz[i].numpy()} for i in range(2)]
    results = det.infer_batch(batch)
    with torch.inference_mode():
        scores, maps = model(rgb, xyz)
    for i, res in enumerate(results):
        assert res.score == pytest.approx(scores[i].item(), rel=1e-5)
        assert res.amap.dtype == np.float32 and res.amap.shape == (R, R)
        assert np.allclose(res.amap, maps[i].numpy(), atol=1e-5)
        assert {"2d", "group", "3d", "align", "mappers", "score"} <= set(res.timings_ms)
    single = det.infer(batch[1])
    assert single.score == pytest.approx(results[1].score, rel=1e-5)
    with pytest.raises(DataError, match="shape"):
        det.infer({"rgb": rgb[0].numpy()[:, :8], "xyz": xyz[0].numpy()})


def test_weights_that_do_not_fit_the_config(saved):
    path, _ = saved
    bundle = load_bundle(path)
    bundle.manifest["config"] = cfm_config("small", **SMALL).to_dict()  # 1152-d 3D features, 4 blocks
    with pytest.raises(BundleError, match="do not fit the config"):
        build_model(bundle)
    bundle.manifest["config"] = {"variant": "tiny", "colour": "blue"}
    with pytest.raises(BundleError, match="invalid config"):
        build_model(bundle)
