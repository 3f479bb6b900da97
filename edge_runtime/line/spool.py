"""The MQTT bridge's on-disk outbox: every message stays here until the broker acked it.

SQLite (WAL, ``synchronous=FULL``: an accepted message survives power loss), one row
per message, unique by its de-duplication key, so a record offered twice (a gateway
restarted between spooling and saving its position) is stored once. Acked rows are
kept as tombstones (body dropped) for the newest ``MAX_TOMBSTONES`` keys so that a
re-offered, already delivered record is not sent again; older ones are pruned.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edge_runtime.errors import DataError

MAX_TOMBSTONES = 100_000  # acked keys remembered for de-duplication
PRUNE_EVERY = 1000  # acks between prunes


class Spool:
    """Outbox rows ``(seq, key, kind, station, body)`` in arrival order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS outbox(
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    key TEXT NOT NULL UNIQUE,
                    kind TEXT NOT NULL,
                    station TEXT,
                    body TEXT,
                    acked INTEGER NOT NULL DEFAULT 0);
                CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(acked, seq);
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """
            )
        except (OSError, sqlite3.Error) as exc:
            raise DataError(self.path, f"cannot open the MQTT spool ({exc})") from None
        self._acks = 0

    def put(self, key: str, kind: str, station: str | None, body: dict) -> bool:
        """Store one message (committed before it returns); False if the key is known."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO outbox(key, kind, station, body) VALUES (?, ?, ?, ?)",
            (key, kind, station, json.dumps(body, separators=(",", ":"))),
        )
        return cur.rowcount == 1

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, str, str, str | None, dict]]:
        """Unacked rows with seq > ``after_seq``, oldest first."""
        rows = self._db.execute(
            "SELECT seq, key, kind, station, body FROM outbox WHERE acked=0 AND seq>? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [(s, k, kind, st, json.loads(b)) for s, k, kind, st, b in rows]

    def ack(self, seqs: list[int]) -> None:
        if not seqs:
            return
        self._db.executemany("UPDATE outbox SET acked=1, body=NULL WHERE seq=?", [(s,) for s in seqs])
        self._acks += len(seqs)
        if self._acks >= PRUNE_EVERY:
            self._acks = 0
            self._db.execute(
                "DELETE FROM outbox WHERE acked=1 AND seq IN "
                "(SELECT seq FROM outbox WHERE acked=1 ORDER BY seq DESC LIMIT -1 OFFSET ?)",
                (MAX_TOMBSTONES,),
            )

    def n_pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox WHERE acked=0").fetchone()[0]

    def get_meta(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self._db.close()
