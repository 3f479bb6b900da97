"""A run's settings (``RunConfig``), the internal link endpoints, and the run id.

Plain data: the config travels to every spawned stage process. See docs/wire.md for
what each setting does to the pipeline; the CLI flags of ``edge-run`` map one to one.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.data.io import DEFAULT_LIMITS, ImageLimits
from edge_runtime.pipeline.wire import DEFAULT_MAX_FRAME_BYTES

# Per-frame deadline when the station's cycle time is unknown (no --fps / --cycle-time).
DEFAULT_DEADLINE_S = 60.0
# With a known cycle time: this many cycles, and never less than the floor.
DEADLINE_CYCLES = 20
DEADLINE_FLOOR_S = 10.0


@dataclass
class RunConfig:
    """Everything a run needs; plain data so it travels to the spawned stage processes.

    bundle: model bundle directory. backend / device / backend_options: ``load_detector``
        (inference workers only; the preprocess stage loads just the method's preprocessor).
    source: "synth", a directory (MVTec 3D-AD layout, test split replayed), or
        "zmq+tcp://HOST:PORT" (ingress PULL socket bound there; port ``*`` = any free one).
    category: synthetic station category / directory category (None: default / all).
    fps: pace of synth / directory sources (None: as fast as the pipeline takes them).
    frames: stop after capturing this many (None: until the source ends or a signal).
    workers: inference worker processes. batch: frames one worker takes at once
        (``infer_batch``). queue: a live source's capture queue (frames) before the oldest is dropped.
    station, alerts, replay, journal, heartbeat_s: the alert channel (alerts.AlertPublisher);
        alerts / replay may use port ``*`` (the bound endpoints are reported by ``on_ready``).
    heatmaps: directory for NOT_OK overlay PNGs (None: none written).
    allow_remote / curve_keys / curve_clients: bind policy, CURVE server keys for the
        external sockets (ingress, alerts, replay), and the client allow-list directory.
    wait_subscribers: capture starts only once this many alert subscriptions arrived
        (bounded by ``startup_timeout_s``; 0 = do not wait).
    link: "ipc" or "tcp" for the internal stage links. max_frame_bytes: cap on one frame.
    max_image_side / max_image_pixels / max_aspect: image size limits (``io.ImageLimits``).
    threads: torch threads per inference worker (0: ``default_threads``).
    synth_size / synth_seed / defect_rate / synth_pool: the synthetic station's frames
        (``synth_pool`` frames rendered once and cycled; 0 renders live).
    drain_timeout_s: bounded wait for in-flight frames at shutdown.
    startup_timeout_s: bound on model loading and start-up of all stages.
    max_restarts / restart_window_s: give up when inference workers died more than
        ``max_restarts`` times within ``restart_window_s`` seconds (a rate, not a total).
    cycle_time_s: the station's cycle time (None: 1 / fps when paced, else unknown).
    frame_deadline_s: a worker holding a frame longer than this is killed and restarted,
        the frame becomes ERROR "deadline" (None: ``DEADLINE_CYCLES`` cycle times, at least
        ``DEADLINE_FLOOR_S``; ``DEFAULT_DEADLINE_S`` without a cycle time).
    stall_timeout_s: a stage whose loop shows no progress for this long is hung: a
        worker is restarted, any other stage fails the run.
    lost_after_s: the alert stage records an id as ERROR "lost" when later ids were decided
        and it still has no record this long after (None: frame deadline + 10 s).
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
    curve_clients: str | None = None
    wait_subscribers: int = 0
    link: str = "ipc"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_image_side: int = DEFAULT_LIMITS.max_side
    max_image_pixels: int = DEFAULT_LIMITS.max_pixels
    max_aspect: float = DEFAULT_LIMITS.max_aspect
    threads: int = 0
    synth_size: int = 224
    synth_seed: int = 0
    defect_rate: float = 0.2
    synth_pool: int = 16
    drain_timeout_s: float = 30.0
    startup_timeout_s: float = 600.0
    max_restarts: int = 10
    restart_window_s: float = 60.0
    cycle_time_s: float | None = None
    frame_deadline_s: float | None = None
    stall_timeout_s: float = 60.0
    lost_after_s: float | None = None
    stats_interval_s: float = 0.5
    warmup: int = 0
    model: str = ""
    bundle_hash: str = ""
    run_id: str = ""

    def limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_side, self.max_image_pixels, self.max_aspect)

    def cycle_s(self) -> float | None:
        """The station's cycle time in seconds, when known."""
        return self.cycle_time_s if self.cycle_time_s else (1.0 / self.fps if self.fps else None)

    def deadline_s(self) -> float:
        """The per-frame deadline in an inference worker (see ``frame_deadline_s``)."""
        if self.frame_deadline_s is not None:
            return float(self.frame_deadline_s)
        cycle = self.cycle_s()
        return DEFAULT_DEADLINE_S if cycle is None else max(DEADLINE_FLOOR_S, DEADLINE_CYCLES * cycle)

    def lost_s(self) -> float:
        return float(self.lost_after_s) if self.lost_after_s is not None else self.deadline_s() + 10.0

    def check(self) -> None:
        """ValueError naming the setting when a size or time is out of range."""
        for name in ("workers", "batch", "queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"workers, batch and queue must be >= 1 (got {self.workers}, {self.batch}, "
                                 f"{self.queue})")
        for name in ("max_restarts", "wait_subscribers", "synth_pool"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("restart_window_s", "stall_timeout_s", "drain_timeout_s", "startup_timeout_s",
                     "heartbeat_s", "max_aspect"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("frame_deadline_s", "cycle_time_s", "lost_after_s"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_image_side < 1 or self.max_image_pixels < 1 or self.max_frame_bytes < 1:
            raise ValueError("image and frame size limits must be >= 1")


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
