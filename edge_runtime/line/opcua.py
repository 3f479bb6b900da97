"""OPC UA bridge (asyncua): a server the PLC reads, or a writer into the PLC's server.

``OpcUaServerSink`` (``edge-alerts --opcua opc.tcp://127.0.0.1:4840/edge``) hosts, in
namespace ``NAMESPACE_URI``, one object per station under ``Objects/EdgeRuntime``;
every node has the string id ``<station>.<name>`` (docs/line.md lists them):

    <st>.LastResult.{PartId, RunId, Decision, StationDecision, Reason, Score, Threshold,
                     CaptureTime, ProcessingTimeMs, Model, BundleHash, Replayed}
    <st>.ResultCounter   UInt32, +1 every time a result is offered (also a re-offer)
    <st>.ResultsSinceStart, <st>.Pending, <st>.Reoffers, <st>.Overflowed
    <st>.Heartbeat (DateTime of the station's last heartbeat), <st>.Alive (Boolean)
    <st>.AckPartId (Int64, PLC-writable), method <st>.Acknowledge(PartId) -> Boolean

Handshake: results queue per station in arrival order; the oldest unacknowledged one
is the offered ``LastResult``. The PLC reacts to a ``ResultCounter`` change, reads
``LastResult``, and acknowledges by writing its ``PartId`` to ``AckPartId`` (or calling
``Acknowledge``); then the next one is offered. Every offer resets ``AckPartId`` to -1
(before the counter changes), so an acknowledgement is always a fresh write. Not acknowledged within
``ack_timeout_s``, the same result is offered again (counter +1, ``Reoffers`` +1).

Decision vocabulary: OK -> ``OK``, NOT_OK -> ``NotOK``, anything else (NOT_DECIDABLE,
ERROR, DROPPED) -> ``NotDecidable`` with ``Reason``; ``StationDecision`` keeps the
station's own word.

Security: on loopback, SecurityPolicy None unless ``secure``; bound anywhere else the
server needs ``allow_remote`` and a certificate + key, and offers Basic256Sha256
SignAndEncrypt only.

``OpcUaWriterSink`` (``--opcua-write URL --node-map FILE``) writes the same fields into
nodes of an existing server, data first and the counter last.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from asyncua import Client, Server, ua

from edge_runtime.errors import DataError, EdgeError
from edge_runtime.line.sinks import Sink
from edge_runtime.pipeline import security

NAMESPACE_URI = "urn:edge-runtime:line"
ROOT_NAME = "EdgeRuntime"
ACK_POLL_S = 0.02  # how often the server looks at AckPartId and re-offer timers
MAX_PENDING = 10_000  # unacknowledged results kept per station; beyond, the oldest is dropped
START_TIMEOUT_S = 30.0
OPC_DECISION = {"OK": "OK", "NOT_OK": "NotOK"}  # everything else: NotDecidable
NOT_DECIDABLE = "NotDecidable"
UINT32_WRAP = 2**32
V = ua.VariantType
# LastResult fields: node name -> (variant type, value from a record)
RESULT_FIELDS = {
    "PartId": (V.Int64, lambda r: r["frame_id"]),
    "RunId": (V.String, lambda r: r["run_id"]),
    "Decision": (V.String, lambda r: OPC_DECISION.get(r["decision"], NOT_DECIDABLE)),
    "StationDecision": (V.String, lambda r: r["decision"]),
    "Reason": (V.String, lambda r: r["reason"] or ""),
    "Score": (V.Double, lambda r: float("nan") if r["score"] is None else float(r["score"])),
    "Threshold": (V.Double, lambda r: float("nan") if r["threshold"] is None else float(r["threshold"])),
    "CaptureTime": (V.DateTime, lambda r: _dt(r["capture_ns"])),
    "ProcessingTimeMs": (V.Double, lambda r: float(r["stages_ms"].get("e2e", float("nan")))),
    "Model": (V.String, lambda r: r["model"]),
    "BundleHash": (V.String, lambda r: r["bundle_hash"]),
    "Replayed": (V.Boolean, lambda r: bool(r.get("replayed", False))),
}
# --opcua-write: node-map keys -> (variant type used when the node's own type is unknown, value)
WRITE_FIELDS = {
    "part_id": RESULT_FIELDS["PartId"], "run_id": RESULT_FIELDS["RunId"],
    "decision": RESULT_FIELDS["Decision"], "station_decision": RESULT_FIELDS["StationDecision"],
    "reason": RESULT_FIELDS["Reason"], "score": RESULT_FIELDS["Score"],
    "threshold": RESULT_FIELDS["Threshold"], "capture_time": RESULT_FIELDS["CaptureTime"],
    "processing_ms": RESULT_FIELDS["ProcessingTimeMs"], "model": RESULT_FIELDS["Model"],
    "bundle_hash": RESULT_FIELDS["BundleHash"], "counter": (V.UInt32, None), "alive": (V.Boolean, None),
}  # fmt: skip

log = logging.getLogger(__name__)


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)


class _LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a result."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = START_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def check_opcua_bind(url: str, allow_remote: bool) -> tuple[str, int]:
    """(host, port) of an opc.tcp URL, refused off loopback without ``allow_remote``."""
    parts = urlsplit(url)
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise EdgeError(f"--opcua {url}: expected opc.tcp://HOST:PORT[/PATH]")
    port = 4840 if parts.port is None else parts.port
    host = parts.hostname
    try:
        security.check_bind(f"tcp://{'[' + host + ']' if ':' in host else host}:{port}", allow_remote)
    except security.BindPolicyError:
        raise EdgeError(
            f"refusing to serve OPC UA on {url}: it is reachable from the network. Bind opc.tcp://127.0.0.1:PORT, "
            "or pass --allow-remote together with --opcua-cert/--opcua-key (Basic256Sha256)"
        ) from None
    return host, port


class _Station:
    """One station's nodes and its queue of unacknowledged results."""

    def __init__(self, nodes: dict, types: dict, ack_node):
        self.nodes, self.types, self.ack_node = nodes, types, ack_node
        self.queue: collections.deque[dict] = collections.deque()
        self.offered_at: float | None = None
        self.counter = self.since_start = self.reoffers = self.overflowed = 0


class OpcUaServerSink(Sink):
    """The gateway's OPC UA server (see the module docstring)."""

    name = "OPC UA server"

    def __init__(self, url: str, *, ack_timeout_s: float = 2.0, cert: Path | None = None, key: Path | None = None,
                 secure: bool = False, allow_remote: bool = False):  # fmt: skip
        host, port = check_opcua_bind(url, allow_remote)
        remote = not _is_loopback(host)
        if (remote or secure) and cert is None:
            raise EdgeError("an OPC UA server off loopback (or --opcua-secure) needs --opcua-cert and --opcua-key")
        self.secure = remote or secure
        self.ack_timeout_s = ack_timeout_s
        self.stations: dict[str, _Station] = {}
        self.lt = _LoopThread("opcua-server")
        parts = urlsplit(url)
        self._path = parts.path
        try:
            self.lt.run(self._start(host, port, cert, key))
        except Exception as exc:
            self.lt.stop()
            raise EdgeError(f"cannot start the OPC UA server on {url}: {exc}") from None
        self.url = f"opc.tcp://{host}:{self.server.bserver.port}{self._path}"
        self._ticker = asyncio.run_coroutine_threadsafe(self._tick_forever(), self.lt.loop)

    async def _start(self, host, port, cert, key) -> None:
        self.server = Server()
        await self.server.init()
        self.server.set_endpoint(f"opc.tcp://{host}:{port}{self._path}")
        self.server.set_server_name("edge_runtime edge-alerts")
        if self.secure:
            self.server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            await self.server.load_certificate(str(cert))
            await self.server.load_private_key(str(key))
        else:
            self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns = await self.server.register_namespace(NAMESPACE_URI)
        self.root = await self.server.nodes.objects.add_object(ua.NodeId(ROOT_NAME, self.ns), f"{self.ns}:{ROOT_NAME}")
        await self.server.start()

    # -- node building (server loop) ---------------------------------------------------

    async def _station(self, station: str) -> _Station:
        st = self.stations.get(station)
        if st is not None:
            return st
        ns = self.ns
        obj = await self.root.add_object(ua.NodeId(station, ns), f"{ns}:{station}")
        result = await obj.add_object(ua.NodeId(f"{station}.LastResult", ns), f"{ns}:LastResult")
        nodes, types = {}, {}
        for name, (vtype, _) in RESULT_FIELDS.items():
            types[name] = vtype
            initial = {V.Int64: -1, V.Double: float("nan"), V.Boolean: False, V.DateTime: _dt(0)}.get(vtype, "")
            nodes[name] = await result.add_variable(ua.NodeId(f"{station}.LastResult.{name}", ns), f"{ns}:{name}",
                                                    ua.Variant(initial, vtype))  # fmt: skip
        for name, vtype, initial in (
            ("ResultCounter", V.UInt32, 0), ("ResultsSinceStart", V.UInt64, 0), ("Pending", V.UInt32, 0),
            ("Reoffers", V.UInt32, 0), ("Overflowed", V.UInt32, 0), ("Heartbeat", V.DateTime, _dt(0)),
            ("Alive", V.Boolean, False), ("RunId", V.String, ""),
        ):  # fmt: skip
            types[name] = vtype
            nodes[name] = await obj.add_variable(ua.NodeId(f"{station}.{name}", ns), f"{ns}:{name}",
                                                 ua.Variant(initial, vtype))  # fmt: skip
        ack = await obj.add_variable(ua.NodeId(f"{station}.AckPartId", ns), f"{ns}:AckPartId", ua.Variant(-1, V.Int64))
        await ack.set_writable()

        async def acknowledge(parent, part_id):
            return [ua.Variant(await self._ack(station, int(part_id.Value)), V.Boolean)]

        await obj.add_method(ua.NodeId(f"{station}.Acknowledge", ns), f"{ns}:Acknowledge", acknowledge,
                             [V.Int64], [V.Boolean])  # fmt: skip
        st = self.stations[station] = _Station(nodes, types, ack)
        return st

    async def _write(self, st: _Station, name: str, value) -> None:
        value = ua.DataValue(ua.Variant(value, st.types[name]))
        await self.server.write_attribute_value(st.nodes[name].nodeid, value)

    # -- the handshake (server loop) -------------------------------------------------------

    async def _offer(self, st: _Station) -> None:
        if not st.queue:
            st.offered_at = None
            return
        record = st.queue[0]
        for name, (_, value) in RESULT_FIELDS.items():
            await self._write(st, name, value(record))
        st.counter = (st.counter + 1) % UINT32_WRAP
        # the PLC's acknowledgement slot is cleared with every offer, so that writing the
        # same part id again (a re-offer, or part 0 of a new run) is always a change
        await self.server.write_attribute_value(st.ack_node.nodeid, ua.DataValue(ua.Variant(-1, V.Int64)))
        await self._write(st, "Pending", len(st.queue))
        await self._write(st, "ResultCounter", st.counter)  # last: the PLC's trigger
        st.offered_at = time.monotonic()

    async def _ack(self, station: str, part_id: int) -> bool:
        st = self.stations.get(station)
        if st is None or not st.queue or st.queue[0]["frame_id"] != part_id:
            return False
        st.queue.popleft()
        await self._offer(st)
        if not st.queue:
            await self._write(st, "Pending", 0)
        return True

    async def _on_record(self, record: dict, replayed: bool) -> None:
        st = await self._station(record["station"])
        st.queue.append({**record, "replayed": replayed})
        if len(st.queue) > MAX_PENDING:
            st.queue.popleft()
            st.overflowed += 1
            await self._write(st, "Overflowed", st.overflowed)
            st.offered_at = None
        st.since_start += 1
        await self._write(st, "ResultsSinceStart", st.since_start)
        if st.offered_at is None:
            await self._offer(st)
        else:
            await self._write(st, "Pending", len(st.queue))

    async def _on_heartbeat(self, hb: dict) -> None:
        st = await self._station(hb["station"])
        await self._write(st, "Heartbeat", _dt(hb["time_ns"]))
        await self._write(st, "RunId", hb["run_id"])
        await self._write(st, "Alive", True)

    async def _on_event(self, event: dict) -> None:
        if event["event"] == "heartbeat_lost":
            targets = [event["station"]] if event.get("station") else list(self.stations)
            for station in targets:
                await self._write(await self._station(station), "Alive", False)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(ACK_POLL_S)
            try:
                now = time.monotonic()
                for station, st in list(self.stations.items()):
                    ack = await st.ack_node.read_value()
                    if ack >= 0 and st.queue and st.queue[0]["frame_id"] == ack:
                        await self._ack(station, int(ack))
                    if st.offered_at is not None and now - st.offered_at >= self.ack_timeout_s:
                        st.reoffers += 1
                        await self._write(st, "Reoffers", st.reoffers)
                        await self._offer(st)
            except Exception:  # noqa: BLE001 - keep serving; log what broke
                log.exception("OPC UA handshake tick failed")

    # -- the gateway's hooks (gateway thread) -------------------------------------------------

    def _submit(self, coro) -> None:
        fut = asyncio.run_coroutine_threadsafe(coro, self.lt.loop)
        fut.add_done_callback(lambda f: f.exception() and log.error("OPC UA update failed: %s", f.exception()))

    def record(self, record: dict, replayed: bool) -> None:
        self._submit(self._on_record(record, replayed))

    def heartbeat(self, message: dict) -> None:
        self._submit(self._on_heartbeat(message))

    def event(self, event: dict) -> None:
        self._submit(self._on_event(event))

    def close(self) -> None:
        self._ticker.cancel()
        try:
            self.lt.run(self.server.stop(), timeout=10)
        except Exception as exc:  # noqa: BLE001
            log.warning("OPC UA server stop: %s", exc)
        self.lt.stop()


def _is_loopback(host: str) -> bool:
    try:
        security.check_bind(f"tcp://{'[' + host + ']' if ':' in host else host}:1", allow_remote=False)
        return True
    except security.BindPolicyError:
        return False


# -- --opcua-write --------------------------------------------------------------------------


def load_node_map(path: str | Path) -> dict[str, str]:
    """``{field: node id string}`` from a JSON file; unknown fields are refused by name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read the OPC UA node map ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(path, "node map must be a non-empty JSON object {field: node id}")
    for field, node_id in data.items():
        if field not in WRITE_FIELDS:
            raise DataError(path, f"unknown node-map field {field!r}; known: {', '.join(WRITE_FIELDS)}")
        if not isinstance(node_id, str):
            raise DataError(path, f"field {field!r}: node id must be a string like 'ns=2;s=Line.PartId'")
        try:
            ua.NodeId.from_string(node_id)
        except Exception:  # noqa: BLE001 - asyncua raises several kinds
            raise DataError(path, f"field {field!r}: {node_id!r} is not an OPC UA node id") from None
    return data


CLOSE_FLUSH_S = 10.0  # how long a closing writer keeps writing what it accepted


class OpcUaWriterSink(Sink):
    """Writes each result into an existing OPC UA server's nodes (``--opcua-write``).

    Writes go through a bounded queue (``MAX_PENDING``) drained by one task: data
    fields first, ``counter`` (if mapped, +1 per result) last. A lost connection is
    re-established with backoff; queued results wait meanwhile."""

    name = "OPC UA writer"

    def __init__(self, url: str, node_map: dict[str, str]):
        self.url, self.node_map = url, node_map
        self.counter = 0
        self.counts = dict(written=0, failed=0, dropped=0)
        self.lt = _LoopThread("opcua-writer")
        self.queue: asyncio.Queue = self.lt.run(self._make_queue())
        self.connected = threading.Event()
        self._current = None  # the item being written (kept across a reconnect)
        self._task = asyncio.run_coroutine_threadsafe(self._writer(), self.lt.loop)

    async def _make_queue(self) -> asyncio.Queue:
        return asyncio.Queue(MAX_PENDING)

    async def _writer(self) -> None:
        delay = 0.2
        while True:
            client = Client(self.url, timeout=5)
            try:
                await client.connect()
                nodes = {f: client.get_node(nid) for f, nid in self.node_map.items()}
                types = {f: await n.read_data_type_as_variant_type() for f, n in nodes.items()}
                self.connected.set()
                delay = 0.2
                while True:
                    item = self._current = self._current or await self.queue.get()
                    await self._write_one(nodes, types, *item)
                    self._current = None  # done: a failed write is retried after reconnecting
            except asyncio.CancelledError:
                await _quiet_disconnect(client)
                raise
            except Exception as exc:  # noqa: BLE001 - connection problems of every kind: retry
                self.connected.clear()
                self.counts["failed"] += 1
                log.warning("OPC UA writer %s: %s; reconnecting in %.1f s", self.url, exc, delay)
                await _quiet_disconnect(client)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def _write_one(self, nodes, types, kind, payload) -> None:
        if kind == "alive":
            if "alive" in nodes:
                await nodes["alive"].write_value(ua.DataValue(ua.Variant(payload, types["alive"])))
            return
        for field, node in nodes.items():
            if field in ("counter", "alive"):
                continue
            value = WRITE_FIELDS[field][1](payload)
            await node.write_value(ua.DataValue(ua.Variant(_coerce(value, types[field]), types[field])))
        if "counter" in nodes:
            nxt = (self.counter + 1) % UINT32_WRAP
            await nodes["counter"].write_value(ua.DataValue(ua.Variant(_coerce(nxt, types["counter"]),
                                                                       types["counter"])))  # fmt: skip
            self.counter = nxt
        self.counts["written"] += 1

    def _put(self, item) -> None:
        def put():
            if self.queue.full():
                self.queue.get_nowait()
                self.counts["dropped"] += 1
            self.queue.put_nowait(item)

        self.lt.call(put)

    def record(self, record: dict, replayed: bool) -> None:
        self._put(("result", {**record, "replayed": replayed}))

    # heartbeats: the base class's no-op; alive state comes from the lost/restored events
    def event(self, event: dict) -> None:
        if event["event"] in ("heartbeat_lost", "heartbeat_restored"):
            self._put(("alive", event["event"] == "heartbeat_restored"))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued write was done (tests, clean exit)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.lt.run(self._empty(), timeout):
                return True
            time.sleep(0.02)
        return False

    async def _empty(self) -> bool:
        return self.queue.empty() and self._current is None

    async def _pending(self) -> int:
        return self.queue.qsize() + (self._current is not None)

    def close(self, timeout: float = CLOSE_FLUSH_S) -> None:
        """Write what was accepted before stopping (at most ``timeout`` s, also while the
        first connection is still being made); what is left is logged with its count."""
        if not self.flush(timeout):
            log.warning("OPC UA writer %s: %d result(s) not written at exit (server unreachable for %.0f s)",
                        self.url, self.lt.run(self._pending(), 5), timeout)
        self._task.cancel()
        time.sleep(0.05)
        self.lt.stop()


def _coerce(value, vtype):
    """Make a record value fit the PLC node's own type (e.g. Int32 part ids, Float scores)."""
    if vtype in (V.Float, V.Double):
        return float(value)
    if vtype in (V.Int16, V.Int32, V.Int64, V.UInt16, V.UInt32, V.UInt64, V.Byte, V.SByte):
        return int(value)
    if vtype == V.String:
        return str(value)
    return value


async def _quiet_disconnect(client) -> None:
    try:
        await client.disconnect()
    except Exception:  # noqa: BLE001
        pass
