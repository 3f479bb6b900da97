"""The decision journal: every decision record, in SQLite, before it is published.

The alert stage appends each decision here first and only then publishes it, so any
alert a gateway missed (PUB drops, slow joiner, gateway restart) can be replayed from
the journal by ``(run_id, frame_id)`` (docs/alerts.md, "Journal").

Storage: one table, one row per decision, the record itself kept as JSON text; the
key ``(run_id, frame_id)`` is unique, so appending is idempotent (the first decision
for an id wins; a repeat is ignored and reported as a duplicate).

Durability: WAL mode. With the default ``synchronous=NORMAL`` each append is its own
committed transaction that survives a crash or kill of the process (the write is in
the OS page cache), but the last appends before a power loss or kernel crash may be
rolled back; the file is never corrupted. ``durable=True`` selects
``synchronous=FULL``: the WAL is fsynced on every append, so an acknowledged append
survives power loss too, at the cost of one fsync per decision.

Bounded size: ``max_rows`` keeps the newest N decisions, ``max_age_days`` drops
decisions journaled longer ago than that; pruning runs at open and every
``prune_every`` appends. SQLite reuses freed pages, so the file plateaus rather
than shrinks.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

from edge_runtime.errors import DataError

DECISIONS = ("OK", "NOT_OK", "NOT_DECIDABLE", "ERROR", "DROPPED")
SCHEMA_VERSION = 1

# Decision-record keys and their accepted types (the F1/F2 contract, docs/alerts.md).
_FIELDS: dict[str, tuple[type, ...]] = {
    "schema": (int,),
    "station": (str,),
    "frame_id": (int,),
    "run_id": (str,),
    "capture_ns": (int,),
    "decision_ns": (int,),
    "decision": (str,),
    "reason": (str, type(None)),
    "score": (float, int, type(None)),
    "threshold": (float, int, type(None)),
    "model": (str,),
    "bundle_hash": (str,),
    "stages_ms": (dict,),
    "regions": (list,),
    "heatmap": (str, type(None)),
}
_REGION_KEYS = ("x", "y", "w", "h", "area", "max_score")
# Size bounds that keep one packed record a few KB (alerts.MAX_ALERT_BYTES = 256 KiB).
MAX_TEXT = 4096  # characters in any string field
MAX_REGIONS = 256
MAX_STAGES = 64


def _bad(field: str, problem: str) -> DataError:
    return DataError(None, f"decision record field {field!r}: {problem}")


def validate_record(record: dict) -> dict:
    """Check a decision record against the contract; returns it unchanged.

    Raises ``DataError`` naming the first offending field. Numbers must be finite
    (JSON and msgpack consumers, and a PLC, cannot act on NaN).
    """
    if not isinstance(record, dict):
        raise DataError(None, f"decision record must be a dict, got {type(record).__name__}")
    for key, types in _FIELDS.items():
        if key not in record:
            raise _bad(key, "missing")
        value = record[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join("None" if t is type(None) else t.__name__ for t in types)
            raise _bad(key, f"must be {names}, got {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise _bad(key, f"longer than {MAX_TEXT} characters ({len(value)})")
    if record["schema"] != 1:
        raise _bad("schema", f"unsupported version {record['schema']} (this runtime writes 1)")
    if record["decision"] not in DECISIONS:
        raise _bad("decision", f"must be one of {', '.join(DECISIONS)}, got {record['decision']!r}")
    if record["frame_id"] < 0:
        raise _bad("frame_id", f"must be >= 0, got {record['frame_id']}")
    if not record["run_id"]:
        raise _bad("run_id", "must not be empty")
    for key in ("score", "threshold"):
        if record[key] is not None and not math.isfinite(record[key]):
            raise _bad(key, f"must be finite or None, got {record[key]}")
    if len(record["stages_ms"]) > MAX_STAGES or len(record["regions"]) > MAX_REGIONS:
        raise _bad("stages_ms/regions", f"at most {MAX_STAGES} stages and {MAX_REGIONS} regions")
    for stage, ms in record["stages_ms"].items():
        if not isinstance(stage, str) or len(stage) > 64 or not isinstance(ms, (int, float)) or not math.isfinite(ms):
            raise _bad("stages_ms", f"entry {stage!r}: {ms!r} is not a finite number of ms")
    for i, region in enumerate(record["regions"]):
        if not isinstance(region, dict) or any(
            not isinstance(region.get(k), (int, float)) or not math.isfinite(region[k]) for k in _REGION_KEYS
        ):
            raise _bad("regions", f"entry {i} must map each of {', '.join(_REGION_KEYS)} to a finite number")
    return record


class Journal:
    """SQLite (WAL) journal of decision records, idempotent by ``(run_id, frame_id)``.

    path: the database file (parent directories are created). max_rows /
    max_age_days: size bounds (None = unbounded). durable: fsync every append
    (``synchronous=FULL``) instead of WAL's ``NORMAL``. One instance per thread.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int | None = None,
        max_age_days: float | None = None,
        durable: bool = False,
        prune_every: int = 1000,
    ):
        self.path = Path(path)
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        if max_age_days is not None and max_age_days <= 0:
            raise ValueError(f"max_age_days must be > 0 or None, got {max_age_days}")
        self.max_rows, self.max_age_days, self.prune_every = max_rows, max_age_days, max(1, prune_every)
        self._since_prune = 0
        if self.path.is_dir():
            raise DataError(self.path, "is a directory; the journal needs a file path (e.g. DIR/journal.sqlite)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(self.path, f"cannot create the journal's directory: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise DataError(self.path, f"cannot open the journal for writing ({exc})") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS decisions(
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    run_id TEXT NOT NULL,
                    frame_id INTEGER NOT NULL,
                    station TEXT NOT NULL,
                    decision TEXT NOT NULL,
                    decision_ns INTEGER NOT NULL,
                    journal_ns INTEGER NOT NULL,
                    record TEXT NOT NULL,
                    UNIQUE(run_id, frame_id));
                CREATE INDEX IF NOT EXISTS decisions_journal_ns ON decisions(journal_ns);
                """
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            (version,) = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise DataError(self.path, f"not a decision journal (SQLite says: {exc})") from None
            problem = f"cannot write the journal ({exc}); check the file and its directory are writable"
            raise DataError(self.path, problem) from None
        if version != str(SCHEMA_VERSION):
            self._db.close()
            raise DataError(self.path, f"journal schema version {version}, this runtime reads {SCHEMA_VERSION}")
        self.prune()

    def append(self, record: dict) -> bool:
        """Validate and store one decision record (one committed transaction).

        Returns True when stored, False when ``(run_id, frame_id)`` was already
        journaled (the stored record is kept). Raises ``DataError`` for an invalid
        record and ``sqlite3.Error`` when the disk refuses the write.
        """
        validate_record(record)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO decisions(run_id, frame_id, station, decision, decision_ns, journal_ns, record)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record["run_id"],
                record["frame_id"],
                record["station"],
                record["decision"],
                record["decision_ns"],
                time.time_ns(),
                json.dumps(record, separators=(",", ":")),
            ),
        )
        self._since_prune += 1
        if self._since_prune >= self.prune_every:
            self.prune()
        return cur.rowcount == 1

    def latest_run_id(self) -> str | None:
        """The run id of the most recently journaled decision, or None when empty."""
        row = self._db.execute("SELECT run_id FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def since(self, frame_id: int, run_id: str | None = None, limit: int = 1000) -> list[dict]:
        """Records of ``run_id`` (None: the latest run) with frame id >= ``frame_id``,
        in frame-id order, at most ``limit`` of them."""
        if run_id is None:
            run_id = self.latest_run_id()
            if run_id is None:
                return []
        rows = self._db.execute(
            "SELECT record FROM decisions WHERE run_id=? AND frame_id>=? ORDER BY frame_id LIMIT ?",
            (run_id, int(frame_id), max(0, int(limit))),
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def last_frame_id(self, run_id: str | None = None) -> int | None:
        """Highest journaled frame id of ``run_id`` (None: the latest run), or None."""
        if run_id is None:
            run_id = self.latest_run_id()
        row = self._db.execute("SELECT MAX(frame_id) FROM decisions WHERE run_id=?", (run_id,)).fetchone()
        return row[0]

    def count(self) -> int:
        """Number of decisions currently journaled (all runs)."""
        return self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]

    def prune(self) -> int:
        """Apply ``max_rows`` / ``max_age_days`` now; returns the number of rows deleted."""
        self._since_prune = 0
        deleted = 0
        if self.max_age_days is not None:
            cutoff = time.time_ns() - int(self.max_age_days * 86400e9)
            deleted += self._db.execute("DELETE FROM decisions WHERE journal_ns < ?", (cutoff,)).rowcount
        if self.max_rows is not None:
            deleted += self._db.execute(
                "DELETE FROM decisions WHERE seq IN (SELECT seq FROM decisions ORDER BY seq DESC LIMIT -1 OFFSET ?)",
                (self.max_rows,),
            ).rowcount
        return deleted

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
