"""Per-run frame-id bookkeeping of the gateway, bounded whatever the station says.

``RunTrack`` knows which ids of one run were delivered (``done``, an ``IdRanges``)
and which are missing (``gaps``: a few ``Gap`` ranges, each with its own timers).
Memory is O(number of ranges), never O(number of ids): a heartbeat announcing
``last_frame_id`` 3,000,000 adds one gap, and ``max_gap`` caps how many missing ids
are tracked at all (older ones beyond it are given up at once and reported).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.line.ranges import IdRanges


@dataclass
class Gap:
    """Missing ids ``lo..hi`` (inclusive): noticed at ``first`` (monotonic s), next
    requested at ``due``, after ``tries`` completed replay requests that lacked them."""

    lo: int
    hi: int
    first: float
    due: float
    tries: int = 0

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1


class RunTrack:
    """Which ids of one run were delivered and which are missing.

    start: the first id this gateway answers for. Ids below it are ignored when the
    start was asked for (``late_ok=False``: ``--from-frame``, a new run followed from
    0); otherwise (the start is merely the first id seen) a late one is delivered once.
    known: the highest id known to exist. max_gap: most missing ids tracked at once.
    """

    def __init__(self, start: int, late_ok: bool, max_gap: int, station: str | None = None):
        self.start, self.late_ok, self.max_gap, self.station = start, late_ok, max_gap, station
        self.known = start - 1
        self.done = IdRanges()
        self.gaps: list[Gap] = []
        self.probe = False  # restored from state: ask the replay server for the run's tail

    # -- queries ------------------------------------------------------------------

    def is_done(self, fid: int) -> bool:
        if fid < self.start and not self.late_ok:
            return True
        return fid in self.done

    def n_missing(self) -> int:
        return sum(g.size for g in self.gaps)

    # -- updates ------------------------------------------------------------------

    def announce(self, upto: int, now: float, grace: float) -> list[tuple[int, int]]:
        """Ids up to ``upto`` exist: those not yet done become missing. Returns the
        ranges given up because more than ``max_gap`` ids would be missing."""
        lo = max(self.known + 1, self.start)
        if upto >= lo:
            for a, b in self.done.holes(lo, upto):
                self.gaps.append(Gap(a, b, now, now + grace))
            self.known = upto
        return self._cap()

    def _cap(self) -> list[tuple[int, int]]:
        excess = self.n_missing() - self.max_gap
        dropped = []
        while excess > 0:
            g = self.gaps[0]
            take = min(excess, g.size)
            dropped.append((g.lo, g.lo + take - 1))
            self.done.add_range(g.lo, g.lo + take - 1)
            if take == g.size:
                self.gaps.pop(0)
            else:
                g.lo += take
            excess -= take
        return dropped

    def mark_done(self, fid: int, now: float, grace: float) -> list[tuple[int, int]]:
        """``fid`` was delivered (or given up). Returns ranges dropped by the cap."""
        if fid < self.start:
            self.done.add(fid)
            return []
        dropped = self.announce(fid - 1, now, grace)
        self.known = max(self.known, fid)
        self._remove(fid, fid)
        self.done.add(fid)
        return dropped

    def give_up(self, lo: int, hi: int) -> None:
        """Ids ``lo..hi`` will not come: stop tracking them (they count as answered)."""
        self._remove(lo, hi)
        self.done.add_range(lo, hi)

    def _remove(self, lo: int, hi: int) -> None:
        out = []
        for g in self.gaps:
            if g.hi < lo or g.lo > hi:
                out.append(g)
                continue
            if g.lo < lo:
                out.append(Gap(g.lo, lo - 1, g.first, g.due, g.tries))
            if g.hi > hi:
                out.append(Gap(hi + 1, g.hi, g.first, g.due, g.tries))
        self.gaps = out

    def split_at(self, x: int) -> None:
        """Make ``x`` the first id of a gap if a gap spans it (timers are kept)."""
        for i, g in enumerate(self.gaps):
            if g.lo < x <= g.hi:
                self.gaps[i : i + 1] = [Gap(g.lo, x - 1, g.first, g.due, g.tries), Gap(x, g.hi, g.first, g.due, g.tries)]
                return

    # -- persistence ------------------------------------------------------------------

    def to_state(self) -> dict:
        return {"station": self.station, "start": self.start, "late_ok": self.late_ok,
                "known": self.known, "done": self.done.ranges()}  # fmt: skip

    @classmethod
    def from_state(cls, entry: dict, max_gap: int, now: float, grace: float) -> RunTrack:
        track = cls(int(entry["start"]), bool(entry["late_ok"]), max_gap, entry.get("station"))
        for lo, hi in entry["done"]:
            track.done.add_range(int(lo), int(hi))
        known = int(entry["known"])
        track.announce(known, now, grace)  # holes below what was known become missing
        track.probe = True
        return track
