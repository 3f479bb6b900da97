"""MQTT bridge: each delivered decision to a broker at QoS 1, surviving broker outages.

Topic tree (JSON payloads; ``P`` = ``--mqtt-prefix``, default ``edge``; docs/line.md):

    P/gateway/<client id>/state   retained  {"online": true|false, "client_id", "time_ns"}
                                            birth on connect, last will "online": false
    P/<station>/decision          QoS 1     the decision record + "replayed" + "dedup_key"
    P/<station>/event             QoS 1     gateway events (heartbeat_lost, gap_unrecovered ...)
    P/<station>/alive             retained  {"alive", "station", "run_id", "time_ns"} on change

With ``--sparkplug GROUP/NODE`` the same stream goes out as Sparkplug B instead
(``edge_runtime.line.sparkplug``): NBIRTH / DBIRTH per station / DDATA per decision,
NDEATH as the last will, ``seq`` per session. Decisions are sent at QoS 1 (the spec's
QoS 0 could not tell the bridge the broker has them).

Delivery: every decision and event is first committed to the on-disk ``Spool``; the
bridge sends spooled messages in order (at most ``MAX_INFLIGHT`` unacknowledged) and
marks them done on the broker's PUBACK. A lost connection is re-established with
exponential backoff (``BACKOFF_MIN_S`` .. ``BACKOFF_MAX_S``) by a fresh client; then
everything not acknowledged is sent again, from the oldest. A consumer therefore gets
each ``(run_id, frame_id)`` at least once and drops repeats by ``dedup_key``
(``"<run_id>/<frame_id>"``): exactly once from its point of view.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho

from edge_runtime.errors import EdgeError
from edge_runtime.line import sparkplug
from edge_runtime.line.sinks import Sink, decision_key
from edge_runtime.line.spool import Spool

QOS = 1
MAX_INFLIGHT = 64  # unacknowledged publishes at once
KEEPALIVE_S = 10  # MQTT keep-alive: a dead broker is noticed within 1.5 x this
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 2.0  # a broker back after an outage is found within this (plus the reconnect)
CLOSE_FLUSH_S = 2.0  # at exit, how long the bridge waits for the broker to ack what is in flight
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass
class MqttSettings:
    url: str
    client_id: str
    spool: Path
    prefix: str = "edge"
    sparkplug: str | None = None  # "GROUP/NODE"
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


def _new_station() -> dict:
    return {"alive": None, "last": None, "alive_msg": None, "born_session": None}


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class MqttSink(Sink):
    """The gateway's MQTT bridge (see the module docstring)."""

    name = "MQTT"

    def __init__(self, settings: MqttSettings):
        self.s = settings
        url = urlsplit(settings.url)
        self.scheme = url.scheme
        if self.scheme == "mqtt+unix":
            if not url.path:
                raise EdgeError(f"--mqtt {settings.url}: mqtt+unix:// needs a socket path")
            self.host, self.port = url.path, DEFAULT_PORTS["mqtt"]  # paho wants a port even for unix
        else:
            if not url.hostname:
                raise EdgeError(f"--mqtt {settings.url}: no host")
            self.host, self.port = url.hostname, url.port or DEFAULT_PORTS[self.scheme]
        if self.scheme != "mqtts" and (settings.ca or settings.cert):
            raise EdgeError("--mqtt-ca / --mqtt-cert need an mqtts:// URL")
        self.group = self.node = None
        if settings.sparkplug:
            self.group, self.node = settings.sparkplug.split("/")
        self.spool = Spool(settings.spool)
        self.bd_seq = int(self.spool.get_meta("bdSeq", "0"))
        self.counts = dict(spooled=0, sent=0, acked=0, connects=0, disconnects=0, resent=0)
        self._lock = threading.Lock()  # guards client, session, seq, alive, last
        self._client: paho.Client | None = None
        self._session = 0  # incremented by each successful connect; 0 = not connected
        self._sent_session = 0  # the session the sender's in-flight table belongs to
        self._seq = 0
        self._stations: dict[str, dict] = {}  # station -> {"alive": bool|None, "last": dict|None}
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> spool seq
        self._cursor = 0  # highest spool seq handed to the client in this session
        self.spool_meta_pending = False
        self._closing = threading.Event()
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._connection_loop, name="mqtt-bridge", daemon=True)
        self._thread.start()

    # -- topics ----------------------------------------------------------------------

    def _t(self, *parts: str) -> str:
        return "/".join([self.s.prefix, *parts])

    def state_topic(self) -> str:
        return self._t("gateway", self.s.client_id, "state")

    # -- connection (bridge thread) ------------------------------------------------

    def _new_client(self) -> paho.Client:
        transport = "unix" if self.scheme == "mqtt+unix" else "tcp"
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.s.client_id, clean_session=True,
                        transport=transport, reconnect_on_failure=False)  # fmt: skip
        c.max_inflight_messages_set(MAX_INFLIGHT)
        if self.s.username is not None:
            c.username_pw_set(self.s.username, self.s.password)
        if self.scheme == "mqtts":
            ctx = ssl.create_default_context(cafile=str(self.s.ca) if self.s.ca else None)
            if self.s.cert:
                ctx.load_cert_chain(str(self.s.cert), str(self.s.key) if self.s.key else None)
            c.tls_set_context(ctx)
        if self.group:
            c.will_set(sparkplug.topic(self.group, "NDEATH", self.node), sparkplug.ndeath(self.bd_seq), qos=1)
        else:
            will = {"online": False, "client_id": self.s.client_id, "time_ns": None, "reason": "connection lost"}
            c.will_set(self.state_topic(), _dumps(will), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        return c

    def _connection_loop(self) -> None:
        delay = BACKOFF_MIN_S
        while not self._closing.is_set():
            client = self._new_client()
            with self._lock:
                self._client = client
            started = time.monotonic()
            try:
                client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
                client.loop_forever()
            except (OSError, ssl.SSLError, ValueError):
                pass
            with self._lock:
                was_up, self._session = self._session, 0
                self._client = None
                self.connected.clear()
                if was_up:
                    self.counts["disconnects"] += 1
                    self.bd_seq += 1  # Sparkplug: each session has its own bdSeq
                    self.spool_meta_pending = True
            if time.monotonic() - started > 2 * BACKOFF_MAX_S:
                delay = BACKOFF_MIN_S
            self._closing.wait(delay)
            delay = min(2 * delay, BACKOFF_MAX_S)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            client.disconnect()
            return
        with self._lock:
            session = self.counts["connects"] + 1
            self._seq = 0
            if self.group:
                client.publish(sparkplug.topic(self.group, "NBIRTH", self.node), sparkplug.nbirth(0, self.bd_seq), QOS)
                self._next_seq()
                for station, st in self._stations.items():
                    self._publish_dbirth(client, station, st, session)
            else:
                birth = {"online": True, "client_id": self.s.client_id, "time_ns": time.time_ns()}
                client.publish(self.state_topic(), _dumps(birth), QOS, retain=True)
                for station, st in self._stations.items():
                    if st["alive"] is not None:
                        client.publish(self._t(station, "alive"), _dumps(st["alive_msg"]), QOS, retain=True)
            self.counts["connects"] = session
            self._session = session
        self.connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.put(mid)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % sparkplug.SEQ_MODULO
        return seq

    def _publish_dbirth(self, client, station: str, st: dict, session: int) -> None:
        payload = sparkplug.dbirth(self._next_seq(), st["alive"], st["last"])
        client.publish(sparkplug.topic(self.group, "DBIRTH", self.node, station), payload, QOS)
        st["born_session"] = session

    # -- the gateway's hooks (gateway thread) ----------------------------------------------

    def record(self, record: dict, replayed: bool) -> None:
        key = decision_key(record)
        if self.spool.put(key, "decision", record["station"], {**record, "replayed": replayed, "dedup_key": key}):
            self.counts["spooled"] += 1
        self._pump()

    def event(self, event: dict) -> None:
        station = event.get("station")
        key = f"event/{event['event']}/{event['time_ns']}"
        self.spool.put(key, "event", station, event)
        if event["event"] in ("heartbeat_lost", "heartbeat_restored") and station is not None:
            self._set_alive(station, event["event"] == "heartbeat_restored", event.get("run_id"))
        self._pump()

    def heartbeat(self, message: dict) -> None:
        st = self._stations.get(message["station"])
        if st is None or st["alive"] is None:
            self._set_alive(message["station"], True, message["run_id"])

    def _set_alive(self, station: str, alive: bool, run_id: str | None) -> None:
        msg = {"alive": alive, "station": station, "run_id": run_id, "time_ns": time.time_ns()}
        with self._lock:
            st = self._stations.setdefault(station, _new_station())
            st["alive"], st["alive_msg"] = alive, msg
            client = self._client if self._session else None
            if client is None:
                return  # sent with the next birth
            if self.group and st.get("born_session") != self._session:
                self._publish_dbirth(client, station, st, self._session)
            elif self.group:
                payload = sparkplug.ddata_alive(self._next_seq(), alive)
                client.publish(sparkplug.topic(self.group, "DDATA", self.node, station), payload, QOS)
            else:
                client.publish(self._t(station, "alive"), _dumps(msg), QOS, retain=True)

    def poll(self) -> None:
        self._pump()

    def _pump(self) -> None:
        """Record acks, then hand the client spooled messages up to the window."""
        acked = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is not None:
                acked.append(seq)
        if acked:
            self.spool.ack(acked)
            self.counts["acked"] += len(acked)
        if getattr(self, "spool_meta_pending", False):
            self.spool.set_meta("bdSeq", str(self.bd_seq))
            self.spool_meta_pending = False
        with self._lock:
            session, client = self._session, self._client
            if session != self._sent_session:  # new session (or none): resend all unacked
                self.counts["resent"] += len(self._inflight)
                self._inflight.clear()
                self._cursor = 0
                self._sent_session = session
            if not session or client is None:
                return
            room = MAX_INFLIGHT - len(self._inflight)
            if room <= 0:
                return
            for seq, key, kind, station, body in self.spool.pending(self._cursor, room):
                topic, payload = self._render(client, kind, station, body)
                info = client.publish(topic, payload, QOS)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    break  # connection going down: the next session resends from here
                self._inflight[info.mid] = seq
                self._cursor = seq
                self.counts["sent"] += 1

    def _render(self, client, kind: str, station: str | None, body: dict) -> tuple[str, bytes]:
        """Topic and payload of a spooled message (Sparkplug: numbered now). Lock held."""
        if kind == "decision":
            st = self._stations.setdefault(station, _new_station())
            if self.group:
                values = sparkplug.result_values(body, body["replayed"], body["dedup_key"])
                if st.get("born_session") != self._session:
                    self._publish_dbirth(client, station, st, self._session)
                st["last"] = values
                return sparkplug.topic(self.group, "DDATA", self.node, station), sparkplug.ddata_result(
                    self._next_seq(), values
                )
            return self._t(station, "decision"), _dumps(body)
        if self.group:  # events have no Sparkplug metric of their own: node-level JSON beside it
            return f"{sparkplug.NAMESPACE}/{self.group}/EVENT/{self.node}", _dumps(body)
        return self._t(station or "_gateway", "event"), _dumps(body)

    def close(self) -> None:
        """Flush what is in flight (bounded), say goodbye (offline / NDEATH), stop."""
        end = time.monotonic() + CLOSE_FLUSH_S
        while time.monotonic() < end and self._session and self.spool.n_pending():
            self._pump()
            time.sleep(0.02)
        self._pump()
        with self._lock:
            client = self._client if self._session else None
            if client is not None:
                if self.group:
                    info = client.publish(sparkplug.topic(self.group, "NDEATH", self.node),
                                          sparkplug.ndeath(self.bd_seq), QOS)  # fmt: skip
                else:
                    bye = {"online": False, "client_id": self.s.client_id, "time_ns": time.time_ns(),
                           "reason": "gateway stopped"}  # fmt: skip
                    info = client.publish(self.state_topic(), _dumps(bye), QOS, retain=True)
        if client is not None:
            try:
                info.wait_for_publish(timeout=CLOSE_FLUSH_S)
            except (RuntimeError, ValueError):
                pass
            self._pump()
        self._closing.set()
        with self._lock:
            if self._client is not None:
                self._client.disconnect()
        self._thread.join(CLOSE_FLUSH_S + KEEPALIVE_S)
        self.spool.set_meta("bdSeq", str(self.bd_seq + 1))
        self.spool.close()
