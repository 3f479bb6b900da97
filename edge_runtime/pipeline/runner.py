"""The streaming pipeline, one import away: ``RunConfig`` and ``run_pipeline``.

The pipeline is split by job (docs/wire.md has the whole picture):

* ``pipeline/config.py``     — ``RunConfig`` (every setting), internal link endpoints, run ids;
* ``pipeline/control.py``    — the control message kinds between supervisor and stages;
* ``pipeline/loops.py``      — the stage processes (capture, preprocess, infer, alert);
* ``pipeline/supervisor.py`` — the supervisor: start, restart, watchdogs, drain, stop;
* ``pipeline/stages.py``     — the pure per-frame functions the loops call.

This module re-exports the public names so ``from edge_runtime.pipeline.runner import
RunConfig, run_pipeline`` keeps working.
"""

from edge_runtime.pipeline.config import Links, RunConfig, make_links, new_run_id  # noqa: F401
from edge_runtime.pipeline.supervisor import Supervisor, preflight, run_pipeline  # noqa: F401

__all__ = ["Links", "RunConfig", "Supervisor", "make_links", "new_run_id", "preflight", "run_pipeline"]
