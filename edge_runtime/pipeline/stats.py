"""Run statistics: per-stage latency, queue wait, end-to-end latency, throughput, loss.

Pure bookkeeping (no sockets): the alert stage feeds every decision record here together
with the frame's per-stage stamps, and sends ``snapshot()`` to the runner, which shows
the live view, writes ``--stats-json`` and serves Prometheus metrics from it.

Definitions (all in milliseconds, from ``time.time_ns()`` stamps carried by the frame):

* stage latency of stage k = exit_k - entry_k (time the stage spent on the frame);
* queue wait of stage k = entry_k - exit_(k-1) (time between the previous stage letting
  go and this one starting: socket transit plus time parked in a queue waiting for a
  free worker);
* end-to-end (e2e) = decision_ns - capture_ns;
* throughput = inspected frames (everything but DROPPED) / (last decision - first
  capture), in frames per second; ``live_fps`` is the number of inspected frames decided
  in the last 2 s divided by 2 s.

Percentiles are over the most recent ``window`` frames (100,000 by default), counts over
the whole run. DROPPED frames, and the first ``warmup`` frame ids (model warm-up in a
benchmark), count in the decisions but not in the latency and throughput figures.
The loss-accounting invariant is captured = OK + NOT_OK + NOT_DECIDABLE + ERROR + DROPPED.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import numpy as np

from edge_runtime.errors import EdgeError
from edge_runtime.pipeline.wire import DECISIONS

STAGES = ("capture", "preprocess", "infer", "alert")
MAX_REASONS = 50  # distinct reason strings kept; the rest are counted under "(other)"
MAX_CATEGORIES = 64  # distinct categories counted; the rest under "(other)"
REASON_CHARS = 160  # a reason's length in the printed summary


class Window:
    """The most recent ``capacity`` values of one latency series (ms), in a ring buffer."""

    def __init__(self, capacity: int):
        self._buf = np.zeros(capacity, np.float64)
        self.count = 0  # values ever added

    def add(self, value_ms: float) -> None:
        self._buf[self.count % self._buf.size] = value_ms
        self.count += 1

    def values(self) -> np.ndarray:
        return self._buf[: min(self.count, self._buf.size)]

    def summary(self) -> dict[str, float]:
        """{"n", "p50", "p95", "p99", "mean", "max"} in ms (n = values ever added)."""
        v = self.values()
        if not v.size:
            return {"n": 0}
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return {"n": self.count, "p50": round(float(p50), 3), "p95": round(float(p95), 3),
                "p99": round(float(p99), 3), "mean": round(float(v.mean()), 3), "max": round(float(v.max()), 3)}


def _ms(a_ns: int, b_ns: int) -> float:
    return (b_ns - a_ns) / 1e6


def stage_ms(stamps: dict[str, list[int]]) -> dict[str, float]:
    """Per-stage latency in ms from a frame's {stage: [entry_ns, exit_ns]} stamps."""
    return {s: round(_ms(*stamps[s]), 3) for s in STAGES if s in stamps}


def queue_wait_ms(stamps: dict[str, list[int]]) -> dict[str, float]:
    """Queue wait in ms before each stage: its entry minus the previous stamped stage's exit."""
    out, prev = {}, None
    for s in STAGES:
        if s in stamps:
            if prev is not None:
                out[s] = round(_ms(stamps[prev][1], stamps[s][0]), 3)
            prev = s
    return out


def invariant(captured: int | None, counts: dict[str, int]) -> dict[str, Any]:
    """The loss-accounting check: {"holds": bool | None, "equation": str}.

    ``holds`` is None while the number captured is not known yet.
    """
    total = sum(counts.get(d, 0) for d in DECISIONS)
    terms = " + ".join(f"{d} {counts.get(d, 0)}" for d in DECISIONS)
    if captured is None:
        return {"holds": None, "equation": f"captured ? vs {terms} = {total}"}
    sign = "=" if captured == total else "!="
    return {"holds": captured == total, "equation": f"captured {captured} {sign} {terms}"}


class FrameLedger:
    """Which frame ids already have a decision record (ids are gap-free from 0).

    All ids below ``low`` have one; ``above`` holds the others seen, so memory stays
    small however long the run."""

    def __init__(self):
        self.low = 0
        self.above: set[int] = set()
        self._max = -1

    def add(self, frame_id: int) -> bool:
        """Mark ``frame_id`` decided; False if it already was (a duplicate)."""
        if frame_id < self.low or frame_id in self.above:
            return False
        self.above.add(frame_id)
        self._max = max(self._max, frame_id)
        while self.low in self.above:
            self.above.remove(self.low)
            self.low += 1
        return True

    @property
    def count(self) -> int:
        return self.low + len(self.above)

    def count_upper(self) -> int:
        """Highest id seen + 1 (0 when none): a lower bound of the frames captured."""
        return self._max + 1

    def missing(self, captured: int) -> list[int]:
        """Ids below ``captured`` without a record, ascending."""
        return [i for i in range(self.low, captured) if i not in self.above]

    def gaps(self) -> list[int]:
        """Ids without a record below the highest id recorded (still in flight, or lost)."""
        return self.missing(self._max)


class RunStats:
    """Accumulates decision records; ``snapshot()`` gives the figures described above."""

    def __init__(self, window: int = 100_000, rate_window_s: float = 2.0, warmup: int = 0):
        self.warmup = warmup  # frames with a smaller id are counted but not timed
        self.counts = Counter({d: 0 for d in DECISIONS})
        self.reasons: Counter = Counter()
        self.duplicates = 0
        self.by_category: dict[str, Counter] = {}
        self.by_truth: dict[str, Counter] = {}  # "good" / "defective" -> decisions (known parts)
        self.captured: int | None = None
        self.stage = {s: Window(window) for s in STAGES}
        self.wait = {s: Window(window) for s in STAGES[1:]}
        self.e2e = Window(window)
        self.infer_steps: dict[str, Window] = {}
        self._window = window
        self._rate_window_ns = int(rate_window_s * 1e9)
        self._recent: deque[int] = deque()  # decision_ns of recent inspected frames
        self.first_capture_ns: int | None = None  # over timed frames (not DROPPED, not warm-up)
        self.last_decision_ns: int | None = None
        self.inspected = 0  # timed frames

    def add(self, record: dict[str, Any], stamps: dict[str, list[int]], infer_ms: dict[str, float] | None,
            category: str | None = None) -> None:
        """Count one decision record; ``stamps`` are the frame's per-stage [entry, exit] ns;
        ``category``: the part's category when the source knows it."""
        decision = record["decision"]
        self.counts[decision] += 1
        if category is not None:
            if category not in self.by_category and len(self.by_category) >= MAX_CATEGORIES:
                category = "(other)"
            self.by_category.setdefault(category, Counter())[decision] += 1
        truth = part_truth(record.get("source"))
        if truth is not None:
            self.by_truth.setdefault(truth, Counter())[decision] += 1
        if record.get("reason"):
            known = record["reason"] in self.reasons or len(self.reasons) < MAX_REASONS
            self.reasons[record["reason"] if known else "(other)"] += 1
        if decision == "DROPPED" or record["frame_id"] < self.warmup:
            return
        cap, dec = record["capture_ns"], record["decision_ns"]
        self.first_capture_ns = cap if self.first_capture_ns is None else min(self.first_capture_ns, cap)
        self.last_decision_ns = dec if self.last_decision_ns is None else max(self.last_decision_ns, dec)
        self.inspected += 1
        self._recent.append(dec)
        self.e2e.add(_ms(cap, dec))
        for s, v in stage_ms(stamps).items():
            self.stage[s].add(v)
        for s, v in queue_wait_ms(stamps).items():
            self.wait[s].add(v)
        for k, v in (infer_ms or {}).items():
            self.infer_steps.setdefault(k, Window(self._window)).add(v)

    def snapshot(self, now_ns: int) -> dict[str, Any]:
        """Counts, invariant, throughput and latency percentiles (see module docstring)."""
        while self._recent and self._recent[0] < now_ns - self._rate_window_ns:
            self._recent.popleft()
        span_s = (
            (self.last_decision_ns - self.first_capture_ns) / 1e9
            if self.first_capture_ns is not None and self.last_decision_ns is not None
            else 0.0
        )
        frames = {"captured": self.captured, "decided": sum(self.counts.values()), **self.counts,
                  "duplicates": self.duplicates}
        return {
            "frames": frames,
            "invariant": invariant(self.captured, self.counts),
            "throughput_fps": round(self.inspected / span_s, 3) if span_s > 0 else 0.0,
            "live_fps": round(len(self._recent) / (self._rate_window_ns / 1e9), 3),
            "latency_ms": {
                "e2e": self.e2e.summary(),
                "stage": {s: w.summary() for s, w in self.stage.items()},
                "queue_wait": {s: w.summary() for s, w in self.wait.items()},
                "infer_steps": {k: w.summary() for k, w in self.infer_steps.items()},
            },
            "reasons": dict(self.reasons.most_common()),
            "categories": {c: {d: n[d] for d in DECISIONS} for c, n in sorted(self.by_category.items())},
            "truth": {t: {d: n[d] for d in DECISIONS} for t, n in sorted(self.by_truth.items())},
        }


def part_truth(source: str | None) -> str | None:
    """"good" / "defective" for a part whose source names its test folder (the synthetic
    station's ``synth:<category>/<split>/<defect>/<stem>``, a replayed test sample's
    ``<category>/test/<defect>/<stem>``); None for anything else (a camera)."""
    if not source:
        return None
    parts = source.removeprefix("synth:").split("/")
    if len(parts) != 4 or parts[1] not in ("test", "stream"):
        return None
    return "good" if parts[2] == "good" else "defective"


# ---------------------------------------------------------------------------------------
# human-readable views

_SHORT = {"OK": "OK", "NOT_OK": "NOT_OK", "NOT_DECIDABLE": "ND", "ERROR": "ERR", "DROPPED": "DROP"}
_STAGE_SHORT = {"capture": "cap", "preprocess": "pre", "infer": "inf", "alert": "out"}


def _p50(summary: dict) -> str:
    return f"{summary['p50']:.1f}" if summary.get("n") else "-"


def format_live(snap: dict[str, Any], label: str) -> str:
    """One status line: label, fps, per-stage p50 ms, e2e p50, decisions so far."""
    lat = snap["latency_ms"]
    stages = " ".join(f"{_STAGE_SHORT[s]} {_p50(lat['stage'][s])}" for s in STAGES)
    counts = " ".join(f"{_SHORT[d]} {snap['frames'][d]}" for d in DECISIONS)
    return (f"{label} | {snap['frames']['decided']} frames {snap['live_fps']:.1f} fps | p50 ms {stages} "
            f"e2e {_p50(lat['e2e'])} | {counts}")


def format_summary(snap: dict[str, Any]) -> str:
    """Multi-line end-of-run summary: counts, invariant, throughput and a latency table."""
    lat = snap["latency_ms"]
    lines = [
        "decisions: " + ", ".join(f"{d} {snap['frames'][d]}" for d in DECISIONS)
        + (f" (duplicates suppressed: {snap['frames']['duplicates']})" if snap["frames"]["duplicates"] else ""),
        f"loss accounting: {snap['invariant']['equation']}"
        + {True: "  [holds]", False: "  [VIOLATED]", None: ""}[snap["invariant"]["holds"]],
        f"throughput: {snap['throughput_fps']:.2f} frames/s",
        f"{'latency ms':<22}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}",
    ]
    rows = [("end-to-end", lat["e2e"])]
    rows += [(f"stage {s}", lat["stage"][s]) for s in STAGES]
    rows += [(f"queue before {s}", lat["queue_wait"][s]) for s in STAGES[1:]]
    rows += [(f"  infer step {k}", v) for k, v in lat["infer_steps"].items()]
    for name, s in rows:
        if s.get("n"):
            lines.append(f"{name:<22}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['p99']:>9.2f}{s['max']:>9.2f}")
    categories = snap.get("categories") or {}
    if categories:
        lines.append("per category:")
        for cat, counts in categories.items():
            lines.append(f"  {cat}: " + ", ".join(f"{d} {counts[d]}" for d in DECISIONS if counts.get(d)))
    truth = snap.get("truth") or {}
    if truth:
        lines.append("against the known truth (synthetic station / replayed test parts):")
        for t in ("good", "defective"):
            if t in truth:
                lines.append(f"  {t}: " + ", ".join(f"{d} {truth[t][d]}" for d in DECISIONS if truth[t].get(d)))
        good, bad = truth.get("good", {}), truth.get("defective", {})
        tp, fn = bad.get("NOT_OK", 0), bad.get("OK", 0)
        fp, tn = good.get("NOT_OK", 0), good.get("OK", 0)
        if tp + fn and fp + tn:
            lines.append(f"  defects found {tp}/{tp + fn} ({100 * tp / (tp + fn):.0f} %), good parts rejected "
                         f"{fp}/{fp + tn} ({100 * fp / (fp + tn):.0f} %)")
    if snap["reasons"]:
        lines.append("reasons (frames, reason):")
        reasons = list(snap["reasons"].items())
        for reason, n in reasons[:10]:
            text = reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."
            lines.append(f"  {n:>7}  {text}")
        if len(reasons) > 10:
            lines.append(f"  ... and {len(reasons) - 10} more reasons (--json has them all)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Prometheus


class PrometheusExporter:
    """Serves the latest snapshot as Prometheus metrics on 127.0.0.1:``port`` (prometheus_client).

    Metrics: edge_frames_total{decision} (counter), edge_frames_captured_total,
    edge_latency_ms{series,stage,quantile} (gauge; series = stage | queue_wait | e2e),
    edge_throughput_fps, edge_worker_restarts_total. Labels: station.
    """

    def __init__(self, port: int, station: str):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise EdgeError("--prometheus needs the prometheus_client package "
                            "(pip install 'edge-runtime[metrics]')") from None

        self.station = station
        self.snap: dict[str, Any] | None = None
        self.restarts = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def update(self, snap: dict[str, Any]) -> None:
        """Serve ``snap`` from now on (its "worker_restarts" feeds the restart counter)."""
        self.snap, self.restarts = snap, snap.get("worker_restarts", 0)

    def close(self) -> None:
        self.server.shutdown()

    def collect(self):
        """prometheus_client collector protocol: yield metric families from the snapshot."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.station
        restarts = CounterMetricFamily("edge_worker_restarts", "Inference workers restarted", labels=["station"])
        restarts.add_metric([st], self.restarts)
        yield restarts
        if self.snap is None:
            return
        frames = CounterMetricFamily("edge_frames", "Decision records by decision", labels=["station", "decision"])
        for d in DECISIONS:
            frames.add_metric([st, d], self.snap["frames"][d])
        yield frames
        captured = CounterMetricFamily("edge_frames_captured", "Frames captured", labels=["station"])
        captured.add_metric([st], self.snap["frames"]["captured"] or 0)
        yield captured
        fps = GaugeMetricFamily("edge_throughput_fps", "Inspected frames per second (last 2 s)", labels=["station"])
        fps.add_metric([st], self.snap["live_fps"])
        yield fps
        lat = GaugeMetricFamily("edge_latency_ms", "Latency percentiles in ms",
                                labels=["station", "series", "stage", "quantile"])
        series = [("e2e", "all", self.snap["latency_ms"]["e2e"])]
        series += [("stage", s, v) for s, v in self.snap["latency_ms"]["stage"].items()]
        series += [("queue_wait", s, v) for s, v in self.snap["latency_ms"]["queue_wait"].items()]
        for name, stage, summ in series:
            for q in ("p50", "p95", "p99"):
                if summ.get("n"):
                    lat.add_metric([st, name, stage, "0." + q[1:]], summ[q])
        yield lat
