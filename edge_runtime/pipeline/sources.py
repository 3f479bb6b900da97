"""Frame sources for the capture stage: synthetic station, directory replay, ZeroMQ ingress.

A source yields ``Captured`` items (rgb, xyz, where it came from, or why it failed).
The capture stage asks ``due_in()`` how long to wait (pacing, or "wait on my socket"),
then calls ``read()``.

* ``SynthSource`` — the synthetic station (``edge_runtime.data.synth.SynthStation``)
  as a simulated camera. With ``fps`` it is a *live* camera running at that rate, and
  frames the pipeline cannot take in time are dropped (oldest first); without ``fps``
  it produces a frame whenever the pipeline asks (nothing is ever dropped).
* ``DirectorySource`` — every test sample of an MVTec 3D-AD layout directory (all
  categories in name order, or one), replayed in order; never live: the pipeline's
  back-pressure pauses the replay, nothing is dropped. ``fps`` paces it.
* ``IngressSource`` — a ZeroMQ PULL socket a camera driver pushes frames to in the wire
  format (docs/wire.md, "Ingress"); always live. Every message becomes a frame: an
  undecodable one becomes an ERROR frame with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from edge_runtime.errors import DataError
from edge_runtime.pipeline.wire import INGRESS_KEYS, WireError, decode

INGRESS_ARRAYS = ("rgb", "xyz")


@dataclass
class Captured:
    """One acquisition: capture_ns / read_ns bracket the read (``time.time_ns()``);
    rgb uint8 H x W x 3, xyz float32 H x W x 3 metres (or None); source names the
    file / sample / camera reference; error is why nothing usable was read (then the
    arrays are None)."""

    capture_ns: int
    read_ns: int
    rgb: np.ndarray | None = None
    xyz: np.ndarray | None = None
    source: str | None = None
    error: str | None = None


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
    station's generator, ``fps`` None = on demand (not live), else a live camera."""

    socket = None

    def __init__(self, category: str | None = None, size: int = 128, seed: int = 0,
                 defect_rate: float = 0.2, fps: float | None = None):
        from edge_runtime.data.synth import SynthStation

        self.live = fps is not None
        self._pacer = _Pacer(fps)
        station = SynthStation(size=size, seed=seed)
        category = category or station.categories[0]
        self._stream = station.stream(category, defect_rate)
        self._desc = (f"synthetic station ({category}, {size} px, defect rate {defect_rate:g}, "
                      f"{'live camera at %g fps' % fps if fps else 'on demand'})")

    def describe(self) -> str:
        return self._desc

    def due_in(self) -> float:
        return self._pacer.due_in()

    def read(self, limit: int | None = None) -> list[Captured]:
        """The next frame of the stream (``limit`` is accepted for the common interface)."""
        self._pacer.tick()
        t0 = time.time_ns()
        sample = next(self._stream)
        return [Captured(t0, time.time_ns(), sample.rgb, sample.xyz, source=f"synth:{sample.key}")]

    def close(self) -> None:
        pass


class DirectorySource:
    """Replays ``root``'s test split (MVTec 3D-AD layout) in order: categories by name
    (or just ``category``), then defect type and stem as the reader orders them.
    A sample whose files are unreadable becomes an ERROR capture naming the file."""

    socket = None
    live = False

    def __init__(self, root: str | Path, category: str | None = None, fps: float | None = None):
        from edge_runtime.data.mvtec import MVTec3D

        dataset = MVTec3D(root)
        categories = [category] if category else dataset.categories()
        if not categories:
            raise DataError(root, "no category folders to replay")
        self._refs = [ref for c in categories for ref in dataset.index(c, "test")]
        if not self._refs:
            raise DataError(root, f"no test samples in {', '.join(categories)}")
        self._next = 0
        self._pacer = _Pacer(fps)
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
        try:
            sample = ref.load()
        except DataError as exc:
            return [Captured(t0, time.time_ns(), source=ref.key, error=f"unreadable sample: {exc}")]
        return [Captured(t0, time.time_ns(), sample.rgb, sample.xyz, source=ref.key)]

    def close(self) -> None:
        pass


class IngressSource:
    """ZeroMQ PULL socket bound at ``endpoint`` (loopback unless ``allow_remote``), fed by
    a camera driver (examples/camera_sender.py). ``max_bytes`` caps one frame's arrays;
    libzmq disconnects a peer that sends one part over twice that (``zmq.MAXMSGSIZE``).
    ``curve_keys``: a CURVE server key pair (security.load_keys) to require encryption.
    ``hwm``: messages queued in the socket before the camera's PUSH blocks."""

    live = True

    def __init__(self, ctx: zmq.Context, endpoint: str, max_bytes: int, allow_remote: bool = False,
                 curve_keys=None, hwm: int = 4):
        from edge_runtime.pipeline import security

        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        security.set_max_msg(self.socket, 2 * max_bytes)
        if curve_keys is not None:
            security.apply_curve_server(self.socket, curve_keys)
        security.bind(self.socket, endpoint, allow_remote)

    def describe(self) -> str:
        return f"ZeroMQ ingress (PULL bound at {self.endpoint})"

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
        except WireError as exc:
            return Captured(t0, time.time_ns(), error=f"bad ingress message: {exc}")
        return Captured(t0, time.time_ns(), frame.arrays["rgb"], frame.arrays.get("xyz"),
                        source=frame.header.get("source"))

    def close(self) -> None:
        self.socket.close(linger=0)


def open_source(cfg, ctx: zmq.Context):
    """The source a ``RunConfig`` names: "synth", "zmq+tcp://HOST:PORT" (also zmq+ipc://),
    or a directory in the MVTec 3D-AD layout. Raises ``DataError`` for a bad directory."""
    spec = cfg.source
    if spec == "synth":
        return SynthSource(cfg.category, cfg.synth_size, cfg.synth_seed, cfg.defect_rate, cfg.fps)
    if spec.startswith("zmq+"):
        keys = None
        if cfg.curve_keys:
            from edge_runtime.pipeline.security import load_keys

            keys = load_keys(cfg.curve_keys)
        return IngressSource(ctx, spec[len("zmq+"):], cfg.max_frame_bytes, cfg.allow_remote, keys)
    if not Path(spec).is_dir():
        raise DataError(spec, "source is not 'synth', 'zmq+tcp://HOST:PORT' or an existing directory")
    return DirectorySource(spec, cfg.category, cfg.fps)
