"""Frame sources for the capture stage: synthetic station, directory replay, ZeroMQ ingress.

A source yields ``Captured`` items (rgb, xyz, where it came from, or why it failed).
The capture stage asks ``due_in()`` how long to wait (pacing, or "wait on my socket"),
then calls ``read()``.

* ``SynthSource`` — the synthetic station (``edge_runtime.data.synth.SynthStation``)
  as a simulated camera. With ``fps`` it is a *live* camera running at that rate, and
  frames the pipeline cannot take in time are dropped (oldest first); without ``fps``
  it produces a frame whenever the pipeline asks (nothing is ever dropped). Rendering
  costs ~100 ms per 400 px frame on a small CPU, so by default a bounded pool of frames
  is rendered once at start and then cycled (``pool``): the camera is never the
  bottleneck. ``pool=0`` renders every frame while streaming.
* ``DirectorySource`` — every test sample of an MVTec 3D-AD layout directory (all
  categories in name order, or one), replayed in order; never live: the pipeline's
  back-pressure pauses the replay, nothing is dropped. ``fps`` paces it. Only the test
  split is needed; a sample whose files are missing, unreadable or over the image
  limits becomes one ERROR capture naming the file.
* ``IngressSource`` — a ZeroMQ PULL socket a camera driver pushes frames to in the wire
  format (docs/wire.md, "Ingress"); always live. Every message becomes a frame: an
  undecodable one, or one over the image limits, becomes an ERROR frame with the reason.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from edge_runtime.data import io
from edge_runtime.data.io import DEFAULT_LIMITS, ImageLimits
from edge_runtime.errors import DataError
from edge_runtime.pipeline.wire import INGRESS_KEYS, WireError, decode

INGRESS_ARRAYS = ("rgb", "xyz")
SYNTH_POOL = 16  # frames the simulated camera renders once and cycles (0: render live)
SYNTH_POOL_MAX_BYTES = 256 * 2**20  # the pool never holds more than this


@dataclass
class Captured:
    """One acquisition: capture_ns / read_ns bracket the read (``time.time_ns()``);
    rgb uint8 H x W x 3, xyz float32 H x W x 3 metres (or None); source names the
    file / sample / camera reference; error is why nothing usable was read (then the
    arrays are None) and status the decision it earns (ERROR, or NOT_DECIDABLE for
    content the runtime cannot judge); category: the part's category when known."""

    capture_ns: int
    read_ns: int
    rgb: np.ndarray | None = None
    xyz: np.ndarray | None = None
    source: str | None = None
    error: str | None = None
    category: str | None = None
    status: str = "ERROR"


class _Pacer:
    """Fixed-rate schedule: ``due_in()`` seconds until the next frame at ``fps`` (None: no pacing).

    A late read does not cause a burst of catch-up frames: the schedule restarts from now
    when it falls more than one period behind (as a camera that missed a trigger)."""

    def __init__(self, fps: float | None):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps if fps else 0.0
        self.next = None

    def due_in(self) -> float:
        """Seconds until the next frame is due; 0 when due (or less than a millisecond away)."""
        wait = 0.0 if self.next is None else self.next - time.monotonic()
        return wait if wait >= 1e-3 else 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if self.next is None or self.next < now - self.period:
            self.next = now
        self.next += self.period


class SynthSource:
    """The synthetic station as a camera. ``category`` None = the station's first category,
    ``size`` pixels a side, ``defect_rate`` fraction of defective parts, ``seed`` for the
    station's generator, ``fps`` None = on demand (not live), else a live camera.
    ``pool``: render this many frames once (bounded by ``SYNTH_POOL_MAX_BYTES``) and cycle
    them; 0 renders every frame when it is read."""

    socket = None

    def __init__(self, category: str | None = None, size: int = 128, seed: int = 0,
                 defect_rate: float = 0.2, fps: float | None = None, pool: int = SYNTH_POOL):
        from edge_runtime.data.synth import SynthStation

        if pool < 0:
            raise ValueError(f"synth pool must be >= 0 frames, got {pool}")
        self.live = fps is not None
        self._pacer = _Pacer(fps)
        station = SynthStation(size=size, seed=seed)
        self.category = category or station.categories[0]
        self._stream = station.stream(self.category, defect_rate)
        frame_bytes = size * size * 3 * (1 + 4)  # rgb uint8 + xyz float32
        self._pool = [next(self._stream) for _ in range(min(pool, max(1, SYNTH_POOL_MAX_BYTES // frame_bytes)))]
        self._n = 0
        mode = f"a pool of {len(self._pool)} pre-rendered frames" if self._pool else "rendered live"
        self._desc = (f"synthetic station ({self.category}, {size} px, defect rate {defect_rate:g}, "
                      f"{'live camera at %g fps' % fps if fps else 'on demand'}, {mode})")

    def describe(self) -> str:
        return self._desc

    def due_in(self) -> float:
        return self._pacer.due_in()

    def read(self, limit: int | None = None) -> list[Captured]:
        """The next frame of the stream (``limit`` is accepted for the common interface)."""
        self._pacer.tick()
        t0 = time.time_ns()
        sample = self._pool[self._n % len(self._pool)] if self._pool else next(self._stream)
        self._n += 1
        return [Captured(t0, time.time_ns(), sample.rgb, sample.xyz, source=f"synth:{sample.key}",
                         category=self.category)]

    def close(self) -> None:
        pass


class _Broken:
    """A test sample the scan found incomplete (e.g. its xyz partner is missing)."""

    def __init__(self, category: str, defect_type: str, stem: str, key: str, problem: str):
        self.category, self.defect_type, self.stem, self.key, self.problem = category, defect_type, stem, key, problem


def _test_split(dataset, category: str) -> list:
    """The test split of ``category`` in replay order (defect type, then stem): SampleRefs,
    and one ``_Broken`` per incomplete sample (so it costs one ERROR record, not the
    replay). Only the test split must exist. Stray files that are no sample are skipped."""
    from edge_runtime.data.mvtec import SampleRef

    scan = dataset._scan(category)  # structure only, no pixel reads
    if "test" not in scan.refs:
        raise DataError(dataset.root / category / "test", "missing split folder (a replay needs the test split)")
    items = list(scan.refs["test"])
    broken: dict[str, _Broken] = {}
    for problem in scan.problems.get("test", []):
        path = Path(problem.path)
        if path.parent.name != "rgb" or path.suffix.lower() != ".png":
            continue  # not a sample (a stray or partner-less file)
        defect = path.parent.parent.name
        key = SampleRef(category, "test", defect, path.stem).key
        if key in broken:
            broken[key].problem += f"; {problem.problem}"
        else:
            broken[key] = _Broken(category, defect, path.stem, key, str(problem))
    return sorted(items + list(broken.values()), key=lambda x: (x.defect_type, x.stem))


class DirectorySource:
    """Replays ``root``'s test split (MVTec 3D-AD layout) in order: categories by name
    (or just ``category``), then defect type and stem as the reader orders them.
    A sample whose files are missing, unreadable or over ``limits`` becomes an ERROR
    capture naming the file; NaN / Inf coordinates follow the same rule as a camera's
    (``stages.check_points``: NOT_DECIDABLE)."""

    socket = None
    live = False

    def __init__(self, root: str | Path, category: str | None = None, fps: float | None = None,
                 limits: ImageLimits | None = None):
        from edge_runtime.data.mvtec import MVTec3D

        dataset = MVTec3D(root)
        categories = [category] if category else dataset.categories()
        if not categories:
            raise DataError(root, "no category folders to replay")
        self._limits = limits or DEFAULT_LIMITS
        self._refs = [ref for c in categories for ref in _test_split(dataset, c)]
        if not self._refs:
            raise DataError(root, f"no test samples in {', '.join(categories)}")
        self._next = 0
        self._pacer = _Pacer(fps)
        self.categories = categories
        self._desc = f"directory {root} ({len(self._refs)} test samples, {', '.join(categories)})"

    def __len__(self) -> int:
        return len(self._refs)

    def describe(self) -> str:
        return self._desc

    def due_in(self) -> float | None:
        return None if self._next >= len(self._refs) else self._pacer.due_in()

    def read(self, limit: int | None = None) -> list[Captured]:
        """The next sample in replay order (``limit`` is accepted for the common interface)."""
        self._pacer.tick()
        ref = self._refs[self._next]
        self._next += 1
        t0 = time.time_ns()
        if isinstance(ref, _Broken):
            return [Captured(t0, time.time_ns(), source=ref.key, category=ref.category,
                             error=f"unreadable sample: {ref.problem}")]
        try:  # rgb and xyz only (no gt at run time); sizes checked on the headers first
            rgb = io.read_rgb(ref.paths["rgb"], self._limits)
            xyz = io.read_xyz(ref.paths["xyz"], self._limits, allow_nonfinite=True) if "xyz" in ref.paths else None
        except DataError as exc:
            return [Captured(t0, time.time_ns(), source=ref.key, category=ref.category,
                             error=f"unreadable sample: {exc}")]
        return [Captured(t0, time.time_ns(), rgb, xyz, source=ref.key, category=ref.category)]

    def close(self) -> None:
        pass


class IngressSource:
    """ZeroMQ PULL socket bound at ``endpoint`` (loopback unless ``allow_remote``), fed by
    a camera driver (examples/camera_sender.py). ``max_bytes`` caps one frame's arrays;
    libzmq disconnects a peer that sends one part over twice that (``zmq.MAXMSGSIZE``).
    ``curve_keys``: a CURVE server key pair (security.load_keys) to require encryption.
    ``hwm``: messages queued in the socket before the camera's PUSH blocks.
    ``limits``: image size bounds, checked on the header's shapes before anything is done
    with the pixels. ``endpoint`` may use port ``*``; ``bound`` is the real endpoint.
    ``disconnects`` counts camera connections that ended; ``refused`` those the station
    closed itself (libzmq drops a peer that sends one part over twice ``max_bytes``, before
    it is buffered, or that breaks the protocol), ``camera_closed`` those the camera
    closed. libzmq reports both as the same monitor event, so the station tells them
    apart by who closed the TCP connection first (``TcpCloseClassifier``)."""

    live = True

    def __init__(self, ctx: zmq.Context, endpoint: str, max_bytes: int, allow_remote: bool = False,
                 curve_keys=None, hwm: int = 4, limits: ImageLimits | None = None):
        from edge_runtime.pipeline import security

        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.limits = limits or DEFAULT_LIMITS
        self.disconnects = 0
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        security.set_max_msg(self.socket, 2 * max_bytes)
        if curve_keys is not None:
            security.apply_curve_server(self.socket, curve_keys)
        security.bind(self.socket, endpoint, allow_remote)
        self.bound = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._closes = TcpCloseClassifier(self.bound)

    def describe(self) -> str:
        return f"ZeroMQ ingress (PULL bound at {self.bound})"

    def poll_events(self, settle: bool = False) -> dict:
        """Count the disconnect events that arrived and classify them; returns the totals
        ``{disconnects, refused, camera_closed, unclassified}``. ``settle``: wait (at most
        ``CLOSE_SETTLE_S``) until every disconnect so far is classified."""
        while True:
            try:
                parts = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) == 2 and len(parts[0]) >= 2 and int.from_bytes(parts[0][:2], "little") \
                    == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                self._closes.disconnected()
        self._closes.classify(settle)
        return {"disconnects": self.disconnects, **self._closes.counts}

    def due_in(self) -> float:
        return math.inf  # wait on self.socket

    def read(self, limit: int | None = None) -> list[Captured]:
        """The messages queued on the socket now (non-blocking; at most ``limit``), each
        decoded or failed."""
        out = []
        while limit is None or len(out) < limit:
            try:
                parts = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            out.append(self._parse(parts))
        return out

    def _parse(self, parts: list) -> Captured:
        t0 = time.time_ns()
        try:
            frame = decode(parts, where=f"ingress {self.endpoint}", max_bytes=self.max_bytes,
                           allowed_keys=INGRESS_KEYS)
            if frame.header.get("kind", "frame") != "frame":
                raise WireError(f"ingress {self.endpoint}", f"kind must be 'frame', got {frame.header['kind']!r}")
            extra = set(frame.arrays) - set(INGRESS_ARRAYS)
            if "rgb" not in frame.arrays or extra:
                raise WireError(f"ingress {self.endpoint}",
                                f"arrays must be 'rgb' and optionally 'xyz', got {sorted(frame.arrays)}")
            for name, arr in frame.arrays.items():  # before anything touches the pixels
                problem = self.limits.problem(*arr.shape[:2]) if arr.ndim >= 2 else None
                if problem is not None and arr.size:
                    raise WireError(f"ingress {self.endpoint}", f"{name}: {problem}")
        except WireError as exc:
            return Captured(t0, time.time_ns(), error=f"bad ingress message: {exc}")
        return Captured(t0, time.time_ns(), frame.arrays["rgb"], frame.arrays.get("xyz"),
                        source=frame.header.get("source"))

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)


# TCP states (Linux /proc/net/tcp) a connection is in after *this* side closed it first.
_CLOSED_HERE = {"04", "05", "06", "0B"}  # FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSING
CLOSE_SETTLE_S = 0.25  # a disconnect is classified once the kernel has had this long


class TcpCloseClassifier:
    """Tells whether the station or the camera closed each ended ingress connection.

    libzmq gives the same ``EVENT_DISCONNECTED`` for a part over ``MAXMSGSIZE`` (the
    station closes) and for a camera that closed its socket. Two kernel traces tell the
    side that closed first: a connection closed here with nothing left unread stays in
    FIN_WAIT / TIME_WAIT on the ingress port; one closed here with unread bytes (the
    oversize part still arriving) is reset, which the kernel counts in TcpExt
    ``TCPAbortOnClose`` / ``TCPAbortOnData``. A disconnect with either trace is ``refused``, one with neither
    (after ``CLOSE_SETTLE_S``) is ``camera_closed``. The abort counter is host-wide, so a
    different process aborting a connection in the same instant could count one camera
    close as a refusal. Linux only (``/proc/net``); elsewhere, and for ipc://, disconnects
    stay ``unclassified``."""

    def __init__(self, endpoint: str, proc: Path = Path("/proc/net")):
        self.counts = {"refused": 0, "camera_closed": 0, "unclassified": 0}
        self._pending: list[float] = []
        self._tables = [proc / "tcp", proc / "tcp6"]
        self._netstat = proc / "netstat"
        self._port = None
        if endpoint.startswith("tcp://") and self._tables[0].exists():
            try:
                self._port = int(endpoint.rsplit(":", 1)[1])
            except ValueError:
                self._port = None
        self._seen = self._closed_here() if self._port else set()
        self._aborts = self._abort_count() if self._port else 0
        self._history: deque[tuple[float, int]] = deque()  # (time, abort count) while idle
        self._classified_at = 0.0

    def _closed_here(self) -> set[str]:
        """Remote addresses of connections on the ingress port that this side closed."""
        out = set()
        for table in self._tables:
            try:
                lines = table.read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) > 3 and f[3] in _CLOSED_HERE and int(f[1].rsplit(":", 1)[1], 16) == self._port:
                    out.add(f[2])
        return out

    def _abort_count(self) -> int:
        """The host's TcpExt TCPAbortOnClose + TCPAbortOnData: connections reset because
        they were closed here with unread data, or data kept arriving after the close."""
        try:
            lines = self._netstat.read_text().splitlines()
        except OSError:
            return 0
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                row = dict(zip(names.split()[1:], values.split()[1:]))
                return int(row.get("TCPAbortOnClose", 0)) + int(row.get("TCPAbortOnData", 0))
        return 0

    def disconnected(self) -> None:
        now = time.monotonic()
        if not self._pending and self._history:
            # libzmq may close the connection before its event is read here: the baseline is
            # the host's count from just before the event, not the one read last.
            since = max(now - CLOSE_SETTLE_S, self._classified_at)  # traces already used stay used
            recent = [n for t, n in self._history if t >= since]
            self._aborts = recent[0] if recent else self._history[-1][1]
        self._pending.append(now)

    def classify(self, settle: bool = False) -> None:
        """Classify what the kernel shows now; ``settle``: keep looking until every
        pending disconnect is classified (at most ``CLOSE_SETTLE_S``)."""
        deadline = time.monotonic() + (CLOSE_SETTLE_S if settle else 0.0)
        while True:
            self._classify_once()
            if not self._pending or time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def _classify_once(self) -> None:
        if self._port is None:
            self.counts["unclassified"] += len(self._pending)
            self._pending.clear()
            return
        aborts = self._abort_count()
        if not self._pending:  # the baseline follows the host while nothing is pending
            now = time.monotonic()
            self._history.append((now, aborts))
            while self._history and self._history[0][0] < now - 4 * CLOSE_SETTLE_S:
                self._history.popleft()
            self._aborts = aborts
            return
        now_closed = self._closed_here()
        traces = len(now_closed - self._seen) + max(0, aborts - self._aborts)
        self._seen, self._aborts = now_closed, aborts  # TIME_WAIT entries expire: keep the live ones
        n = min(traces, len(self._pending))
        self.counts["refused"] += n
        if n:
            self._classified_at = time.monotonic()
        del self._pending[:n]
        settled = [t for t in self._pending if time.monotonic() - t >= CLOSE_SETTLE_S]
        self.counts["camera_closed"] += len(settled)
        self._pending = self._pending[len(settled):]


def open_source(cfg, ctx: zmq.Context):
    """The source a ``RunConfig`` names: "synth", "zmq+tcp://HOST:PORT" (also zmq+ipc://),
    or a directory in the MVTec 3D-AD layout. Raises ``DataError`` for a bad directory."""
    spec = cfg.source
    limits = cfg.limits()
    if spec == "synth":
        return SynthSource(cfg.category, cfg.synth_size, cfg.synth_seed, cfg.defect_rate, cfg.fps, cfg.synth_pool)
    if spec.startswith("zmq+"):
        keys = None
        if cfg.curve_keys:
            from edge_runtime.pipeline.security import authorize_clients, load_keys

            keys = load_keys(cfg.curve_keys)
            if cfg.curve_clients:
                ctx.edge_auth = authorize_clients(ctx, cfg.curve_clients)  # stopped with the context's owner
        return IngressSource(ctx, spec[len("zmq+"):], cfg.max_frame_bytes, cfg.allow_remote, keys, limits=limits)
    if not Path(spec).is_dir():
        raise DataError(spec, "source is not 'synth', 'zmq+tcp://HOST:PORT' or an existing directory")
    return DirectorySource(spec, cfg.category, cfg.fps, limits)
