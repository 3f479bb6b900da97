"""End-to-end pipeline runs on real sockets and processes (no-op model, 32-64 px frames).

Each run spawns the four stages (capture, preprocess, inference worker(s), alert) and
checks the loss accounting: every captured frame id gets exactly one decision record
(journal), captured = OK + NOT_OK + NOT_DECIDABLE + ERROR + DROPPED.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from edge_runtime.pipeline.journal import Journal
from edge_runtime.pipeline.runner import run_pipeline
from edge_runtime.pipeline.wire import Frame, encode
from pipeline_fixtures import ANY_PORT, noop_bundle, run_bounded, run_config, scaled

DECISIONS = ("OK", "NOT_OK", "NOT_DECIDABLE", "ERROR", "DROPPED")
pytestmark = pytest.mark.timeout(300)


def _journal(cfg) -> dict[int, dict]:
    """frame_id -> record of this run, checking ids are exactly 0..n-1."""
    with Journal(cfg.journal) as j:
        records = j.since(0, run_id=cfg.run_id, limit=10_000)
    by_id = {r["frame_id"]: r for r in records}
    assert len(by_id) == len(records) and sorted(by_id) == list(range(len(records)))
    return by_id


def _assert_accounted(summary: dict, captured: int) -> None:
    frames = summary["frames"]
    assert summary["error"] is None
    assert frames["captured"] == captured == frames["decided"] == sum(frames[d] for d in DECISIONS)
    assert summary["invariant"]["holds"] is True


def test_synth_run_decides_every_frame_and_publishes_alerts(tmp_path):
    # The subscriber connects once the alert stage has bound (port *), and capture starts
    # only after its subscription arrived (wait_subscribers): no slow-joiner loss, no race.
    cfg = run_config(tmp_path, frames=24, heatmaps=str(tmp_path / "heatmaps"), wait_subscribers=1)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, f"{cfg.station}.".encode())
    snapshots = []
    try:
        summary = run_bounded(cfg, on_stats=snapshots.append, on_ready=lambda info: sub.connect(
            info["endpoints"]["alerts"]))
        _assert_accounted(summary, 24)
        assert summary["frames"]["DROPPED"] == 0 and summary["frames"]["OK"] + summary["frames"]["NOT_OK"] == 24
        assert summary["stopped_by"] == "frame limit" and summary["calibrated"] is True
        assert summary["model"] == "cfm-noop-test" and len(summary["bundle_hash"]) == 64
        lat = summary["latency_ms"]
        assert set(lat["stage"]) == {"capture", "preprocess", "infer", "alert"}
        assert set(lat["queue_wait"]) == {"preprocess", "infer", "alert"}
        assert lat["e2e"]["n"] == 24 and lat["e2e"]["p50"] <= lat["e2e"]["p99"]
        assert lat["infer_steps"]["noop"]["n"] == 24
        assert summary["throughput_fps"] > 0 and summary["alerts"]["published"] >= 24
        assert snapshots and snapshots[-1]["frames"]["decided"] == 24
        records = _journal(cfg)
        assert len(records) == 24
        assert all(r["decision"] in ("OK", "NOT_OK") and r["model"] == "cfm-noop-test" for r in records.values())
        assert all({"capture", "preprocess", "infer", "e2e"} <= r["stages_ms"].keys() for r in records.values())
        for r in records.values():  # an overlay PNG per NOT_OK frame, none for OK
            assert (r["heatmap"] is not None) == (r["decision"] == "NOT_OK")
            assert r["heatmap"] is None or os.path.getsize(r["heatmap"]) > 0
        published = {}
        while len(published) < 24 and sub.poll(int(scaled(5) * 1000)):
            topic, payload = sub.recv_multipart()
            if not topic.endswith(b".HEARTBEAT"):
                rec = msgpack.unpackb(payload)
                published[rec["frame_id"]] = (topic.decode(), rec)
        assert sorted(published) == list(range(24))
        assert all(t == f"{cfg.station}.{r['decision']}" for t, r in published.values())
    finally:
        ctx.destroy(linger=0)


def test_directory_replay_over_tcp_with_two_batching_workers_is_lossless(tmp_path, mvtec_root):
    cfg = run_config(tmp_path, source=str(mvtec_root), link="tcp", workers=2, batch=2,
                     backend_options={"delay_ms": 40})
    summary = run_bounded(cfg)
    _assert_accounted(summary, 6)
    assert summary["frames"]["DROPPED"] == 0 and summary["stopped_by"] == "end of input"
    records = _journal(cfg)
    assert [records[i]["source"] for i in (0, 5)] == ["widget/test/dent/000", "widget/test/stain/001"]
    assert summary["latency_ms"]["stage"]["infer"]["n"] == 6


def test_live_source_drops_oldest_frames_under_overload_and_accounts_for_them(tmp_path):
    cfg = run_config(tmp_path, fps=100.0, frames=30, queue=2, backend_options={"delay_ms": 60})
    summary = run_bounded(cfg)
    _assert_accounted(summary, 30)
    dropped = summary["frames"]["DROPPED"]
    assert dropped >= 10  # 100 fps in, < 17 fps out
    assert summary["frames"]["OK"] + summary["frames"]["NOT_OK"] == 30 - dropped
    records = _journal(cfg)
    drops = [r for r in records.values() if r["decision"] == "DROPPED"]
    assert len(drops) == dropped
    assert all("dropped oldest frame" in r["reason"] for r in drops)
    assert records[29]["decision"] != "DROPPED"  # the newest frame is never the one dropped
    assert summary["latency_ms"]["e2e"]["n"] == 30 - dropped  # drops are not timed


def _send_ingress(endpoint: str, messages: list[list]) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(endpoint)
    for parts in messages:
        push.send_multipart(parts, copy=False)
    push.close()
    ctx.term()


def test_malformed_ingress_frames_get_a_status_and_the_pipeline_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    xyz = np.zeros((32, 32, 3), np.float32)
    xyz[4:28, 4:28] = [0.0, 0.0, 0.5]
    nan_xyz = xyz.copy()
    nan_xyz[5, 5, 2] = np.nan

    def msg(**arrays):
        return encode(Frame({"source": "cam"}, arrays))

    messages = [
        msg(rgb=rgb, xyz=xyz),
        [b"\x93not msgpack"],
        msg(rgb=rgb, xyz=xyz[:16]),
        msg(rgb=rgb, xyz=nan_xyz),
        msg(rgb=rgb, xyz=np.zeros_like(xyz)),
        msg(rgb=np.zeros((150, 150, 3), np.uint8)),  # 67.5 kB > the 50 kB frame limit
        msg(rgb=rgb.astype(np.float32), xyz=xyz),
        msg(rgb=rgb, xyz=xyz),
        msg(rgb=np.zeros((0, 0, 3), np.uint8)),  # issue 12.1: zero-size image
        encode(Frame({"k" * 3000: 1}, {"rgb": rgb})),  # issue 12.1: a 3000-character unknown key
        msg(rgb=np.zeros((4, 200, 3), np.uint8)),  # issue 12.2: aspect ratio 50 > the limit of 20
        msg(rgb=rgb, xyz=xyz),
    ]
    # long drain: a frame that fell between stages would surface only as "not decided before shutdown"
    cfg = run_config(tmp_path, source=f"zmq+{ANY_PORT}", frames=len(messages), queue=16, max_frame_bytes=50_000,
                     max_aspect=20.0, drain_timeout_s=scaled(60))
    senders = []

    def start_camera(info):
        senders.append(threading.Thread(target=_send_ingress, args=(info["endpoints"]["ingress"], messages)))
        senders[0].start()

    t0 = time.monotonic()
    summary = run_bounded(cfg, timeout_s=120, on_ready=start_camera)
    senders[0].join(scaled(10))
    _assert_accounted(summary, len(messages))
    assert time.monotonic() - t0 < scaled(50)  # promptly: nothing waited for the drain
    records = _journal(cfg)
    expected = [
        (("OK", "NOT_OK"), None),
        (("ERROR",), "not valid msgpack"),
        (("ERROR",), "xyz: 16x32 does not match rgb 32x32"),
        (("NOT_DECIDABLE",), "xyz has 1 points with NaN or Inf"),
        (("NOT_DECIDABLE",), "empty point cloud"),
        (("ERROR",), "over the 50000-byte limit"),
        (("ERROR",), "rgb: expected uint8"),
        (("OK", "NOT_OK"), None),
        (("ERROR",), "rgb: expected uint8 H x W x 3, got uint8 [0, 0, 3]"),
        (("ERROR",), "unknown header key 'kkkk"),
        (("ERROR",), "aspect ratio exceeds the limit of 20"),
        (("OK", "NOT_OK"), None),
    ]
    for fid, (decisions, reason) in enumerate(expected):
        assert records[fid]["decision"] in decisions, (fid, records[fid])
        assert reason is None or reason in records[fid]["reason"], (fid, records[fid]["reason"])
        assert "before shutdown" not in (records[fid]["reason"] or "")
    assert all(len(r["reason"] or "") <= 1000 for r in records.values())


def test_uncalibrated_bundle_makes_every_frame_not_decidable(tmp_path):
    cfg = run_config(tmp_path, bundle=noop_bundle(tmp_path / "uncal", thresholds=None), frames=5)
    summary = run_bounded(cfg)
    _assert_accounted(summary, 5)
    assert summary["frames"]["NOT_DECIDABLE"] == 5 and summary["calibrated"] is False
    assert summary["reasons"] == {"bundle not calibrated": 5}
    assert all(r["score"] is not None for r in _journal(cfg).values())  # scored, just not judged


def test_killed_worker_is_restarted_and_its_frame_reported(tmp_path):
    cfg = run_config(tmp_path, frames=8, backend_options={"delay_ms": 300})
    killed = []

    def kill_worker_once(snap):
        if not killed and snap["frames"]["decided"] >= 1:
            (worker,) = [p for p in multiprocessing.active_children() if p.name == "edge-infer0.0"]
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)

    summary = run_bounded(cfg, on_stats=kill_worker_once)
    assert killed
    _assert_accounted(summary, 8)
    assert summary["worker_restarts"] == 1
    records = _journal(cfg)
    died = [r for r in records.values() if r["decision"] == "ERROR"]
    assert 1 <= len(died) <= 2  # the frame in hand and the one queued behind it
    assert all("inference worker infer0.0 died (killed by signal 9)" in r["reason"] for r in died)
    assert summary["frames"]["OK"] + summary["frames"]["NOT_OK"] == 8 - len(died)  # the replacement took over


def test_drain_timeout_bounds_shutdown_and_records_stuck_frames(tmp_path):
    cfg = run_config(tmp_path, frames=3, queue=1, drain_timeout_s=0.5, backend_options={"delay_ms": 1500})
    t0 = time.monotonic()
    summary = run_bounded(cfg)
    assert time.monotonic() - t0 < 30
    _assert_accounted(summary, 3)
    stuck = [r for r in _journal(cfg).values() if "not decided before shutdown" in (r["reason"] or "")]
    assert stuck and all(r["decision"] == "ERROR" and "drain timeout of 0.5 s" in r["reason"] for r in stuck)


def test_a_stage_that_cannot_start_fails_the_run_with_its_reason(tmp_path):
    cfg = run_config(tmp_path, backend="no-such-backend", frames=3)
    t0 = time.monotonic()
    summary = run_bounded(cfg)
    assert time.monotonic() - t0 < 30
    assert "no-such-backend" in summary["error"] and "failed" in summary["error"]
    assert summary["frames"]["captured"] == 0 and summary["invariant"]["holds"] is True


@pytest.mark.parametrize("bad", [{"workers": 0}, {"queue": 0}])
def test_run_pipeline_rejects_bad_sizes(tmp_path, bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        run_pipeline(run_config(tmp_path, **bad))
