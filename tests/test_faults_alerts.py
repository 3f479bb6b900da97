"""Issue 12, alert side, on real sockets: a failed journal write, replay caps, a replay
request for an absent id, and a missing id that can no longer hold the ledger open."""

from __future__ import annotations

import sqlite3
import time

import msgpack
import pytest
import zmq

from edge_runtime.pipeline.alerts import MAX_REPLAY_LIMIT, REQUESTS_PER_TICK, AlertPublisher
from edge_runtime.pipeline.stats import FrameLedger
from pipeline_fixtures import ANY_PORT, scaled
from test_alerts import record

pytestmark = pytest.mark.timeout(120)


def _replies(dealer, pub, n_ends=1):
    """Tick until ``n_ends`` complete replies (records then a non-record) arrived."""
    replies, ends, deadline = [], 0, time.monotonic() + scaled(10)
    while ends < n_ends and time.monotonic() < deadline:
        if not dealer.poll(10):
            pub.tick()
            continue
        replies.append(msgpack.unpackb(dealer.recv(), raw=False))
        ends += replies[-1]["type"] != "record"
    assert ends == n_ends, replies[-3:]
    return replies


@pytest.fixture
def publisher(tmp_path):
    with AlertPublisher(ANY_PORT, ANY_PORT, tmp_path / "j.sqlite", "st1", run_id="run-a") as pub:
        yield pub


@pytest.fixture
def dealer(publisher):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(publisher.endpoints["replay"])
    yield sock
    sock.close()
    ctx.term()


def test_a_failed_journal_write_is_still_sent_and_counted(publisher, monkeypatch):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.subscribe(b"st1.OK")
    sub.connect(publisher.endpoints["alerts"])
    deadline = time.monotonic() + scaled(5)
    while publisher.counts["subscriptions"] < 1 and time.monotonic() < deadline:
        publisher.tick()
        time.sleep(0.01)

    def disk_full(rec):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(publisher.journal, "append", disk_full)
    assert publisher.publish(record(0)) == "sent"
    assert publisher.counts["journal_errors"] == 1 and publisher.counts["published"] == 1
    assert sub.poll(int(scaled(5) * 1000))
    topic, payload = sub.recv_multipart()
    assert topic == b"st1.OK" and msgpack.unpackb(payload)["frame_id"] == 0
    sub.close()
    ctx.term()


def test_replay_is_capped_per_request_and_per_tick(publisher, dealer):
    for i in range(MAX_REPLAY_LIMIT + 200):
        publisher.journal.append(record(i, run_id="run-a"))
    dealer.send(msgpack.packb({"op": "replay", "from_frame_id": 0, "limit": 10**6}))
    replies = _replies(dealer, publisher)
    assert len(replies) == MAX_REPLAY_LIMIT + 1 and replies[-1]["more"] is True
    assert replies[-1]["count"] == MAX_REPLAY_LIMIT
    for i in range(REQUESTS_PER_TICK + 4):  # more requests than one tick serves
        dealer.send(msgpack.packb({"op": "status", "req_id": i}))
    time.sleep(0.2)
    publisher.tick()
    first = []
    while dealer.poll(int(scaled(1) * 1000)) and len(first) < REQUESTS_PER_TICK + 4:
        first.append(msgpack.unpackb(dealer.recv()))
        if len(first) == REQUESTS_PER_TICK:
            break
    assert len(first) == REQUESTS_PER_TICK  # one tick: at most REQUESTS_PER_TICK served
    rest = _replies(dealer, publisher, n_ends=4)
    assert sorted(r["req_id"] for r in first + rest) == list(range(REQUESTS_PER_TICK + 4))


def test_a_replay_request_for_an_absent_id_says_not_found_instead_of_the_next_id(publisher, dealer):
    for i in (0, 1, 3):
        publisher.journal.append(record(i, run_id="run-a"))
    dealer.send(msgpack.packb({"op": "replay", "from_frame_id": 2, "to_frame_id": 2, "req_id": "g"}))
    (end,) = _replies(dealer, publisher)
    assert (end["type"], end["count"], end["not_found"], end["to_frame_id"]) == ("end", 0, [2], 2)
    dealer.send(msgpack.packb({"op": "replay", "from_frame_id": 1, "to_frame_id": 4}))
    replies = _replies(dealer, publisher)
    assert [r["record"]["frame_id"] for r in replies[:-1]] == [1, 3] and replies[-1]["not_found"] == [2, 4]
    dealer.send(msgpack.packb({"op": "replay", "from_frame_id": 3, "to_frame_id": 1}))
    (error,) = _replies(dealer, publisher)
    assert error["type"] == "error" and "to_frame_id" in error["error"]


def test_the_ledger_reports_gaps_so_a_missing_id_can_be_expired():
    led = FrameLedger()
    for i in [0, 1] + list(range(3, 2000)):
        led.add(i)
    assert led.gaps() == [2] and len(led.above) == 1997  # id 2 holds every later id in the set
    led.add(2)  # what the alert stage's sweep records (ERROR "lost") after RunConfig.lost_s()
    assert led.gaps() == [] and led.above == set() and led.low == 2000
