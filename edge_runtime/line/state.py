"""The gateway's durable delivered position: a small JSON file, written atomically.

``GatewayState(path)`` holds, per run (and its station), the ranges of frame ids the
gateway delivered, the first id it answers for and the highest id it knew of. It is
written with write-to-temp + fsync + rename + directory fsync, so after any crash the
file is either the previous or the new version, never a torn one. An exclusive
``flock`` on ``<file>.lock`` keeps two gateways from sharing one state file.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from edge_runtime.errors import DataError

STATE_SCHEMA = 1
MAX_STATE_RUNS = 16  # runs remembered; older ones are forgotten (their journal rows too, eventually)
APP_DIR = "edge_runtime"


def default_state_path(station: str | None) -> Path:
    """``$XDG_STATE_HOME/edge_runtime/gateway-<station|all>.json`` (XDG default ~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / APP_DIR / f"gateway-{station or 'all'}.json"


class GatewayState:
    """Load, lock and atomically save the gateway's per-run delivered ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.runs: dict[str, dict] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115
        except OSError as exc:
            raise DataError(self.path, f"cannot create the gateway state file's directory: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise DataError(self.path, "state file is in use by another edge-alerts; run one gateway per "
                            "station or give each its own --state FILE") from None  # fmt: skip
        if self.path.exists():
            self.runs = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(self.path, f"unreadable gateway state ({exc}); delete it to start afresh") from None
        if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA or not isinstance(data.get("runs"), dict):
            raise DataError(self.path, f"not an edge-alerts state file (schema {STATE_SCHEMA} expected)")
        runs = {}
        for run_id, entry in data["runs"].items():
            ok = isinstance(entry, dict) and all(k in entry for k in ("start", "late_ok", "known", "done"))
            if not ok or not all(isinstance(r, list) and len(r) == 2 for r in entry["done"]):
                raise DataError(self.path, f"run {run_id!r}: needs start, late_ok, known and done [[lo, hi], ...]")
            runs[run_id] = entry
        return runs

    def save(self, runs: dict[str, dict]) -> None:
        """Atomically replace the file with ``runs`` (newest ``MAX_STATE_RUNS`` kept)."""
        keep = dict(sorted(runs.items(), key=lambda kv: kv[1].get("updated_ns", 0))[-MAX_STATE_RUNS:])
        text = json.dumps({"schema": STATE_SCHEMA, "runs": keep}, separators=(",", ":"))
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise DataError(self.path, f"cannot write the gateway state: {exc.strerror or exc}") from None
        self.runs = keep

    def close(self) -> None:
        self._lock.close()
