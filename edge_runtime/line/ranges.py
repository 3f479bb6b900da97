"""Sets of frame ids stored as sorted, disjoint, inclusive ``[lo, hi]`` ranges.

The gateway's bookkeeping (which ids were delivered, which are missing) must stay
small whatever the station announces: a heartbeat saying ``last_frame_id`` 3,000,000
is one range here, not three million entries. Operations cost O(number of ranges).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class IdRanges:
    """A set of non-negative ints kept as merged inclusive ranges ``[(lo, hi), ...]``."""

    __slots__ = ("_lo", "_hi")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._lo: list[int] = []
        self._hi: list[int] = []
        for lo, hi in ranges:
            self.add_range(lo, hi)

    # -- queries ------------------------------------------------------------------

    def __contains__(self, fid: int) -> bool:
        i = bisect.bisect_right(self._lo, fid) - 1
        return i >= 0 and fid <= self._hi[i]

    def __len__(self) -> int:  # number of ids (not ranges)
        return sum(h - l + 1 for l, h in zip(self._lo, self._hi))

    def __bool__(self) -> bool:
        return bool(self._lo)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(zip(self._lo, self._hi)))

    def __eq__(self, other) -> bool:
        return isinstance(other, IdRanges) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"IdRanges({self.ranges()})"

    @property
    def n_ranges(self) -> int:
        return len(self._lo)

    def ranges(self) -> list[list[int]]:
        """``[[lo, hi], ...]``, JSON-ready."""
        return [[l, h] for l, h in zip(self._lo, self._hi)]

    def first(self) -> int | None:
        return self._lo[0] if self._lo else None

    def last(self) -> int | None:
        return self._hi[-1] if self._hi else None

    def holes(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Ranges inside ``[lo, hi]`` that are NOT in the set."""
        out, cur = [], lo
        i = max(0, bisect.bisect_right(self._lo, lo) - 1)
        while cur <= hi and i < len(self._lo):
            a, b = self._lo[i], self._hi[i]
            if b >= cur:
                if a > cur:
                    out.append((cur, min(hi, a - 1)))
                cur = max(cur, b + 1)
            if a > hi:
                break
            i += 1
        if cur <= hi:
            out.append((cur, hi))
        return out

    # -- updates ------------------------------------------------------------------

    def add(self, fid: int) -> None:
        self.add_range(fid, fid)

    def add_range(self, lo: int, hi: int) -> None:
        """Add every id in ``[lo, hi]`` (inclusive), merging touching ranges."""
        if hi < lo:
            return
        i = bisect.bisect_left(self._hi, lo - 1)  # first range that could touch
        j = bisect.bisect_right(self._lo, hi + 1)  # first range entirely after
        if i < j:
            lo, hi = min(lo, self._lo[i]), max(hi, self._hi[j - 1])
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def remove_range(self, lo: int, hi: int) -> None:
        """Remove every id in ``[lo, hi]``."""
        if hi < lo:
            return
        i = bisect.bisect_left(self._hi, lo)
        j = bisect.bisect_right(self._lo, hi)
        if i >= j:
            return
        keep_lo, keep_hi = [], []
        if self._lo[i] < lo:
            keep_lo.append(self._lo[i])
            keep_hi.append(lo - 1)
        if self._hi[j - 1] > hi:
            keep_lo.append(hi + 1)
            keep_hi.append(self._hi[j - 1])
        self._lo[i:j] = keep_lo
        self._hi[i:j] = keep_hi

    def discard(self, fid: int) -> None:
        self.remove_range(fid, fid)

    def pop_below(self, bound: int) -> list[tuple[int, int]]:
        """Remove and return the ranges (clipped) of ids < ``bound``."""
        out = [(l, min(h, bound - 1)) for l, h in zip(self._lo, self._hi) if l < bound]
        self.remove_range(0, bound - 1) if out else None
        return out
