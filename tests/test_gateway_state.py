"""edge-alerts hardening (issue 12, items 6-7): durable position, bounded gap
bookkeeping, CURVE refusal, --retry and --station filtering. Real sockets: a real
AlertPublisher (or a raw XPUB where the test needs to lie), the real gateway main().
"""

import json
import os
import threading
import time
import tracemalloc

import msgpack
import pytest
import zmq

from edge_runtime.cli.alerts import main
from edge_runtime.line.ranges import IdRanges
from edge_runtime.line.track import RunTrack
from edge_runtime.pipeline import security
from test_edge_alerts import Station, record

F = float(os.environ.get("EDGE_TEST_TIME_FACTOR", "1"))  # scales every short timeout
pytestmark = pytest.mark.timeout(120 * F)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def gateway(capsys, *args):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, [json.loads(line) for line in captured.out.splitlines()], captured.err


def eps(st):
    return ("--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep)


def wait(event, what, seconds=20):
    assert event.wait(seconds * F), f"timed out waiting for {what}"


# -- pure bookkeeping ------------------------------------------------------------------


def test_id_ranges_merge_split_and_holes():
    r = IdRanges()
    for fid in (5, 7, 6, 1, 2, 10):
        r.add(fid)
    assert r.ranges() == [[1, 2], [5, 7], [10, 10]]
    assert 6 in r and 3 not in r and len(r) == 6
    assert r.holes(0, 11) == [(0, 0), (3, 4), (8, 9), (11, 11)]
    r.remove_range(6, 10)
    assert r.ranges() == [[1, 2], [5, 5]]
    r.add_range(0, 100)
    assert r.ranges() == [[0, 100]]


def test_a_huge_announcement_costs_one_range_not_millions_of_entries():
    tracemalloc.start()
    track = RunTrack(0, late_ok=False, max_gap=100_000)
    track.mark_done(0, 0.0, 0.1)
    dropped = track.announce(3_000_000, 0.0, 0.1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000  # bytes: a set of 3 M ints would take ~150 MB
    assert dropped == [(1, 2_900_000)]  # older than the newest max_gap ids: given up
    assert len(track.gaps) == 1 and track.n_missing() == 100_000
    track.mark_done(2_950_000, 0.0, 0.1)  # one arrives in the middle: the gap splits
    assert [(g.lo, g.hi) for g in track.gaps] == [(2_900_001, 2_949_999), (2_950_001, 3_000_000)]


# -- durable position --------------------------------------------------------------------


def test_restart_replays_exactly_the_missed_window_and_never_repeats(tmp_path, capsys):
    first_gone, more_published = threading.Event(), threading.Event()

    def script(st):
        st.wait_subscribed()
        for fid in range(10):
            st.pub.publish(record(fid))
            st.tick_for(0.002)
        while not first_gone.is_set():
            st.tick_for(0.02)
        for fid in range(10, 20):  # nobody listens: only the journal has these
            st.pub.publish(record(fid))
        more_published.set()

    state = tmp_path / "gw.json"
    with Station(tmp_path, script) as st:
        common = (*eps(st), "--station", "st1", "--state", state, "--gap-grace", "0.05")
        rc, lines, _ = gateway(capsys, *common, "--max-messages", 10, "--timeout", 20 * F)
        assert rc == 0 and [r["frame_id"] for r in lines] == list(range(10))
        saved = json.loads(state.read_text())
        assert saved["runs"]["run-a"]["done"] == [[0, 9]]
        first_gone.set()
        wait(more_published, "the station's frames 10..19")
        rc, lines, err = gateway(capsys, *common, "--max-messages", 10, "--timeout", 20 * F)
        assert rc == 0 and sorted(r["frame_id"] for r in lines) == list(range(10, 20))
        assert all(r["replayed"] for r in lines)
        rc, lines, err = gateway(capsys, *common, "--timeout", 1.0 * F)  # nothing new: nothing printed
        assert rc == 0 and [r for r in lines if "frame_id" in r] == [] and "0 decisions" in err
        # --from-frame is an explicit override of the saved position
        rc, lines, _ = gateway(capsys, *common, "--from-frame", 15, "--max-messages", 5, "--timeout", 20 * F)
        assert rc == 0 and sorted(r["frame_id"] for r in lines) == list(range(15, 20))
    assert json.loads(state.read_text())["runs"]["run-a"]["done"] == [[0, 19]]


def test_restart_catches_up_on_the_old_run_tail_and_a_run_begun_meanwhile(tmp_path, capsys):
    first_gone, more_published = threading.Event(), threading.Event()

    def script(st):
        st.wait_subscribed()
        for fid in range(5):
            st.pub.publish(record(fid))
            st.tick_for(0.002)
        while not first_gone.is_set():
            st.tick_for(0.02)
        for fid in (5, 6):
            st.pub.publish(record(fid))
        for fid in range(3):  # the station restarted: a new run, frame ids from 0
            st.pub.publish(record(fid, run_id="run-b"))
        more_published.set()

    state = tmp_path / "gw.json"
    with Station(tmp_path, script) as st:
        common = (*eps(st), "--state", state, "--gap-grace", "0.05", "--timeout", 20 * F)
        rc, lines, _ = gateway(capsys, *common, "--max-messages", 5)
        assert [r["frame_id"] for r in lines] == list(range(5))
        first_gone.set()
        wait(more_published, "the station's restart")
        rc, lines, _ = gateway(capsys, *common, "--max-messages", 5)
    got = sorted((r["run_id"], r["frame_id"]) for r in lines)
    assert rc == 0 and got == [("run-a", 5), ("run-a", 6), ("run-b", 0), ("run-b", 1), ("run-b", 2)]


def test_two_gateways_cannot_share_one_state_file(tmp_path, capsys):
    from edge_runtime.line.state import GatewayState

    holder = GatewayState(tmp_path / "gw.json")
    try:
        rc, _, err = gateway(capsys, "--endpoint", f"ipc://{tmp_path}/p", "--replay-endpoint",
                             f"ipc://{tmp_path}/r", "--state", tmp_path / "gw.json", "--timeout", 0.2)  # fmt: skip
    finally:
        holder.close()
    assert rc == 1 and "in use by another edge-alerts" in err


# -- bounded gaps, retry, station filter (raw publisher where the test must lie) ----------


class RawStation:
    """A bare XPUB the test scripts message by message."""

    def __init__(self, tmp_path):
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.linger = 0
        self.endpoint = f"ipc://{tmp_path}/raw.sock"
        self.pub.bind(self.endpoint)

    def wait_subscriber(self):
        assert self.pub.poll(int(20_000 * F)), "the gateway never subscribed"
        return self.pub.recv()

    def send(self, station, kind, payload):
        self.pub.send_multipart([f"{station}.{kind}".encode(), msgpack.packb(payload)])

    def close(self):
        self.pub.close()
        self.ctx.term()


def heartbeat(last, station="st1", run_id="run-a"):
    return {"schema": 1, "station": station, "run_id": run_id, "time_ns": time.time_ns(),
            "last_frame_id": last, "heartbeat_s": 0.1, "counts": {}}  # fmt: skip


def test_heartbeat_announcing_three_million_ids_is_capped_with_an_event(tmp_path, capsys):
    raw = RawStation(tmp_path)

    def station():
        raw.wait_subscriber()
        raw.send("st1", "OK", record(0))
        raw.send("st1", "HEARTBEAT", heartbeat(3_000_000))

    thread = threading.Thread(target=station, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        rc, lines, err = gateway(capsys, "--endpoint", raw.endpoint, "--replay-endpoint", f"ipc://{tmp_path}/r",
                                 "--max-gap", 1000, "--gap-grace", 5, "--timeout", 1.5 * F,
                                 "--state", tmp_path / "gw.json")  # fmt: skip
    finally:
        thread.join(5)
        raw.close()
    assert time.monotonic() - started < 30 * F
    events = [line for line in lines if line.get("event") == "gap_too_large"]
    assert len(events) == 1, lines
    ev = events[0]
    assert ev["run_id"] == "run-a" and ev["ranges"] == [[1, 2_999_000]] and ev["count"] == 2_999_000
    assert ev["max_gap"] == 1000 and "frame_ids" not in ev  # too many to list one by one
    assert "exceed --max-gap 1000" in err and "reject those parts" in err
    assert len((tmp_path / "gw.json").read_text()) < 1000  # the saved position is ranges too


def test_retry_asks_again_until_the_journal_has_the_frame(tmp_path, capsys):
    def script(st):
        st.wait_subscribed()
        for fid in (0, 1, 3):  # 2 is still "in inference": not journaled yet
            st.pub.publish(record(fid))
        st.tick_for(0.8 * F)  # the gateway asks, gets nothing, asks again every --retry
        st.pub.journal.append(record(2, decision="NOT_OK"))

    with Station(tmp_path, script) as st:
        rc, lines, err = gateway(capsys, *eps(st), "--gap-grace", 0.05, "--retry", 0.1, "--gap-timeout", 60,
                                 "--max-messages", 4, "--timeout", 30 * F)  # fmt: skip
    assert rc == 0 and sorted(r["frame_id"] for r in lines) == [0, 1, 2, 3]
    late = next(r for r in lines if r["frame_id"] == 2)
    assert late["replayed"] and late["decision"] == "NOT_OK"
    requests = int(err.rsplit(" replay requests", 1)[0].rsplit(" ", 1)[1])
    assert requests >= 3  # first ask + at least two retries during the 0.8 s


def test_station_filter_passes_only_that_station(tmp_path, capsys):
    raw = RawStation(tmp_path)

    def station():
        raw.wait_subscriber()
        time.sleep(0.1)
        raw.send("st2", "OK", record(0, station="st2"))
        raw.send("st10", "OK", record(0, station="st10"))  # "st1." must not match "st10."
        raw.send("st1", "OK", record(0))
        raw.send("st2", "HEARTBEAT", heartbeat(5, station="st2"))
        raw.send("st1", "NOT_OK", record(1, decision="NOT_OK"))

    thread = threading.Thread(target=station, daemon=True)
    thread.start()
    try:
        rc, lines, err = gateway(capsys, "--endpoint", raw.endpoint, "--replay-endpoint", f"ipc://{tmp_path}/r",
                                 "--station", "st1", "--heartbeat-timeout", 0.5 * F, "--timeout", 1.5 * F)
    finally:
        thread.join(5)
        raw.close()
    records = [r for r in lines if "frame_id" in r]
    assert [(r["station"], r["frame_id"]) for r in records] == [("st1", 0), ("st1", 1)]
    # st2's heartbeat is not st1's: the gateway still reports st1's vision as down
    assert [(e["event"], e["station"]) for e in lines if "event" in e] == [("heartbeat_lost", "st1")]


# -- security ------------------------------------------------------------------------------


def test_a_keyless_gateway_refuses_a_curve_station_with_the_reason(tmp_path, capsys):
    security.generate_keys(tmp_path / "station")
    with Station(tmp_path, lambda st: None, curve=tmp_path / "station") as st:
        started = time.monotonic()
        rc, lines, err = gateway(capsys, *eps(st), "--timeout", 20 * F)
    assert rc == 1 and time.monotonic() - started < 15 * F
    assert "configured with CURVE" in err and "--curve-server-key" in err


def test_a_plaintext_gateway_refuses_a_remote_station_unless_allowed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--endpoint", "tcp://192.0.2.10:5556", "--timeout", "0.1"])  # TEST-NET: never contacted
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no station authentication" in err and "--allow-plaintext" in err
