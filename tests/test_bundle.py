"""Model bundle: round trip, tamper detection, manifest updates, the torch backend's loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_runtime.backends import load_detector
from edge_runtime.bundle import (
    MANIFEST, WEIGHTS, build_model, bundle_hash, load_bundle, read_manifest, save_bundle, seal_of, update_manifest,
)
from edge_runtime.errors import BackendUnavailable, BundleError, DataError
from edge_runtime.methods.cfm.model import CFMModel, cfm_config
from tests.conftest import save_cfm_bundle
from tests.test_cfm import R, SMALL, scene

FIELDS = {"preprocessing": {"resolution": R, "clean": True},
          "extractors": {"2d": {"name": "dino-vitb8", "source": "random-init"},
                         "3d": {"name": "pointmae", "source": "random-init"}},
          "training": {"category": "puck", "n_images": 0}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = CFMModel(cfm_config("tiny", **SMALL))
    return save_cfm_bundle(tmp_path / "bundle", model, FIELDS), model


def test_round_trip_same_outputs(saved):
    path, model = saved
    bundle = load_bundle(path)
    m = bundle.manifest
    assert m["schema_version"] == 2 and m["method"] == "cfm" and m["variant"] == "tiny"
    assert m["modality"] == "rgb+3d" and m["seal"] == seal_of(m)
    assert m["config"] == model.cfg.to_dict() and m["extractors"]["2d"]["source"] == "random-init"
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


def _edit(path, change):
    """Edit the manifest by hand (as a user with a text editor would), keeping it valid JSON."""
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _reseal(manifest):
    manifest["seal"] = seal_of(manifest)


@pytest.mark.parametrize("change,message", [
    (lambda m: m["thresholds"].update(image=1e9), "seal mismatch"),  # every part OK: must be refused
    (lambda m: m["config"].update(aggregation="sum"), "seal mismatch"),
    (lambda m: m.update(normalisation={"image": {"good_std": 1.0}}), "seal mismatch"),
    (lambda m: m.pop("seal"), "no seal"),
    (lambda m: (m.update(schema_version=9), _reseal(m)), "schema_version 9"),
    (lambda m: (m.update(method="magic"), _reseal(m)), "method 'magic'"),
    (lambda m: (m["files"][WEIGHTS].update(sha256="0" * 64), _reseal(m)), f"{WEIGHTS}.*sha256"),
    (lambda m: (m.update(files={}), _reseal(m)), "must list"),
    (lambda m: (m["files"].update({"../outside.bin": {"sha256": "0" * 64, "bytes": 1}}), _reseal(m)),
     "inside the bundle"),
    (lambda m: (m["files"].update({"/etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), _reseal(m)),
     "inside the bundle"),
    (lambda m: (m.update(engines={"onnx": {"parts": {"p": {"file": "../outside/x.onnx"}}}}), _reseal(m)),
     "engine file '../outside/x.onnx' must be a path inside"),
    (lambda m: (m.update(engines={"onnx": {"parts": {"p": {"file": "engines/x.onnx"}}}}), _reseal(m)),
     "not listed"),
    (lambda m: (m.update(config=[1]), _reseal(m)), "config must be"),
    (lambda m: (m.pop("files"), _reseal(m)), "lacks"),
])
def test_bundle_refusals(saved, change, message):
    path, _ = saved
    update_manifest(path, thresholds={"image": 1.0, "pixel": 1.0})
    _edit(path, change)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(path)
    assert str(path) in str(err.value)


def test_version_1_bundles_are_still_read(saved):
    path, model = saved
    def to_v1(m):
        for key in ("seal", "modality", "extractors"):
            m.pop(key)
        m.update(schema_version=1, backbones={"2d": "random-init", "3d": "random-init"})
    _edit(path, to_v1)
    m = read_manifest(path)
    assert m["modality"] == "rgb+3d" and m["extractors"]["2d"] == {"name": "random-init"}
    assert len(bundle_hash(path)) == 64
    det = load_detector(path, backend="torch")
    rgb, xyz = scene()
    with torch.inference_mode():
        assert det.infer({"rgb": rgb[0].numpy(), "xyz": xyz[0].numpy()}).score == pytest.approx(
            model(rgb[:1], xyz[:1])[0].item(), rel=1e-5)
    update_manifest(path, thresholds={"image": 2.0})  # a tool rewrites it as a sealed version 2
    assert read_manifest(path)["schema_version"] == 2


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
    after_calibration = bundle_hash(path)
    assert after_calibration != before  # the hash covers every field that changes a decision
    assert after_calibration == m["seal"]
    (path / "engines").mkdir()
    (path / "engines" / "mapper.onnx").write_bytes(b"engine bytes")
    m = update_manifest(path, files=["engines/mapper.onnx"], engines={"onnx": {"file": "engines/mapper.onnx"}})
    assert m["files"]["engines/mapper.onnx"]["bytes"] == 12
    assert bundle_hash(path) not in (before, after_calibration)
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
        save_cfm_bundle(tmp_path / "b", CFMModel(cfm_config("tiny", **SMALL)), {**FIELDS, "files": {}})
    with pytest.raises(ValueError, match="itself"):
        save_cfm_bundle(tmp_path / "b", CFMModel(cfm_config("tiny", **SMALL)), {**FIELDS, "seal": "x"})


def test_torch_backend_options(saved):
    path, model = saved
    det = load_detector(path, backend="torch", device="cpu", aggregation="2d", smoothing="box")
    assert det.name == "torch-cpu-fp32" and det.manifest["variant"] == "tiny"
    assert det.model.cfg.aggregation == "2d" and det.model.cfg.smoothing == "box"
    with pytest.raises(ValueError, match="unknown option 'precsion'"):
        load_detector(path, backend="torch", precsion="fp16")
    with pytest.raises(ValueError, match="aggregation='mean' must be one of"):
        load_detector(path, backend="torch", aggregation="mean")
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
