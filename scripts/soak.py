"""Soak test of the station: the no-op backend fed through ZeroMQ ingress for a bounded time.

Starts ``edge-run`` (no-op backend, ZeroMQ ingress, loopback alerts) as a subprocess, pushes
frames into its ingress at ``--fps`` from a camera thread, and reads every alert from a SUB
socket. Every ``--sample-s`` seconds it records, for the supervisor and each stage process,
the resident memory (VmRSS) and the open file descriptors, with the frames sent and the
decisions received so far. At the end (after ``--minutes``) the camera stops, the station is
stopped with SIGTERM, and the script checks the journal: every frame sent must have exactly
one decision record (lost = sent without a record, duplicated = a frame id or a sent frame
with two records). Prints one table of samples and a verdict; ``--json FILE`` writes it all.

    python scripts/soak.py --minutes 10 --fps 30 --size 256
    python scripts/soak.py --minutes 1 --json runs/soak.json     # a quick check

Not part of CI (it is bounded in time, not fast). Figures: docs/benchmarks.md, "Soak".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from edge_runtime.backends.noop import write_bundle
from edge_runtime.pipeline.journal import Journal
from edge_runtime.pipeline.wire import Frame, encode

ENDPOINTS = re.compile(r"endpoints: (.*)$")
HEARTBEAT_SUFFIX = b".HEARTBEAT"


def proc_tree(root: int) -> dict[int, str]:
    """{pid: name} for ``root`` and its direct children (the stages), from /proc."""
    out = {root: "supervisor"}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == root:
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(d.name)] = ("resource_tracker" if "resource_tracker" in cmd else
                                "stage" if "spawn_main" in cmd else cmd.split(" ")[0].rsplit("/", 1)[-1])
    return out


def rss_mib_and_fds(pid: int) -> tuple[float, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return kb / 1024.0, fds


STARTED = re.compile(r"(\S+) \(pid (\d+)\)")


class Camera(threading.Thread):
    """Pushes frames (rgb + xyz, ``size`` px) with sources ``soak-<n>`` at ``fps``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, fps: float, size: int):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.linger = 2000
        self.sock.sndhwm = 64
        self.sock.connect(endpoint)
        rng = np.random.default_rng(0)
        self.rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        self.xyz = np.zeros((size, size, 3), np.float32)
        self.xyz[..., 2] = 0.5
        self.period = 1.0 / fps
        self.sent = 0
        self.send_full = 0  # sends refused because the station's ingress queue was full
        self.stop = threading.Event()

    def run(self) -> None:
        t_next = time.monotonic()
        while not self.stop.is_set():
            t_next += self.period
            parts = encode(Frame({"source": f"soak-{self.sent}"}, {"rgb": self.rgb, "xyz": self.xyz}))
            try:
                self.sock.send_multipart(parts, flags=zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                self.send_full += 1  # never entered the station: not a station loss
            delay = t_next - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
        self.sock.close()


class Listener(threading.Thread):
    """Reads every alert; counts decisions by kind, and heartbeats."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.rcvhwm = 100_000
        self.sock.subscribe(b"")
        self.sock.connect(endpoint)
        self.decisions: dict[str, int] = {}
        self.heartbeats = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            while True:
                try:
                    topic, payload = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if topic.endswith(HEARTBEAT_SUFFIX):
                    self.heartbeats += 1
                    continue
                rec = msgpack.unpackb(payload)
                self.decisions[rec["decision"]] = self.decisions.get(rec["decision"], 0) + 1
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the camera sends (default 10)")
    ap.add_argument("--fps", type=float, default=30.0, help="camera frame rate (default 30)")
    ap.add_argument("--size", type=int, default=256, help="frame side in px, rgb + xyz (default 256)")
    ap.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples (default 30)")
    ap.add_argument("--workers", type=int, default=1, help="inference workers (default 1)")
    ap.add_argument("--json", metavar="FILE", help="write samples and verdict as JSON")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    bundle = write_bundle(work / "bundle")
    journal = work / "journal.sqlite"
    cmd = [sys.executable, "-m", "edge_runtime.cli.run", "--model", str(bundle), "--backend", "noop",
           "--source", "zmq+tcp://127.0.0.1:*", "--alerts", "tcp://127.0.0.1:*", "--replay-endpoint", "none",
           "--journal", str(journal), "--workers", str(args.workers), "--wait-subscribers", "1", "--quiet",
           "--json", str(work / "summary.json")]
    station = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    endpoints: dict[str, str] = {}
    ready = threading.Event()
    log: list[str] = []

    def read_log():
        for line in station.stderr:
            log.append(line.rstrip())
            m = ENDPOINTS.search(line)
            if m:
                endpoints.update(dict(item.split(" ", 1) for item in m.group(1).split(", ")))
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not ready.wait(300):
        station.kill()
        print("the station did not start:\n" + "\n".join(log), file=sys.stderr)
        return 1
    ctx = zmq.Context()
    listener = Listener(ctx, endpoints["alerts"])
    listener.start()
    while not any("started:" in line for line in log):  # it waits for our subscriber
        time.sleep(0.1)
    camera = Camera(ctx, endpoints["ingress"], args.fps, args.size)
    t0 = time.monotonic()
    camera.start()
    samples = []
    end = t0 + args.minutes * 60.0
    next_sample = t0
    while True:
        now = time.monotonic()
        if now >= next_sample:
            procs = proc_tree(station.pid)
            names = {int(pid): name for line in log if "started:" in line for name, pid in STARTED.findall(line)}
            row = {"t_s": round(now - t0, 1), "sent": camera.sent, "decided": sum(listener.decisions.values()),
                   "procs": {}}
            for pid, kind in procs.items():
                got = rss_mib_and_fds(pid)
                if got is not None:
                    name = "supervisor" if pid == station.pid else names.get(pid, kind)
                    row["procs"][name] = {"rss_mib": round(got[0], 1), "fds": got[1]}
            samples.append(row)
            print(f"{row['t_s']:7.1f} s  sent {row['sent']:7d}  decided {row['decided']:7d}  " +
                  "  ".join(f"{n} {v['rss_mib']:.0f} MiB/{v['fds']} fd" for n, v in sorted(row["procs"].items())),
                  flush=True)
            next_sample += args.sample_s
        if now >= end or station.poll() is not None:
            break
        time.sleep(min(0.5, max(0.0, min(end, next_sample) - now)))
    camera.stop.set()
    camera.join()
    time.sleep(3.0)  # the last frames reach their decision
    station.send_signal(signal.SIGTERM)
    try:
        station.wait(120)
    except subprocess.TimeoutExpired:
        station.kill()
    listener.stop.set()
    listener.join()
    ctx.term()

    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {}
    with Journal(str(journal)) as j:
        records = j.since(0, run_id=summary.get("run_id"), limit=10_000_000)
    by_source: dict[str, int] = {}
    ids: dict[int, int] = {}
    for r in records:
        by_source[r.get("source") or ""] = by_source.get(r.get("source") or "", 0) + 1
        ids[r["frame_id"]] = ids.get(r["frame_id"], 0) + 1
    sent_sources = {f"soak-{i}" for i in range(camera.sent)}
    lost = len(sent_sources - by_source.keys())
    duplicated = sum(1 for s in sent_sources if by_source.get(s, 0) > 1) + sum(1 for n in ids.values() if n > 1)
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    verdict = {
        "minutes": args.minutes, "fps": args.fps, "size": args.size, "sent": camera.sent,
        "camera_send_full": camera.send_full, "journal_records": len(records),
        "decisions_received_live": listener.decisions, "heartbeats": listener.heartbeats,
        "lost": lost, "duplicated": duplicated,
        "station_frames": summary.get("frames"), "invariant": summary.get("invariant"),
        "rss_growth_mib": {n: round(last["procs"][n]["rss_mib"] - first["procs"][n]["rss_mib"], 1)
                           for n in last["procs"] if n in first["procs"]},
        "fd_growth": {n: last["procs"][n]["fds"] - first["procs"][n]["fds"]
                      for n in last["procs"] if n in first["procs"]},
        "station_exit": station.returncode,
    }
    print(json.dumps(verdict, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"samples": samples, "verdict": verdict}, indent=1))
    return 0 if lost == 0 and duplicated == 0 and station.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
