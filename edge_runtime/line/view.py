"""Live view: a small HTTP server (stdlib ``http.server`` + server-sent events) showing
the latest frame with its overlay and decision, the counts, per-stage latency
p50/p95/p99 and frames/s, updated live.

It never slows the pipeline: it is an independent subscriber of the station's alert
PUB endpoint (like ``edge-alerts``) whose receiving thread only appends each record
to a bounded deque; statistics are computed from a copy when a page asks, at most
``MAX_PUSH_HZ`` times a second. (The station's XPUB drops an alert for every
subscriber when one subscriber's queue is full, so the receiving thread is kept
trivial and its queue large.) ``LiveView.offer(record, image_png=None)`` feeds it
directly instead, e.g. from a test or a process that has the pictures.

    view = start_view("127.0.0.1:8080", alerts_endpoint="tcp://127.0.0.1:5556")
    print(view.url); ...; view.close()

Routes: ``/`` (the page), ``/events`` (SSE: one JSON snapshot per change), ``/state.json``
(the snapshot), ``/frame`` (the latest picture: the offered PNG, or the file named by
the newest record's ``heatmap`` when it is readable here).
"""

from __future__ import annotations

import collections
import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import zmq

from edge_runtime.pipeline import security
from edge_runtime.pipeline.alerts import HEARTBEAT, MAX_ALERT_BYTES, unpack
from edge_runtime.pipeline.journal import DECISIONS

HISTORY = 1000  # records kept for the statistics
FPS_WINDOW_S = 5.0
MAX_PUSH_HZ = 4.0  # SSE updates per second at most, per client
SSE_KEEPALIVE_S = 10.0
MAX_IMAGE_BYTES = 16 * 2**20  # a heatmap file larger than this is not served
RCVHWM = 100_000  # the view's SUB queue: large, so the station never sees it as slow
POLL_MS = 100
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return {"n": len(values), "p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


class LiveView:
    """The view's state and its HTTP server (``start_view`` builds and starts one)."""

    def __init__(self, bind: str = "127.0.0.1:8080", alerts_endpoint: str | None = None, *,
                 station: str | None = None, allow_remote: bool = False, history: int = HISTORY,
                 curve_server_key: str | Path | None = None, title: str = "edge_runtime live view"):  # fmt: skip
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"view bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
        security.check_bind(f"tcp://{host}:{port}", allow_remote)  # same bind policy as the station
        self.title = title
        self._lock = threading.Condition()
        self._records: collections.deque[dict] = collections.deque(maxlen=history)
        self._counts = dict.fromkeys(DECISIONS, 0)
        self._version = 0
        self._image: tuple[bytes, str] | None = None  # (bytes, content type) offered directly
        self._image_version = 0
        self._image_path: str | None = None
        self._stations: dict[str, dict] = {}
        self._closing = threading.Event()
        self.served = {"page": 0, "frame": 0, "events": 0}  # requests answered, by route
        self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
        self._threads = [threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                          name="live-view-http", daemon=True)]  # fmt: skip
        self._ctx = self._sub = None
        if alerts_endpoint is not None:
            self._ctx = zmq.Context()
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.linger = 0
            self._sub.rcvhwm = RCVHWM
            security.set_max_msg(self._sub, MAX_ALERT_BYTES)
            if curve_server_key is not None:
                security.apply_curve_client(self._sub, None, curve_server_key)
            self._sub.subscribe(f"{station}." if station else "")
            self._sub.connect(alerts_endpoint)
            self._threads.append(threading.Thread(target=self._receive, name="live-view-sub", daemon=True))

    def start(self) -> LiveView:
        for t in self._threads:
            t.start()
        return self

    # -- feeding -------------------------------------------------------------------

    def offer(self, record: dict, image_png: bytes | None = None) -> None:
        """Add one decision record (and optionally its overlay PNG). Cheap; thread-safe."""
        with self._lock:
            self._records.append(record)
            decision = record.get("decision")
            if decision in self._counts:
                self._counts[decision] += 1
            if image_png is not None:
                self._image, self._image_path = (bytes(image_png), "image/png"), None
                self._image_version = self._version + 1
            elif isinstance(record.get("heatmap"), str):
                self._image, self._image_path = None, record["heatmap"]
                self._image_version = self._version + 1
            self._version += 1
            self._lock.notify_all()

    def _heartbeat(self, hb: dict) -> None:
        with self._lock:
            self._stations[str(hb.get("station"))] = {"run_id": hb.get("run_id"), "time_ns": hb.get("time_ns"),
                                                      "last_frame_id": hb.get("last_frame_id")}  # fmt: skip

    def _receive(self) -> None:
        """The subscriber thread: receive, decode, append. Nothing else."""
        while not self._closing.is_set():
            if not self._sub.poll(POLL_MS):
                continue
            while True:
                try:
                    topic, payload = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ValueError:  # not two parts
                    continue
                try:
                    message = unpack(payload, "alert")
                except Exception:  # noqa: BLE001 - a bad message is skipped, never fatal
                    continue
                if topic.endswith(b"." + HEARTBEAT.encode()):
                    self._heartbeat(message)
                else:
                    self.offer(message)

    # -- reading ---------------------------------------------------------------------

    def snapshot(self) -> dict:
        with self._lock:
            records = list(self._records)
            counts, version, image_version = dict(self._counts), self._version, self._image_version
            stations = dict(self._stations)
            has_image = self._image is not None or self._image_path is not None
        stages: dict[str, list[float]] = collections.defaultdict(list)
        for r in records:
            for stage, ms in (r.get("stages_ms") or {}).items():
                if isinstance(ms, (int, float)):
                    stages[stage].append(float(ms))
        now_ns = max((r.get("decision_ns", 0) for r in records), default=0)
        recent = [r for r in records if now_ns - r.get("decision_ns", 0) <= FPS_WINDOW_S * 1e9]
        fps = None
        if len(recent) >= 2:
            span = (recent[-1]["decision_ns"] - min(r["decision_ns"] for r in recent)) / 1e9
            fps = round((len(recent) - 1) / span, 2) if span > 0 else None
        last = records[-1] if records else None
        latest = None
        if last is not None:
            latest = {k: last.get(k) for k in ("station", "run_id", "frame_id", "decision", "reason", "score",
                                               "threshold", "model", "decision_ns")}  # fmt: skip
        return {"version": version, "image_version": image_version if has_image else None,
                "counts": counts, "total": sum(counts.values()), "fps": fps, "latest": latest,
                "latency_ms": {s: _percentiles(v) for s, v in sorted(stages.items())}, "stations": stations}  # fmt: skip

    def image(self) -> tuple[bytes, str] | None:
        with self._lock:
            image, path = self._image, self._image_path
        if image is not None:
            return image
        if path is None:
            return None
        p = Path(path)
        content_type = IMAGE_TYPES.get(p.suffix.lower())
        try:
            if content_type is None or not p.is_file() or p.stat().st_size > MAX_IMAGE_BYTES:
                return None
            return p.read_bytes(), content_type
        except OSError:
            return None

    def wait_change(self, version: int, timeout: float) -> int:
        with self._lock:
            self._lock.wait_for(lambda: self._version != version or self._closing.is_set(), timeout)
            return self._version

    # -- HTTP ------------------------------------------------------------------------------

    def _handler(self):
        view = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/":
                    view.served["page"] += 1
                    self._send(200, view.page().encode(), "text/html; charset=utf-8")
                elif path == "/state.json":
                    self._send(200, json.dumps(view.snapshot()).encode(), "application/json")
                elif path == "/frame":
                    image = view.image()
                    if image is None:
                        self._send(404, b"no picture yet", "text/plain")
                    else:
                        view.served["frame"] += 1
                        self._send(200, image[0], image[1])
                elif path == "/events":
                    self._events()
                else:
                    self._send(404, b"not found", "text/plain")

            def _events(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                view.served["events"] += 1
                version, last_sent = -1, 0.0
                try:
                    while not view._closing.is_set():
                        delay = last_sent + 1.0 / MAX_PUSH_HZ - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        new = view.wait_change(version, SSE_KEEPALIVE_S)
                        if view._closing.is_set():
                            break
                        if new == version:
                            self.wfile.write(b": keep-alive\n\n")
                        else:
                            version = new
                            self.wfile.write(f"data: {json.dumps(view.snapshot())}\n\n".encode())
                            last_sent = time.monotonic()
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler

    def page(self) -> str:
        snap = self.snapshot()
        return _PAGE.replace("__TITLE__", html.escape(self.title)).replace("__STATE__", json.dumps(snap))

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(5)
        if self._sub is not None:
            self._sub.close()
            self._ctx.term()

    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_view(bind: str = "127.0.0.1:8080", alerts_endpoint: str | None = None, **kwargs) -> LiveView:
    """Start a live view on ``bind`` (``HOST:PORT``; port 0 = any free one), subscribed
    to ``alerts_endpoint`` if given. Returns it started: ``.url``, ``.offer()``, ``.close()``.
    Non-loopback binds need ``allow_remote=True``."""
    return LiveView(bind, alerts_endpoint, **kwargs).start()


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body{font-family:sans-serif;background:#111;color:#eee;margin:16px}
 h1{font-size:18px;margin:0 0 12px} .row{display:flex;gap:16px;align-items:flex-start}
 #banner{font-size:22px;font-weight:bold;padding:8px 12px;border-radius:4px;background:#444;margin-bottom:10px}
 .OK{background:#2a7d2a!important} .NOT_OK{background:#b22!important} .other{background:#c80!important}
 table{border-collapse:collapse;font-size:14px} td,th{border:1px solid #444;padding:3px 8px;text-align:right}
 th{background:#222} #frame{width:640px;max-width:60vw;border:1px solid #444;background:#000;min-height:100px}
</style></head><body>
<h1>__TITLE__</h1>
<div id="banner">waiting for decisions...</div>
<div class="row">
 <div><img id="frame" alt="latest overlay"></div>
 <div>
  <table id="counts"><tr><th>decision</th><th>count</th></tr></table><br>
  <div>frames/s: <b id="fps">-</b> &nbsp; total: <b id="total">0</b></div><br>
  <table id="latency"><tr><th>stage (ms)</th><th>p50</th><th>p95</th><th>p99</th></tr></table>
 </div>
</div>
<script>
const DECISIONS = ["OK","NOT_OK","NOT_DECIDABLE","ERROR","DROPPED"];
let imageVersion = null;
function fmt(v){ return v === null || v === undefined ? "-" : v; }
function render(s){
  const c = document.getElementById("counts");
  c.innerHTML = "<tr><th>decision</th><th>count</th></tr>" +
    DECISIONS.map(d => `<tr><td>${d}</td><td id="count-${d}">${s.counts[d] || 0}</td></tr>`).join("");
  document.getElementById("fps").textContent = fmt(s.fps);
  document.getElementById("total").textContent = s.total;
  const l = document.getElementById("latency");
  l.innerHTML = "<tr><th>stage (ms)</th><th>p50</th><th>p95</th><th>p99</th></tr>" +
    Object.entries(s.latency_ms).map(([k,v]) =>
      `<tr><td>${k}</td><td>${fmt(v.p50)}</td><td>${fmt(v.p95)}</td><td>${fmt(v.p99)}</td></tr>`).join("");
  const b = document.getElementById("banner");
  if (s.latest) {
    const x = s.latest;
    b.textContent = `${x.station} part ${x.frame_id}: ${x.decision}` +
      (x.score !== null ? `  score ${x.score.toPrecision(4)}` : "") +
      (x.threshold !== null ? ` / threshold ${x.threshold.toPrecision(4)}` : "") + (x.reason ? `  (${x.reason})` : "");
    b.className = x.decision === "OK" || x.decision === "NOT_OK" ? x.decision : "other";
  }
  if (s.image_version !== null && s.image_version !== imageVersion) {
    imageVersion = s.image_version;
    document.getElementById("frame").src = "/frame?v=" + imageVersion;
  }
}
render(__STATE__);
const es = new EventSource("/events");
es.onmessage = e => render(JSON.parse(e.data));
</script></body></html>
"""
