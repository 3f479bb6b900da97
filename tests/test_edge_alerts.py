"""edge-alerts, the reference gateway, against a real AlertPublisher over real sockets.

The station runs in a background thread (its own ZeroMQ context, as a separate
process would); the gateway runs ``main(argv)`` in the test's thread with
``--timeout`` so that no bug can hang the suite.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from edge_runtime.cli.alerts import main
from edge_runtime.pipeline import security
from edge_runtime.pipeline.alerts import AlertPublisher


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path, monkeypatch):
    """The gateway keeps its delivered position under $XDG_STATE_HOME: one per test."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def record(frame_id, run_id="run-a", decision="OK", station="st1"):
    return {
        "schema": 1, "station": station, "frame_id": frame_id, "run_id": run_id,
        "capture_ns": 1_000 + frame_id, "decision_ns": 2_000 + frame_id, "decision": decision,
        "reason": None, "score": 0.5, "threshold": 1.0, "model": "cfm-tiny", "bundle_hash": "abc",
        "stages_ms": {"infer": 3.5, "e2e": 9.0}, "regions": [], "heatmap": None,
    }  # fmt: skip


class Station(threading.Thread):
    """An AlertPublisher driven by ``script(pub, tick_for)`` in a thread; afterwards it
    keeps ticking (heartbeats, replay) until stopped, unless ``mute`` is set."""

    def __init__(self, tmp_path, script, heartbeat_s=0.1, curve=None, run_id="run-a"):
        super().__init__(daemon=True)
        self.pub_ep, self.replay_ep = f"ipc://{tmp_path}/pub.sock", f"ipc://{tmp_path}/replay.sock"
        self.args = (self.pub_ep, self.replay_ep, tmp_path / "journal.sqlite", "st1", heartbeat_s, curve)
        self.run_id, self.script = run_id, script
        self.halt, self.mute, self.ready = threading.Event(), threading.Event(), threading.Event()
        self.error = None

    def tick_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.halt.is_set():
            if not self.mute.is_set():
                self.pub.tick()
            time.sleep(0.005)

    def wait_subscribed(self, timeout=20.0):
        end = time.monotonic() + timeout
        while self.pub.counts["subscriptions"] < 1 and time.monotonic() < end:
            self.tick_for(0.01)

    def run(self):
        try:
            with AlertPublisher(*self.args, run_id=self.run_id) as self.pub:
                self.ready.set()
                self.script(self)
                while not self.halt.is_set():
                    self.tick_for(0.05)
        except Exception as exc:  # surfaced by stop()
            self.error = exc
            self.ready.set()

    def __enter__(self):
        self.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(5)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def run_gateway(capsys, *args):
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_gaps_are_recovered_by_replay_and_output_is_complete(tmp_path, capsys):
    skipped = {10, 11, 12, 13, 14, 20, 29}  # journaled, never sent live; 29 is a tail gap

    def script(st):
        st.wait_subscribed()
        for fid in range(30):
            if fid in skipped:
                st.pub.journal.append(record(fid))
                st.pub.last_frame_id = fid  # what publish() would have announced
            else:
                assert st.pub.publish(record(fid, decision="NOT_OK" if fid == 5 else "OK")) == "sent"
            st.tick_for(0.002)

    with Station(tmp_path, script) as st:
        rc, lines, err = run_gateway(
            capsys, "--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--station", "st1",
            "--gap-grace", "0.05", "--max-messages", "30", "--timeout", "20",
        )  # fmt: skip
    assert rc == 0
    assert [r["frame_id"] for r in sorted(lines, key=lambda r: r["frame_id"])] == list(range(30))
    assert {r["frame_id"] for r in lines if r["replayed"]} == skipped
    assert all(r["run_id"] == "run-a" and r["station"] == "st1" for r in lines)
    assert lines[[r["frame_id"] for r in lines].index(5)]["decision"] == "NOT_OK"
    assert "30 decisions (23 live, 7 replayed)" in err


def test_from_frame_replays_what_was_missed_and_deduplicates(tmp_path, capsys):
    early_done = threading.Event()

    def script(st):
        for fid in range(20):  # before any gateway exists: only the journal has these
            st.pub.publish(record(fid))
        early_done.set()
        st.wait_subscribed()
        st.tick_for(0.3)  # the gateway's replay is under way ...
        for fid in range(20, 25):  # ... and new frames come in live meanwhile
            st.pub.publish(record(fid))
            st.tick_for(0.01)
        st.pub.publish(record(24))  # a repeat is not even sent

    with Station(tmp_path, script) as st:
        assert early_done.wait(5)
        rc, lines, err = run_gateway(
            capsys, "--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--from-frame", "5",
            "--gap-grace", "0.05", "--max-messages", "20", "--timeout", "20",
        )  # fmt: skip
    ids = [r["frame_id"] for r in lines]
    assert rc == 0 and sorted(ids) == list(range(5, 25))  # every id once, none before 5
    assert all(r["replayed"] for r in lines if r["frame_id"] < 20)


def test_new_run_after_station_restart_is_followed_from_frame_zero(tmp_path, capsys):
    def script(st):
        st.wait_subscribed()
        for fid in range(3):
            st.pub.publish(record(fid))
        st.tick_for(0.2)
        st.pub.journal.append(record(0, run_id="run-b"))  # restart: its first frame is lost live
        for fid in (1, 2):
            st.pub.publish(record(fid, run_id="run-b"))

    with Station(tmp_path, script) as st:
        _, lines, _ = run_gateway(
            capsys, "--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep,
            "--gap-grace", "0.05", "--max-messages", "6", "--timeout", "20",
        )  # fmt: skip
    got = sorted((r["run_id"], r["frame_id"], r["replayed"]) for r in lines)
    assert got == [("run-a", 0, False), ("run-a", 1, False), ("run-a", 2, False),
                   ("run-b", 0, True), ("run-b", 1, False), ("run-b", 2, False)]  # fmt: skip


def test_a_frame_nobody_can_replay_is_declared_lost(tmp_path, capsys):
    def script(st):
        st.wait_subscribed()
        for fid in (0, 1, 3, 4):  # frame 2 is neither sent nor journaled
            st.pub.publish(record(fid))

    with Station(tmp_path, script) as st:
        rc, lines, err = run_gateway(
            capsys, "--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep,
            "--gap-grace", "0.05", "--gap-timeout", "0.3", "--timeout", "1.5",
        )  # fmt: skip
    events = [line for line in lines if "event" in line]
    assert sorted(r["frame_id"] for r in lines if "frame_id" in r) == [0, 1, 3, 4]
    assert [(e["event"], e["run_id"], e["frame_ids"]) for e in events] == [("gap_unrecovered", "run-a", [2])]
    assert "reject those parts" in err and "1 lost" in err


def test_heartbeat_loss_and_return_are_reported(tmp_path, capsys):
    def script(st):
        st.wait_subscribed()
        st.tick_for(0.4)
        st.mute.set()  # vision "dies": no more heartbeats
        st.tick_for(1.0)
        st.mute.clear()

    with Station(tmp_path, script, heartbeat_s=0.1) as st:
        out_file = tmp_path / "alerts.jsonl"
        rc = main(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--heartbeat-timeout", "0.5",
                   "--timeout", "2.2", "--json", str(out_file)])  # fmt: skip
    captured = capsys.readouterr()
    events = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rc == 0
    assert [e["event"] for e in events] == ["heartbeat_lost", "heartbeat_restored"]
    assert events[0]["station"] == "st1" and events[0]["silence_s"] >= 0.5
    assert "no heartbeat from station st1" in captured.err and "treat its parts as reject" in captured.err
    assert "EVENT heartbeat_lost" in captured.out  # readable lines on stdout when --json is a file


def test_no_station_at_all_is_a_lost_heartbeat(tmp_path, capsys):
    rc, lines, err = run_gateway(
        capsys, "--endpoint", f"ipc://{tmp_path}/nobody.sock", "--replay-endpoint", f"ipc://{tmp_path}/r.sock",
        "--station", "st9", "--heartbeat-timeout", "0.2", "--timeout", "0.6",
    )  # fmt: skip
    assert rc == 0
    assert [(e["event"], e["station"]) for e in lines] == [("heartbeat_lost", "st9")]
    assert "no heartbeat received at all" in err


def test_malformed_messages_are_reported_and_skipped(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/raw.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.bind(endpoint)

    def station():
        assert pub.poll(5000)  # the gateway's subscription
        pub.recv()
        pub.send_multipart([b"st1.OK", b"\xc1garbage"])
        pub.send_multipart([b"st1.OK", msgpack.packb({**record(0), "decision": "SOMEHOW"})])
        pub.send_multipart([b"st1.NOT_OK", msgpack.packb(record(1))])  # topic and record disagree
        pub.send_multipart([b"st1.OK", msgpack.packb(record(2))])

    thread = threading.Thread(target=station, daemon=True)
    thread.start()
    rc, lines, err = run_gateway(
        capsys, "--endpoint", endpoint, "--replay-endpoint", f"ipc://{tmp_path}/r.sock",
        "--max-messages", "1", "--timeout", "10",
    )  # fmt: skip
    thread.join(5)
    pub.close()
    ctx.term()
    assert rc == 0 and [r["frame_id"] for r in lines] == [2]
    assert "undecodable msgpack" in err and "'decision'" in err and "record is st1.OK" in err
    assert "3 malformed messages" in err


def test_curve_encrypted_alerts_reach_a_gateway_with_the_station_key(tmp_path, capsys):
    public, _ = security.generate_keys(tmp_path / "station")

    def script(st):
        st.wait_subscribed()
        for fid in range(3):
            st.pub.publish(record(fid))

    with Station(tmp_path, script, curve=tmp_path / "station") as st:
        rc, lines, _ = run_gateway(
            capsys, "--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep,
            "--curve-server-key", str(public), "--max-messages", "3", "--timeout", "10",
        )  # fmt: skip
    assert rc == 0 and [r["frame_id"] for r in lines] == [0, 1, 2]


def test_sigterm_stops_the_gateway_cleanly(tmp_path):
    with Station(tmp_path, lambda st: st.wait_subscribed()) as st:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli.alerts", "--endpoint", st.pub_ep,
             "--replay-endpoint", st.replay_ep, "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            end = time.monotonic() + 20
            while st.pub.counts["subscriptions"] < 1 and time.monotonic() < end:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0
    assert out == "" and "0 decisions" in err
