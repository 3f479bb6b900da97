"""The stage processes: one small ZeroMQ loop per stage around the pure functions of ``stages.py``.

* capture: read the source, number frames, queue, dispatch on credit, drop the oldest if live.
* preprocess: the method's preprocessor only (``Method.preprocessor``; no weights, no
  engines), the map geometry into the header, dispatch to the least loaded worker with
  credit; it knows which frame ids each worker holds and since when (the per-frame
  deadline: ``control.OVERDUE``).
* infer: ``load_detector``, ``infer`` / ``infer_batch``, decide, regions.
* alert: decision records, journal, publish, heat-maps, statistics; ids missing for too
  long while later ones were decided are recorded as ERROR "lost".

A frame that fails validation on an internal link is never silently lost: the stage
salvages its identity from the header (``wire.salvage_identity``) and sends one ERROR
frame for it to the alert stage. Every loop sends ``control.BEAT`` about once a second
(the supervisor's stall watchdog) and exits when the supervisor disappears.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable

import zmq

from edge_runtime.errors import DataError, EdgeError
from edge_runtime.geometry import MapGeometry
from edge_runtime.hostmem import retain_freed_memory
from edge_runtime.pipeline import control as C
from edge_runtime.pipeline import stages
from edge_runtime.pipeline.config import Links, RunConfig
from edge_runtime.pipeline.stats import FrameLedger, RunStats
from edge_runtime.pipeline.wire import Frame, WireError, decode, encode, pack_msg, salvage_identity, unpack_msg


class StageIO:
    """A stage process's sockets: the control DEALER to the supervisor plus helpers."""

    def __init__(self, name: str, links: Links, parent_pid: int):
        self.name = name
        self.links = links
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.ctl = self.socket(zmq.DEALER, connect=links.ctl, identity=name.encode(), max_msg=C.CONTROL_MAX_BYTES)
        self._next_beat = 0.0
        self.counters: dict[str, int] = {}  # sent with each beat (e.g. ingress disconnects)

    def socket(self, kind: int, *, bind: str | None = None, connect: str | None = None,
               identity: bytes | None = None, max_msg: int | None = None) -> zmq.Socket:
        """A socket with LINGER set, and MAXMSGSIZE (bytes per part) when it receives."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, C.LINGER_MS)
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

    def beat(self) -> None:
        """A progress heartbeat, at most every ``control.BEAT_S`` (call it from the loop)."""
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + C.BEAT_S
            self.tell(C.BEAT, counters=self.counters)

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
        self.ctx.destroy(linger=C.LINGER_MS)


def load_detector(cfg: RunConfig):
    """The inference workers' detector (the model: weights, engines)."""
    from edge_runtime.backends import load_detector as load

    return load(cfg.bundle, backend=cfg.backend, device=cfg.device, **cfg.backend_options)


def load_preprocessing(cfg: RunConfig) -> stages.Preprocessing:
    """What the preprocess stage runs: the bundle's method preprocessor and map geometry,
    from the manifest alone (no weights, no engines). The no-op backend brings its own."""
    from edge_runtime.bundle import read_manifest

    manifest = read_manifest(cfg.bundle)
    if cfg.backend == "noop":
        from edge_runtime.backends import noop

        return stages.Preprocessing(noop.preprocessor(manifest, **cfg.backend_options), MapGeometry.identity,
                                    False, "noop")
    from edge_runtime import methods

    method = methods.for_manifest(manifest)
    return stages.Preprocessing(method.preprocessor(manifest), lambda shape: method.geometry(shape, manifest),
                                bool(method.needs_xyz(manifest)), method.describe(manifest))


def send_frame(sock: zmq.Socket, frame: Frame, prefix: list | None = None) -> None:
    sock.send_multipart([*(prefix or []), *encode(frame)], copy=False)


def decode_or_salvage(parts: list, where: str, max_bytes: int, io: StageIO) -> tuple[Frame | None, Frame | None]:
    """(frame, None) for a valid message; (None, ERROR frame) when it fails validation but
    its identity survives; (None, None) when nothing can be salvaged (logged)."""
    try:
        return decode(parts, where, max_bytes), None
    except WireError as exc:
        ident = salvage_identity(parts)
        if ident is None:
            io.tell(C.LOG, text=stages.short(f"{io.name}: dropped an internal message with no frame identity: {exc}"))
            return None, None
        return None, stages.error_frame(ident, f"invalid frame inside the pipeline: {exc.problem}")


# =======================================================================================
# capture


def capture_loop(io: StageIO, cfg: RunConfig) -> None:
    """Acquire frames from the source, number them, queue, dispatch on credit, drop if live."""
    from edge_runtime.pipeline.sources import open_source

    src = open_source(cfg, io.ctx)
    out = io.socket(zmq.ROUTER, bind=io.links.cap, max_msg=C.CONTROL_MAX_BYTES)
    out.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sink = io.socket(zmq.PUSH, connect=io.links.sink)
    io.tell(C.HELLO, source=src.describe(), live=src.live,
            endpoints={"ingress": src.bound} if hasattr(src, "bound") else {})
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
                send_frame(out, queue[0], [peer])
            except zmq.ZMQError:  # preprocess stage went away: keep the frame, wait for credit
                return 0
            queue.popleft()
            credit -= 1
        return credit

    try:
        while not io.orphaned():
            if hasattr(src, "poll_events"):
                counts = {f"ingress_{k}": v for k, v in src.poll_events().items()}
                if any(io.counters.get(k, 0) != v for k, v in counts.items()):
                    io._next_beat = 0.0  # report a change at once
                io.counters.update(counts)
            io.beat()
            limit_left = None if cfg.frames is None else cfg.frames - next_id
            acquiring = started and not stopping and (limit_left is None or limit_left > 0)
            # A live source is read whenever it has a frame (overflow drops the oldest); any
            # other source only when the preprocess stage asks for a frame (no prefetch: the
            # frame's capture time is when the pipeline could take it, lowest latency).
            can_read = acquiring and (src.live or (credit > 0 and not queue))
            due = src.due_in() if can_read else 0.0
            if can_read and due is None:  # source exhausted
                stopping, can_read = True, False
            wait = C.POLL_MS if not can_read or due == math.inf else min(C.POLL_MS, due * 1000.0)
            events = dict((reading if can_read else idle).poll(wait))
            for cmd in io.commands():
                if cmd["kind"] == C.START:
                    started = True
                elif cmd["kind"] == C.STOP:
                    stopping = True
                elif cmd["kind"] == C.QUIT:
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
                        send_frame(sink, frame)
                        continue
                    if len(queue) >= cfg.queue:  # live source, pipeline behind: drop the oldest
                        send_frame(sink, stages.drop_frame(queue.popleft(), cfg.queue))
                    queue.append(frame)
            credit = dispatch(credit)
            if not eos_sent and started and (stopping or (limit_left is not None and limit_left <= 0)):
                # Frames still queued here are in flight: the alert stage waits for every id < next_id.
                send_frame(sink, Frame({"kind": "eos", "station": cfg.station, "run_id": cfg.run_id,
                                        "captured": next_id}))
                if hasattr(src, "poll_events"):  # disconnects still being classified: settle them
                    io.counters.update({f"ingress_{k}": v for k, v in src.poll_events(settle=True).items()})
                io.tell(C.EOS, captured=next_id, counters=io.counters)
                eos_sent = True
    finally:
        src.close()
        auth = getattr(io.ctx, "edge_auth", None)
        if auth is not None:
            auth.stop()


# =======================================================================================
# preprocess


def preprocess_loop(io: StageIO, cfg: RunConfig) -> None:
    """Pull frames from capture one at a time, preprocess, dispatch to workers with credit,
    and watch each worker's oldest frame against the per-frame deadline."""
    prep = load_preprocessing(cfg)
    limits = cfg.limits()
    deadline_s = cfg.deadline_s()
    up = io.socket(zmq.DEALER, connect=io.links.cap, identity=b"preprocess", max_msg=2 * cfg.max_frame_bytes)
    down = io.socket(zmq.ROUTER, bind=io.links.pre, max_msg=C.CONTROL_MAX_BYTES)
    down.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sink = io.socket(zmq.PUSH, connect=io.links.sink)
    io.tell(C.HELLO, preprocessing=prep.name)
    poller = zmq.Poller()
    for s in (io.ctl, up, down):
        poller.register(s, zmq.POLLIN)
    ready: deque[Frame] = deque()
    credit: dict[bytes, int] = {}
    inflight: dict[bytes, dict[int, tuple[dict, float]]] = {}  # worker -> {frame id: (header, sent at)}
    gone: set[bytes] = set()
    overdue: set[bytes] = set()  # workers reported past the deadline
    asked = False
    keep_rgb = cfg.heatmaps is not None
    while not io.orphaned():
        io.beat()
        if not asked and len(ready) < cfg.batch:
            up.send(pack_msg(C.CREDIT, n=1))
            asked = True
        events = dict(poller.poll(C.POLL_MS))
        for cmd in io.commands():
            if cmd["kind"] == C.DEAD:
                ident = cmd["worker"].encode()
                gone.add(ident)
                credit.pop(ident, None)
                late = cmd.get("deadline_frame")
                for fid, (header, _) in sorted(inflight.pop(ident, {}).items()):
                    if fid == late:
                        reason = (f"deadline: inference worker {cmd['worker']} did not decide this frame within "
                                  f"{deadline_s:g} s (killed and restarted)")
                    else:
                        reason = f"inference worker {cmd['worker']} died ({cmd['how']}) holding this frame"
                    send_frame(sink, stages.fail(Frame(header), "ERROR", reason))
            elif cmd["kind"] == C.QUIT:
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
            frame, failed = decode_or_salvage(parts, "frame from capture", 2 * cfg.max_frame_bytes, io)
            if failed is not None:
                send_frame(sink, failed)
            if frame is not None:
                frame = stages.preprocess_frame(prep, frame, keep_rgb, limits)
                if frame.header["status"] is not None:
                    send_frame(sink, frame)
                else:
                    ready.append(frame)
        while ready:
            free = [i for i, n in credit.items() if n > 0]
            if not free:
                break
            ident = min(free, key=lambda i: len(inflight.get(i, ())))  # least loaded worker
            frame = ready[0]
            try:
                send_frame(down, frame, [ident])
            except zmq.ZMQError:  # worker disconnected (dying): forget its credit, keep the frame
                credit.pop(ident, None)
                continue
            ready.popleft()
            credit[ident] -= 1
            inflight.setdefault(ident, {})[frame.header["frame_id"]] = (
                {k: v for k, v in frame.header.items() if k != "arrays"}, time.monotonic())
        now = time.monotonic()
        for ident, held in inflight.items():
            if ident in overdue or ident in gone or not held:
                continue
            fid, (_, sent) = min(held.items(), key=lambda kv: kv[1][1])
            if now - sent > deadline_s:
                overdue.add(ident)
                io.tell(C.OVERDUE, worker=ident.decode(errors="replace"), frame_id=fid,
                        held_s=round(now - sent, 3))


# =======================================================================================
# infer


def default_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per inference worker when none are asked for: (cores - 1) // workers,
    at least 1. One core stays with the capture, preprocess and alert processes: torch's
    OpenMP threads wait for each other at every operator, so a worker whose threads share
    every core with busy stages stalls (measured on 2 cores under load: 2 threads 2.5 s per
    cfm-tiny frame, 1 thread 0.15 s; docs/benchmarks.md)."""
    cores = cores or os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, workers))


def infer_loop(io: StageIO, cfg: RunConfig) -> None:
    """Take up to ``batch`` frames from the preprocess stage, run the model, decide, send on."""
    from edge_runtime.geometry import regions_from_map

    det = load_detector(cfg)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cfg.threads or default_threads(cfg.workers))
    link = io.socket(zmq.DEALER, connect=io.links.pre, identity=io.name.encode(), max_msg=2 * cfg.max_frame_bytes)
    sink = io.socket(zmq.PUSH, connect=io.links.sink)
    thresholds = det.manifest.get("thresholds")
    selection = getattr(det, "selection", None)  # set by --backend auto: say what it chose and why
    if selection is not None and io.name.startswith("infer0."):
        io.tell(C.LOG, text=selection.explain())
    io.tell(C.HELLO, detector=det.name, calibrated=bool((thresholds or {}).get("image") is not None))
    # Credit for two batches: one in hand, the next already queued at this worker, so it never
    # waits a credit round trip between batches (the pipeline's overhead per frame).
    link.send(pack_msg(C.CREDIT, n=2 * cfg.batch, done=[]))
    poller = zmq.Poller()
    poller.register(io.ctl, zmq.POLLIN)
    poller.register(link, zmq.POLLIN)
    while not io.orphaned():
        io.beat()
        events = dict(poller.poll(C.POLL_MS))
        if any(cmd["kind"] == C.QUIT for cmd in io.commands()):
            return
        if link not in events:
            continue
        frames, done, received = [], [], 0
        while received < cfg.batch:
            try:
                parts = link.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            received += 1
            frame, failed = decode_or_salvage(parts, "frame from preprocess", 2 * cfg.max_frame_bytes, io)
            if failed is not None:
                send_frame(sink, failed)
                done.append(failed.header["frame_id"])
            if frame is not None:
                frames.append(frame)
        out = stages.infer_frames(det, frames, thresholds, regions_from_map,
                                  keep_map=cfg.heatmaps is not None, worker=io.name)
        for frame in out:
            send_frame(sink, frame)
        link.send(pack_msg(C.CREDIT, n=received, done=done + [f.header["frame_id"] for f in out]))


# =======================================================================================
# alert


def alert_loop(io: StageIO, cfg: RunConfig) -> None:
    """Turn finished frames into decision records: journal, publish, heat-map, statistics."""
    from edge_runtime.pipeline.alerts import AlertPublisher, write_overlay

    publisher = AlertPublisher(cfg.alerts, cfg.replay, cfg.journal, cfg.station, cfg.heartbeat_s,
                               cfg.curve_keys, run_id=cfg.run_id, allow_remote=cfg.allow_remote,
                               curve_clients=cfg.curve_clients)
    try:
        sink = io.socket(zmq.PULL, bind=io.links.sink, max_msg=2 * cfg.max_frame_bytes)
        poller = zmq.Poller()
        for s in (io.ctl, sink, *publisher.sockets):
            poller.register(s, zmq.POLLIN)
        io.tell(C.HELLO, endpoints=publisher.endpoints)
        subscribed_sent = False
        ledger, stats = FrameLedger(), RunStats(warmup=cfg.warmup)
        final_sent, next_report, next_sweep = False, 0.0, 0.0
        gap_since: dict[int, float] = {}
        lost_s = cfg.lost_s()

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
                stats.duplicates += 1  # a late result of a frame already recorded: never published again
                return
            gap_since.pop(header["frame_id"], None)
            heatmap = None
            if cfg.heatmaps and {"amap", "rgb"} <= frame.arrays.keys():
                try:
                    geometry = (MapGeometry.from_wire(header["geometry"]) if header.get("geometry")
                                else MapGeometry.identity(frame.arrays["rgb"].shape))
                    heatmap = str(write_overlay(Path(cfg.heatmaps) / f"{cfg.run_id}_{header['frame_id']:08d}.png",
                                                frame.arrays["rgb"], frame.arrays["amap"], geometry=geometry,
                                                regions=header.get("regions"),
                                                label={"score": header.get("score"),
                                                       "threshold": header.get("threshold"),
                                                       "decision": header.get("status"),
                                                       "part_id": header["frame_id"],
                                                       "time": header.get("capture_ns")}))
                except DataError as exc:
                    io.tell(C.LOG, text=stages.short(f"heat-map not written: {exc}"))
            record = publish(stages.build_record(header, cfg.model, cfg.bundle_hash, stages.now_ns(), heatmap))
            stages.stamp(frame, "alert", entry)
            stats.add(record, header["t"], header.get("infer_ms"), header.get("category"))

        def record_error(fid: int, reason: str) -> None:
            ledger.add(fid)
            gap_since.pop(fid, None)
            record = stages.shutdown_record(cfg.station, cfg.run_id, fid, cfg.model, cfg.bundle_hash, reason)
            stats.add(publish(record), {}, None)

        shutdown: dict = {"reason": None, "guessed": False}  # set by FINALIZE

        def finalize(captured: int | None, reason: str) -> None:
            shutdown["reason"] = reason
            if stats.captured is None:
                # capture's count unknown (it did not report in time): the ids seen are a lower bound
                shutdown["guessed"] = captured is None
                stats.captured = captured if captured is not None else ledger.count_upper()
            for fid in ledger.missing(stats.captured):
                record_error(fid, reason)

        def after_finalize(fid: int | None = None, captured: int | None = None) -> None:
            """A guessed count grows with every later id (a record, or capture's own count),
            and the ids it then covers without a record get one: the invariant keeps holding."""
            if shutdown["reason"] is None or not shutdown["guessed"]:
                return
            if captured is not None:
                stats.captured, shutdown["guessed"] = max(stats.captured, captured), False
            elif fid is not None and fid >= stats.captured:
                stats.captured = fid + 1
            for missing in ledger.missing(stats.captured):
                record_error(missing, shutdown["reason"])

        def sweep(now: float) -> None:
            """Ids still missing while later ids were decided: ERROR "lost" after ``lost_s``
            (bounds the ledger: a missing id can never hold it open)."""
            for fid in ledger.gaps():
                since = gap_since.setdefault(fid, now)
                if now - since > lost_s:
                    record_error(fid, f"lost inside the pipeline: no decision {lost_s:g} s after later frames "
                                      "were decided")
            for fid in [f for f in gap_since if f < ledger.low]:
                del gap_since[fid]

        while not io.orphaned():
            io.beat()
            poller.poll(C.POLL_MS)  # wake on control, frames or gateway requests; each is drained below
            for cmd in io.commands():
                if cmd["kind"] == C.FINALIZE:
                    finalize(cmd.get("captured"), cmd["reason"])
                elif cmd["kind"] == C.QUIT:
                    return
            if not subscribed_sent and publisher.counts["subscriptions"] >= cfg.wait_subscribers:
                io.tell(C.SUBSCRIBED, subscriptions=publisher.counts["subscriptions"])
                subscribed_sent = True
            for _ in range(256):  # bounded batch so ticks and control stay responsive
                try:
                    parts = sink.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                frame, failed = decode_or_salvage(parts, "frame to the alert stage", 2 * cfg.max_frame_bytes, io)
                frame = frame or failed
                if frame is None:
                    continue
                if frame.header.get("kind") == "eos":
                    if shutdown["guessed"]:
                        after_finalize(captured=int(frame.header["captured"]))
                    else:
                        stats.captured = frame.header["captured"]
                else:
                    handle(frame)
                    after_finalize(fid=frame.header.get("frame_id"))
            publisher.tick()
            now = time.monotonic()
            if now >= next_sweep:
                sweep(now)
                next_sweep = now + 1.0
            done = stats.captured is not None and ledger.count >= stats.captured
            if now >= next_report or (done and not final_sent):
                snap = stats.snapshot(time.time_ns())
                snap["alerts"] = dict(publisher.counts)
                io.tell(C.FINAL if done and not final_sent else C.STATS, snap=snap)
                final_sent = final_sent or done
                next_report = now + cfg.stats_interval_s
    finally:
        publisher.close()


LOOPS: dict[str, Callable[[StageIO, RunConfig], None]] = {
    "capture": capture_loop,
    "preprocess": preprocess_loop,
    "infer": infer_loop,
    "alert": alert_loop,
}


def stage_main(role: str, name: str, cfg: RunConfig, links: Links, parent_pid: int) -> None:
    """Entry point of a stage process: run its loop; report a fatal error to the supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group;
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor decides how to stop
    retain_freed_memory()  # per-frame arrays reuse the heap instead of page-faulting afresh
    io = StageIO(name, links, parent_pid)
    code = 0
    try:
        LOOPS[role](io, cfg)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, EdgeError) else "".join(traceback.format_exception_only(exc)).strip()
        io.tell(C.FATAL, error=stages.short(detail))
        code = 1
    finally:
        io.close()
    sys.exit(code)
