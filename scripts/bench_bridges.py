"""Added latency of the line bridges, and the MQTT bridge's broker-outage recovery.

A real AlertPublisher publishes decision records at ``--fps`` (default 15); a real
``edge-alerts`` subprocess bridges them to a private mosquitto broker (``--mqtt``,
loopback TCP) and to its own OPC UA server (``--opcua``). Measured per frame, from
the record's ``decision_ns`` (stamped just before ``publish``) to:

* the gateway's own JSON line (its stdout, read by this script): the baseline;
* a paho MQTT subscriber receiving ``edge/st1/decision`` (QoS 1);
* an asyncua client notified of ``st1.ResultCounter`` (10 ms subscription) that then
  reads ``LastResult.PartId`` and acknowledges it (the PLC handshake).

Then the broker is SIGKILLed for ``--outage`` seconds while frames keep coming and
restarted; recovery time = restart -> the subscriber has every frame of the outage.

    python scripts/bench_bridges.py [--frames 300] [--fps 15] [--outage 3] [--write docs/_parts/benchmarks_bridges.md]
"""

from __future__ import annotations

import argparse
from importlib import metadata
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from asyncua import Client, ua

from edge_runtime.line.mosquitto import Mosquitto
from edge_runtime.line.mqtt import BACKOFF_MAX_S, BACKOFF_MIN_S
from edge_runtime.line.opcua import NAMESPACE_URI
from edge_runtime.pipeline.alerts import AlertPublisher


def free_port() -> int:  # benchmark only: mosquitto cannot report an OS-chosen port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(fid: int, run_id: str) -> dict:
    now = time.time_ns()
    return {"schema": 1, "station": "st1", "frame_id": fid, "run_id": run_id, "capture_ns": now - 50_000_000,
            "decision_ns": now, "decision": "NOT_OK" if fid % 10 == 0 else "OK", "reason": None, "score": 0.4,
            "threshold": 0.5, "model": "bench", "bundle_hash": "bench", "stages_ms": {"e2e": 50.0},
            "regions": [], "heatmap": None}  # fmt: skip


class Latencies:
    def __init__(self):
        self.ms: dict[int, float] = {}
        self.lock = threading.Lock()

    def add(self, fid: int, decision_ns: int) -> None:
        with self.lock:
            self.ms.setdefault(fid, (time.time_ns() - decision_ns) / 1e6)

    def stats(self, ids) -> dict:
        v = [self.ms[i] for i in ids if i in self.ms]
        if not v:
            return {"n": 0}
        p50, p99 = np.percentile(v, [50, 99])
        return {"n": len(v), "p50": round(float(p50), 2), "p99": round(float(p99), 2), "max": round(max(v), 2)}


def opcua_plc(url: str, lat: Latencies, stop: threading.Event, sent: dict) -> None:
    async def main():
        async with Client(url, timeout=10) as client:
            ns = await client.get_namespace_index(NAMESPACE_URI)
            node = lambda name: client.get_node(ua.NodeId(f"st1.{name}", ns))  # noqa: E731
            changed = asyncio.Event()

            class Handler:
                def datachange_notification(self, n, val, data):
                    changed.set()

            sub = await client.create_subscription(10, Handler())
            while True:  # the station object appears with the first result
                try:
                    await sub.subscribe_data_change(node("ResultCounter"))
                    break
                except ua.UaStatusCodeError:
                    await asyncio.sleep(0.05)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(changed.wait(), 0.5)
                except asyncio.TimeoutError:
                    continue
                changed.clear()
                part = await node("LastResult.PartId").read_value()
                if part in sent:
                    lat.add(part, sent[part])
                await node("AckPartId").write_value(ua.DataValue(ua.Variant(part, ua.VariantType.Int64)))

    asyncio.run(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--outage", type=float, default=3.0, help="seconds the broker is down")
    p.add_argument("--write", type=Path, help="write the markdown table here")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-bridges-"))
    port = free_port()
    broker = Mosquitto(tmp / "broker", tcp_port=port).start()
    run_id = uuid.uuid4().hex
    lat = {"gateway": Latencies(), "mqtt": Latencies(), "opcua": Latencies()}
    sent: dict[int, int] = {}
    mqtt_seen: dict[int, float] = {}

    def on_message(c, u, msg):
        r = json.loads(msg.payload)
        lat["mqtt"].add(r["frame_id"], r["decision_ns"])
        mqtt_seen.setdefault(r["frame_id"], time.monotonic())

    consumer = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-consumer", clean_session=False)
    consumer.reconnect_delay_set(0.05, 0.5)
    consumer.on_connect = lambda c, u, f, rc, pr: c.subscribe("edge/+/decision", qos=1)
    consumer.on_message = on_message
    consumer.connect("127.0.0.1", port)
    consumer.loop_start()
    pub_ep, replay_ep = f"ipc://{tmp}/pub.sock", f"ipc://{tmp}/replay.sock"
    stop = threading.Event()
    with AlertPublisher(pub_ep, replay_ep, tmp / "journal.sqlite", "st1", 1.0, run_id=run_id) as pub:
        gw = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli.alerts", "--endpoint", pub_ep, "--replay-endpoint", replay_ep,
             "--no-state", "--mqtt", f"mqtt://127.0.0.1:{port}", "--mqtt-spool", str(tmp / "spool.sqlite"),
             "--opcua", "opc.tcp://127.0.0.1:0/edge"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        url = None
        while url is None:
            line = gw.stderr.readline()
            if not line:
                raise SystemExit("the gateway exited: " + gw.stderr.read())
            if "OPC UA server listening on " in line:
                url = line.rsplit(" ", 1)[1].strip()
        threading.Thread(target=gw.stderr.read, daemon=True).start()

        def read_gateway():
            for line in gw.stdout:
                r = json.loads(line)
                if "frame_id" in r:
                    lat["gateway"].add(r["frame_id"], r["decision_ns"])

        threading.Thread(target=read_gateway, daemon=True).start()
        end = time.monotonic() + 20
        while pub.counts["subscriptions"] < 1 and time.monotonic() < end:
            pub.tick()
            time.sleep(0.01)
        plc = threading.Thread(target=opcua_plc, args=(url, lat["opcua"], stop, sent), daemon=True)
        plc.start()
        period = 1.0 / args.fps
        n_outage = int(args.outage * args.fps)
        total = args.frames + n_outage + int(2 * args.fps)
        t_next = time.monotonic() + 1.0
        restart_at = None
        outage_ids = range(args.frames, args.frames + n_outage)
        for fid in range(total):
            while time.monotonic() < t_next:
                pub.tick()
                time.sleep(min(0.002, max(0.0, t_next - time.monotonic())))
            t_next += period
            if fid == args.frames:
                broker.kill()
            if fid == args.frames + n_outage:
                broker.start()
                restart_at = time.monotonic()
            r = record(fid, run_id)
            sent[fid] = r["decision_ns"]
            pub.publish(r)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(i in mqtt_seen for i in range(total)):
            pub.tick()
            time.sleep(0.01)
        recovered = [mqtt_seen[i] for i in outage_ids if i in mqtt_seen]
        recovery_s = max(recovered) - restart_at if len(recovered) == n_outage else None
        time.sleep(1.0)
        stop.set()
        gw.terminate()
        gw.wait(30)
    consumer.loop_stop()
    broker.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    steady = range(int(args.fps), args.frames)  # skip the first second (connections warming up)
    rows = [("gateway JSON line (baseline)", lat["gateway"].stats(steady)),
            ("MQTT subscriber, QoS 1 (`--mqtt`)", lat["mqtt"].stats(steady)),
            ("OPC UA client: notified, read, acked (`--opcua`)", lat["opcua"].stats(steady))]  # fmt: skip
    cpu = platform.processor() or platform.machine()
    versions = ", ".join(f"{m} {metadata.version(m)}" for m in ("asyncua", "paho-mqtt", "pyzmq"))
    mosq = subprocess.run([broker.binary, "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    lines = [
        "# Line bridges: measurements",
        "",
        f"{versions}; {mosq[0] if mosq else 'mosquitto'}; load average {load_before:.1f} at the start "
        "(the box is shared with other jobs, so tails are pessimistic).",
        "",
        f"Decision publish -> delivery, {len(steady)} frames at {args.fps:g} frames/s (loopback, {os.cpu_count()} "
        f"cores, {cpu}, shared with other work); `python scripts/bench_bridges.py --frames {args.frames} "
        f"--fps {args.fps:g} --outage {args.outage:g}`:",
        "",
        "| delivered to | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {s['n']} | {s.get('p50', '-')} | {s.get('p99', '-')} | {s.get('max', '-')} |" for name, s in rows]
    got = sum(1 for i in range(total) if i in mqtt_seen)
    lines += [
        "",
        f"Broker outage: mosquitto SIGKILLed for {args.outage:g} s while {n_outage} frames were decided, then "
        f"restarted: the MQTT subscriber had every one of them "
        + (f"{recovery_s:.2f} s after the restart" if recovery_s is not None else "NOT within 30 s")
        + f" (reconnect backoff {BACKOFF_MIN_S:g} s doubling to {BACKOFF_MAX_S:g} s, so at most that plus the "
        f"catch-up); {got}/{total} frames delivered in all, "
        "none lost (repeats, if any, carry the same `dedup_key`).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)
    return 0 if got == total else 1


if __name__ == "__main__":
    sys.exit(main())
