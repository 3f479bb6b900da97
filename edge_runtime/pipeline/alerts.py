"""Alerts a PLC gateway can rely on: journal first, publish, heartbeat, replay.

``AlertPublisher`` is what the pipeline's alert stage calls for each decision
(docs/alerts.md has the full protocol):

* ``publish(record)`` appends the decision record to the SQLite journal
  (``journal.Journal``) FIRST, then sends it on a PUB channel as the two-part
  message ``[topic, msgpack(record)]`` with topic ``f"{station}.{decision}"``. The
  socket is an XPUB with a bounded ``SNDHWM`` per subscriber and libzmq's default
  policy: a subscriber whose queue is full loses *its own* copy of the message
  (it sees a frame-id gap and replays it); every other subscriber still gets it.
  It never blocks, and one stuck gateway can never silence the others.
* ``tick()`` (called by the alert stage's loop) drains subscription events, answers
  pending replay requests on a ROUTER socket and sends a heartbeat
  ``f"{station}.HEARTBEAT"`` every ``heartbeat_s`` seconds (and at once when a new
  subscriber joins, so a slow joiner learns the run id and last frame id at once).
* The replay ROUTER answers msgpack requests ``{"op": "replay", "run_id",
  "from_frame_id", "limit"}`` with one ``{"type": "record"}`` message per journaled
  record in frame-id order and an ``{"type": "end"}`` marker (with ``to_frame_id``
  the range is bounded and ids the journal lacks are listed as ``not_found``);
  ``{"op": "status"}`` gets the run id, last frame id and counters.

``write_overlay`` (heat-map image on the RGB image with a bounded-disk policy) maps
the anomaly map onto the image through the frame's ``edge_runtime.geometry.MapGeometry``;
regions come from ``edge_runtime.geometry.regions_from_map``. Nothing here knows a method.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import zmq

from edge_runtime.errors import DataError
from edge_runtime.geometry import MapGeometry, map_to_image
from edge_runtime.pipeline import security
from edge_runtime.pipeline.journal import DECISIONS, Journal

log = logging.getLogger(__name__)

DEFAULT_PUB_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_REPLAY_ENDPOINT = "tcp://127.0.0.1:5557"
HEARTBEAT = "HEARTBEAT"
# Caps (bytes) for one inbound message part on the alert channels: a decision record
# is a few KB (validate_record bounds every string and list), a request a few bytes.
MAX_ALERT_BYTES = 256 * 2**10
MAX_REQUEST_BYTES = 64 * 2**10
MAX_REPLAY_LIMIT = 1000  # records per replay request; the end marker says if more exist
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg")  # what write_overlay writes and its disk bound counts
REQUESTS_PER_TICK = 16  # replay requests served per tick(), bounds the time tick() takes

_STATION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_station(station: str) -> str:
    """A station id is 1-64 characters of letters, digits, ``_`` or ``-``.

    No dot: a gateway subscribes to the prefix ``f"{station}."``, which must not
    match another station's topics.
    """
    if not isinstance(station, str) or not _STATION_RE.match(station):
        raise ValueError(f"station id {station!r} must be 1-64 characters from A-Z a-z 0-9 _ -")
    return station


def topic(station: str, kind: str) -> bytes:
    """The PUB topic ``f"{station}.{kind}"`` (kind: a decision or ``HEARTBEAT``)."""
    return f"{station}.{kind}".encode()


def pack(obj: Any) -> bytes:
    """msgpack encoding used on every alert channel (bin type on, no pickle)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(buf: bytes, what: str) -> dict:
    """Decode one msgpack message that must be a map; ``DataError(what, ...)`` otherwise."""
    try:
        obj = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except ValueError as exc:  # every msgpack decode error (FormatError, ExtraData...) is one
        raise DataError(what, f"undecodable msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(what, f"message must be a msgpack map, got {type(obj).__name__}")
    return obj


class AlertPublisher:
    """Journal-first alert publisher with heartbeats and a replay server.

    pub_endpoint: where the XPUB binds (default ``DEFAULT_PUB_ENDPOINT``).
    replay_endpoint: where the replay ROUTER binds; None disables replay.
    journal_path: SQLite journal file (``journal.Journal``).
    station: station id (``check_station``). heartbeat_s: heartbeat period in seconds.
    curve: server key pair (``security.CurveKeys``, a ``*.key_secret`` file or its
        directory) to encrypt both sockets; None = plain text.
    run_id: this run's id (default: a fresh uuid4 hex); a record with another run id
        switches the heartbeat to that run.
    allow_remote: permit binding non-loopback addresses (``security.check_bind``).
    curve_clients: directory of allowed client ``*.key`` files (ZAP allow-list).
    sndhwm: per-subscriber queue bound in messages; beyond it that subscriber (only)
        misses messages, which it recovers by replay.
    linger_ms: how long ``close`` may spend flushing queued alerts.
    journal_max_rows / journal_max_age_days / journal_durable: see ``Journal``.
    """

    def __init__(
        self,
        pub_endpoint: str,
        replay_endpoint: str | None,
        journal_path: str | Path,
        station: str,
        heartbeat_s: float = 1.0,
        curve: security.CurveKeys | str | Path | None = None,
        *,
        run_id: str | None = None,
        allow_remote: bool = False,
        curve_clients: str | Path | None = None,
        sndhwm: int = 1000,
        linger_ms: int = 200,
        journal_max_rows: int | None = None,
        journal_max_age_days: float | None = None,
        journal_durable: bool = False,
    ):
        self.station = check_station(station)
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0 seconds, got {heartbeat_s}")
        self.heartbeat_s = float(heartbeat_s)
        self.run_id = run_id or uuid.uuid4().hex
        self.last_frame_id: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(DECISIONS, 0)
        self.counts.update(
            published=0, send_drops=0, duplicates=0, journal_errors=0, subscriptions=0,
            replay_requests=0, replayed=0, replay_drops=0, bad_requests=0, heartbeats=0, heartbeat_drops=0,
        )  # fmt: skip
        security.check_bind(pub_endpoint, allow_remote)
        if replay_endpoint is not None:
            security.check_bind(replay_endpoint, allow_remote)
        self.journal = Journal(
            journal_path, max_rows=journal_max_rows, max_age_days=journal_max_age_days, durable=journal_durable
        )
        self._ctx = zmq.Context()
        self._auth = None
        try:
            if curve_clients is not None:
                self._auth = security.authorize_clients(self._ctx, curve_clients)
            self._pub = self._ctx.socket(zmq.XPUB)  # no XPUB_NODROP: a full subscriber drops its own copy
            self._pub.sndhwm = sndhwm
            self._pub.linger = linger_ms
            security.set_max_msg(self._pub, MAX_REQUEST_BYTES)  # inbound = subscription frames
            if curve is not None:
                curve = security.apply_curve_server(self._pub, curve)
            security.bind(self._pub, pub_endpoint, allow_remote)
            self.sockets: list[zmq.Socket] = [self._pub]
            self._router = None
            if replay_endpoint is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self._router.sndhwm = 4 * MAX_REPLAY_LIMIT
                self._router.linger = 0
                security.set_max_msg(self._router, MAX_REQUEST_BYTES)
                if curve is not None:
                    security.apply_curve_server(self._router, curve)
                security.bind(self._router, replay_endpoint, allow_remote)
                self.sockets.append(self._router)
            # as bound (a port ``*`` resolved): where gateways connect
            self.endpoints = {"alerts": self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()}
            if self._router is not None:
                self.endpoints["replay"] = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        except BaseException:
            self._close_sockets()
            self.journal.close()
            raise
        self._next_heartbeat = time.monotonic()

    # -- publishing ---------------------------------------------------------------

    def publish(self, record: dict) -> str:
        """Journal ``record`` (validated; ``DataError`` if it breaks the contract),
        then PUB-send it without blocking.

        Returns ``"sent"`` (handed to every subscriber whose queue has room; a full
        subscriber misses its copy and recovers it by replay), ``"dropped"`` (the socket
        refused the message altogether: counted in ``counts["send_drops"]``, recoverable
        by replay) or ``"duplicate"`` (this ``(run_id, frame_id)`` was already journaled:
        not sent again). If the disk
        refuses the journal write the alert is still sent live and
        ``counts["journal_errors"]`` grows (it then cannot be replayed).
        """
        try:
            fresh = self.journal.append(record)
        except sqlite3.Error as exc:
            self.counts["journal_errors"] += 1
            log.error("journal %s: cannot append frame %s: %s", self.journal.path, record.get("frame_id"), exc)
            fresh = True
        if not fresh:
            self.counts["duplicates"] += 1
            return "duplicate"
        self.counts[record["decision"]] += 1
        if record["run_id"] != self.run_id:
            self.run_id, self.last_frame_id = record["run_id"], None
        if self.last_frame_id is None or record["frame_id"] > self.last_frame_id:
            self.last_frame_id = record["frame_id"]
        if self._send([topic(self.station, record["decision"]), pack(record)]):
            self.counts["published"] += 1
            return "sent"
        self.counts["send_drops"] += 1
        return "dropped"

    def _send(self, parts: list[bytes]) -> bool:
        """Non-blocking multipart send on the XPUB; False when the socket refused it."""
        try:
            self._pub.send_multipart(parts, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def heartbeat(self) -> dict:
        """The heartbeat payload for now (also sent by ``tick``)."""
        return {
            "schema": 1,
            "station": self.station,
            "run_id": self.run_id,
            "time_ns": time.time_ns(),
            "last_frame_id": self.last_frame_id,
            "heartbeat_s": self.heartbeat_s,
            "counts": dict(self.counts),
        }

    # -- the loop's periodic work --------------------------------------------------

    def tick(self) -> None:
        """Do what is due: subscription events, up to ``REQUESTS_PER_TICK`` replay
        requests, and the heartbeat. Call it at least every ``heartbeat_s / 2`` and
        whenever one of ``self.sockets`` polls readable. Never blocks."""
        self._drain_subscriptions()
        if self._router is not None:
            for _ in range(REQUESTS_PER_TICK):
                try:
                    frames = self._router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._serve(frames)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_s
            sent = self._send([topic(self.station, HEARTBEAT), pack(self.heartbeat())])
            self.counts["heartbeats" if sent else "heartbeat_drops"] += 1

    def _drain_subscriptions(self) -> None:
        """Read XPUB (un)subscription frames; a new subscriber triggers a heartbeat now."""
        while True:
            try:
                event = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[:1] == b"\x01":
                self.counts["subscriptions"] += 1
                self._next_heartbeat = time.monotonic()
            elif event[:1] == b"\x00":
                self.counts["subscriptions"] -= 1

    def _serve(self, frames: list[bytes]) -> None:
        """Answer one ROUTER request. Envelope: [identity, payload] from a DEALER, or
        [identity, b"", payload] from a REQ; replies use the same envelope."""
        envelope, payload = frames[:-1], frames[-1]
        req_id = None
        try:
            if len(envelope) not in (1, 2):
                raise DataError("replay request", f"expected 2 or 3 message frames, got {len(frames)}")
            request = unpack(payload, "replay request")
            req_id = request.get("req_id")
            op = request.get("op")
            if op == "status":
                self._reply(envelope, [self._status(req_id)])
            elif op == "replay":
                self.counts["replay_requests"] += 1
                self._reply(envelope, self._replay(request, req_id))
            else:
                raise DataError("replay request", f"field 'op' must be 'replay' or 'status', got {op!r}")
        except DataError as exc:
            self.counts["bad_requests"] += 1
            self._reply(envelope, [{"type": "error", "req_id": req_id, "error": str(exc)}])

    def _status(self, req_id: Any) -> dict:
        return {
            "type": "status",
            "req_id": req_id,
            "station": self.station,
            "run_id": self.run_id,
            "last_frame_id": self.last_frame_id,
            "time_ns": time.time_ns(),
            "counts": dict(self.counts),
        }

    def _replay(self, request: dict, req_id: Any) -> list[dict]:
        """Journal records for a replay request, then the end marker."""
        run_id = request.get("run_id") or self.run_id
        start, limit = request.get("from_frame_id"), request.get("limit", MAX_REPLAY_LIMIT)
        stop = request.get("to_frame_id")
        if not isinstance(run_id, str):
            raise DataError("replay request", f"field 'run_id' must be a string, got {type(run_id).__name__}")
        for name, value, lowest in (("from_frame_id", start, 0), ("limit", limit, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise DataError("replay request", f"field {name!r} must be an integer >= {lowest}, got {value!r}")
        if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool) or stop < start):
            raise DataError("replay request", f"field 'to_frame_id' must be an integer >= from_frame_id, got {stop!r}")
        limit = min(limit, MAX_REPLAY_LIMIT)
        if stop is not None:
            limit = min(limit, stop - start + 1)
        records = self.journal.since(start, run_id=run_id, limit=limit + 1)
        if stop is not None:
            records = [r for r in records if r["frame_id"] <= stop]
        more = len(records) > limit
        records = records[:limit]
        end = {
            "type": "end",
            "req_id": req_id,
            "run_id": run_id,
            "from_frame_id": start,
            "count": len(records),
            "more": more,
            "last_frame_id": self.journal.last_frame_id(run_id),
        }
        if stop is not None:  # a bounded request: name the ids the journal does not have
            found = {r["frame_id"] for r in records}
            end["to_frame_id"] = stop
            end["not_found"] = [i for i in range(start, start + limit) if i not in found]
        return [{"type": "record", "req_id": req_id, "record": r} for r in records] + [end]

    def _reply(self, envelope: list[bytes], messages: list[dict]) -> None:
        """Send reply messages without blocking; a full or vanished peer aborts the
        reply (counted in ``replay_drops``; the client's request times out and retries)."""
        for i, message in enumerate(messages):
            try:
                self._router.send_multipart([*envelope, pack(message)], zmq.NOBLOCK)
            except zmq.ZMQError:  # Again (peer queue full) or EHOSTUNREACH (peer gone)
                self.counts["replay_drops"] += 1
                return
            if message["type"] == "record":
                self.counts["replayed"] += 1

    # -- shutdown ---------------------------------------------------------------

    def _close_sockets(self) -> None:
        for sock in (getattr(self, "_pub", None), getattr(self, "_router", None)):
            if sock is not None:
                sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def close(self) -> None:
        """Close sockets (bounded by ``linger_ms``) and the journal."""
        self._close_sockets()
        self.journal.close()

    def __enter__(self) -> AlertPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_overlay(
    path: str | Path,
    rgb: np.ndarray,
    amap: np.ndarray,
    *,
    vmax: float | None = None,
    regions: list[dict] | None = None,
    geometry: MapGeometry | None = None,
    alpha: float = 0.5,
    max_files: int = 500,
    max_mb: float = 256.0,
    label: dict | None = None,
) -> Path:
    """Write a heat-map overlay image and keep its directory within a disk budget.

    path: ``*.png`` (lossless) or ``*.jpg`` / ``*.jpeg`` (quality 90, an order of
    magnitude faster to encode at 800 x 600: docs/alerts.md).
    rgb: uint8 H x W x 3, RGB order. amap: the map on the model grid, mapped back with
    ``edge_runtime.geometry.map_to_image`` through ``geometry`` (the frame's header
    "geometry"; default: the map covers exactly the image). The map is colour-mapped (OpenCV JET) over [0, vmax]
    (vmax default: the map's own maximum; pass e.g. 2 x threshold for a scale that
    is comparable between frames) and blended with weight ``alpha``; ``regions``
    boxes are drawn in white. With ``label`` ({"score", "threshold", "decision", "part_id",
    "time"}) and a .png path the picture is the labelled one of
    ``edge_runtime.line.overlay.render_overlay`` (image, map, each region's box, score
    against threshold, decision, part id, time). The file is written atomically (temp file + rename).
    Afterwards the oldest overlay files (``OVERLAY_SUFFIXES``) of the directory are
    deleted until at most ``max_files`` remain and they total at most ``max_mb`` MiB
    (the new file is always kept), so give overlays a directory of their own.
    Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OVERLAY_SUFFIXES:
        raise DataError(path, f"overlay file name must end in one of {', '.join(OVERLAY_SUFFIXES)}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(path, f"overlay needs an H x W x 3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    heat = map_to_image(amap, rgb.shape, geometry or MapGeometry.identity(rgb.shape))
    if label is not None and suffix == ".png":  # the labelled picture replaces the plain one
        from edge_runtime.line.overlay import render_overlay

        encoded = np.frombuffer(render_overlay(rgb, heat, regions, label.get("score"), label.get("threshold"),
                                               str(label.get("decision")), label.get("part_id", ""),
                                               label.get("time"), vmax=vmax, alpha=alpha), np.uint8)
        ok = True
    else:
        top = float(np.max(heat)) if vmax is None else float(vmax)
        scaled = np.clip(heat * (255.0 / top), 0, 255) if top > 0 else np.zeros_like(heat)
        colour = cv2.applyColorMap(scaled.astype(np.uint8), cv2.COLORMAP_JET)
        out = cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1.0 - alpha, colour, alpha, 0.0)
        for r in regions or ():
            cv2.rectangle(out, (r["x"], r["y"]), (r["x"] + r["w"] - 1, r["y"] + r["h"] - 1), (255, 255, 255), 1)
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1] if suffix == ".png" else [cv2.IMWRITE_JPEG_QUALITY, 90]
        ok, encoded = cv2.imencode(suffix, out, params)
    if not ok:
        raise DataError(path, f"OpenCV could not encode the overlay as {suffix}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(encoded.tobytes())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(path, f"cannot write overlay: {exc.strerror or exc}") from None
    _bound_directory(path, max_files, int(max_mb * 2**20))
    return path


def _bound_directory(keep: Path, max_files: int, max_bytes: int) -> None:
    """Delete the oldest overlay files (by mtime, then name) in ``keep``'s directory
    until at most ``max_files`` remain, totalling at most ``max_bytes``; never ``keep``."""
    files = []
    with os.scandir(keep.parent) as it:
        for entry in it:
            if entry.name.lower().endswith(OVERLAY_SUFFIXES) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                files.append((st.st_mtime_ns, entry.name, st.st_size))
    files.sort()
    count, total = len(files), sum(f[2] for f in files)
    for _, name, size in files:
        if count <= max_files and total <= max_bytes:
            break
        if name == keep.name:
            continue
        try:
            os.unlink(keep.parent / name)
        except FileNotFoundError:  # deleted meanwhile by another writer
            pass
        count, total = count - 1, total - size
