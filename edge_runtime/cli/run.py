"""``edge-run``: the station's main job — stream frames through the model, publish decisions.

    edge-run [--model cfm-tiny] [--source synth|DIR|zmq+tcp://HOST:PORT] [--frames N] ...

Right after install, ``edge-run --model cfm-tiny`` works offline: the first time, the demo
bundle is built into the model store (pipeline/store.py: a synthetic dataset, edge-train,
edge-calibrate; a few minutes on a CPU), then the synthetic station streams through the
pipeline (pipeline/runner.py: capture -> preprocess -> inference workers -> alerts).

A live view (one refreshing line on a terminal, a line every 5 s otherwise, on stderr)
shows frames/s, per-stage p50 latency and the decisions so far. Ctrl-C or SIGTERM stops
cleanly (in-flight frames drain; a second Ctrl-C stops at once); the summary ends with
the loss-accounting check captured = OK + NOT_OK + NOT_DECIDABLE + ERROR + DROPPED.

Exit status: 0 run completed (also when stopped by a signal), 1 the run failed (a stage
died, the invariant broke), 2 bad arguments, model, source or endpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from edge_runtime.errors import EdgeError

STATUS_EVERY_S = 5.0  # live-view line period when stderr is not a terminal


class LiveView:
    """Prints statistics snapshots: a refreshing line on a TTY, periodic lines otherwise."""

    def __init__(self, label: str, stream=sys.stderr, quiet: bool = False):
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet = quiet
        self.next_line = 0.0
        self.dirty = False

    def stats(self, snap: dict) -> None:
        from edge_runtime.pipeline.stats import format_live

        if self.quiet:
            return
        line = format_live(snap, self.label)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.dirty = True
        elif time.monotonic() >= self.next_line:
            self.stream.write(line + "\n")
            self.next_line = time.monotonic() + STATUS_EVERY_S
        self.stream.flush()

    def log(self, text: str) -> None:
        self.end_line()
        self.stream.write(f"edge-run: {text}\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.dirty = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cfm-tiny",
                   help="bundle directory or model-store name; cfm-tiny/small/medium/full are built on first use "
                        "(default %(default)s)")
    p.add_argument("--source", default="synth",
                   help="synth (simulated camera), a directory in the MVTec 3D-AD layout (test split replayed in "
                        "order), or zmq+tcp://HOST:PORT (bind a PULL socket a camera driver pushes to; "
                        "docs/wire.md). Default %(default)s")
    p.add_argument("--category", help="synthetic station category, or the one directory category to replay")
    p.add_argument("--fps", type=float, help="pace synth / directory sources at N frames/s; synth with --fps is a "
                                             "live camera (drops the oldest frame when behind). Default: as fast "
                                             "as the pipeline takes frames")
    p.add_argument("--frames", type=int, help="stop after capturing N frames")
    p.add_argument("--workers", type=int, default=1, help="inference worker processes (default 1)")
    p.add_argument("--batch", type=int, default=1, help="frames per inference call (infer_batch; GPU). Default 1")
    p.add_argument("--queue", type=int, default=2, help="capture queue depth in frames (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt | noop (default auto)")
    p.add_argument("--station", default="station1", help="station id: topic prefix of the alerts (default station1)")
    p.add_argument("--alerts", default="tcp://127.0.0.1:5556", help="alert PUB endpoint (default %(default)s)")
    p.add_argument("--replay-endpoint", default="tcp://127.0.0.1:5557",
                   help="replay ROUTER endpoint, or 'none' (default %(default)s)")
    p.add_argument("--journal", help="decision journal SQLite file (default $EDGE_RUNTIME_HOME/journal/STATION.sqlite)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a heat-map overlay PNG per NOT_OK frame into DIR "
                                                     "(bounded: oldest deleted)")
    p.add_argument("--stats-json", metavar="FILE", help="write the final statistics (docs/wire.md, 'Statistics')")
    p.add_argument("--prometheus", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding non-loopback addresses (ingress, alerts, replay); use with --curve-keys")
    p.add_argument("--curve-keys", metavar="DIR", help="CURVE key pair (from --gen-keys) to encrypt external sockets")
    p.add_argument("--gen-keys", metavar="DIR", help="generate a CURVE key pair into DIR and exit")
    p.add_argument("--link", choices=["ipc", "tcp"], default="ipc", help="internal stage links (default ipc)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="at shutdown, wait this long for in-flight frames (default %(default)s s)")
    p.add_argument("--max-frame-mb", type=float, default=128.0, help="largest accepted frame (default 128 MB)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE|-", help="final summary as JSON (stdout with -)")
    p.add_argument("--quiet", action="store_true", help="no live view")
    p.add_argument("--bench", action="store_true",
                   help="run the fixed pipeline benchmark (model with 1 and 2 workers, no-op model) and print a table")
    return p


def make_config(args, bundle: Path, info: dict):
    """The RunConfig for parsed arguments and a resolved bundle (info = store.bundle_info)."""
    from edge_runtime.pipeline.runner import RunConfig
    from edge_runtime.pipeline.store import DEMO_SYNTH, runtime_home

    synth = dict(DEMO_SYNTH)
    synth.update((info.get("demo") or {}).get("synth") or {})
    category = args.category
    if category is None and args.source == "synth":
        category = synth["category"] if info.get("demo") else None
    return RunConfig(
        bundle=str(bundle), backend=args.backend, device=args.device, source=args.source, category=category,
        fps=args.fps, frames=args.frames, workers=args.workers, batch=args.batch, queue=args.queue,
        station=args.station, alerts=args.alerts,
        replay=None if args.replay_endpoint == "none" else args.replay_endpoint,
        journal=args.journal or str(runtime_home() / "journal" / f"{args.station}.sqlite"),
        heatmaps=args.heatmaps, allow_remote=args.allow_remote, curve_keys=args.curve_keys, link=args.link,
        max_frame_bytes=int(args.max_frame_mb * 1e6), synth_size=synth["size"], synth_seed=synth["seed"],
        drain_timeout_s=args.drain_timeout, model=info["model"], bundle_hash=info["bundle_hash"])


def _check(args) -> None:
    """Argument checks that need no model (raise ValueError with the flag's name)."""
    from edge_runtime.pipeline.alerts import check_station

    for flag, value in (("--workers", args.workers), ("--batch", args.batch), ("--queue", args.queue)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps must be > 0, got {args.fps}")
    if args.max_frame_mb <= 0:
        raise ValueError(f"--max-frame-mb must be > 0, got {args.max_frame_mb}")
    check_station(args.station)


def summary_text(summary: dict, label: str) -> str:
    """The human-readable end-of-run summary."""
    from edge_runtime.pipeline.stats import format_summary

    lines = [
        f"edge-run summary: {label}",
        f"run {summary['run_id']} station {summary['station']}: {summary.get('source')}",
        f"model {summary['model']} ({summary.get('detector')}, bundle {summary['bundle_hash'][:12]}), "
        f"{summary['workers']} worker(s), stopped by {summary['stopped_by']}, "
        f"{summary['run_s']:.1f} s streaming ({summary['wall_s']:.1f} s with start-up)",
    ]
    if summary.get("frames"):
        lines.append(format_summary(summary))
    if summary.get("worker_restarts"):
        lines.append(f"inference workers restarted: {summary['worker_restarts']}")
    if summary.get("alerts"):
        a = summary["alerts"]
        lines.append(f"alerts: {a.get('published', 0)} published, {a.get('send_drops', 0)} send drops "
                     f"(replayable from the journal), {a.get('journal_errors', 0)} journal errors")
    if summary.get("error"):
        lines.append(f"ERROR: {summary['error']}")
    return "\n".join(lines)


def _write_json(target: str, obj: dict) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if target == "-":
        print(text)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text + "\n")


def run_once(args, log) -> int:
    from edge_runtime.pipeline.runner import run_pipeline
    from edge_runtime.pipeline.stats import PrometheusExporter
    from edge_runtime.pipeline.store import bundle_info, resolve_model

    bundle = resolve_model(args.model, log=log)
    info = bundle_info(bundle)
    cfg = make_config(args, bundle, info)
    label = info["model"] + ("" if info["calibrated"] else " UNCALIBRATED")
    if info.get("demo"):
        label += f" ({info['demo']['label']})"
    view = LiveView(label, quiet=args.quiet)
    exporter = PrometheusExporter(args.prometheus, args.station) if args.prometheus else None

    def on_stats(snap: dict) -> None:
        view.stats(snap)
        if exporter is not None:
            exporter.update(snap)

    for warning in info["warnings"]:
        view.log(f"model warning: {warning.splitlines()[0]}")
    if not info["calibrated"]:
        view.log("bundle not calibrated: every frame is NOT_DECIDABLE (run edge-calibrate)")
    try:
        summary = run_pipeline(cfg, on_stats=on_stats, on_log=view.log)
    finally:
        view.end_line()
        if exporter is not None:
            exporter.close()
    if args.stats_json:
        _write_json(args.stats_json, summary)
    if args.json:
        _write_json(args.json, summary)
    print(summary_text(summary, label), file=sys.stderr if args.json == "-" else sys.stdout)
    return 1 if summary.get("error") or summary.get("invariant", {}).get("holds") is False else 0


def bench(args, rows: list[dict], log) -> list[tuple[dict, dict]]:
    """Run one pipeline per row (keys: name, backend, workers, optional synth_size) on the
    synthetic station on demand, ``args.frames`` frames each (default 60; the first 5 are
    warm-up: decided but not timed). Returns (row, summary) pairs; raises RuntimeError
    when a run fails."""
    from edge_runtime.pipeline.runner import run_pipeline
    from edge_runtime.pipeline.store import bundle_info, resolve_model

    bundle = resolve_model(args.model, log=log)
    info = bundle_info(bundle)
    frames = args.frames or 60
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        for i, row in enumerate(rows):
            run_args = argparse.Namespace(**{**vars(args), "backend": row["backend"], "workers": row["workers"],
                                             "frames": frames, "source": "synth", "fps": None,
                                             "journal": str(Path(tmp) / f"run{i}.sqlite")})
            cfg = make_config(run_args, bundle, info)
            cfg.warmup = min(5, frames // 4)
            cfg.synth_size = row.get("synth_size") or cfg.synth_size
            log(f"bench: {row['name']}, {row['workers']} worker(s), {cfg.synth_size} px frames, {frames} frames "
                f"({cfg.warmup} warm-up)")
            summary = run_pipeline(cfg, on_log=log)
            if summary.get("error"):
                raise RuntimeError(f"bench run {row['name']} failed: {summary['error']}")
            results.append((row, summary))
    return results


def bench_table(results: list[tuple[dict, dict]]) -> str:
    """Markdown table of bench results: throughput, e2e and per-stage p50 ms."""
    lines = ["| run | workers | frame px | frames/s | e2e p50 ms | e2e p99 ms | capture p50 | preprocess p50 | "
             "wait before infer p50 | infer p50 | alert p50 |", "|" + "---|" * 11]
    for row, s in results:
        lat = s["latency_ms"]
        cells = [lat["e2e"]["p50"], lat["e2e"]["p99"], lat["stage"]["capture"]["p50"],
                 lat["stage"]["preprocess"]["p50"], lat["queue_wait"]["infer"]["p50"], lat["stage"]["infer"]["p50"],
                 lat["stage"]["alert"]["p50"]]
        lines.append(f"| {row['name']} ({s['detector']}) | {row['workers']} | {s['config']['synth_size']} | "
                     f"{s['throughput_fps']:.2f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def run_bench(args, log) -> int:
    """``--bench``: the model with 1 and 2 inference workers, then the no-op model
    (the pipeline's own cost: everything but inference); prints a markdown table."""
    rows = [{"name": args.model, "backend": args.backend, "workers": 1},
            {"name": args.model, "backend": args.backend, "workers": 2},
            {"name": "no-op model", "backend": "noop", "workers": 1}]
    try:
        results = bench(args, rows, log)
    except RuntimeError as exc:
        log(str(exc))
        return 1
    print(bench_table(results), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, {"rows": [{**row, **s} for row, s in results]})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(text: str) -> None:
        print(f"edge-run: {text}", file=sys.stderr, flush=True)

    if args.gen_keys:
        from edge_runtime.pipeline.security import generate_keys

        try:
            public, secret = generate_keys(args.gen_keys)
        except EdgeError as exc:
            log(str(exc))
            return 2
        print(f"public key (give to gateways): {public}\nsecret key (keep on this station): {secret}")
        return 0
    try:
        _check(args)
        return run_bench(args, log) if args.bench else run_once(args, log)
    except (EdgeError, ValueError, OSError) as exc:
        log(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
