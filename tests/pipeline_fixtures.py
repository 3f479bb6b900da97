"""Helpers shared by the pipeline tests (test_wire, test_stages, test_pipeline_e2e, test_run_cli,
test_faults_*).

``noop_bundle`` writes a weightless bundle directory the no-op backend
(edge_runtime/backends/noop.py) runs: a manifest that ``edge_runtime.bundle.read_manifest``
accepts (so ``bundle_hash`` works) plus thresholds and a small working resolution.

Time: every timeout a test waits on is scaled by ``EDGE_TEST_TIME_FACTOR`` (default 1;
e.g. 3 on a loaded CI box) through ``scaled``; tests wait on events with generous
deadlines, never on fixed sleeps. Endpoints: alert and replay sockets bind
``tcp://127.0.0.1:*`` (the OS picks a free port; the run reports it through ``on_ready``),
so no test races another for a port.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from edge_runtime.pipeline.config import RunConfig

# noop scores are the std of the resized rgb in [0, 1]; synthetic station frames sit around
# 0.1-0.3, so this threshold yields both OK and NOT_OK decisions.
NOOP_THRESHOLDS = {"image": 0.2, "pixel": 0.5}
ANY_PORT = "tcp://127.0.0.1:*"


def time_factor() -> float:
    """``EDGE_TEST_TIME_FACTOR`` (>= 1 slows every test deadline down by that factor)."""
    return max(1.0, float(os.environ.get("EDGE_TEST_TIME_FACTOR", "1") or 1))


def scaled(seconds: float) -> float:
    """A test deadline in seconds, scaled by ``time_factor()``."""
    return seconds * time_factor()


def noop_bundle(path: Path, thresholds: dict | None = NOOP_THRESHOLDS, resolution: int = 32,
                training: dict | None = None) -> Path:
    """A bundle directory for ``backend="noop"``; thresholds None = uncalibrated;
    ``training`` e.g. {"category": "widget"} (what edge-run replays by default)."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "schema_version": 1, "method": "cfm", "variant": "noop-test", "config": {}, "resolution": resolution,
        "files": {"model.safetensors": {"sha256": "0" * 64, "bytes": 0}},
        "thresholds": dict(thresholds) if thresholds else thresholds, "training": training,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (only where an API needs a number
    up front, e.g. a subprocess's --prometheus; prefer ``ANY_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(tmp_path: Path, **overrides) -> RunConfig:
    """A RunConfig for a fast test run: no-op model, 64 px synthetic frames, loopback
    alert endpoints on OS-chosen ports, journal in ``tmp_path``, short (scaled) timeouts."""
    bundle = overrides.pop("bundle", None) or noop_bundle(tmp_path / "bundle")
    base = dict(
        bundle=str(bundle), backend="noop", synth_size=64, synth_pool=4, journal=str(tmp_path / "journal.sqlite"),
        alerts=ANY_PORT, replay=ANY_PORT, drain_timeout_s=scaled(10.0), startup_timeout_s=scaled(60.0),
        stats_interval_s=0.2,
    )
    base.update(overrides)
    return RunConfig(**base)


def run_bounded(cfg: RunConfig, timeout_s: float = 90.0, **kwargs) -> dict:
    """``run_pipeline`` with a watchdog: after ``scaled(timeout_s)`` it sends this process
    SIGTERM (the runner's graceful stop, then a second one for an immediate stop), so a
    bug cannot hang the test suite; the test then fails on its assertions."""
    import signal

    from edge_runtime.pipeline.supervisor import run_pipeline

    timers = [threading.Timer(scaled(timeout_s) + extra, os.kill, (os.getpid(), signal.SIGTERM))
              for extra in (0, 15)]
    for t in timers:
        t.start()
    try:
        return run_pipeline(cfg, **kwargs)
    finally:
        for t in timers:
            t.cancel()


@pytest.fixture
def one_torch_thread():
    """torch limited to one thread for the test, restored after (the 2-core CI box is
    shared). Suggested for tests/conftest.py, where test_bundle / test_cfm /
    test_train_eval each carry a copy."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
