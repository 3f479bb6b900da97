"""``edge-alerts``: the reference PLC gateway for a station's alert channel.

Subscribes to the station's PUB channel, prints every decision as one JSON line,
de-duplicates by ``(run_id, frame_id)``, notices missing frame ids (gaps between
received ids, or ids a heartbeat announces that never arrived) and recovers them from
the station's replay server, printing them with ``"replayed": true``. Heartbeat
silence longer than ``--heartbeat-timeout`` is reported (stderr warning + a JSON
``{"event": "heartbeat_lost"}`` line) and so is its return. docs/alerts.md describes
the protocol and what a PLC should do with each line.

Frame ids arrive out of order when the station runs several inference workers, so a
missing id is only requested after ``--gap-grace`` seconds, re-requested every
``--retry`` seconds while the journal does not have it yet, and declared lost (a
``{"event": "gap_unrecovered"}`` line: the PLC must reject those parts) after
``--gap-timeout`` seconds. One replay request is in flight at a time.

Which frame ids the gateway answers for: with ``--from-frame N``, ids >= N of the
station's current run (asked for at start: this closes the slow-joiner gap);
otherwise the ids from the first one it sees on. A run that starts while the gateway
is running (station restart) is followed from frame 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import zmq

from edge_runtime.errors import DataError, EdgeError
from edge_runtime.pipeline import security
from edge_runtime.pipeline.alerts import (
    DEFAULT_PUB_ENDPOINT,
    DEFAULT_REPLAY_ENDPOINT,
    HEARTBEAT,
    MAX_ALERT_BYTES,
    MAX_REPLAY_LIMIT,
    check_station,
    pack,
    unpack,
)
from edge_runtime.pipeline.journal import validate_record

POLL_MS = 50  # poll granularity; bounds how late timers (heartbeat, retries, exit) fire
REQUEST_TIMEOUT_S = 2.0  # a replay request with no end marker by then is sent again


def _warn(message: str) -> None:
    print(f"edge-alerts: {message}", file=sys.stderr, flush=True)


class _RunTrack:
    """Which frame ids of one run were printed, and which are missing.

    Ids in ``[start, next_id)`` are all done; ``ahead`` holds done ids above
    ``next_id`` (out-of-order arrivals). Ids below ``start`` are ignored when the
    start was asked for (``--from-frame``); otherwise (the start is just the first id
    seen) they are printed once when they arrive late, and ``before`` holds them.
    ``missing`` maps a missing id to ``[first_noticed, next_request_time, completed_requests]``
    (monotonic seconds). ``known`` is the highest id known to exist.
    """

    def __init__(self, start: int, late_ok: bool):
        self.start = self.next_id = start
        self.late_ok = late_ok
        self.known = start - 1
        self.ahead: set[int] = set()
        self.before: set[int] = set()
        self.missing: dict[int, list] = {}

    def done(self, fid: int) -> bool:
        if fid < self.start:
            return not self.late_ok or fid in self.before
        return fid < self.next_id or fid in self.ahead

    def announce(self, upto: int, now: float, grace: float) -> None:
        """Ids up to ``upto`` exist: every one not yet done becomes missing."""
        for fid in range(max(self.known + 1, self.next_id), upto + 1):
            if fid not in self.ahead:
                self.missing.setdefault(fid, [now, now + grace, 0])
        self.known = max(self.known, upto)

    def mark_done(self, fid: int, now: float, grace: float) -> None:
        if fid < self.start:
            self.before.add(fid)
            return
        self.announce(fid - 1, now, grace)
        self.known = max(self.known, fid)
        self.missing.pop(fid, None)
        self.ahead.add(fid)
        while self.next_id in self.ahead:
            self.ahead.remove(self.next_id)
            self.next_id += 1


class Gateway:
    """The ``edge-alerts`` loop: SUB for live alerts, DEALER for replay."""

    def __init__(self, args: argparse.Namespace, out: TextIO, human: TextIO | None):
        self.args, self.out, self.human = args, out, human
        self.runs: dict[str, _RunTrack] = {}
        self.heartbeats: dict[str, float] = {}  # station -> monotonic time of its last heartbeat
        self.lost: set[str | None] = set()
        self.counts = dict(live=0, replayed=0, duplicates=0, unrecovered=0, malformed=0, replay_requests=0)
        self.inflight: dict | None = None
        self.req_ids = itertools.count()
        self.stop = False
        keys = server_key = None
        if args.curve_server_key:  # load (and fail on bad files) before any socket exists
            server_key = security.load_public_key(args.curve_server_key)
            keys = security.load_keys(args.curve_keys) if args.curve_keys else None
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.dealer = self.ctx.socket(zmq.DEALER)
        for sock in (self.sub, self.dealer):
            sock.linger = 0
            sock.rcvhwm = 10 * MAX_REPLAY_LIMIT
            security.set_max_msg(sock, MAX_ALERT_BYTES)
            if server_key is not None:
                keys = security.apply_curve_client(sock, keys, server_key)
        self.sub.subscribe(f"{args.station}." if args.station else "")
        for sock, endpoint in ((self.sub, args.endpoint), (self.dealer, args.replay_endpoint)):
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                raise EdgeError(f"cannot connect to {endpoint}: {exc}") from None
        if args.from_frame is not None:
            self._request({"op": "status"})

    # -- output ------------------------------------------------------------------

    def emit(self, obj: dict, human_line: str) -> None:
        self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.out.flush()
        if self.human is not None:
            self.human.write(human_line + "\n")
            self.human.flush()

    def event(self, name: str, message: str, **fields) -> None:
        _warn(message)
        self.emit({"event": name, "time_ns": time.time_ns(), **fields}, f"EVENT {name}: {message}")

    # -- state ---------------------------------------------------------------------

    def track(self, run_id: str, first_id: int) -> _RunTrack:
        """The run's tracker; a new run starts at --from-frame (the first run seen),
        ``first_id`` (first run, no --from-frame) or 0 (a run begun while we listen)."""
        if run_id not in self.runs:
            if self.runs:
                self.runs[run_id] = _RunTrack(0, late_ok=False)
            elif self.args.from_frame is not None:
                self.runs[run_id] = _RunTrack(self.args.from_frame, late_ok=False)
            else:
                self.runs[run_id] = _RunTrack(first_id, late_ok=True)
        return self.runs[run_id]

    def on_record(self, record: dict, replayed: bool) -> None:
        now = time.monotonic()
        track = self.track(record["run_id"], record["frame_id"])
        if track.done(record["frame_id"]):
            self.counts["duplicates"] += 1
            return
        track.mark_done(record["frame_id"], now, self.args.gap_grace)
        self.counts["replayed" if replayed else "live"] += 1
        r = record
        self.emit(
            {**r, "replayed": replayed},
            f"{r['station']} run {r['run_id'][:8]} frame {r['frame_id']}: {r['decision']}"
            f" score={r['score']} reason={r['reason']}{' (replayed)' if replayed else ''}",
        )

    def on_announcement(self, what: str, message: dict) -> str:
        """A heartbeat or status reply: the station's run id and last journaled frame
        id. Ids up to that one not yet printed become missing. Returns the station."""
        station, run_id, last = message.get("station"), message.get("run_id"), message.get("last_frame_id")
        if not isinstance(station, str) or not isinstance(run_id, str) or not (last is None or isinstance(last, int)):
            raise DataError(what, "needs string 'station' and 'run_id' and an integer or null 'last_frame_id'")
        track = self.track(run_id, 0 if last is None else last + 1)
        if last is not None:
            track.announce(last, time.monotonic(), self.args.gap_grace)
        return station

    def on_heartbeat(self, hb: dict) -> None:
        station = self.on_announcement("heartbeat", hb)
        self.heartbeats[station] = time.monotonic()
        for key in (station, None):
            if key in self.lost:
                self.lost.discard(key)
                message = f"heartbeat from station {station} is back"
                self.event("heartbeat_restored", message, station=station, run_id=hb["run_id"])

    # -- sockets ------------------------------------------------------------------

    def on_sub(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            raise DataError("alert", f"expected [topic, payload], got {len(frames)} frames")
        name = frames[0].decode("utf-8", "replace")
        payload = unpack(frames[1], f"alert on topic {name}")
        if name.endswith("." + HEARTBEAT):
            self.on_heartbeat(payload)
            return
        validate_record(payload)
        if name != f"{payload['station']}.{payload['decision']}":
            raise DataError(f"alert on topic {name}", f"record is {payload['station']}.{payload['decision']}")
        self.on_record(payload, replayed=False)

    def on_reply(self, frames: list[bytes]) -> None:
        reply = unpack(frames[-1], "replay reply")
        kind = reply.get("type")
        if kind == "record":
            record = reply.get("record")
            validate_record(record)
            self.on_record(record, replayed=True)
        elif kind not in ("status", "end", "error"):
            raise DataError("replay reply", f"unknown type {kind!r}")
        else:
            if kind == "status":
                self.on_announcement("status reply", reply)
            elif kind == "error":
                _warn(f"replay server refused a request: {reply.get('error')}")
            if self.inflight is not None and reply.get("req_id") == self.inflight["req_id"]:
                self._request_done(time.monotonic())

    def _request(self, request: dict, **context) -> None:
        request["req_id"] = next(self.req_ids)
        try:
            self.dealer.send(pack(request), zmq.NOBLOCK)
        except zmq.Again:  # queue to the replay server full: the request times out and is retried
            pass
        self.inflight = {"req_id": request["req_id"], "sent": time.monotonic(), **context}

    def _request_done(self, now: float) -> None:
        """The in-flight replay finished: ids it should have brought but did not are
        retried after --retry seconds."""
        if "ids" in self.inflight:
            track = self.runs[self.inflight["run_id"]]
            for fid in self.inflight["ids"]:
                if fid in track.missing:
                    entry = track.missing[fid]
                    entry[1], entry[2] = now + self.args.retry, entry[2] + 1
        self.inflight = None

    # -- timers --------------------------------------------------------------------

    def check_heartbeats(self, now: float, started: float) -> None:
        timeout = self.args.heartbeat_timeout
        for station, last in self.heartbeats.items():
            if now - last > timeout and station not in self.lost:
                self.lost.add(station)
                self.event(
                    "heartbeat_lost",
                    f"no heartbeat from station {station} for {now - last:.1f} s: treat its parts as reject",
                    station=station, silence_s=round(now - last, 3),
                )  # fmt: skip
        if not self.heartbeats and now - started > timeout and None not in self.lost:
            self.lost.add(None)
            self.event(
                "heartbeat_lost",
                f"no heartbeat received at all in {timeout:.1f} s from {self.args.endpoint}: treat parts as reject",
                station=self.args.station, silence_s=round(now - started, 3),
            )  # fmt: skip

    def schedule_replay(self, now: float) -> None:
        """Give up on ids missing too long; otherwise ask for the first due range."""
        if self.inflight is not None:
            if now - self.inflight["sent"] < REQUEST_TIMEOUT_S:
                return
            self._request_done(now)
        for run_id, track in self.runs.items():
            timeout = self.args.gap_timeout
            expired = sorted(f for f, (first, _, tries) in track.missing.items() if tries and now - first >= timeout)
            if expired:
                for fid in expired:
                    track.mark_done(fid, now, self.args.gap_grace)
                self.counts["unrecovered"] += len(expired)
                message = (
                    f"run {run_id}: {len(expired)} frame ids neither arrived nor could be replayed "
                    f"(first {expired[0]}): reject those parts"
                )
                self.event("gap_unrecovered", message, run_id=run_id, frame_ids=expired)
        for run_id, track in self.runs.items():
            due = sorted(f for f, (_, when, _) in track.missing.items() if when <= now)
            if due:
                ids = [due[0]]
                for fid in due[1:MAX_REPLAY_LIMIT]:
                    if fid != ids[-1] + 1:
                        break
                    ids.append(fid)
                self.counts["replay_requests"] += 1
                request = {"op": "replay", "run_id": run_id, "from_frame_id": ids[0], "limit": len(ids)}
                self._request(request, run_id=run_id, ids=ids)
                return

    # -- main loop -------------------------------------------------------------------

    def run(self) -> None:
        """Poll and dispatch until --max-messages, --timeout or a stop request."""
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        started = time.monotonic()
        deadline = started + self.args.timeout if self.args.timeout else None
        handlers = ((self.sub, self.on_sub), (self.dealer, self.on_reply))
        while not self.stop and not self._enough():
            ready = dict(poller.poll(POLL_MS))
            for sock, handler in handlers:
                for _ in range(MAX_REPLAY_LIMIT):
                    if sock not in ready or self._enough():
                        break
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        handler(frames)
                    except DataError as exc:
                        self.counts["malformed"] += 1
                        _warn(f"ignored a malformed message: {exc}")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            self.check_heartbeats(now, started)
            self.schedule_replay(now)

    def _enough(self) -> bool:
        limit = self.args.max_messages
        return limit is not None and self.counts["live"] + self.counts["replayed"] >= limit

    def close(self) -> None:
        self.sub.close()
        self.dealer.close()
        self.ctx.term()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-alerts",
        description="Reference PLC gateway: print a station's decisions as JSON lines, "
        "de-duplicated, gaps recovered by replay, heartbeat loss reported.",
    )
    add = p.add_argument
    add("--endpoint", default=DEFAULT_PUB_ENDPOINT, help="station's alert PUB endpoint (default %(default)s)")
    add("--replay-endpoint", default=DEFAULT_REPLAY_ENDPOINT, help="station's replay endpoint (default %(default)s)")
    add("--station", help="only this station's alerts (topic prefix STATION.); default: every station")
    add("--from-frame", type=int, metavar="N", help="first replay the current run's decisions from frame N")
    add("--heartbeat-timeout", type=float, default=3.0, metavar="S",
        help="heartbeat silence that counts as lost (default %(default)s s)")
    add("--gap-grace", type=float, default=0.25, metavar="S",
        help="wait this long for an out-of-order frame before asking for a replay (default %(default)s s)")
    add("--retry", type=float, default=0.5, metavar="S",
        help="ask again for a still-missing frame after this long (default %(default)s s)")
    add("--gap-timeout", type=float, default=10.0, metavar="S",
        help="declare a missing frame lost after this long (default %(default)s s)")
    add("--max-messages", type=int, metavar="N", help="exit after printing N decisions")
    add("--timeout", type=float, metavar="S", help="exit after S seconds")
    add("--json", default="-", metavar="FILE|-",
        help="where the JSON lines go (default: stdout; with a FILE, stdout gets one readable line per decision)")
    add("--curve-server-key", type=Path, metavar="FILE",
        help="station's CURVE public key file (*.key): encrypt and authenticate the station")
    add("--curve-keys", type=Path, metavar="DIR",
        help="this gateway's own key pair (directory or *.key_secret; default: a fresh one)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.station is not None:
        try:
            check_station(args.station)
        except ValueError as exc:
            parser.error(str(exc))
    if args.curve_keys and not args.curve_server_key:
        parser.error("--curve-keys needs --curve-server-key (the station's public key)")
    if args.from_frame is not None and args.from_frame < 0:
        parser.error("--from-frame must be >= 0")
    for name in ("heartbeat_timeout", "gap_grace", "retry", "gap_timeout", "timeout"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0 seconds")
    try:
        out = sys.stdout if args.json == "-" else open(args.json, "a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        _warn(f"error: cannot open {args.json} for the JSON lines: {exc.strerror or exc}")
        return 1
    try:
        return _serve(args, out)
    finally:
        if out is not sys.stdout:
            out.close()


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    """Run the gateway until a stop condition; signals end it cleanly (exit 0)."""
    try:
        gateway = Gateway(args, out, None if out is sys.stdout else sys.stdout)
    except EdgeError as exc:
        _warn(f"error: {exc}")
        return 1
    previous = {}
    if threading.current_thread() is threading.main_thread():

        def request_stop(signum, frame):
            gateway.stop = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    rc = 0
    try:
        gateway.run()
    except BrokenPipeError:  # whoever reads our output went away
        _warn("output closed by the reader; stopping")
        rc = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        gateway.close()
        c = gateway.counts
        _warn(
            f"{c['live'] + c['replayed']} decisions ({c['live']} live, {c['replayed']} replayed), "
            f"{c['duplicates']} duplicates ignored, {c['unrecovered']} lost, {c['malformed']} malformed messages, "
            f"{c['replay_requests']} replay requests"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
