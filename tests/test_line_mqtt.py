"""The MQTT bridge against a real mosquitto broker (started per test on a unix socket).

Station: a real AlertPublisher in a thread. Gateway: the real ``edge-alerts`` main()
(in a thread, or a subprocess where the test must stop it from outside). Consumer: a
real paho client with a persistent session, de-duplicating by ``dedup_key``.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

paho = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install paho-mqtt)")

from edge_runtime.cli.alerts import main  # noqa: E402
from edge_runtime.line import mosquitto, sparkplug  # noqa: E402
from test_edge_alerts import Station, record  # noqa: E402

F = float(os.environ.get("EDGE_TEST_TIME_FACTOR", "1"))
pytestmark = [
    pytest.mark.timeout(180 * F),
    pytest.mark.skipif(mosquitto.find_binary() is None, reason="mosquitto binary absent (apt-get install mosquitto)"),
]


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def broker(tmp_path):
    b = mosquitto.Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


class Consumer:
    """A QoS 1 subscriber with a persistent session that survives broker restarts."""

    def __init__(self, broker, topic="edge/#", client_id="test-consumer", auth=None):
        self.messages, self.lock = [], threading.Lock()
        self.subscribed = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                             transport="unix")  # fmt: skip
        self.c.reconnect_delay_set(0.05, 0.5)
        if auth:
            self.c.username_pw_set(*auth)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(str(broker.socket))
        self.c.loop_start()
        assert self.subscribed.wait(10 * F), "consumer could not subscribe"

    def _on_message(self, c, u, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def decisions(self):
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/decision")]

    def wait_for(self, predicate, what, seconds=30):
        end = time.monotonic() + seconds * F
        while time.monotonic() < end:
            if predicate(self):
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; have {len(self.messages)} messages")

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def run_main_in_thread(args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main([str(a) for a in args])), daemon=True)
    thread.start()
    return thread, result


def test_every_decision_arrives_once_with_birth_and_death(tmp_path, broker, capsys):
    consumer = Consumer(broker)

    def script(st):
        st.wait_subscribed()
        for fid in range(40):
            st.pub.publish(record(fid, decision="NOT_OK" if fid % 7 == 0 else "OK"))
            st.tick_for(0.005)

    with Station(tmp_path, script) as st:
        rc = main(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--station", "st1",
                   "--mqtt", broker.url, "--max-messages", "40", "--timeout", str(30 * F)])  # fmt: skip
    assert rc == 0
    consumer.wait_for(lambda c: len(c.decisions()) >= 40, "40 decisions")
    decisions = consumer.decisions()
    assert sorted(d["frame_id"] for d in decisions) == list(range(40))  # each once, no duplicate
    assert {d["dedup_key"] for d in decisions} == {f"run-a/{i}" for i in range(40)}
    assert next(d for d in decisions if d["frame_id"] == 7)["decision"] == "NOT_OK"
    consumer.wait_for(lambda c: any(t.endswith("/state") and b'"online":false' in p for t, p, _ in c.messages),
                      "the offline state")  # fmt: skip
    states = [json.loads(p)["online"] for t, p, _ in consumer.messages if t == "edge/gateway/edge-alerts-st1/state"]
    assert states[0] is True and states[-1] is False
    assert any(t == "edge/st1/alive" and json.loads(p)["alive"] for t, p, _ in consumer.messages)
    consumer.close()


def test_a_broker_killed_and_restarted_mid_run_loses_nothing(tmp_path, broker):
    consumer = Consumer(broker)
    n, kill_at, restart_at = 120, 40, 80
    killed, restarted = threading.Event(), threading.Event()

    def script(st):
        st.wait_subscribed()
        for fid in range(n):
            st.pub.publish(record(fid))
            st.tick_for(0.01)
            if fid == kill_at:
                broker.kill()
                killed.set()
            if fid == restart_at:
                broker.start()
                restarted.set()

    with Station(tmp_path, script) as st:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli.alerts", "--endpoint", st.pub_ep, "--replay-endpoint",
             st.replay_ep, "--station", "st1", "--mqtt", broker.url, "--state", str(tmp_path / "gw.json"), "--from-frame", "0",
             "--timeout", str(120 * F)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert restarted.wait(60 * F)
            consumer.wait_for(lambda c: {d["frame_id"] for d in c.decisions()} >= set(range(n)),
                              "every frame after the broker restart", seconds=60)  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30 * F)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    keys = [d["dedup_key"] for d in consumer.decisions()]
    assert set(keys) == {f"run-a/{i}" for i in range(n)}  # nothing lost; repeats only by dedup key
    consumer.close()


def test_the_spool_survives_a_gateway_restart_while_the_broker_is_down(tmp_path, capsys):
    b = mosquitto.Mosquitto(tmp_path / "broker")  # not started yet: the broker is down

    def script(st):
        st.wait_subscribed()
        for fid in range(10):
            st.pub.publish(record(fid))
            st.tick_for(0.005)

    spool = tmp_path / "spool.sqlite"
    common = ["--mqtt", b.url, "--mqtt-spool", str(spool), "--state", str(tmp_path / "gw.json")]
    with Station(tmp_path, script) as st:
        rc = main(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, *common,
                   "--max-messages", "10", "--timeout", str(30 * F)])  # fmt: skip
        assert rc == 0
        with b:
            consumer = Consumer(b)
            thread, result = run_main_in_thread(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep,
                                                 *common, "--timeout", str(4 * F)])  # fmt: skip
            consumer.wait_for(lambda c: len(c.decisions()) >= 10, "the spooled decisions")
            thread.join(30 * F)
            consumer.close()
    assert result["rc"] == 0
    assert sorted(d["frame_id"] for d in consumer.decisions()) == list(range(10))


def _raw_fields(data: bytes) -> list[int]:
    """Top-level protobuf field numbers of a message, decoded by hand (checks the descriptor)."""
    out, i = [], 0
    while i < len(data):
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        out.append(number)
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            i += size
        elif wire == 1:
            i += 8
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


def _varint(data, i):
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def test_sparkplug_birth_data_and_sequence_numbers(tmp_path, broker, capsys):
    consumer = Consumer(broker, topic="spBv1.0/#")

    def script(st):
        st.wait_subscribed()
        for fid in range(5):
            st.pub.publish(record(fid))
            st.tick_for(0.005)

    with Station(tmp_path, script) as st:
        rc = main(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--mqtt", broker.url,
                   "--sparkplug", "line1/edge1", "--max-messages", "5", "--timeout", str(30 * F)])  # fmt: skip
    assert rc == 0
    consumer.wait_for(lambda c: any("/NDEATH/" in t for t, _, _ in c.messages), "NDEATH")
    msgs = [(t, p) for t, p, _ in consumer.messages]
    kinds = [t.split("/")[2] for t, _ in msgs]
    assert kinds[0] == "NBIRTH" and kinds[-1] == "NDEATH" and "DBIRTH" in kinds
    assert kinds.index("DBIRTH") < kinds.index("DDATA")
    decoded = [(t, sparkplug.decode(p)) for t, p in msgs]
    seqs = [d["seq"] for t, d in decoded if "/NDEATH/" not in t]
    assert seqs == list(range(len(seqs)))  # 0 = NBIRTH, then +1 per message
    birth, death = decoded[0][1], decoded[-1][1]
    assert birth["metrics"]["bdSeq"] == death["metrics"]["bdSeq"]
    results = [d["metrics"] for t, d in decoded if t == "spBv1.0/line1/DDATA/edge1/st1" and "Result/PartId" in d["metrics"]]
    assert [m["Result/PartId"] for m in results] == list(range(5))
    assert results[0]["Result/Decision"] == "OK" and results[0]["Result/DedupKey"] == "run-a/0"
    assert results[0]["Result/Score"] == 0.5 and results[0]["Result/Reason"] is None
    assert _raw_fields(msgs[0][1]) == [1, 2, 2, 3]  # timestamp, two metrics, seq: the Tahu field numbers
    consumer.close()


def test_heartbeat_loss_is_published_as_alive_false_and_an_event(tmp_path, broker):
    consumer = Consumer(broker)

    def script(st):
        st.wait_subscribed()
        st.pub.publish(record(0))
        st.tick_for(0.5)
        st.mute.set()  # vision stops

    with Station(tmp_path, script) as st:
        thread, result = run_main_in_thread(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep,
                                             "--mqtt", broker.url, "--heartbeat-timeout", 0.4 * F,
                                             "--timeout", 4 * F])  # loss after ~1 s; then it exits  # fmt: skip
        consumer.wait_for(lambda c: any(t == "edge/st1/alive" and not json.loads(p)["alive"]
                                        for t, p, _ in c.messages), "alive false")  # fmt: skip
        consumer.wait_for(lambda c: any(t == "edge/st1/event" for t, _, _ in c.messages), "the event")
        st.halt.set()
        thread.join(60 * F)
    alive = [json.loads(p)["alive"] for t, p, _ in consumer.messages if t == "edge/st1/alive"]
    assert alive[0] is True and alive[-1] is False
    event = next(json.loads(p) for t, p, _ in consumer.messages if t == "edge/st1/event")
    assert event["event"] == "heartbeat_lost" and event["station"] == "st1"
    consumer.close()


def test_username_and_password_are_used_and_a_wrong_one_delivers_nothing(tmp_path, capsys):
    with mosquitto.Mosquitto(tmp_path / "broker", users={"mes": "s3cret", "edge": "right"}) as b:
        consumer = Consumer(b, client_id="mes", auth=("mes", "s3cret"))
        (tmp_path / "pw-good").write_text("right\n")
        (tmp_path / "pw-bad").write_text("wrong\n")

        def script(st):
            st.wait_subscribed()
            for fid in range(3):
                st.pub.publish(record(fid))
                st.tick_for(0.01)

        for password, expect in (("bad", 0), ("good", 3)):
            (tmp_path / password).mkdir()
            with Station(tmp_path / password, script) as st:
                rc = main(["--endpoint", st.pub_ep, "--replay-endpoint", st.replay_ep, "--mqtt", b.url,
                           "--mqtt-username", "edge", "--mqtt-password-file", str(tmp_path / f"pw-{password}"),
                           "--mqtt-spool", str(tmp_path / f"{password}.sqlite"), "--no-state",
                           "--max-messages", "3", "--timeout", str(30 * F)])  # fmt: skip
            assert rc == 0
            if expect:
                consumer.wait_for(lambda c: len(c.decisions()) >= expect, "3 decisions")
            assert len(consumer.decisions()) == expect  # the refused gateway sent nothing
        consumer.close()
