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
    ``disconnects`` counts peers libzmq dropped: a part over twice ``max_bytes``
    (refused before it is buffered) or a camera that closed its socket."""

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

    def describe(self) -> str:
        return f"ZeroMQ ingress (PULL bound at {self.bound})"

    def poll_events(self) -> int:
        """Count the disconnect events that arrived; returns the new total."""
        while True:
            try:
                parts = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self.disconnects
            if len(parts) == 2 and len(parts[0]) >= 2 and int.from_bytes(parts[0][:2], "little") \
                    == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1

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
