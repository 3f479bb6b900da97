"""Helpers shared by the pipeline tests (test_wire, test_stages, test_pipeline_e2e, test_run_cli).

``noop_bundle`` writes a weightless bundle directory the no-op backend
(edge_runtime/backends/noop.py) runs: a manifest that ``edge_runtime.bundle.read_manifest``
accepts (so ``bundle_hash`` works) plus thresholds and a small working resolution.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from edge_runtime.pipeline.runner import RunConfig

# noop scores are the std of the resized rgb in [0, 1]; synthetic station frames sit around
# 0.1-0.3, so this threshold yields both OK and NOT_OK decisions.
NOOP_THRESHOLDS = {"image": 0.2, "pixel": 0.5}


def noop_bundle(path: Path, thresholds: dict | None = NOOP_THRESHOLDS, resolution: int = 32) -> Path:
    """A bundle directory for ``backend="noop"``; thresholds None = uncalibrated."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "schema_version": 1, "method": "cfm", "variant": "noop-test", "config": {}, "resolution": resolution,
        "files": {"model.safetensors": {"sha256": "0" * 64, "bytes": 0}}, "thresholds": thresholds,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(tmp_path: Path, **overrides) -> RunConfig:
    """A RunConfig for a fast test run: no-op model, 64 px synthetic frames, loopback
    alert endpoints on free ports, journal in ``tmp_path``, short timeouts."""
    bundle = overrides.pop("bundle", None) or noop_bundle(tmp_path / "bundle")
    base = dict(
        bundle=str(bundle), backend="noop", synth_size=64, journal=str(tmp_path / "journal.sqlite"),
        alerts=f"tcp://127.0.0.1:{free_port()}", replay=f"tcp://127.0.0.1:{free_port()}",
        drain_timeout_s=10.0, startup_timeout_s=60.0, stats_interval_s=0.2,
    )
    base.update(overrides)
    return RunConfig(**base)


def run_bounded(cfg: RunConfig, timeout_s: float = 90.0, **kwargs) -> dict:
    """``run_pipeline`` with a watchdog: after ``timeout_s`` it sends this process SIGTERM
    (the runner's graceful stop, then a second one for an immediate stop), so a bug
    cannot hang the test suite; the test then fails on its assertions."""
    import os
    import signal
    import threading

    from edge_runtime.pipeline.runner import run_pipeline

    timers = [threading.Timer(timeout_s + extra, os.kill, (os.getpid(), signal.SIGTERM)) for extra in (0, 15)]
    for t in timers:
        t.start()
    try:
        return run_pipeline(cfg, **kwargs)
    finally:
        for t in timers:
            t.cancel()
