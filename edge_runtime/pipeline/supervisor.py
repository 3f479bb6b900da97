"""The supervisor (the ``edge-run`` process): starts the stages, routes control, restarts
dead or hung inference workers, drains and stops.

* Start-up: every stage says ``HELLO``; the capture stage gets ``START`` once all have
  (bounded by ``startup_timeout_s``). ``on_ready`` then gets the bound endpoints.
* Worker deaths are a rate: more than ``max_restarts`` deaths within
  ``restart_window_s`` seconds aborts the run; below that each dead worker is replaced.
* Per-frame deadline: the preprocess stage reports a worker holding a frame past
  ``RunConfig.deadline_s()`` (``OVERDUE``); the supervisor kills it, and the frames it held
  become ERROR ("deadline" for the overdue one). A late result can never be published
  twice: the alert stage keeps the first record per id (and the journal is idempotent).
* Stall watchdog: a stage that sent nothing (``BEAT`` comes about every second) for
  ``stall_timeout_s`` is hung: a worker is killed and replaced, any other stage fails
  the run (its frames are then recorded at shutdown).
* Shutdown: as docs/wire.md describes (drain, finalize, quit, kill after 5 s).

Reading the manifest here never imports torch (``store.bundle_info``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Callable

import zmq

from edge_runtime.pipeline import control as C
from edge_runtime.pipeline.config import Links, RunConfig, make_links, new_run_id
from edge_runtime.pipeline.loops import stage_main
from edge_runtime.pipeline.wire import WireError, pack_msg, unpack_msg

QUIT_GRACE_S = 5.0  # a stage that does not exit this long after QUIT is killed
# After an error stops the run, how long the alert stage's FINALIZE waits for capture's
# count of frames: without it the alert stage can only guess the count from the ids it saw,
# and records of frames still in flight (a dead worker's) would land beyond the guess.
CAPTURE_COUNT_WAIT_S = 3.0


def preflight(cfg: RunConfig) -> None:
    """Checks that need no stage process: sizes, the bind policy of every external
    endpoint, CURVE key files. Raises ``ValueError`` / ``BindPolicyError`` / ``DataError``
    before anything starts (``edge-run`` exits 2)."""
    from edge_runtime.pipeline import security
    from edge_runtime.pipeline.alerts import check_station

    cfg.check()
    check_station(cfg.station)
    endpoints = [cfg.alerts] + ([cfg.replay] if cfg.replay else [])
    if cfg.source.startswith("zmq+"):
        endpoints.append(cfg.source[len("zmq+"):])
    for endpoint in endpoints:
        security.check_bind(endpoint, cfg.allow_remote)
    if cfg.curve_keys:
        security.load_keys(cfg.curve_keys)
    if cfg.curve_clients:
        if not cfg.curve_keys:
            raise ValueError("a CURVE client allow-list (--curve-clients) needs the station's keys (--curve-keys)")
        security.check_clients_dir(cfg.curve_clients)


class Supervisor:
    """Starts the stages, routes control, restarts dead workers, drains and stops."""

    def __init__(self, cfg: RunConfig, links: Links, on_stats: Callable[[dict], None] | None,
                 on_log: Callable[[str], None] | None, on_ready: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.links = links
        self.on_stats = on_stats or (lambda snap: None)
        self.on_log = on_log or (lambda text: None)
        self.on_ready = on_ready or (lambda info: None)
        self.mp = multiprocessing.get_context("spawn")
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, C.CONTROL_MAX_BYTES)
        self.ctl.bind(links.ctl)
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.roles: dict[str, str] = {}
        self.gen: dict[int, int] = {}  # worker slot -> generation
        self.restarts = 0
        self.deaths: deque[float] = deque()  # monotonic times of worker deaths in the window
        self.killing: dict[str, dict] = {}  # worker -> why the supervisor killed it
        self.deadline_kills = 0
        self.stall_kills = 0
        self.signals = 0
        self.signal_name: str | None = None
        self.snap: dict | None = None
        self.final: dict | None = None
        self.captured: int | None = None
        self.error: str | None = None
        self.stopped_by: str | None = None
        self.info: dict[str, dict] = {}  # each stage's hello message
        self.last_seen: dict[str, float] = {}
        self.counters: dict[str, int] = {}
        self.calibrated: bool | None = None
        self.subscribed = False  # the alert stage's SUBSCRIBED (wait_subscribers reached)

    # -- processes --------------------------------------------------------------------

    def spawn(self, role: str, name: str) -> None:
        proc = self.mp.Process(target=stage_main, args=(role, name, self.cfg, self.links, os.getpid()),
                               name=f"edge-{name}", daemon=False)
        proc.start()
        self.procs[name] = proc
        self.roles[name] = role
        self.last_seen[name] = time.monotonic()

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
        ready_called = False
        drain_deadline = finalize_deadline = count_wait = None
        while True:
            now = time.monotonic()
            for ident, payload in self._messages():
                self._handle(ident, payload, waiting)
            if self.final is not None:
                break
            if not ready_called and not waiting and self.error is None:
                ready_called = True
                self.on_ready({"endpoints": self.endpoints(), "run_id": cfg.run_id})
                self.on_log("endpoints: " + ", ".join(f"{k} {v}" for k, v in sorted(self.endpoints().items())))
                if cfg.wait_subscribers and not self.subscribed:
                    self.on_log(f"waiting for {cfg.wait_subscribers} alert subscriber(s) on "
                                f"{self.endpoints().get('alerts')}")
            if started_at is None and ready_called and self.subscribed and self.error is None:
                self.send("capture", C.START)
                started_at = now
                self.on_log("started: " + ", ".join(f"{n} (pid {self.procs[n].pid})" for n in sorted(self.procs)))
            if started_at is None and self.error is None and now - t0 > cfg.startup_timeout_s:
                what = (f"stages {sorted(waiting)} did not start" if waiting else
                        f"{cfg.wait_subscribers} alert subscriber(s) did not subscribe")
                self.error = f"{what} within {cfg.startup_timeout_s:g} s (--startup-timeout)"
                self.on_log(self.error)
            self._watchdog(now, waiting)
            self._check_processes()
            if self.signals and self.stopped_by is None:
                self.stopped_by = "signal"
                self.on_log("stopping: draining in-flight frames (press Ctrl-C again to stop at once)")
                self.send("capture", C.STOP)
            ending = self.error is not None or self.signals > 1 or (
                drain_deadline is not None and now > drain_deadline)
            if drain_deadline is None and (self.captured is not None or self.signals or self.error):
                drain_deadline = now + cfg.drain_timeout_s
            if ending and "alert" not in self.procs:  # nobody left to finish the records
                break
            if ending and finalize_deadline is None and count_wait is None:
                if self.error is not None and "capture" in self.procs:
                    self.send("capture", C.STOP)
                count_wait = now + (CAPTURE_COUNT_WAIT_S if self.captured is None and started_at is not None
                                    and "capture" in self.procs else 0.0)
            if (ending and finalize_deadline is None and count_wait is not None
                    and (self.captured is not None or "capture" not in self.procs or now >= count_wait)):
                reason = ("not decided before shutdown: " +
                          (self.error or ("second stop signal" if self.signals > 1 else
                                          f"drain timeout of {cfg.drain_timeout_s:g} s")))
                if self.captured is None and started_at is None:
                    self.captured = 0  # capture was never started: no frame entered the pipeline
                self.send("alert", C.FINALIZE, captured=self.captured, reason=reason[:1000])
                finalize_deadline = now + 5.0
            if finalize_deadline is not None and now > finalize_deadline:
                self.error = self.error or "the alert stage did not finish its records"
                break
        self._quit_all()
        snap = self.final or self.snap or {}
        frames = snap.get("frames") or {}
        if started_at is None and frames.get("captured") is None and not frames.get("decided"):
            # the run failed before capture was started: no frame entered, none is unaccounted
            snap = {**snap, "frames": {**frames, "captured": 0, "decided": 0},
                    "invariant": {**(snap.get("invariant") or {}), "holds": True,
                                  "equation": "captured 0 = decided 0 (capture never started)"}}
        return {
            **snap,
            "run_id": cfg.run_id, "station": cfg.station, "model": cfg.model, "bundle_hash": cfg.bundle_hash,
            "backend": cfg.backend, "device": cfg.device, "workers": cfg.workers, "batch": cfg.batch,
            "source": self.info.get("capture", {}).get("source", cfg.source),
            "detector": next((i.get("detector") for n, i in self.info.items() if n.startswith("infer")), None),
            "preprocessing": self.info.get("preprocess", {}).get("preprocessing"),
            "endpoints": self.endpoints(),
            "calibrated": self.calibrated,
            "worker_restarts": self.restarts,
            "deadline_kills": self.deadline_kills,
            "stall_kills": self.stall_kills,
            "ingress": {k: self.counters.get(f"ingress_{k}", 0) for k in C.INGRESS_COUNTS}
            if cfg.source.startswith("zmq+") else None,
            "stopped_by": "error" if self.error else (self.stopped_by or "end of input"),
            "signal": self.signal_name,
            "wall_s": round(time.monotonic() - t0, 3),
            "run_s": round(time.monotonic() - started_at, 3) if started_at else 0.0,
            "error": self.error,
            "config": asdict(cfg),
        }

    def endpoints(self) -> dict:
        """The external endpoints as bound (alerts, replay, ingress)."""
        return {**self.info.get("alert", {}).get("endpoints", {}), **self.info.get("capture", {}).get("endpoints", {})}

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
        self.last_seen[name] = time.monotonic()
        kind = msg["kind"]
        if kind == C.HELLO:
            waiting.discard(name)
            self.info[name] = msg
            if "calibrated" in msg:
                self.calibrated = bool(msg["calibrated"])
        elif kind == C.SUBSCRIBED:
            self.subscribed = True
        elif kind == C.BEAT:
            if name == "capture":
                self.counters.update(msg.get("counters") or {})
        elif kind in (C.STATS, C.FINAL):
            self.snap = dict(msg["snap"], worker_restarts=self.restarts)
            if kind == C.FINAL:
                self.final = self.snap
            self.on_stats(self.snap)
        elif kind == C.EOS:
            self.counters.update(msg.get("counters") or {})
            self.captured = int(msg["captured"])
            self.stopped_by = self.stopped_by or ("frame limit" if self.cfg.frames is not None
                                                  and self.captured >= self.cfg.frames else "end of input")
        elif kind == C.OVERDUE:
            self._kill_worker(str(msg.get("worker")), {
                "how": f"killed: frame {msg.get('frame_id')} held {msg.get('held_s')} s, past the "
                       f"{self.cfg.deadline_s():g} s deadline", "deadline_frame": msg.get("frame_id")})
            self.deadline_kills += 1
        elif kind == C.LOG:
            self.on_log(str(msg.get("text")))
        elif kind == C.FATAL:
            self.error = self.error or f"stage {name} failed: {msg.get('error')}"
            self.on_log(self.error)

    def _kill_worker(self, name: str, why: dict) -> None:
        proc = self.procs.get(name)
        if proc is None or self.roles.get(name) != "infer" or name in self.killing:
            return
        self.killing[name] = why
        self.on_log(f"inference worker {name}: {why['how']}")
        proc.kill()

    def _watchdog(self, now: float, waiting: set[str]) -> None:
        """Stages that started but show no progress for ``stall_timeout_s`` are hung."""
        cfg = self.cfg
        for name in list(self.procs):
            if name in waiting or name in self.killing:
                continue
            role = self.roles[name]
            limit = max(cfg.stall_timeout_s, cfg.deadline_s() + 10.0) if role == "infer" else cfg.stall_timeout_s
            silent = now - self.last_seen.get(name, now)
            if silent <= limit:
                continue
            if role == "infer":
                self.stall_kills += 1
                self._kill_worker(name, {"how": f"killed: no progress for {silent:.0f} s (stalled)"})
            elif self.error is None:
                self.error = f"stage {name} stalled: no progress for {silent:.0f} s (--stall-timeout)"
                self.on_log(self.error)
                self.procs[name].kill()

    def _check_processes(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            code = proc.exitcode
            why = self.killing.pop(name, None)
            how = why["how"] if why else (f"killed by signal {-code}" if code is not None and code < 0
                                          else f"exit code {code}")
            del self.procs[name]
            if self.roles[name] == "infer" and self.error is None:
                self.restarts += 1
                now = time.monotonic()
                self.deaths.append(now)
                while self.deaths and self.deaths[0] < now - self.cfg.restart_window_s:
                    self.deaths.popleft()
                slot = int(name[len("infer"):].split(".")[0])
                self.send("preprocess", C.DEAD, worker=name, how=how,
                          deadline_frame=(why or {}).get("deadline_frame"))
                if len(self.deaths) > self.cfg.max_restarts:
                    self.error = (f"inference workers died {len(self.deaths)} times within "
                                  f"{self.cfg.restart_window_s:g} s (last: {name}, {how}); giving up "
                                  f"(--max-restarts {self.cfg.max_restarts} per --restart-window)")
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
            self.send(name, C.QUIT)
        deadline = time.monotonic() + QUIT_GRACE_S
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
                 on_log: Callable[[str], None] | None = None,
                 on_ready: Callable[[dict], None] | None = None) -> dict:
    """Run the pipeline until the source ends, ``cfg.frames`` are captured, or SIGINT /
    SIGTERM (handled here when called from the main thread; a second signal stops at once).

    ``on_stats(snapshot)`` is called with each statistics snapshot (about every
    ``cfg.stats_interval_s``), ``on_log(text)`` with events (worker restarts, errors),
    ``on_ready({"endpoints": {"alerts", "replay", "ingress"}, "run_id"})`` once every
    stage is up, before capture starts and before waiting for ``cfg.wait_subscribers``
    (the endpoints as bound: port ``*`` resolved; connect a subscriber there).
    Returns the final summary: the last ``RunStats`` snapshot (frames, invariant,
    throughput, latency_ms, reasons, categories, alerts) plus run_id, station, model,
    bundle_hash, backend, device, workers, batch, source, detector, preprocessing,
    endpoints, calibrated, worker_restarts, deadline_kills, stall_kills, ingress,
    stopped_by, signal (SIGINT / SIGTERM when one stopped it), wall_s (including
    start-up), run_s (from first capture), error (None when the run ended normally),
    config (the RunConfig as a dict).

    Raises ``ValueError`` / ``EdgeError`` (bind policy, keys, sizes) before starting anything.
    """
    preflight(cfg)
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
                sup.signal_name = sup.signal_name or signal.Signals(signum).name

        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup = Supervisor(cfg, make_links(cfg.link, tmp), on_stats, on_log, on_ready)
        return sup.run()
    finally:
        if sup is not None:
            sup.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)
