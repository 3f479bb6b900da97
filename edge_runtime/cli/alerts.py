"""``edge-alerts``: the reference PLC gateway for a station's alert channel.

Subscribes to the station's PUB channel, prints every decision as one JSON line,
de-duplicates by ``(run_id, frame_id)``, notices missing frame ids (gaps between
received ids, or ids a heartbeat announces that never arrived) and recovers them from
the station's replay server, printing them with ``"replayed": true``. Heartbeat
silence longer than ``--heartbeat-timeout`` is reported (stderr warning + a JSON
``{"event": "heartbeat_lost"}`` line) and so is its return. docs/alerts.md describes
the protocol and what a PLC should do with each line; docs/line.md the bridges.

Frame ids arrive out of order when the station runs several inference workers, so a
missing id is only requested after ``--gap-grace`` seconds, re-requested every
``--retry`` seconds while the journal does not have it yet, and declared lost (a
``{"event": "gap_unrecovered"}`` line: the PLC must reject those parts) after
``--gap-timeout`` seconds. One replay request is in flight at a time. Missing ids are
kept as ranges and at most ``--max-gap`` of them are tracked; older ones beyond that
are given up at once (``{"event": "gap_too_large"}``).

Which frame ids the gateway answers for: with ``--from-frame N``, ids >= N of the
station's current run (asked for at start: this closes the slow-joiner gap);
otherwise the ids from the first one it sees on. A run that starts while the gateway
is running (station restart) is followed from frame 0.

Durable position (``--state FILE``, default ``$XDG_STATE_HOME/edge_runtime/
gateway-<station|all>.json``): the delivered ranges per run are saved atomically after
every loop turn that delivered something. A restarted gateway replays exactly what it
missed (the saved runs' holes and tails, and a run begun meanwhile from 0) and never
repeats what it delivered. ``--from-frame`` overrides the saved position of the
station's current run; ``--no-state`` gives the stateless behaviour.

Bridges (``--opcua``, ``--opcua-write``, ``--mqtt``) are sinks fed by the same
delivered stream (``edge_runtime.line.sinks``).
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
from zmq.utils.monitor import recv_monitor_message

from edge_runtime.errors import DataError, EdgeError
from edge_runtime.line.ranges import IdRanges
from edge_runtime.line.sinks import Sink
from edge_runtime.line.state import GatewayState, default_state_path
from edge_runtime.line.track import RunTrack
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
DEFAULT_MAX_GAP = 100_000  # missing ids tracked at once (about 1.8 h at 15 frames/s)
MAX_LISTED_IDS = 1000  # gap events list ids one by one up to this many; ranges always
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _warn(message: str) -> None:
    print(f"edge-alerts: {message}", file=sys.stderr, flush=True)


def _ids_fields(ranges: list[tuple[int, int]]) -> dict:
    """Event fields naming ids: ``ranges`` always, ``frame_ids`` when few."""
    count = sum(hi - lo + 1 for lo, hi in ranges)
    fields = {"ranges": [[lo, hi] for lo, hi in ranges], "count": count}
    if count <= MAX_LISTED_IDS:
        fields["frame_ids"] = [f for lo, hi in ranges for f in range(lo, hi + 1)]
    return fields


class Gateway:
    """The ``edge-alerts`` loop: SUB for live alerts, DEALER for replay, sinks after."""

    def __init__(self, args: argparse.Namespace, out: TextIO, human: TextIO | None, sinks: list[Sink] = ()):
        self.args, self.out, self.human, self.sinks = args, out, human, list(sinks)
        self.runs: dict[str, RunTrack] = {}
        self.heartbeats: dict[str, float] = {}  # station -> monotonic time of its last heartbeat
        self.lost: set[str | None] = set()
        self.counts = dict(live=0, replayed=0, duplicates=0, unrecovered=0, malformed=0, replay_requests=0)
        self.inflight: dict | None = None
        self.req_ids = itertools.count()
        self.stop = False
        self.fatal: str | None = None
        self.dirty = False
        self.first_live_run = True  # the next run learned from the station is "its current run"
        self.state = GatewayState(args.state) if args.state else None
        self.restored = False
        if self.state is not None and self.state.runs:
            now = time.monotonic()
            for run_id, entry in self.state.runs.items():
                if args.station is None or entry.get("station") in (None, args.station):
                    self.runs[run_id] = RunTrack.from_state(entry, args.max_gap, now, args.gap_grace)
            self.restored = bool(self.runs)
        keys = server_key = None
        if args.curve_server_key:  # load (and fail on bad files) before any socket exists
            server_key = security.load_public_key(args.curve_server_key)
            keys = security.load_keys(args.curve_keys) if args.curve_keys else None
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.monitors: dict[zmq.Socket, str] = {}
        for sock, endpoint in ((self.sub, args.endpoint), (self.dealer, args.replay_endpoint)):
            sock.linger = 0
            sock.rcvhwm = 10 * MAX_REPLAY_LIMIT
            security.set_max_msg(sock, MAX_ALERT_BYTES)
            if server_key is not None:
                keys = security.apply_curve_client(sock, keys, server_key)
            self.monitors[sock.get_monitor_socket(_HANDSHAKE_FAILED)] = endpoint
        self.sub.subscribe(f"{args.station}." if args.station else "")
        for sock, endpoint in ((self.sub, args.endpoint), (self.dealer, args.replay_endpoint)):
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                raise EdgeError(f"cannot connect to {endpoint}: {exc}") from None
        if args.from_frame is not None or self.restored:
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
        obj = {"event": name, "time_ns": time.time_ns(), **fields}
        self.emit(obj, f"EVENT {name}: {message}")
        for sink in self.sinks:
            sink.event(obj)

    def too_large(self, run_id: str, dropped: list[tuple[int, int]]) -> None:
        if not dropped:
            return
        fields = _ids_fields(dropped)
        self.counts["unrecovered"] += fields["count"]
        self.dirty = True
        message = (
            f"run {run_id}: {fields['count']} missing frame ids ({dropped[0][0]}..{dropped[-1][1]}) exceed "
            f"--max-gap {self.args.max_gap}: given up without replay, reject those parts"
        )
        self.event("gap_too_large", message, run_id=run_id, max_gap=self.args.max_gap, **fields)

    # -- state ---------------------------------------------------------------------

    def track(self, run_id: str, first_id: int, station: str | None, live: bool) -> RunTrack:
        """The run's tracker. A run learned from the station (``live``) for the first
        time is its current run: ``--from-frame`` applies to it (even over a saved
        position). A new run starts at --from-frame (the first run seen), ``first_id``
        (first run, no --from-frame, no saved state) or 0 (a run begun while we
        listened or while we were down)."""
        first_live, self.first_live_run = self.first_live_run and live, self.first_live_run and not live
        a = self.args
        if first_live and a.from_frame is not None and (run_id not in self.runs or self.runs[run_id].probe):
            fresh = RunTrack(a.from_frame, False, a.max_gap, station)
            if run_id in self.runs:  # keep the saved position below N, redo N onwards
                for lo, hi in self.runs[run_id].done:
                    fresh.done.add_range(lo, min(hi, a.from_frame - 1))
            self.runs[run_id] = fresh
        elif run_id not in self.runs:
            if self.runs:
                self.runs[run_id] = RunTrack(0, False, a.max_gap, station)
            else:
                self.runs[run_id] = RunTrack(first_id, True, a.max_gap, station)
        track = self.runs[run_id]
        if track.station is None:
            track.station = station
        return track

    def on_record(self, record: dict, replayed: bool) -> None:
        now = time.monotonic()
        track = self.track(record["run_id"], record["frame_id"], record["station"], live=not replayed)
        if track.is_done(record["frame_id"]):
            self.counts["duplicates"] += 1
            return
        self.too_large(record["run_id"], track.mark_done(record["frame_id"], now, self.args.gap_grace))
        self.counts["replayed" if replayed else "live"] += 1
        self.dirty = True
        r = record
        self.emit(
            {**r, "replayed": replayed},
            f"{r['station']} run {r['run_id'][:8]} frame {r['frame_id']}: {r['decision']}"
            f" score={r['score']} reason={r['reason']}{' (replayed)' if replayed else ''}",
        )
        for sink in self.sinks:
            sink.record(record, replayed)

    def on_announcement(self, what: str, message: dict) -> str:
        """A heartbeat or status reply: the station's run id and last journaled frame
        id. Ids up to that one not yet printed become missing. Returns the station."""
        station, run_id, last = message.get("station"), message.get("run_id"), message.get("last_frame_id")
        if not isinstance(station, str) or not isinstance(run_id, str) or not (last is None or isinstance(last, int)):
            raise DataError(what, "needs string 'station' and 'run_id' and an integer or null 'last_frame_id'")
        track = self.track(run_id, 0 if last is None else last + 1, station, live=True)
        if last is not None:
            self.too_large(run_id, track.announce(last, time.monotonic(), self.args.gap_grace))
        return station

    def on_heartbeat(self, hb: dict) -> None:
        station = self.on_announcement("heartbeat", hb)
        self.heartbeats[station] = time.monotonic()
        for sink in self.sinks:
            sink.heartbeat(hb)
        for key in (station, None):
            if key in self.lost:
                self.lost.discard(key)
                message = f"heartbeat from station {station} is back"
                self.event("heartbeat_restored", message, station=station, run_id=hb["run_id"])

    def save_state(self) -> None:
        if self.state is None or not self.dirty:
            return
        now_ns = time.time_ns()
        entries = dict(self.state.runs)
        for run_id, track in self.runs.items():
            if track.known >= track.start or track.done:
                entries[run_id] = {**track.to_state(), "updated_ns": now_ns}
        self.state.save(entries)
        self.dirty = False

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
            if self.args.station is None or record["station"] == self.args.station:
                self.on_record(record, replayed=True)
        elif kind not in ("status", "end", "error"):
            raise DataError("replay reply", f"unknown type {kind!r}")
        else:
            if kind == "status":
                if self.args.station is None or reply.get("station") == self.args.station:
                    self.on_announcement("status reply", reply)
            elif kind == "end":
                self.on_end(reply)
            elif kind == "error":
                _warn(f"replay server refused a request: {reply.get('error')}")
            if self.inflight is not None and reply.get("req_id") == self.inflight["req_id"]:
                self._request_done(time.monotonic())

    def on_end(self, reply: dict) -> None:
        """An end marker names the run's last journaled id: the tail of a run restored
        from state (or any run) becomes known."""
        run_id, last = reply.get("run_id"), reply.get("last_frame_id")
        track = self.runs.get(run_id) if isinstance(run_id, str) else None
        if track is not None and isinstance(last, int) and not isinstance(last, bool):
            self.too_large(run_id, track.announce(last, time.monotonic(), self.args.gap_grace))

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
        flight, self.inflight = self.inflight, None
        if "lo" in flight:
            track = self.runs[flight["run_id"]]
            if flight.get("probe"):
                track.probe = False
                return
            lo, hi = flight["lo"], flight["hi"]
            track.split_at(lo)
            track.split_at(hi + 1)
            for gap in track.gaps:
                if lo <= gap.lo and gap.hi <= hi:
                    gap.due, gap.tries = now + self.args.retry, gap.tries + 1

    # -- timers --------------------------------------------------------------------

    def check_monitors(self) -> None:
        """A failed ZMTP handshake means the two ends disagree on security: stop with
        the reason rather than retry silently for ever."""
        for mon, endpoint in self.monitors.items():
            while True:
                try:
                    msg = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self.args.curve_server_key is None:
                    self.fatal = (
                        f"the station at {endpoint} refused a plain-text connection: it is configured with CURVE. "
                        "Pass --curve-server-key STATION.key (and --curve-keys DIR if it allow-lists clients)"
                    )
                elif msg["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.fatal = (
                        f"the station at {endpoint} refused this gateway's CURVE key: add its public key to the "
                        "station's client allow-list, or pass --curve-keys with an allowed pair"
                    )
                else:
                    self.fatal = (
                        f"CURVE handshake with {endpoint} failed: the station is not using CURVE, or "
                        "--curve-server-key is not its public key"
                    )

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
            expired = [(g.lo, g.hi) for g in track.gaps if g.tries and now - g.first >= timeout]
            if expired:
                for lo, hi in expired:
                    track.give_up(lo, hi)
                fields = _ids_fields(expired)
                self.counts["unrecovered"] += fields["count"]
                self.dirty = True
                message = (
                    f"run {run_id}: {fields['count']} frame ids neither arrived nor could be replayed "
                    f"(first {expired[0][0]}): reject those parts"
                )
                self.event("gap_unrecovered", message, run_id=run_id, **fields)
        for run_id, track in self.runs.items():
            if track.probe:  # restored from state: what did the station journal after we stopped?
                request = {"op": "replay", "run_id": run_id, "from_frame_id": track.known + 1,
                           "limit": MAX_REPLAY_LIMIT}  # fmt: skip
                self.counts["replay_requests"] += 1
                self._request(request, run_id=run_id, lo=track.known + 1, hi=track.known, probe=True)
                return
        for run_id, track in self.runs.items():
            due = [g for g in track.gaps if g.due <= now]
            if due:
                lo = min(g.lo for g in due)
                gap = next(g for g in due if g.lo == lo)
                hi = min(gap.hi, lo + MAX_REPLAY_LIMIT - 1)
                self.counts["replay_requests"] += 1
                request = {"op": "replay", "run_id": run_id, "from_frame_id": lo, "limit": hi - lo + 1}
                self._request(request, run_id=run_id, lo=lo, hi=hi)
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
        while not self.stop and not self._enough() and self.fatal is None:
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
            self.save_state()
            for sink in self.sinks:
                sink.poll()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            self.check_monitors()
            self.check_heartbeats(now, started)
            self.schedule_replay(now)
        self.save_state()

    def _enough(self) -> bool:
        limit = self.args.max_messages
        return limit is not None and self.counts["live"] + self.counts["replayed"] >= limit

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - one bad sink must not keep the others open
                _warn(f"closing the {sink.name} bridge failed: {exc}")
        for mon in self.monitors:
            mon.close()
        self.sub.close()
        self.dealer.close()
        self.ctx.term()
        if self.state is not None:
            self.state.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-alerts",
        description="Reference PLC gateway: print a station's decisions as JSON lines, "
        "de-duplicated, gaps recovered by replay, heartbeat loss reported; optionally bridge them "
        "to OPC UA and MQTT (docs/line.md).",
    )
    add = p.add_argument
    add("--endpoint", default=DEFAULT_PUB_ENDPOINT, help="station's alert PUB endpoint (default %(default)s)")
    add("--replay-endpoint", default=DEFAULT_REPLAY_ENDPOINT, help="station's replay endpoint (default %(default)s)")
    add("--station", help="only this station's alerts (topic prefix STATION.); default: every station")
    add("--from-frame", type=int, metavar="N", help="first replay the current run's decisions from frame N")
    add("--state", type=Path, metavar="FILE",
        help="durable delivered position (default $XDG_STATE_HOME/edge_runtime/gateway-<station|all>.json)")
    add("--no-state", action="store_true", help="keep no delivered position (stateless, as before --state)")
    add("--heartbeat-timeout", type=float, default=3.0, metavar="S",
        help="heartbeat silence that counts as lost (default %(default)s s)")
    add("--gap-grace", type=float, default=0.25, metavar="S",
        help="wait this long for an out-of-order frame before asking for a replay (default %(default)s s)")
    add("--retry", type=float, default=0.5, metavar="S",
        help="ask again for a still-missing frame after this long (default %(default)s s)")
    add("--gap-timeout", type=float, default=10.0, metavar="S",
        help="declare a missing frame lost after this long (default %(default)s s)")
    add("--max-gap", type=int, default=DEFAULT_MAX_GAP, metavar="N",
        help="most missing frame ids tracked at once; older ones are given up (default %(default)s)")
    add("--max-messages", type=int, metavar="N", help="exit after printing N decisions")
    add("--timeout", type=float, metavar="S", help="exit after S seconds")
    add("--json", default="-", metavar="FILE|-",
        help="where the JSON lines go (default: stdout; with a FILE, stdout gets one readable line per decision)")
    add("--curve-server-key", type=Path, metavar="FILE",
        help="station's CURVE public key file (*.key): encrypt and authenticate the station")
    add("--curve-keys", type=Path, metavar="DIR",
        help="this gateway's own key pair (directory or *.key_secret; default: a fresh one)")
    add("--allow-plaintext", action="store_true",
        help="allow a non-loopback station endpoint without CURVE (anyone on the network could pose as it)")
    from edge_runtime.line import options  # the bridges' flags live beside the bridges

    options.add_bridge_options(p)
    return p


def _is_loopback_endpoint(endpoint: str) -> bool:
    try:
        security.check_bind(endpoint, allow_remote=False)
        return True
    except security.BindPolicyError:
        return False


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
    if args.max_gap < 1:
        parser.error("--max-gap must be >= 1")
    for name in ("heartbeat_timeout", "gap_grace", "retry", "gap_timeout", "timeout"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0 seconds")
    if not args.curve_server_key and not args.allow_plaintext:
        for endpoint in (args.endpoint, args.replay_endpoint):
            if not _is_loopback_endpoint(endpoint):
                parser.error(
                    f"{endpoint} is not on this host and no --curve-server-key is given: plain text has no station "
                    "authentication (anyone on the network could pose as the station). Use CURVE, or pass "
                    "--allow-plaintext to accept that deliberately"
                )
    if args.no_state:
        if args.state is not None:
            parser.error("--state and --no-state contradict each other")
    elif args.state is None:
        args.state = default_state_path(args.station)
    from edge_runtime.line import options

    try:
        options.check_bridge_options(args)
    except ValueError as exc:
        parser.error(str(exc))
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
    from edge_runtime.line import options

    sinks: list[Sink] = []
    try:
        sinks = options.build_sinks(args)
        gateway = Gateway(args, out, None if out is sys.stdout else sys.stdout, sinks)
    except EdgeError as exc:
        for sink in sinks:
            sink.close()
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
    except EdgeError as exc:  # e.g. the state file became unwritable
        _warn(f"error: {exc}")
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
    if gateway.fatal is not None:
        _warn(f"error: {gateway.fatal}")
        return 1
    return rc


__all__ = ["Gateway", "IdRanges", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
