"""edge-deploy: ONNX export + onnxruntime parity on a tiny bundle, parity maths, TensorRT refusal."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from deploy import cli
from deploy.parity import compare_results, pearson, spearman
from edge_runtime import methods
from edge_runtime.backends import Result, load_detector
from edge_runtime.backends.tensorrt_backend import trt_input_shapes
from edge_runtime.bundle import load_bundle, update_manifest
from tests.conftest import save_cfm_bundle
from edge_runtime.methods.cfm.model import CFMModel, cfm_config

TINY = dict(resolution=64, mapper_resolution=32, num_groups=32, group_size=16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny calibrated bundle after ``edge-deploy --target onnx``: (bundle, exit code, JSON)."""
    torch.manual_seed(0)
    bundle = save_cfm_bundle(tmp_path_factory.mktemp("deploy") / "b", CFMModel(cfm_config("tiny", **TINY)),
                         {"preprocessing": {"clean": True}})
    # thresholds in the scores' range so the decision check has both outcomes to agree on
    update_manifest(bundle, thresholds={"image": 2.0, "pixel": 1.5})
    out = bundle.parent / "deploy.json"
    code = cli.main(["--model", str(bundle), "--target", "onnx", "--check-frames", "2", "--json", str(out)])
    return bundle, code, json.loads(out.read_text())


def test_onnx_export_recorded_and_verified(exported):
    bundle, code, out = exported
    assert code == 0 and out["passed"]
    manifest = load_bundle(bundle).manifest  # verify=True: engine files are sha256-listed and intact
    entry = manifest["engines"]["onnx"]
    assert set(entry["parts"]) == {"backbone_2d", "backbone_3d.dense", "map_2d_to_3d", "map_3d_to_2d"}
    assert entry["opset"] >= 17
    for part in entry["parts"].values():
        assert part["file"] in manifest["files"] and (bundle / part["file"]).is_file()
        assert part["max_abs_diff_vs_torch"] < 1e-4
    # opset 17: LayerNorm stays one op (FP16-safe in TensorRT), in both transformers
    assert entry["parts"]["backbone_2d"]["ops"]["LayerNormalization"] >= 2
    assert entry["parts"]["backbone_3d.dense"]["ops"]["LayerNormalization"] >= 2
    assert entry["parts"]["map_2d_to_3d"]["inputs"] == {"x2d": ["N", 768]}
    assert entry["weights_sha256"] == manifest["files"]["model.safetensors"]["sha256"]


def test_onnx_parity_recorded(exported):
    bundle, _, out = exported
    parity = json.loads((bundle / "manifest.json").read_text())["engines"]["onnx"]["parity"]["onnxruntime-cpu"]
    assert parity["passed"] and parity["reference"] == "torch-cpu-fp32"
    for name in ("random", "synthetic"):
        s = parity["sets"][name]
        assert s["n_frames"] == 2 and s["amap_pearson"] > 0.9999 and s["amap_rel_max_abs_diff"] < 1e-3
        assert s["decisions"]["checked"] and s["decisions"]["mismatches"] == 0
    assert out["parity"]["onnxruntime-cpu"]["passed"]


def test_onnxruntime_backend_matches_torch(exported):
    bundle, _, _ = exported
    ort_det = load_detector(bundle, backend="onnxruntime")
    ref = load_detector(bundle, backend="torch")
    assert ort_det.name == "onnxruntime-cpu"
    rng = np.random.default_rng(3)
    v, u = np.mgrid[0:64, 0:64] / 64.0 - 0.5
    z = 0.5 - 0.02 * np.exp(-(u**2 + v**2) / 0.05)
    xyz = np.stack([u * 0.1, v * 0.1, z], -1).astype(np.float32)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    inputs = ref.preprocess(rgb, xyz)
    a, b = ref.infer(inputs), ort_det.infer(inputs)
    np.testing.assert_allclose(b.amap, a.amap, rtol=1e-4, atol=1e-5)
    assert set(b.timings_ms) >= {"2d", "group", "3d", "mappers"}
    batch = ort_det.infer_batch([inputs, inputs])  # static batch-1 parts run per item
    np.testing.assert_allclose(batch[1].amap, a.amap, rtol=1e-4, atol=1e-5)
    # auto on a CPU picks the parity-checked ONNX export
    auto = load_detector(bundle, backend="auto", device="cpu")
    assert auto.name == "onnxruntime-cpu" and auto.selection.chosen.backend == "onnxruntime"


def test_refusals(exported, capsys):
    bundle, _, _ = exported
    assert cli.main(["--model", str(bundle), "--target", "onnx", "--opset", "16"]) == cli.EXIT_REFUSED
    assert "LayerNorm" in capsys.readouterr().err
    assert cli.main(["--model", str(bundle), "--target", "onnx", "--precision", "fp16"]) == cli.EXIT_REFUSED
    assert cli.main(["--model", str(bundle.parent / "nope"), "--target", "onnx"]) == cli.EXIT_REFUSED
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present")
def test_tensorrt_target_says_what_is_missing(exported, capsys, tmp_path):
    bundle, _, _ = exported
    out = tmp_path / "trt.json"
    assert cli.main(["--model", str(bundle), "--target", "tensorrt", "--json", str(out)]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    missing = json.loads(out.read_text())["missing"]
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not installed" in err
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in err and any("CUDA" in m for m in missing)
    assert not any(k.startswith("tensorrt/") for k in json.loads((bundle / "manifest.json").read_text())["engines"])


def test_trt_profile_shapes():
    shapes = trt_input_shapes(methods.get("cfm"), cfm_config("tiny", **TINY))
    assert shapes["backbone_2d"] == {"rgb": [1, 3, 64, 64]}
    assert shapes["map_3d_to_2d"] == {"x3d": [[1, 512, 1024], 384]}


def _results(scores, maps):
    return [Result(score=s, amap=m) for s, m in zip(scores, maps)]


def test_parity_maths():
    rng = np.random.default_rng(0)
    maps = [rng.random((8, 8)).astype(np.float32) for _ in range(4)]
    scores = [float(m.max()) for m in maps]
    same = compare_results(_results(scores, maps), _results(scores, maps), "fp32", {"image": 0.5})
    assert same["passed"] and same["amap_max_abs_diff"] == 0.0 and same["decisions"]["mismatches"] == 0
    # a candidate that flips one decision at the threshold fails, and says so
    t = sorted(scores)[1] + 1e-6
    flipped = list(scores)
    i = int(np.argsort(scores)[1])
    flipped[i] = t + 1e-6
    bad = compare_results(_results(scores, maps), _results(flipped, maps), "fp32", {"image": t})
    assert not bad["passed"] and bad["decisions"]["mismatches"] == 1 and "decided differently" in bad["failures"][0]
    unc = compare_results(_results(scores, maps), _results(scores, maps), "fp32", None)
    assert not unc["decisions"]["checked"] and "uncalibrated" in unc["decisions"]["note"]
    noisy = compare_results(_results(scores, maps), _results(scores, [m + 0.01 for m in maps]), "fp32", None)
    assert not noisy["passed"] and any("amap_rel_max_abs_diff" in f for f in noisy["failures"])


def test_rank_statistics():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(np.sqrt(3) / 2)


def test_rerun_reuses_current_export(exported):
    from deploy.cli import deploy_onnx

    bundle, _, _ = exported
    before = json.loads((bundle / "manifest.json").read_text())["engines"]["onnx"]
    lines = []
    entry = deploy_onnx(bundle, 17, log=lines.append)
    assert "reusing" in lines[0] and entry["parts"] == before["parts"]
    assert "-opset17/" in entry["parts"]["backbone_2d"]["file"]
    load_bundle(bundle)  # still verifies: nothing listed was rewritten


class _FakeTensorRT:
    """Just enough of the TensorRT 10 builder API to run deploy.tensorrt_build's control
    flow without a GPU: records flags, pinned layers and profiles into the 'plan' bytes."""

    __version__ = "10.3.0"
    float32 = "float32"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class LayerType:
        NORMALIZATION, SOFTMAX, MATRIX_MULTIPLY = "norm", "softmax", "matmul"

    class BuilderFlag:
        FP16, OBEY_PRECISION_CONSTRAINTS = "fp16", "obey"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class _Layer:
        def __init__(self, kind):
            self.type, self.precision, self.num_outputs, self.out_types = kind, None, 1, {}

        def set_output_type(self, i, dtype):
            self.out_types[i] = dtype

    class _Network:
        def __init__(self):
            kinds = ("norm", "matmul", "softmax")
            self.layers = [_FakeTensorRT._Layer(k) for k in kinds]
            self.num_layers = len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class _Config:
        def __init__(self):
            self.flags, self.profiles, self.pool = [], [], None

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

    class _Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            return path.endswith(".onnx")

    class Builder:
        def __init__(self, logger):
            self.network = None

        def create_network(self, flags):
            self.network = _FakeTensorRT._Network()
            return self.network

        def create_builder_config(self):
            return _FakeTensorRT._Config()

        def create_optimization_profile(self):
            return _FakeTensorRT._Profile()

        def build_serialized_network(self, network, config):
            pinned = [layer.type for layer in network.layers if layer.precision == "float32"]
            return json.dumps({"flags": config.flags, "profiles": config.profiles, "pinned": pinned}).encode()


def test_tensorrt_build_flow_with_fake_api(exported, monkeypatch):
    """The engine build's control flow (FP16 + FP32 pins, mapper profile, files, entry) on a
    stand-in of the TensorRT API: the real TensorRT path cannot run here (no GPU)."""
    import sys

    from deploy.tensorrt_build import build_engines
    from edge_runtime.backends.engine_keys import EngineTarget

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT)
    bundle, _, _ = exported
    manifest = load_bundle(bundle).manifest
    cfg = cfm_config("tiny", **TINY)
    target = EngineTarget("NVIDIA GeForce RTX 4090", "8.9", "10.3.0", "fp16", trt_input_shapes(methods.get("cfm"), cfg))
    name, entry = build_engines(bundle, manifest["engines"]["onnx"], methods.get("cfm"), cfg, target)
    assert name == "tensorrt/" + entry["key"] and entry["tensorrt_version"] == "10.3.0"
    mapper = json.loads((bundle / entry["parts"]["map_2d_to_3d"]["file"]).read_bytes())
    assert mapper["flags"] == ["fp16", "obey"] and sorted(mapper["pinned"]) == ["norm", "softmax"]
    assert mapper["profiles"] == [{"x2d": [[1, 768], [512, 768], [1024, 768]]}]
    vit = json.loads((bundle / entry["parts"]["backbone_2d"]["file"]).read_bytes())
    assert vit["profiles"] == []  # static shapes need no profile
    assert entry["parts"]["backbone_2d"]["fp32_layers"] == 2
    assert f"/{entry['key']}/{manifest['files']['model.safetensors']['sha256'][:12]}/" in \
        entry["parts"]["backbone_2d"]["file"]
