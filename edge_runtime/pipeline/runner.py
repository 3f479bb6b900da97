"""The streaming pipeline: stage processes joined by ZeroMQ, and the supervisor that runs them.

::

    capture --credit--> preprocess --credit--> infer worker x N --+
       |  (drops oldest if live)   | (tracks frames per worker)    |
       +---------------------------+------------ PUSH -------------+--> alert (journal, PUB,
                                                                          heartbeat, replay,
    runner (supervisor): control ROUTER <-> every stage's DEALER           stats) --> runner

* Every stage is its own process (multiprocessing "spawn"), a small loop around the pure
  functions of ``stages.py``. Links are ipc:// sockets in a per-run temp directory
  (``link="tcp"``: 127.0.0.1 ports). Frames travel in the ``wire`` format, zero-copy.
* Flow control is credit based, so no queue is ever unbounded and the capture stage
  knows exactly when the pipeline is behind: the preprocess stage asks capture for one
  frame at a time; each inference worker announces ``batch`` credits to the preprocess
  stage and returns one (with the ids it finished) per frame done. The preprocess stage
  therefore knows which frame ids each worker holds: when the supervisor sees a worker
  die (SIGKILL, OOM, segfault) it tells the preprocess stage, which reports those frames
  as ERROR "worker died", and starts a replacement.
* Capture keeps a local queue of ``queue`` frames. A live source (a camera: synthetic
  station with ``fps``, ZeroMQ ingress) drops the OLDEST queued frame when a new one
  arrives and the queue is full, and reports it as a DROPPED record (the frame id is
  accounted for, the PLC rejects the part); a replayed directory, or the synthetic
  station on demand, is read only when the preprocess stage asks for a frame
  (lossless, and no frame ages in a queue).
* Terminal frames (errors, drops, decisions) go to the alert stage over PUSH/PULL. The
  alert stage builds the decision record, journals and publishes it through
  ``alerts.AlertPublisher`` (never blocking on a slow gateway), keeps ``stats.RunStats``
  and reports snapshots to the supervisor. Frame ids are gap-free, so it knows exactly
  which frames are still missing.
* Shutdown (``frames`` reached, directory exhausted, SIGINT / SIGTERM, a fatal stage
  error): capture stops acquiring and reports how many frames it captured; the
  supervisor waits up to ``drain_timeout_s`` for the alert stage to have a record for
  each, then makes it record every still-missing frame as ERROR "not decided before
  shutdown", so the invariant captured = OK + NOT_OK + NOT_DECIDABLE + ERROR + DROPPED
  always holds at exit. Every socket has a LINGER; stage processes ignore SIGINT /
  SIGTERM (the supervisor decides), exit when the supervisor disappears, and are killed
  if they do not quit in time.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq

from edge_runtime.errors import DataError, EdgeError
from edge_runtime.pipeline import stages
from edge_runtime.pipeline.stats import FrameLedger, RunStats
from edge_runtime.pipeline.wire import (DEFAULT_MAX_FRAME_BYTES, Frame, WireError, decode, encode, pack_msg,
                                        unpack_msg)

CONTROL_MAX_BYTES = 1 << 20  # cap on control / credit messages (snapshots are a few KB)
POLL_MS = 50  # stage loop poll period: bounds reaction time to control messages
LINGER_MS = 500  # every socket: how long close() may spend flushing


@dataclass
class RunConfig:
    """Everything a run needs; plain data so it travels to the spawned stage processes.

    bundle: model bundle directory. backend / device / backend_options: ``load_detector``.
    source: "synth", a directory (MVTec 3D-AD layout, test split replayed), or
        "zmq+tcp://HOST:PORT" (ingress PULL socket bound there).
    category: synthetic station category / directory category (None: default / all).
    fps: pace of synth / directory sources (None: as fast as the pipeline takes them).
    frames: stop after capturing this many (None: until the source ends or a signal).
    workers: inference worker processes. batch: frames one worker takes at once
        (``infer_batch``). queue: a live source's capture queue (frames) before the oldest is dropped.
    station, alerts, replay, journal, heartbeat_s: the alert channel (alerts.AlertPublisher).
    heatmaps: directory for NOT_OK overlay PNGs (None: none written).
    allow_remote / curve_keys: bind policy and CURVE server keys for the external sockets
        (ingress, alerts, replay).
    link: "ipc" or "tcp" for the internal stage links. max_frame_bytes: cap on one frame.
    threads: torch threads per inference worker (0: cpu_count // workers, at least 1).
    synth_size / synth_seed / defect_rate: the synthetic station's frames.
    drain_timeout_s: bounded wait for in-flight frames at shutdown.
    startup_timeout_s: bound on model loading and start-up of all stages.
    max_restarts: inference worker restarts allowed before the run is aborted.
    stats_interval_s: period of statistics snapshots. warmup: frame ids below this are
        decided and counted but left out of latency / throughput figures.
    model / bundle_hash / run_id: filled by ``run_pipeline`` when empty.
    """

    bundle: str
    backend: str = "auto"
    device: str = "cpu"
    backend_options: dict = field(default_factory=dict)
    source: str = "synth"
    category: str | None = None
    fps: float | None = None
    frames: int | None = None
    workers: int = 1
    batch: int = 1
    queue: int = 2
    station: str = "station1"
    alerts: str = "tcp://127.0.0.1:5556"
    replay: str | None = "tcp://127.0.0.1:5557"
    journal: str = ""
    heartbeat_s: float = 1.0
    heatmaps: str | None = None
    allow_remote: bool = False
    curve_keys: str | None = None
    link: str = "ipc"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    threads: int = 0
    synth_size: int = 224
    synth_seed: int = 0
    defect_rate: float = 0.2
    drain_timeout_s: float = 30.0
    startup_timeout_s: float = 600.0
    max_restarts: int = 10
    stats_interval_s: float = 0.5
    warmup: int = 0
    model: str = ""
    bundle_hash: str = ""
    run_id: str = ""


@dataclass
class Links:
    """Endpoints of the internal links: control (runner ROUTER), capture -> preprocess,
    preprocess -> workers, and the sink (alert stage PULL)."""

    ctl: str
    cap: str
    pre: str
    sink: str


def make_links(kind: str, tmpdir: str | Path) -> Links:
    """ipc:// paths inside ``tmpdir``, or tcp://127.0.0.1 ports the OS reports free."""
    names = ("ctl", "cap", "pre", "sink")
    if kind == "ipc":
        return Links(*(f"ipc://{Path(tmpdir) / n}" for n in names))
    if kind == "tcp":
        ports = []
        held = []
        for _ in names:  # hold all four at once so they are distinct
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)
            ports.append(s.getsockname()[1])
        for s in held:
            s.close()
        return Links(*(f"tcp://127.0.0.1:{p}" for p in ports))
    raise ValueError(f"link must be 'ipc' or 'tcp', got {kind!r}")


def new_run_id() -> str:
    """A run id: UTC start time plus 8 random hex digits, e.g. 20240611T101500Z-1a2b3c4d."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


# =======================================================================================
# stage side


class _StageIO:
    """A stage process's sockets: the control DEALER to the supervisor plus helpers."""

    def __init__(self, name: str, links: Links, parent_pid: int):
        self.name = name
        self.links = links
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.ctl = self.socket(zmq.DEALER, connect=links.ctl, identity=name.encode(), max_msg=CONTROL_MAX_BYTES)

    def socket(self, kind: int, *, bind: str | None = None, connect: str | None = None,
               identity: bytes | None = None, max_msg: int | None = None) -> zmq.Socket:
        """A socket with LINGER set, and MAXMSGSIZE (bytes per part) when it receives."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if max_msg is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_msg)
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
        return sock

    def tell(self, kind: str, **fields: Any) -> None:
        """Send a control message to the supervisor."""
        self.ctl.send(pack_msg(kind, stage=self.name, **fields))

    def commands(self) -> list[dict]:
        """Control messages waiting from the supervisor (non-blocking)."""
        out = []
        while True:
            try:
                out.append(unpack_msg(self.ctl.recv(zmq.NOBLOCK), f"control message to {self.name}"))
            except zmq.Again:
                return out

    def orphaned(self) -> bool:
        """True when the supervisor process is gone (this stage must exit)."""
        return os.getppid() != self.parent_pid

    def close(self) -> None:
        self.ctx.destroy(linger=LINGER_MS)


def _load_detector(cfg: RunConfig):
    from edge_runtime.backends.base import load_detector

    return load_detector(cfg.bundle, backend=cfg.backend, device=cfg.device, **cfg.backend_options)


def _send_frame(sock: zmq.Socket, frame: Frame, prefix: list | None = None) -> None:
    sock.send_multipart([*(prefix or []), *encode(frame)], copy=False)


def _capture_loop(io: _StageIO, cfg: RunConfig) -> None:
    """Acquire frames from the source, number them, queue, dispatch on credit, drop if live."""
    from edge_runtime.pipeline.sources import open_source

    src = open_source(cfg, io.ctx)
    out = io.socket(zmq.ROUTER, bind=io.links.cap, max_msg=CONTROL_MAX_BYTES)
    out.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sink = io.socket(zmq.PUSH, connect=io.links.sink)
    io.tell("hello", source=src.describe(), live=src.live)
    idle = zmq.Poller()  # control and credits only
    for s in (io.ctl, out):
        idle.register(s, zmq.POLLIN)
    reading = zmq.Poller()  # ... and the ingress socket, while acquiring
    for s in (io.ctl, out, src.socket):
        if s is not None:
            reading.register(s, zmq.POLLIN)
    queue: deque[Frame] = deque()
    credit, peer = 0, None
    next_id, started, stopping, eos_sent = 0, False, False, False

    def dispatch(credit: int) -> int:
        """Send queued frames, oldest first, while the preprocess stage has credit; returns
        the credit left."""
        while credit and queue:
            try:
                _send_frame(out, queue[0], [peer])
            except zmq.ZMQError:  # preprocess stage went away: keep the frame, wait for credit
                return 0
            queue.popleft()
            credit -= 1
        return credit

    try:
        while not io.orphaned():
            limit_left = None if cfg.frames is None else cfg.frames - next_id
            acquiring = started and not stopping and (limit_left is None or limit_left > 0)
            # A live source is read whenever it has a frame (overflow drops the oldest); any
            # other source only when the preprocess stage asks for a frame (no prefetch: the
            # frame's capture time is when the pipeline could take it, lowest latency).
            can_read = acquiring and (src.live or (credit > 0 and not queue))
            due = src.due_in() if can_read else 0.0
            if can_read and due is None:  # source exhausted
                stopping, can_read = True, False
            wait = POLL_MS if not can_read or due == math.inf else min(POLL_MS, due * 1000.0)
            events = dict((reading if can_read else idle).poll(wait))
            for cmd in io.commands():
                if cmd["kind"] == "start":
                    started = True
                elif cmd["kind"] == "stop":
                    stopping = True
                elif cmd["kind"] == "quit":
                    return
            while out in events:
                try:
                    ident, payload = out.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                credit += int(unpack_msg(payload, "credit from preprocess").get("n", 0))
                peer = ident
            credit = dispatch(credit)  # before reading: a slow read must not hold a queued frame back
            if can_read and not stopping and (src.socket in events if src.socket is not None
                                              else src.due_in() == 0.0):
                for captured in src.read(limit_left):
                    frame = stages.capture_frame(captured, cfg.station, cfg.run_id, next_id)
                    next_id += 1
                    if frame.header["status"] is not None:
                        _send_frame(sink, frame)
                        continue
                    if len(queue) >= cfg.queue:  # live source, pipeline behind: drop the oldest
                        _send_frame(sink, stages.drop_frame(queue.popleft(), cfg.queue))
                    queue.append(frame)
            credit = dispatch(credit)
            if not eos_sent and started and (stopping or (limit_left is not None and limit_left <= 0)):
                # Frames still queued here are in flight: the alert stage waits for every id < next_id.
                _send_frame(sink, Frame({"kind": "eos", "station": cfg.station, "run_id": cfg.run_id,
                                         "captured": next_id}))
                io.tell("eos", captured=next_id)
                eos_sent = True
    finally:
        src.close()


def _preprocess_loop(io: _StageIO, cfg: RunConfig) -> None:
    """Pull frames from capture one at a time, preprocess, dispatch to workers with credit."""
    det = _load_detector(cfg)
    up = io.socket(zmq.DEALER, connect=io.links.cap, identity=b"preprocess", max_msg=2 * cfg.max_frame_bytes)
    down = io.socket(zmq.ROUTER, bind=io.links.pre, max_msg=CONTROL_MAX_BYTES)
    down.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sink = io.socket(zmq.PUSH, connect=io.links.sink)
    io.tell("hello", detector=det.name)
    poller = zmq.Poller()
    for s in (io.ctl, up, down):
        poller.register(s, zmq.POLLIN)
    ready: deque[Frame] = deque()
    credit: dict[bytes, int] = {}
    inflight: dict[bytes, dict[int, dict]] = {}
    gone: set[bytes] = set()
    asked = False
    keep_rgb = cfg.heatmaps is not None
    while not io.orphaned():
        if not asked and len(ready) < cfg.batch:
            up.send(pack_msg("credit", n=1))
            asked = True
        events = dict(poller.poll(POLL_MS))
        for cmd in io.commands():
            if cmd["kind"] == "dead":
                ident = cmd["worker"].encode()
                gone.add(ident)
                credit.pop(ident, None)
                for header in inflight.pop(ident, {}).values():
                    lost = stages.fail(Frame(header), "ERROR",
                                       f"inference worker {cmd['worker']} died ({cmd['how']}) holding this frame")
                    _send_frame(sink, lost)
            elif cmd["kind"] == "quit":
                return
        while down in events:
            try:
                ident, payload = down.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if ident in gone:
                continue
            msg = unpack_msg(payload, f"credit from {ident.decode(errors='replace')}")
            credit[ident] = credit.get(ident, 0) + int(msg.get("n", 0))
            held = inflight.setdefault(ident, {})
            for fid in msg.get("done", []):
                held.pop(fid, None)
        if up in events:
            parts = up.recv_multipart(copy=False)
            asked = False
            try:
                frame = decode(parts, "frame from capture", 2 * cfg.max_frame_bytes)
            except WireError as exc:  # internal link: a bug; the alert stage accounts the id at shutdown
                io.tell("log", text=f"preprocess: dropped an undecodable internal message: {exc}")
            else:
                frame = stages.preprocess_frame(det, frame, keep_rgb)
                if frame.header["status"] is not None:
                    _send_frame(sink, frame)
                else:
                    ready.append(frame)
        while ready:
            free = [i for i, n in credit.items() if n > 0]
            if not free:
                break
            ident = min(free, key=lambda i: len(inflight.get(i, ())))  # least loaded worker
            frame = ready[0]
            try:
                _send_frame(down, frame, [ident])
            except zmq.ZMQError:  # worker disconnected (dying): forget its credit, keep the frame
                credit.pop(ident, None)
                continue
            ready.popleft()
            credit[ident] -= 1
            inflight.setdefault(ident, {})[frame.header["frame_id"]] = {
                k: v for k, v in frame.header.items() if k != "arrays"}


def _infer_loop(io: _StageIO, cfg: RunConfig) -> None:
    """Take up to ``batch`` frames from the preprocess stage, run the model, decide, send on."""
    from edge_runtime.pipeline.alerts import regions_from_map

    det = _load_detector(cfg)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers))
    link = io.socket(zmq.DEALER, connect=io.links.pre, identity=io.name.encode(), max_msg=2 * cfg.max_frame_bytes)
    sink = io.socket(zmq.PUSH, connect=io.links.sink)
    thresholds = det.manifest.get("thresholds")
    selection = getattr(det, "selection", None)  # set by --backend auto: say what it chose and why
    if selection is not None and io.name.startswith("infer0."):
        io.tell("log", text=selection.explain())
    io.tell("hello", detector=det.name, calibrated=bool((thresholds or {}).get("image") is not None))
    link.send(pack_msg("credit", n=cfg.batch, done=[]))
    poller = zmq.Poller()
    poller.register(io.ctl, zmq.POLLIN)
    poller.register(link, zmq.POLLIN)
    while not io.orphaned():
        events = dict(poller.poll(POLL_MS))
        if any(cmd["kind"] == "quit" for cmd in io.commands()):
            return
        if link not in events:
            continue
        frames, received = [], 0
        while received < cfg.batch:
            try:
                parts = link.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            received += 1
            try:
                frames.append(decode(parts, "frame from preprocess", 2 * cfg.max_frame_bytes))
            except WireError as exc:
                io.tell("log", text=f"{io.name}: dropped an undecodable internal message: {exc}")
        out = stages.infer_frames(det, frames, thresholds, regions_from_map,
                                  keep_map=cfg.heatmaps is not None, worker=io.name)
        for frame in out:
            _send_frame(sink, frame)
        link.send(pack_msg("credit", n=received, done=[f.header["frame_id"] for f in out]))


def _alert_loop(io: _StageIO, cfg: RunConfig) -> None:
    """Turn finished frames into decision records: journal, publish, heat-map, statistics."""
    from edge_runtime.pipeline.alerts import AlertPublisher, write_overlay

    publisher = AlertPublisher(cfg.alerts, cfg.replay, cfg.journal, cfg.station, cfg.heartbeat_s,
                               cfg.curve_keys, run_id=cfg.run_id, allow_remote=cfg.allow_remote)
    try:
        sink = io.socket(zmq.PULL, bind=io.links.sink, max_msg=2 * cfg.max_frame_bytes)
        io.tell("hello")
        poller = zmq.Poller()
        for s in (io.ctl, sink, *publisher.sockets):
            poller.register(s, zmq.POLLIN)
        ledger, stats = FrameLedger(), RunStats(warmup=cfg.warmup)
        final_sent, next_report = False, 0.0

        def publish(record: dict) -> dict:
            """Journal + publish; returns the record published."""
            try:
                publisher.publish(record)
            except DataError as exc:  # a record that breaks the contract: publish an ERROR instead
                record = stages.shutdown_record(cfg.station, cfg.run_id, record["frame_id"], cfg.model,
                                                cfg.bundle_hash, f"invalid decision record: {exc}")
                publisher.publish(record)
            return record

        def handle(frame: Frame) -> None:
            entry = stages.now_ns()
            header = frame.header
            if not ledger.add(header["frame_id"]):
                stats.duplicates += 1
                return
            heatmap = None
            if cfg.heatmaps and {"amap", "rgb"} <= frame.arrays.keys():
                try:
                    heatmap = str(write_overlay(Path(cfg.heatmaps) / f"{cfg.run_id}_{header['frame_id']:08d}.png",
                                                frame.arrays["rgb"], frame.arrays["amap"],
                                                regions=header.get("regions")))
                except DataError as exc:
                    io.tell("log", text=f"heat-map not written: {exc}")
            record = publish(stages.build_record(header, cfg.model, cfg.bundle_hash, stages.now_ns(), heatmap))
            stages.stamp(frame, "alert", entry)
            stats.add(record, header["t"], header.get("infer_ms"))

        def finalize(captured: int | None, reason: str) -> None:
            if stats.captured is None:
                stats.captured = captured if captured is not None else ledger.count_upper()
            for fid in ledger.missing(stats.captured):
                ledger.add(fid)
                record = stages.shutdown_record(cfg.station, cfg.run_id, fid, cfg.model, cfg.bundle_hash, reason)
                stats.add(publish(record), {}, None)

        while not io.orphaned():
            poller.poll(POLL_MS)  # wake on control, frames or gateway requests; each is drained below
            for cmd in io.commands():
                if cmd["kind"] == "finalize":
                    finalize(cmd.get("captured"), cmd["reason"])
                elif cmd["kind"] == "quit":
                    return
            for _ in range(256):  # bounded batch so ticks and control stay responsive
                try:
                    parts = sink.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    frame = decode(parts, "frame to the alert stage", 2 * cfg.max_frame_bytes)
                except WireError as exc:
                    io.tell("log", text=f"alert: dropped an undecodable internal message: {exc}")
                    continue
                if frame.header.get("kind") == "eos":
                    stats.captured = frame.header["captured"]
                else:
                    handle(frame)
            publisher.tick()
            now = time.monotonic()
            done = stats.captured is not None and ledger.count >= stats.captured
            if now >= next_report or (done and not final_sent):
                snap = stats.snapshot(time.time_ns())
                snap["alerts"] = dict(publisher.counts)
                io.tell("final" if done and not final_sent else "stats", snap=snap)
                final_sent = final_sent or done
                next_report = now + cfg.stats_interval_s
    finally:
        publisher.close()


_LOOPS: dict[str, Callable[[_StageIO, RunConfig], None]] = {
    "capture": _capture_loop,
    "preprocess": _preprocess_loop,
    "infer": _infer_loop,
    "alert": _alert_loop,
}


def _stage_main(role: str, name: str, cfg: RunConfig, links: Links, parent_pid: int) -> None:
    """Entry point of a stage process: run its loop; report a fatal error to the supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group;
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor decides how to stop
    io = _StageIO(name, links, parent_pid)
    code = 0
    try:
        _LOOPS[role](io, cfg)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, EdgeError) else "".join(traceback.format_exception_only(exc)).strip()
        io.tell("fatal", error=detail)
        code = 1
    finally:
        io.close()
    sys.exit(code)


# =======================================================================================
# supervisor side


class _Supervisor:
    """Starts the stages, routes control, restarts dead workers, drains and stops."""

    def __init__(self, cfg: RunConfig, links: Links, on_stats: Callable[[dict], None] | None,
                 on_log: Callable[[str], None] | None):
        self.cfg = cfg
        self.links = links
        self.on_stats = on_stats or (lambda snap: None)
        self.on_log = on_log or (lambda text: None)
        self.mp = multiprocessing.get_context("spawn")
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_BYTES)
        self.ctl.bind(links.ctl)
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.roles: dict[str, str] = {}
        self.gen: dict[int, int] = {}  # worker slot -> generation
        self.restarts = 0
        self.signals = 0
        self.snap: dict | None = None
        self.final: dict | None = None
        self.captured: int | None = None
        self.error: str | None = None
        self.stopped_by: str | None = None
        self.info: dict[str, dict] = {}  # each stage's hello message
        self.calibrated: bool | None = None

    # -- processes --------------------------------------------------------------------

    def spawn(self, role: str, name: str) -> None:
        proc = self.mp.Process(target=_stage_main, args=(role, name, self.cfg, self.links, os.getpid()),
                               name=f"edge-{name}", daemon=False)
        proc.start()
        self.procs[name] = proc
        self.roles[name] = role

    def worker_name(self, slot: int) -> str:
        return f"infer{slot}.{self.gen[slot]}"

    def send(self, name: str, kind: str, **fields: Any) -> None:
        try:
            self.ctl.send_multipart([name.encode(), pack_msg(kind, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the stage is gone; its absence is handled by the liveness check
            pass

    # -- main loop ----------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.monotonic()
        self.spawn("alert", "alert")
        for slot in range(cfg.workers):
            self.gen[slot] = 0
            self.spawn("infer", self.worker_name(slot))
        self.spawn("preprocess", "preprocess")
        self.spawn("capture", "capture")
        waiting = set(self.procs)
        started_at = None
        drain_deadline = finalize_deadline = None
        while True:
            now = time.monotonic()
            for ident, payload in self._messages():
                self._handle(ident, payload, waiting)
            if self.final is not None:
                break
            if started_at is None and not waiting and self.error is None:
                self.send("capture", "start")
                started_at = now
                self.on_log(f"started: {', '.join(sorted(self.procs))}")
            if started_at is None and self.error is None and now - t0 > cfg.startup_timeout_s:
                self.error = f"stages {sorted(waiting)} did not start within {cfg.startup_timeout_s:.0f} s"
            self._check_processes()
            if self.signals and self.stopped_by is None:
                self.stopped_by = "signal"
                self.on_log("stopping: draining in-flight frames (press Ctrl-C again to stop at once)")
                self.send("capture", "stop")
            ending = self.error is not None or self.signals > 1 or (
                drain_deadline is not None and now > drain_deadline)
            if drain_deadline is None and (self.captured is not None or self.signals or self.error):
                drain_deadline = now + cfg.drain_timeout_s
            if ending and "alert" not in self.procs:  # nobody left to finish the records
                break
            if ending and finalize_deadline is None:
                if self.error is not None and "capture" in self.procs:
                    self.send("capture", "stop")
                reason = ("not decided before shutdown: " +
                          (self.error or ("second stop signal" if self.signals > 1 else
                                          f"drain timeout of {cfg.drain_timeout_s:g} s")))
                self.send("alert", "finalize", captured=self.captured, reason=reason[:2000])
                finalize_deadline = now + 5.0
            if finalize_deadline is not None and now > finalize_deadline:
                self.error = self.error or "the alert stage did not finish its records"
                break
        self._quit_all()
        snap = self.final or self.snap or {}
        return {
            **snap,
            "run_id": cfg.run_id, "station": cfg.station, "model": cfg.model, "bundle_hash": cfg.bundle_hash,
            "backend": cfg.backend, "device": cfg.device, "workers": cfg.workers, "batch": cfg.batch,
            "source": self.info.get("capture", {}).get("source", cfg.source),
            "detector": self.info.get("preprocess", {}).get("detector"),
            "calibrated": self.calibrated,
            "worker_restarts": self.restarts,
            "stopped_by": "error" if self.error else (self.stopped_by or "end of input"),
            "wall_s": round(time.monotonic() - t0, 3),
            "run_s": round(time.monotonic() - started_at, 3) if started_at else 0.0,
            "error": self.error,
            "config": asdict(cfg),
        }

    def _messages(self) -> list[tuple[bytes, bytes]]:
        out = []
        if self.ctl.poll(100):
            while True:
                try:
                    ident, payload = self.ctl.recv_multipart(zmq.NOBLOCK)
                except (zmq.Again, ValueError):
                    break
                out.append((ident, payload))
        return out

    def _handle(self, ident: bytes, payload: bytes, waiting: set[str]) -> None:
        name = ident.decode(errors="replace")
        try:
            msg = unpack_msg(payload, f"control message from {name}")
        except WireError as exc:
            self.on_log(str(exc))
            return
        kind = msg["kind"]
        if kind == "hello":
            waiting.discard(name)
            self.info[name] = msg
            if "calibrated" in msg:
                self.calibrated = bool(msg["calibrated"])
        elif kind in ("stats", "final"):
            self.snap = dict(msg["snap"], worker_restarts=self.restarts)
            if kind == "final":
                self.final = self.snap
            self.on_stats(self.snap)
        elif kind == "eos":
            self.captured = int(msg["captured"])
            self.stopped_by = self.stopped_by or ("frame limit" if self.cfg.frames is not None
                                                  and self.captured >= self.cfg.frames else "end of input")
        elif kind == "log":
            self.on_log(str(msg.get("text")))
        elif kind == "fatal":
            self.error = self.error or f"stage {name} failed: {msg.get('error')}"
            self.on_log(self.error)

    def _check_processes(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            code = proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            del self.procs[name]
            if self.roles[name] == "infer" and self.error is None:
                self.restarts += 1
                slot = int(name[len("infer"):].split(".")[0])
                self.send("preprocess", "dead", worker=name, how=how)
                if self.restarts > self.cfg.max_restarts:
                    self.error = f"inference workers died {self.restarts} times (last: {name}, {how}); giving up"
                    self.on_log(self.error)
                    continue
                self.gen[slot] += 1
                self.on_log(f"inference worker {name} died ({how}); starting {self.worker_name(slot)}")
                self.spawn("infer", self.worker_name(slot))
            elif self.error is None:
                self.error = f"stage {name} exited unexpectedly ({how})"
                self.on_log(self.error)

    def _quit_all(self) -> None:
        for name in self.procs:
            self.send(name, "quit")
        deadline = time.monotonic() + 5.0
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        self.ctx.destroy(linger=0)


def run_pipeline(cfg: RunConfig, on_stats: Callable[[dict], None] | None = None,
                 on_log: Callable[[str], None] | None = None) -> dict:
    """Run the pipeline until the source ends, ``cfg.frames`` are captured, or SIGINT /
    SIGTERM (handled here when called from the main thread; a second signal stops at once).

    ``on_stats(snapshot)`` is called with each statistics snapshot (about every
    ``cfg.stats_interval_s``), ``on_log(text)`` with events (worker restarts, errors).
    Returns the final summary: the last ``RunStats`` snapshot (frames, invariant,
    throughput, latency_ms, reasons, alerts) plus run_id, station, model, bundle_hash,
    backend, device, workers, batch, source, detector, calibrated, worker_restarts,
    stopped_by, wall_s (including start-up), run_s (from first capture), error (None
    when the run ended normally), config (the RunConfig as a dict).
    """
    if cfg.workers < 1 or cfg.batch < 1 or cfg.queue < 1:
        raise ValueError(f"workers, batch and queue must be >= 1 (got {cfg.workers}, {cfg.batch}, {cfg.queue})")
    if not cfg.run_id:
        cfg.run_id = new_run_id()
    if not cfg.model or not cfg.bundle_hash:
        from edge_runtime.pipeline.store import bundle_info

        info = bundle_info(cfg.bundle)
        cfg.model = cfg.model or info["model"]
        cfg.bundle_hash = cfg.bundle_hash or info["bundle_hash"]
    if not cfg.journal:
        from edge_runtime.pipeline.store import runtime_home

        cfg.journal = str(runtime_home() / "journal" / f"{cfg.station}.sqlite")
    tmp = tempfile.mkdtemp(prefix="edge-run-")
    sup = None
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            if sup is not None:
                sup.signals += 1

        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup = _Supervisor(cfg, make_links(cfg.link, tmp), on_stats, on_log)
        return sup.run()
    finally:
        if sup is not None:
            sup.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)

