"""The pipeline's pure parts: stage functions, decisions, records, statistics, sources."""

from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest
import zmq

from edge_runtime.backends.detector import Result
from edge_runtime.backends.noop import load as load_noop
from edge_runtime.errors import DataError
from edge_runtime.pipeline import stages
from edge_runtime.pipeline.journal import validate_record
from edge_runtime.pipeline.sources import Captured, DirectorySource, IngressSource, SynthSource
from edge_runtime.pipeline.stats import (
    FrameLedger,
    RunStats,
    Window,
    format_live,
    format_summary,
    invariant,
    queue_wait_ms,
    stage_ms,
)
from edge_runtime.pipeline.wire import Frame, decode, encode, salvage_identity
from pipeline_fixtures import ANY_PORT, free_port

pytestmark = pytest.mark.timeout(60)

THRESHOLDS = {"image": 0.5, "pixel": 0.4}


def _part(h: int = 32, w: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    xyz = np.zeros((h, w, 3), np.float32)
    xyz[4:-4, 4:-4] = [0.01, 0.02, 0.5]
    return rgb, xyz


def _frame(rgb, xyz, frame_id: int = 3) -> Frame:
    cap = Captured(capture_ns=time.time_ns(), read_ns=time.time_ns(), rgb=rgb, xyz=xyz, source="test/1")
    return stages.capture_frame(cap, "st1", "run1", frame_id)


class ScriptedDetector:
    """Detector double: preprocess passes arrays through, infer returns scripted scores
    (or raises for a score given as an exception)."""

    name = "scripted"

    def __init__(self, scores, manifest=None, batch_fails=False, preprocess_error=None):
        self.scores = list(scores)
        self.manifest = manifest or {}
        self.batch_fails = batch_fails
        self.preprocess_error = preprocess_error
        self.batch_calls = 0

    def preprocess(self, rgb, xyz):
        if self.preprocess_error is not None:
            raise self.preprocess_error
        return {"rgb": rgb.astype(np.float32), "xyz": xyz}

    def infer(self, inputs):
        score = self.scores.pop(0)
        if isinstance(score, Exception):
            raise score
        amap = np.zeros((8, 8), np.float32)
        amap[2:4, 2:4] = score
        return Result(score=score, amap=amap, timings_ms={"model": 1.5})

    def infer_batch(self, batch):
        self.batch_calls += 1
        if self.batch_fails:
            raise RuntimeError("batch kernel failed")
        return [self.infer(x) for x in batch]


# ---- capture / preprocess -------------------------------------------------------------


def test_capture_frame_numbers_and_stamps_the_frame():
    rgb, xyz = _part()
    f = _frame(rgb, xyz, frame_id=11)
    h = f.header
    assert (h["station"], h["run_id"], h["frame_id"], h["image_shape"], h["status"]) == ("st1", "run1", 11, [32, 48], None)
    assert h["t"]["capture"][0] == h["capture_ns"] <= h["t"]["capture"][1]
    assert set(f.arrays) == {"rgb", "xyz"}
    failed = stages.capture_frame(Captured(1, 2, source="x.png", error="unreadable sample: x.png: truncated"), "s", "r", 0)
    assert failed.header["status"] == "ERROR" and "truncated" in failed.header["reason"] and not failed.arrays


@pytest.mark.parametrize("rgb, xyz, status, reason", [
    (np.zeros((8, 8, 3), np.float32), None, "ERROR", "rgb: expected uint8"),
    (np.zeros((8, 8), np.uint8), None, "ERROR", "rgb: expected uint8"),
    (np.zeros((8, 8, 3), np.uint8), np.ones((8, 4, 3), np.float32), "ERROR", "does not match rgb"),
    (np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.int32), "ERROR", "xyz: expected float32"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), np.nan, np.float32), "NOT_DECIDABLE", "64 points with NaN"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32), "NOT_DECIDABLE", "empty point cloud"),
])
def test_check_inputs_names_the_problem(rgb, xyz, status, reason):
    got = stages.check_inputs(rgb, xyz)
    assert got[0] == status and reason in got[1]


def test_check_inputs_accepts_good_and_rgb_only_frames():
    rgb, xyz = _part()
    xyz[0, 0] = [0.0, 0.0, 0.0]
    assert stages.check_inputs(rgb, xyz) is None
    assert stages.check_inputs(rgb, None) is None


def test_preprocess_frame_runs_the_detector_and_prefixes_its_inputs():
    rgb, xyz = _part()
    det = load_noop("unused-dir", resolution=16)
    f = stages.preprocess_frame(det, _frame(rgb, xyz), keep_rgb=True)
    assert f.header["status"] is None
    assert set(f.arrays) == {"in:rgb", "in:xyz", "rgb"}
    assert f.arrays["in:rgb"].shape == (16, 16, 3) and f.arrays["rgb"] is rgb
    assert f.header["t"]["preprocess"][0] <= f.header["t"]["preprocess"][1]
    assert set(stages.model_inputs(f)) == {"rgb", "xyz"}


@pytest.mark.parametrize("error, status, reason", [
    (DataError(None, "no points left after background removal"), "NOT_DECIDABLE",
     "preprocess: no points left after background removal"),
    (ZeroDivisionError("boom"), "ERROR", "preprocess failed: ZeroDivisionError: boom"),
])
def test_preprocess_failures_become_a_status_not_an_exception(error, status, reason):
    rgb, xyz = _part()
    f = stages.preprocess_frame(ScriptedDetector([], preprocess_error=error), _frame(rgb, xyz))
    assert (f.header["status"], f.header["reason"], f.arrays) == (status, reason, {})
    assert "preprocess" in f.header["t"]


def test_preprocess_flags_bad_inputs_before_calling_the_detector():
    rgb, _ = _part()
    f = stages.preprocess_frame(ScriptedDetector([], preprocess_error=AssertionError("must not run")),
                                _frame(rgb, np.zeros((32, 48, 3), np.float32)))
    assert (f.header["status"], f.header["reason"]) == ("NOT_DECIDABLE", "empty point cloud (no valid 3D point)")


# ---- infer / decide ---------------------------------------------------------------------


@pytest.mark.parametrize("score, thresholds, decision, reason", [
    (0.7, THRESHOLDS, "NOT_OK", None),
    (0.5, THRESHOLDS, "OK", None),  # anomalous iff score > threshold
    (0.1, THRESHOLDS, "OK", None),
    (0.9, None, "NOT_DECIDABLE", "bundle not calibrated"),
    (0.9, {"image": None}, "NOT_DECIDABLE", "bundle not calibrated"),
    (math.nan, THRESHOLDS, "ERROR", "non-finite score"),
])
def test_decide(score, thresholds, decision, reason):
    got = stages.decide(score, thresholds)
    assert got[0] == decision and (reason is None and got[1] is None or reason in got[1])


def _preprocessed(n: int, keep_rgb: bool = False):
    rgb, xyz = _part()
    det = ScriptedDetector([])
    return [stages.preprocess_frame(det, _frame(rgb, xyz, frame_id=i), keep_rgb) for i in range(n)]


def test_infer_frames_decides_and_locates_regions_for_not_ok_only():
    calls = []

    def regions(amap, threshold, shape, geometry):
        calls.append((amap.shape, threshold, shape, tuple(geometry)))
        return [{"x": 1, "y": 2, "w": 3, "h": 4, "area": 12, "max_score": float(amap.max())}]

    frames = _preprocessed(3, keep_rgb=True)
    out = stages.infer_frames(ScriptedDetector([0.9, 0.1, 0.6]), frames, THRESHOLDS, regions,
                              keep_map=True, worker="w0")
    assert [f.header["status"] for f in out] == ["NOT_OK", "OK", "NOT_OK"]
    assert calls == [((8, 8), 0.4, (32, 48), (32, 48, 0, 0))] * 2  # identity canvas: no geometry given
    assert out[0].header["regions"][0]["max_score"] == pytest.approx(0.9)
    assert "regions" not in out[1].header
    assert out[0].header["infer_ms"] == {"model": 1.5} and out[0].header["worker"] == "w0"
    assert out[0].header["threshold"] == 0.5 and out[1].header["score"] == pytest.approx(0.1)
    assert set(out[0].arrays) == {"amap", "rgb"} and out[1].arrays == {}  # overlay data for NOT_OK only
    plain = stages.infer_frames(ScriptedDetector([0.9]), _preprocessed(1), THRESHOLDS, regions, keep_map=True)
    assert plain[0].header["status"] == "NOT_OK" and plain[0].arrays == {}  # no rgb came: nothing to overlay
    stamps = [f.header["t"]["infer"] for f in out]
    assert stamps[0] == stamps[1] == stamps[2]  # one batch, one span


def test_infer_failures_cost_only_their_own_frame():
    det = ScriptedDetector([0.9, RuntimeError("CUDA error: out of memory"), 0.1], batch_fails=True)
    out = stages.infer_frames(det, _preprocessed(3), THRESHOLDS)
    assert det.batch_calls == 1
    assert [f.header["status"] for f in out] == ["NOT_OK", "ERROR", "OK"]
    assert out[1].header["reason"] == "inference failed: RuntimeError: CUDA error: out of memory"


def test_infer_passes_frames_that_already_failed_untouched():
    frames = _preprocessed(2)
    stages.fail(frames[0], "NOT_DECIDABLE", "empty point cloud (no valid 3D point)")
    out = stages.infer_frames(ScriptedDetector([0.9]), frames, None)
    assert out[0].header["reason"] == "empty point cloud (no valid 3D point)" and "infer" not in out[0].header["t"]
    assert (out[1].header["status"], out[1].header["reason"]) == ("NOT_DECIDABLE", "bundle not calibrated")


def test_records_meet_the_alert_contract():
    frames = stages.infer_frames(ScriptedDetector([0.9]), _preprocessed(1), THRESHOLDS,
                                 lambda a, t, s, g: [{"x": 0, "y": 0, "w": 2, "h": 2, "area": 4, "max_score": 0.9}])
    frame = frames[0]
    rec = stages.build_record(frame.header, "cfm-tiny", "abc123", time.time_ns())
    assert validate_record(rec) is rec
    assert rec["decision"] == "NOT_OK" and rec["frame_id"] == 0 and rec["source"] == "test/1"
    assert set(rec["stages_ms"]) == {"capture", "preprocess", "infer", "e2e"}
    assert rec["stages_ms"]["e2e"] >= rec["stages_ms"]["infer"] >= 0
    dropped = stages.drop_frame(_frame(*_part(), frame_id=5), 2)
    rec = validate_record(stages.build_record(dropped.header, "m", "h", time.time_ns()))
    assert rec["decision"] == "DROPPED" and "capture queue of 2 full" in rec["reason"]
    rec = validate_record(stages.shutdown_record("st1", "run1", 9, "m", "h", "not decided before shutdown"))
    assert (rec["decision"], rec["frame_id"], rec["score"]) == ("ERROR", 9, None)


# ---- statistics --------------------------------------------------------------------------


def test_window_percentiles_and_ring_buffer():
    w = Window(100)
    for v in range(1, 201):
        w.add(float(v))
    s = w.summary()
    assert s["n"] == 200 and s["max"] == 200 and s["p50"] == pytest.approx(150.5)  # last 100 kept
    assert Window(5).summary() == {"n": 0}


def test_stage_and_queue_times_from_stamps():
    ms = 1_000_000
    t = {"capture": [0, 2 * ms], "preprocess": [5 * ms, 9 * ms], "infer": [10 * ms, 30 * ms]}
    assert stage_ms(t) == {"capture": 2.0, "preprocess": 4.0, "infer": 20.0}
    assert queue_wait_ms(t) == {"preprocess": 3.0, "infer": 1.0}
    assert queue_wait_ms({"capture": [0, ms], "alert": [4 * ms, 5 * ms]}) == {"alert": 3.0}


def test_invariant_text():
    counts = {"OK": 5, "NOT_OK": 2, "NOT_DECIDABLE": 1, "ERROR": 1, "DROPPED": 1}
    assert invariant(10, counts) == {"holds": True, "equation":
                                     "captured 10 = OK 5 + NOT_OK 2 + NOT_DECIDABLE 1 + ERROR 1 + DROPPED 1"}
    assert invariant(11, counts)["holds"] is False and "11 !=" in invariant(11, counts)["equation"]
    assert invariant(None, counts)["holds"] is None


def _record(fid, decision, cap_ms, dec_ms, reason=None):
    return {"frame_id": fid, "decision": decision, "reason": reason, "capture_ns": int(cap_ms * 1e6),
            "decision_ns": int(dec_ms * 1e6)}


def test_run_stats_counts_times_and_skips_drops_and_warmup():
    st = RunStats(warmup=1)
    ms = 1_000_000
    st.add(_record(0, "OK", 0, 500), {"capture": [0, ms]}, None)  # warm-up: counted, not timed
    for i in range(1, 11):
        st.add(_record(i, "NOT_OK" if i % 2 else "OK", 100 * i, 100 * i + 40),
               {"capture": [100 * i * ms, (100 * i + 5) * ms], "infer": [(100 * i + 10) * ms, (100 * i + 30) * ms]},
               {"2d": 3.0})
    st.add(_record(11, "DROPPED", 1100, 1100, reason="overload"), {"capture": [0, ms]}, None)
    st.captured = 12
    snap = st.snapshot(time.time_ns())
    assert snap["frames"] == {"captured": 12, "decided": 12, "OK": 6, "NOT_OK": 5, "NOT_DECIDABLE": 0, "ERROR": 0,
                              "DROPPED": 1, "duplicates": 0}
    assert snap["invariant"]["holds"] is True
    assert snap["latency_ms"]["e2e"]["n"] == 10 and snap["latency_ms"]["e2e"]["p50"] == pytest.approx(40.0)
    assert snap["latency_ms"]["stage"]["infer"]["p50"] == pytest.approx(20.0)
    assert snap["latency_ms"]["queue_wait"]["infer"]["p50"] == pytest.approx(5.0)
    assert snap["latency_ms"]["infer_steps"]["2d"]["p50"] == pytest.approx(3.0)
    assert snap["throughput_fps"] == pytest.approx(10 / 0.94, rel=1e-3)  # frames 1..10 over 100 ms .. 1040 ms
    assert snap["reasons"] == {"overload": 1}
    assert "10 frames" not in format_live(snap, "m") and "DROP 1" in format_live(snap, "m")
    text = format_summary(snap)
    assert "[holds]" in text and "end-to-end" in text and "queue before infer" in text


def test_frame_ledger_tracks_gap_free_ids_compactly():
    led = FrameLedger()
    assert [led.add(i) for i in (0, 2, 5, 2, 1)] == [True, True, True, False, True]
    assert (led.count, led.low, led.above, led.count_upper()) == (4, 3, {5}, 6)
    assert led.missing(7) == [3, 4, 6]
    assert led.add(0) is False


# ---- sources -----------------------------------------------------------------------------


def test_directory_source_replays_the_test_split_in_order(mvtec_root):
    src = DirectorySource(mvtec_root)
    assert not src.live and len(src) == 6 and "6 test samples" in src.describe()
    got = []
    while src.due_in() is not None:
        got += src.read()
    assert [c.source for c in got] == ["widget/test/dent/000", "widget/test/dent/001", "widget/test/good/000",
                                       "widget/test/good/001", "widget/test/stain/000", "widget/test/stain/001"]
    assert all(c.error is None and c.rgb.shape == (64, 64, 3) and c.xyz.shape == (64, 64, 3) for c in got)


def test_directory_source_turns_an_unreadable_file_into_an_error_capture(mvtec_root):
    bad = mvtec_root / "widget/test/good/rgb/000.png"
    bad.write_bytes(bad.read_bytes()[:100])
    src = DirectorySource(mvtec_root, category="widget")
    caps = [c for _ in range(len(src)) for c in src.read()]
    (broken,) = [c for c in caps if c.error]
    assert broken.source == "widget/test/good/000" and "000.png" in broken.error and broken.rgb is None


def test_directory_source_errors_name_the_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DirectorySource(tmp_path / "nope")


def test_synth_source_is_live_only_with_a_frame_rate():
    on_demand = SynthSource("puck", size=32, fps=None)
    assert not on_demand.live and on_demand.due_in() == 0.0
    (cap,) = on_demand.read()
    assert cap.rgb.shape == (32, 32, 3) and cap.xyz.dtype == np.float32 and cap.source.startswith("synth:puck/")
    live = SynthSource("puck", size=32, fps=2)
    assert live.live and "live camera at 2 fps" in live.describe()
    live.read()
    assert 0.2 < live.due_in() <= 0.5  # next frame one period (500 ms) after the last


def test_ingress_source_decodes_camera_frames_and_reports_bad_ones():
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    src = IngressSource(ctx, endpoint, max_bytes=100_000)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(endpoint)
        rgb, xyz = _part()
        push.send_multipart(encode(Frame({"source": "cam/7"}, {"rgb": rgb, "xyz": xyz})), copy=False)
        push.send_multipart([b"not msgpack"])
        push.send_multipart(encode(Frame({}, {"depth": xyz})))
        push.send_multipart(encode(Frame({}, {"rgb": np.zeros((200, 200, 3), np.uint8)})))  # 120 kB > 100 kB
        push.send_multipart([msgpack.packb({"schema": 1, "frame_id": 4, "arrays": []})])
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 5 and time.monotonic() < deadline:
            if src.socket.poll(100):
                got += src.read()
        assert got[0].error is None and got[0].source == "cam/7"
        np.testing.assert_array_equal(got[0].xyz, xyz)
        assert [("bad ingress message" in (c.error or "")) for c in got] == [False, True, True, True, True]
        assert "not valid msgpack" in got[1].error
        assert "arrays must be 'rgb'" in got[2].error
        assert "over the 100000-byte limit" in got[3].error
        assert "unknown header key 'frame_id'" in got[4].error
    finally:
        src.close()
        ctx.destroy(linger=0)


def test_ingress_source_refuses_a_network_bind_without_allow_remote():
    from edge_runtime.pipeline.security import BindPolicyError

    ctx = zmq.Context()
    try:
        with pytest.raises(BindPolicyError, match="--allow-remote"):
            IngressSource(ctx, "tcp://0.0.0.0:5999", max_bytes=1000)
    finally:
        ctx.destroy(linger=0)


def test_prometheus_exporter_serves_the_latest_snapshot():
    import urllib.request

    from edge_runtime.pipeline.stats import PrometheusExporter

    st = RunStats()
    st.add(_record(0, "NOT_OK", 0, 30), {"capture": [0, 1_000_000]}, None)
    st.captured = 1
    port = free_port()
    exporter = PrometheusExporter(port, "st1")
    try:
        exporter.update(dict(st.snapshot(time.time_ns()), worker_restarts=2))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        exporter.close()
    assert 'edge_frames_total{decision="NOT_OK",station="st1"} 1.0' in text
    assert 'edge_worker_restarts_total{station="st1"} 2.0' in text
    assert 'edge_latency_ms{quantile="0.50",series="e2e",stage="all",station="st1"} 30.0' in text


def test_ingress_with_curve_keys_accepts_only_encrypted_senders(tmp_path):
    from edge_runtime.pipeline.security import apply_curve_client, generate_keys, load_keys

    public, _ = generate_keys(tmp_path / "keys")
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    src = IngressSource(ctx, endpoint, max_bytes=100_000, curve_keys=load_keys(tmp_path / "keys"))
    try:
        plain, secure = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
        for sock in (plain, secure):
            sock.setsockopt(zmq.LINGER, 0)
        apply_curve_client(secure, None, public)
        plain.connect(endpoint)
        secure.connect(endpoint)
        rgb, xyz = _part()
        try:  # the handshake fails, so this frame can never be delivered
            plain.send_multipart(encode(Frame({"source": "plain"}, {"rgb": rgb})), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        secure.send_multipart(encode(Frame({"source": "secure"}, {"rgb": rgb})))
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            if src.socket.poll(100):
                got += src.read()
        got += src.read() if src.socket.poll(300) else []  # the plain frame would be here by now
        assert [c.source for c in got] == ["secure"]
    finally:
        src.close()
        ctx.destroy(linger=0)


# ---- issue 8 / 12: geometry in the header, bounded reasons, limits, one NaN rule ----------------


def test_preprocess_puts_the_methods_geometry_in_the_header_and_regions_use_it():
    from edge_runtime.geometry import MapGeometry, regions_from_map

    rgb, xyz = _part(60, 100)
    prep = stages.Preprocessing(lambda r, x: {"rgb": r.astype(np.float32)}, MapGeometry.square_pad, True, "t")
    f = stages.preprocess_frame(prep, _frame(rgb, xyz))
    assert f.header["geometry"] == [100, 100, 20, 0]
    amap = np.zeros((20, 20), np.float32)
    amap[6:8, 10:12] = 2.0
    det = ScriptedDetector([0.9])
    det.infer = lambda inputs: Result(score=0.9, amap=amap)
    (out,) = stages.infer_frames(det, [f], THRESHOLDS, regions_from_map)
    assert [(r["x"], r["y"], r["w"], r["h"]) for r in out.header["regions"]] == [(50, 10, 10, 10)]
    assert decode(encode(out)).header["geometry"] == [100, 100, 20, 0]  # travels on the wire
    rgb_only = stages.preprocess_frame(prep, _frame(rgb, None))  # the method needs xyz
    assert rgb_only.header["status"] == "NOT_DECIDABLE" and "needs a point cloud" in rgb_only.header["reason"]


def test_reasons_are_bounded_so_an_error_frame_always_passes_the_wire():
    f = stages.fail(_frame(*_part()), "ERROR", "x" * 5000)
    assert len(f.header["reason"]) == stages.MAX_REASON and f.header["reason"].endswith("...")
    assert decode(encode(f)).header["reason"] == f.header["reason"]


def test_a_header_that_fails_validation_still_yields_its_frame_identity():
    f = _frame(*_part(), frame_id=41)
    parts = encode(Frame(dict(f.header, image_shape=[0, 0]), {}))  # zero-size image: invalid header
    with pytest.raises(DataError, match="image_shape"):
        decode(parts)
    ident = salvage_identity(parts)
    assert (ident["frame_id"], ident["run_id"], ident["source"]) == (41, "run1", "test/1")
    err = stages.error_frame(ident, "invalid frame inside the pipeline: " + "y" * 3000)
    rec = validate_record(stages.build_record(decode(encode(err)).header, "m", "h", time.time_ns()))
    assert rec["decision"] == "ERROR" and rec["frame_id"] == 41 and len(rec["reason"]) <= stages.MAX_REASON
    assert salvage_identity([b"\x93junk"]) is None
    assert salvage_identity(encode(Frame({"frame_id": -1, "run_id": "r", "station": "s", "capture_ns": 1}))) is None


def test_zero_size_rgb_from_a_camera_gets_no_invalid_image_shape():
    f = stages.capture_frame(Captured(1, 2, np.zeros((0, 0, 3), np.uint8), None, "cam"), "st1", "r", 0)
    assert f.header["image_shape"] is None
    f = decode(encode(f))  # passes the internal link
    out = stages.preprocess_frame(load_noop("unused-dir", resolution=8), f)
    assert out.header["status"] == "ERROR" and "rgb: expected uint8 H x W x 3" in out.header["reason"]


@pytest.mark.parametrize("shape, problem", [
    ((8, 180, 3), "aspect ratio"), ((10, 210, 3), "a side exceeds"), ((120, 120, 3), "pixels exceed"),
])
def test_image_limits_refuse_oversize_frames_before_preprocessing(shape, problem):
    from edge_runtime.data.io import ImageLimits

    limits = ImageLimits(max_side=200, max_pixels=10_000, max_aspect=20)
    status, reason = stages.check_inputs(np.zeros(shape, np.uint8), None, limits)
    assert status == "ERROR" and problem in reason
    assert stages.check_inputs(np.zeros((50, 100, 3), np.uint8), None, limits) is None


def test_file_readers_check_limits_from_the_header_before_decoding(tmp_path, monkeypatch):
    import cv2
    import tifffile

    from edge_runtime.data import io
    from edge_runtime.data.io import ImageLimits

    limits = ImageLimits(max_side=64, max_pixels=10**6, max_aspect=4)
    io.write_rgb(tmp_path / "a.png", np.zeros((20, 100, 3), np.uint8))
    io.write_xyz(tmp_path / "a.tiff", np.ones((100, 20, 3), np.float32))
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded an oversize PNG"))
    monkeypatch.setattr(tifffile, "imread", lambda *a, **k: pytest.fail("read an oversize TIFF"))
    with pytest.raises(DataError, match="a.png: image is 20x100.*exceeds the limit of 64"):
        io.read_rgb(tmp_path / "a.png", limits)
    with pytest.raises(DataError, match="a.tiff: image is 100x20"):
        io.read_xyz(tmp_path / "a.tiff", limits)
    assert io.read_tiff_shape(tmp_path / "a.tiff") == (100, 20, 3)


def test_directory_replay_needs_only_the_test_split_and_a_missing_partner_is_one_error(mvtec_root):
    import shutil

    shutil.rmtree(mvtec_root / "widget" / "train")
    shutil.rmtree(mvtec_root / "widget" / "validation")
    (mvtec_root / "widget/test/good/xyz/001.tiff").unlink()
    src = DirectorySource(mvtec_root)
    caps = [c for _ in range(len(src)) for c in src.read()]
    assert len(caps) == 6 and src.due_in() is None
    (broken,) = [c for c in caps if c.error]
    assert broken.source == "widget/test/good/001" and "missing xyz partner" in broken.error
    assert [c.source for c in caps][:4] == ["widget/test/dent/000", "widget/test/dent/001", "widget/test/good/000",
                                            "widget/test/good/001"]
    assert all(c.category == "widget" for c in caps)


def test_nan_xyz_is_one_rule_for_files_and_cameras(mvtec_root):
    from edge_runtime.data import io

    path = mvtec_root / "widget/test/good/xyz/000.tiff"
    xyz = io.read_xyz(path)
    xyz[3, 3] = np.nan
    io.write_xyz(path, xyz)
    src = DirectorySource(mvtec_root)
    caps = [c for _ in range(len(src)) for c in src.read()]
    (nan_cap,) = [c for c in caps if c.source == "widget/test/good/000"]
    assert nan_cap.error is None and np.isnan(nan_cap.xyz).any()  # read, not refused as unreadable
    from_file = stages.check_inputs(nan_cap.rgb, nan_cap.xyz)
    from_camera = stages.check_inputs(nan_cap.rgb, np.array(nan_cap.xyz))
    assert from_file == from_camera == ("NOT_DECIDABLE", "xyz has 1 points with NaN or Inf coordinates")


def test_synth_source_cycles_a_bounded_pool_of_prerendered_frames():
    src = SynthSource("puck", size=32, pool=3)
    keys = [src.read()[0].source for _ in range(7)]
    assert keys[:3] == keys[3:6] and len(set(keys[:3])) == 3 and "pool of 3" in src.describe()
    live = SynthSource("puck", size=32, pool=0)
    assert len({live.read()[0].source for _ in range(4)}) == 4 and "rendered live" in live.describe()


def test_ingress_refuses_frames_over_the_image_limits_by_their_header():
    from edge_runtime.data.io import ImageLimits

    ctx = zmq.Context()
    src = IngressSource(ctx, ANY_PORT, max_bytes=10**6, limits=ImageLimits(max_side=100, max_pixels=10**6,
                                                                            max_aspect=5))
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(src.bound)
        push.send_multipart(encode(Frame({}, {"rgb": np.zeros((10, 90, 3), np.uint8)})))
        push.send_multipart(encode(Frame({"source": "k" * 3000}, {"rgb": np.zeros((8, 8, 3), np.uint8)})))
        push.send_multipart(encode(Frame({"z" * 3000: 1}, {"rgb": np.zeros((8, 8, 3), np.uint8)})))
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            if src.socket.poll(100):
                got += src.read()
        assert "rgb: image is 10x90 (HxW): aspect ratio exceeds the limit of 5" in got[0].error
        assert "invalid value" in got[1].error
        assert "unknown header key 'zzz" in got[2].error and len(got[2].error) < 600  # key quoted, cut
    finally:
        src.close()
        ctx.destroy(linger=0)


def test_run_stats_count_decisions_against_the_known_truth_of_test_parts():
    from edge_runtime.pipeline.stats import part_truth

    assert part_truth("synth:puck/stream/good/000") == "good"
    assert part_truth("box/test/crack/004") == "defective"
    assert part_truth("camera-7") is None and part_truth(None) is None and part_truth("a/train/good/0") is None
    st = RunStats()
    sources = ["synth:puck/stream/good/000", "synth:puck/stream/dent/001", "synth:puck/stream/good/002",
               "synth:puck/stream/hole/003", "cam-1"]
    for i, (src, dec) in enumerate(zip(sources, ["OK", "NOT_OK", "NOT_OK", "OK", "OK"])):
        st.add({**_record(i, dec, 10 * i, 10 * i + 5), "source": src}, {}, None)
    snap = st.snapshot(10**9)
    assert snap["truth"]["good"]["OK"] == 1 and snap["truth"]["good"]["NOT_OK"] == 1
    assert snap["truth"]["defective"]["NOT_OK"] == 1 and snap["truth"]["defective"]["OK"] == 1
    text = format_summary(snap)
    assert "defects found 1/2 (50 %), good parts rejected 1/2 (50 %)" in text


def test_inference_workers_leave_one_core_to_the_other_stages():
    from edge_runtime.pipeline.loops import default_threads

    assert default_threads(1, cores=2) == 1  # 2 cores: the preprocess stage keeps one
    assert default_threads(1, cores=16) == 15 and default_threads(2, cores=16) == 7
    assert default_threads(4, cores=2) == 1 and default_threads(1, cores=1) == 1
