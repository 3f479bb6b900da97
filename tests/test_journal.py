"""Decision journal: idempotent appends, queries, bounds, clear errors."""

import sqlite3
import time

import pytest

from edge_runtime.errors import DataError
from edge_runtime.pipeline.journal import Journal, validate_record


def record(frame_id, run_id="run-a", decision="OK", **extra):
    rec = {
        "schema": 1, "station": "st1", "frame_id": frame_id, "run_id": run_id,
        "capture_ns": 1_000 + frame_id, "decision_ns": 2_000 + frame_id, "decision": decision,
        "reason": None, "score": 0.5, "threshold": 1.0, "model": "cfm-tiny", "bundle_hash": "abc",
        "stages_ms": {"infer": 3.5, "e2e": 9.0}, "regions": [], "heatmap": None,
    }  # fmt: skip
    rec.update(extra)
    return rec


def test_append_is_idempotent_and_since_returns_in_order(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        for fid in (3, 0, 2, 1, 4):
            assert j.append(record(fid)) is True
        assert j.append(record(2, decision="NOT_OK")) is False  # repeat id: first decision kept
        got = j.since(1)
        assert [r["frame_id"] for r in got] == [1, 2, 3, 4]
        assert got[1]["decision"] == "OK"
        assert got[0] == record(1)  # the whole record round-trips
        assert [r["frame_id"] for r in j.since(0, limit=2)] == [0, 1]
        assert j.last_frame_id("run-a") == 4
        assert j.count() == 5


def test_runs_are_separate_and_none_means_latest_run(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        assert j.since(0) == [] and j.last_frame_id() is None and j.latest_run_id() is None
        for fid in range(3):
            j.append(record(fid, run_id="old"))
        for fid in range(2):
            j.append(record(fid, run_id="new"))
        assert j.append(record(0, run_id="new")) is False
        assert j.latest_run_id() == "new"
        assert [(r["run_id"], r["frame_id"]) for r in j.since(0)] == [("new", 0), ("new", 1)]
        assert [r["frame_id"] for r in j.since(1, run_id="old")] == [1, 2]
        assert j.last_frame_id("old") == 2 and j.last_frame_id() == 1
        assert j.last_frame_id("unknown") is None


def test_survives_reopen_in_wal_mode_and_is_readable_concurrently(tmp_path):
    path = tmp_path / "sub" / "j.sqlite"  # parent directories are created
    j = Journal(path)
    j.append(record(0))
    reader = sqlite3.connect(path)  # another process's view while the writer is open
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reader.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 1
    reader.close()
    j.close()
    with Journal(path) as again:
        assert again.append(record(0)) is False
        assert again.since(0) == [record(0)]


def test_max_rows_keeps_the_newest(tmp_path):
    with Journal(tmp_path / "j.sqlite", max_rows=5, prune_every=1) as j:
        for fid in range(12):
            j.append(record(fid))
        assert j.count() == 5
        assert [r["frame_id"] for r in j.since(0)] == [7, 8, 9, 10, 11]


def test_max_age_drops_old_rows(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        for fid in range(4):
            j.append(record(fid))
    time.sleep(1.2)
    # 1 s: everything above is older, and the fresh row below stays younger even on a
    # loaded CPU (1 ms was seen to expire it between append and prune)
    with Journal(path, max_age_days=1.0 / 86400) as j:
        assert j.count() == 0
        j.append(record(10))
        assert j.prune() == 0 and j.count() == 1


def test_unwritable_or_wrong_paths_name_the_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="a_file/j.sqlite: cannot create the journal's directory"):
        Journal(blocker / "j.sqlite")
    with pytest.raises(DataError, match="is a directory"):
        Journal(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(DataError, match="junk.sqlite: not a decision journal"):
        Journal(junk)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decision": "MAYBE"}, "'decision': must be one of"),
        ({"frame_id": True}, "'frame_id': must be int, got bool"),
        ({"frame_id": -1}, "'frame_id': must be >= 0"),
        ({"score": float("nan")}, "'score': must be finite"),
        ({"run_id": ""}, "'run_id': must not be empty"),
        ({"schema": 2}, "'schema': unsupported version 2"),
        ({"reason": "x" * 5000}, "'reason': longer than 4096"),
        ({"regions": [{"x": 1}]}, "'regions': entry 0"),
        ({"stages_ms": {"e2e": float("inf")}}, "'stages_ms': entry 'e2e'"),
    ],
)
def test_invalid_records_are_refused_with_the_field_named(tmp_path, change, message):
    with Journal(tmp_path / "j.sqlite") as j:
        with pytest.raises(DataError, match=message):
            j.append({**record(0), **change})
        assert j.count() == 0
    bad = record(0)
    del bad["model"]
    with pytest.raises(DataError, match="'model': missing"):
        validate_record(bad)
