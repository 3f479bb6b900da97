"""``edge-run``: the station's main job — stream frames through the model, publish decisions.

    edge-run [--model NAME|DIR] [--source synth|DIR|zmq+tcp://HOST:PORT] [--frames N] ...

Right after install, ``edge-run`` works offline: the first time, the default demo bundle
(the one a method flags as default, e.g. cfm-tiny) is built into the model store
(pipeline/store.py: a synthetic dataset, edge-train, edge-calibrate; a few minutes on a
CPU), then the synthetic station streams through the pipeline (capture -> preprocess ->
inference workers -> alerts; pipeline/supervisor.py).

A live view (one refreshing line on a terminal, a line every 5 s otherwise, on stderr)
shows frames/s, per-stage p50 latency and the decisions so far. Ctrl-C or SIGTERM stops
cleanly (in-flight frames drain; a second Ctrl-C stops at once); the summary ends with
the loss-accounting check captured = OK + NOT_OK + NOT_DECIDABLE + ERROR + DROPPED,
decisions per category and one line per reason.

Exit status: 0 the run completed (also when stopped by SIGTERM); 3 it completed but at
least one frame ended as ERROR; 130 stopped by Ctrl-C (after the summary); 1 the run
failed (a stage died or stalled, too many worker deaths, the invariant broke); 2 usage
error or bad input (arguments, model, source, endpoint refused by the bind policy, keys).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from edge_runtime.errors import DataError, EdgeError
from edge_runtime.outputs import (EXIT_FRAME_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE,
                                  add_json_flag, write_json)

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
    from edge_runtime.pipeline.config import DEADLINE_CYCLES, DEADLINE_FLOOR_S, DEFAULT_DEADLINE_S
    from edge_runtime.data.io import DEFAULT_LIMITS

    p = argparse.ArgumentParser(prog="edge-run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model and source")
    src.add_argument("--model", metavar="NAME|DIR",
                     help="bundle directory or model-store name; demo names (edge_runtime.methods) are built on "
                          "first use. Default: the default demo")
    src.add_argument("--source", default="synth", metavar="synth|DIR|zmq+tcp://HOST:PORT",
                     help="synth (simulated camera), a directory in the MVTec 3D-AD layout (its test split is "
                          "replayed in order), or zmq+tcp://HOST:PORT (bind a PULL socket a camera driver pushes "
                          "to; docs/wire.md). Default %(default)s")
    src.add_argument("--category", help="synthetic station category, or the directory category to replay "
                                        "(default: the bundle's training category)")
    src.add_argument("--all-categories", action="store_true",
                     help="replay every category of the --source directory, not only the bundle's own")
    src.add_argument("--fps", type=float, help="pace synth / directory sources at N frames/s; synth with --fps is "
                                               "a live camera (drops the oldest frame when behind). Default: as "
                                               "fast as the pipeline takes frames")
    src.add_argument("--frames", type=int, metavar="N", help="stop after capturing N frames")
    src.add_argument("--synth-pool", type=int, default=16, metavar="N",
                     help="the simulated camera renders N frames once and cycles them (0: render every frame "
                          "while streaming, slow). Default %(default)s")
    src.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    src.add_argument("--backend", default="auto",
                     help="auto (the fastest usable one, it says why) | torch | onnxruntime | tensorrt | noop "
                          "(no model: pipeline overhead). Default %(default)s")
    run = p.add_argument_group("pipeline")
    run.add_argument("--workers", type=int, default=1, help="inference worker processes (default %(default)s)")
    run.add_argument("--batch", type=int, default=1, help="frames per inference call (infer_batch; GPU). "
                                                         "Default %(default)s")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads per inference worker (default 0: (cores - 1) // workers, at least 1; "
                          "one core is left to the capture, preprocess and alert stages)")
    run.add_argument("--queue", type=int, default=2, help="capture queue depth in frames (default %(default)s)")
    run.add_argument("--link", choices=["ipc", "tcp"], default="ipc", help="internal stage links (default ipc)")
    run.add_argument("--cycle-time", type=float, metavar="S",
                     help="the station's cycle time in seconds (default: 1 / --fps when given)")
    run.add_argument("--frame-deadline", type=float, metavar="S",
                     help="a worker holding a frame longer than this is killed and restarted, the frame is "
                          f"ERROR 'deadline' (default: {DEADLINE_CYCLES} cycle times, at least "
                          f"{DEADLINE_FLOOR_S:g} s; {DEFAULT_DEADLINE_S:g} s without a cycle time)")
    run.add_argument("--stall-timeout", type=float, default=60.0, metavar="S",
                     help="a stage showing no progress this long is hung (default %(default)s s)")
    run.add_argument("--max-restarts", type=int, default=10, metavar="N",
                     help="give up when inference workers die more than N times within --restart-window "
                          "(default %(default)s)")
    run.add_argument("--restart-window", type=float, default=60.0, metavar="S",
                     help="the window of --max-restarts in seconds (default %(default)s)")
    run.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                     help="bound on model loading and start-up of every stage (default %(default)s s)")
    run.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="at shutdown, wait this long for in-flight frames (default %(default)s s)")
    run.add_argument("--max-frame-mb", type=float, default=128.0, metavar="MIB",
                     help="largest accepted frame in MiB of arrays; a single message part over twice this "
                          "is refused by the socket (default %(default)s)")
    run.add_argument("--max-image-side", type=int, default=DEFAULT_LIMITS.max_side, metavar="PX",
                     help="longest accepted image side in pixels (default %(default)s)")
    run.add_argument("--max-image-mpx", type=float, default=DEFAULT_LIMITS.max_pixels / 1e6, metavar="MPX",
                     help="largest accepted image in megapixels (default %(default)s)")
    run.add_argument("--max-aspect", type=float, default=DEFAULT_LIMITS.max_aspect, metavar="R",
                     help="largest accepted aspect ratio, long side / short side (default %(default)s)")
    out = p.add_argument_group("alerts and outputs")
    out.add_argument("--station", default="station1", help="station id: topic prefix of the alerts "
                                                           "(default %(default)s)")
    out.add_argument("--alerts", default="tcp://127.0.0.1:5556", metavar="ENDPOINT",
                     help="alert PUB endpoint (default %(default)s)")
    out.add_argument("--replay-endpoint", default="tcp://127.0.0.1:5557", metavar="ENDPOINT",
                     help="replay ROUTER endpoint, or 'none' (default %(default)s)")
    out.add_argument("--heartbeat", type=float, default=1.0, metavar="S",
                     help="alert channel heartbeat period (default %(default)s s)")
    out.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                     help="start capturing only once N gateways subscribed to the alerts (default %(default)s)")
    out.add_argument("--journal", metavar="FILE",
                     help="decision journal SQLite file (default $EDGE_RUNTIME_HOME/journal/STATION.sqlite)")
    out.add_argument("--heatmaps", metavar="DIR", help="write a heat-map overlay PNG per NOT_OK frame into DIR "
                                                       "(bounded: oldest deleted)")
    out.add_argument("--view", metavar="HOST:PORT",
                     help="serve a live web view of the decisions on HOST:PORT (loopback unless --allow-remote; "
                          "docs/line.md)")
    out.add_argument("--stats-json", metavar="FILE", help="write the final statistics (docs/wire.md, 'Statistics')")
    out.add_argument("--prometheus", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT")
    add_json_flag(out, "the final summary")
    out.add_argument("--quiet", action="store_true", help="no live view")
    # (room for the live-view flag of edge_runtime/line/view.py)
    sec = p.add_argument_group("security")
    sec.add_argument("--allow-remote", action="store_true",
                     help="allow binding non-loopback addresses (ingress, alerts, replay); use with --curve-keys")
    sec.add_argument("--curve-keys", metavar="DIR", help="CURVE key pair (from --gen-keys) to encrypt the "
                                                         "external sockets")
    sec.add_argument("--curve-clients", metavar="DIR",
                     help="accept only CURVE clients whose public key (*.key) is in DIR (needs --curve-keys)")
    sec.add_argument("--gen-keys", metavar="DIR", help="generate a CURVE key pair into DIR and exit")
    p.add_argument("--bench", action="store_true",
                   help="run the fixed pipeline benchmark (model with 1 and 2 workers, no-op model) and print a table")
    return p


def _category(args, info: dict) -> str | None:
    """The category to stream: --category; else for a directory the bundle's training
    category (all with --all-categories or when the bundle names none); for the synthetic
    station the demo's, else the training category when the station has it."""
    if args.category or args.all_categories:
        return args.category
    trained = info.get("category")
    if args.source == "synth":
        from edge_runtime.data.synth import CATEGORIES

        demo = (info.get("demo") or {}).get("synth") or {}
        return demo.get("category") or (trained if trained in CATEGORIES else None)
    if args.source.startswith("zmq+") or trained is None:
        return None
    if Path(args.source).is_dir() and not (Path(args.source) / trained).is_dir():
        raise DataError(Path(args.source), f"has no folder for the bundle's category {trained!r}; "
                                           "name one with --category or replay all with --all-categories")
    return trained


def make_config(args, bundle: Path, info: dict):
    """The RunConfig for parsed arguments and a resolved bundle (info = store.bundle_info)."""
    from edge_runtime.pipeline.config import RunConfig
    from edge_runtime.pipeline.store import DEMO_SYNTH, runtime_home

    synth = dict(DEMO_SYNTH)
    synth.update((info.get("demo") or {}).get("synth") or {})
    return RunConfig(
        bundle=str(bundle), backend=args.backend, device=args.device, source=args.source,
        category=_category(args, info), fps=args.fps, frames=args.frames, workers=args.workers, batch=args.batch,
        threads=args.threads, queue=args.queue, station=args.station, alerts=args.alerts,
        replay=None if args.replay_endpoint == "none" else args.replay_endpoint,
        journal=args.journal or str(runtime_home() / "journal" / f"{args.station}.sqlite"),
        heartbeat_s=args.heartbeat, heatmaps=args.heatmaps, allow_remote=args.allow_remote,
        curve_keys=args.curve_keys, curve_clients=args.curve_clients, wait_subscribers=args.wait_subscribers,
        link=args.link, max_frame_bytes=int(args.max_frame_mb * 2**20), max_image_side=args.max_image_side,
        max_image_pixels=int(args.max_image_mpx * 1e6), max_aspect=args.max_aspect,
        synth_size=synth["size"], synth_seed=synth["seed"], synth_pool=args.synth_pool,
        drain_timeout_s=args.drain_timeout, startup_timeout_s=args.startup_timeout, max_restarts=args.max_restarts,
        restart_window_s=args.restart_window, cycle_time_s=args.cycle_time, frame_deadline_s=args.frame_deadline,
        stall_timeout_s=args.stall_timeout, model=info["model"], bundle_hash=info["bundle_hash"])


def _check(args) -> None:
    """Argument checks that need no model (raise ValueError with the flag's name)."""
    from edge_runtime.pipeline.alerts import check_station

    for flag, value in (("--workers", args.workers), ("--batch", args.batch), ("--queue", args.queue)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: automatic), got {args.threads}")
    for flag, value in (("--fps", args.fps), ("--cycle-time", args.cycle_time),
                        ("--frame-deadline", args.frame_deadline)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    for flag, value in (("--max-frame-mb", args.max_frame_mb), ("--stall-timeout", args.stall_timeout),
                        ("--restart-window", args.restart_window), ("--startup-timeout", args.startup_timeout),
                        ("--drain-timeout", args.drain_timeout), ("--heartbeat", args.heartbeat),
                        ("--max-image-mpx", args.max_image_mpx), ("--max-aspect", args.max_aspect),
                        ("--max-image-side", args.max_image_side)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    for flag, value in (("--max-restarts", args.max_restarts), ("--wait-subscribers", args.wait_subscribers),
                        ("--synth-pool", args.synth_pool)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if args.curve_clients and not args.curve_keys:
        raise ValueError("--curve-clients needs --curve-keys (the station's key pair)")
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
        lines.append(f"inference workers restarted: {summary['worker_restarts']} "
                     f"({summary.get('deadline_kills', 0)} past the frame deadline, "
                     f"{summary.get('stall_kills', 0)} stalled)")
    ing = summary.get("ingress") or {}
    if ing.get("disconnects"):
        lines.append(f"ingress: {ing['disconnects']} camera connections ended: {ing.get('refused', 0)} "
                     f"refused by the station (ingress refused: oversize part over twice --max-frame-mb, or "
                     f"a protocol error), {ing.get('camera_closed', 0)} closed by the camera"
                     + (f", {ing['unclassified']} unclassified" if ing.get("unclassified") else ""))
    if summary.get("alerts"):
        a = summary["alerts"]
        lines.append(f"alerts: {a.get('published', 0)} published, {a.get('send_drops', 0)} send drops "
                     f"(replayable from the journal), {a.get('journal_errors', 0)} journal errors")
    if summary.get("error"):
        lines.append(f"ERROR: {summary['error']}")
    return "\n".join(lines)


def exit_code(summary: dict) -> int:
    """0 ok, 1 the run failed, 130 Ctrl-C, 3 some frame ended as ERROR (module doc)."""
    if summary.get("error") or summary.get("invariant", {}).get("holds") is False:
        return EXIT_RUNTIME
    if summary.get("signal") == "SIGINT":
        return EXIT_INTERRUPTED
    if (summary.get("frames") or {}).get("ERROR"):
        return EXIT_FRAME_ERRORS
    return EXIT_OK


def run_once(args, log) -> int:
    from edge_runtime.pipeline.stats import PrometheusExporter
    from edge_runtime.pipeline.store import bundle_info, resolve_model
    from edge_runtime.pipeline.supervisor import preflight, run_pipeline

    bundle = resolve_model(args.model, log=log)
    info = bundle_info(bundle)
    cfg = make_config(args, bundle, info)
    preflight(cfg)  # bind policy, keys: refused before anything starts (exit 2)
    label = info["model"] + ("" if info["calibrated"] else " UNCALIBRATED")
    if info.get("demo"):
        label += f" ({info['demo']['label']})"
    view = LiveView(label, quiet=args.quiet)
    exporter = PrometheusExporter(args.prometheus, args.station) if args.prometheus else None

    def on_stats(snap: dict) -> None:
        view.stats(snap)
        if exporter is not None:
            exporter.update(snap)

    for line in info.get("extractors") or ["no feature extractors (trained from scratch)"]:
        view.log(f"extractor {line}")
    for warning in info["warnings"]:
        view.log(f"model warning: {warning.splitlines()[0]}")
    if not info["calibrated"]:
        view.log("bundle not calibrated: every frame is NOT_DECIDABLE (run edge-calibrate)")
    try:
        web = None
        if getattr(args, "view", None):
            from edge_runtime.line.view import start_view as start_web_view

            web = start_web_view(args.view, alerts_endpoint=args.alerts, allow_remote=args.allow_remote)
            view.log(f"live view: {web.url}")
        try:
            summary = run_pipeline(cfg, on_stats=on_stats, on_log=view.log)
        finally:
            if web is not None:
                web.close()
    finally:
        view.end_line()
        if exporter is not None:
            exporter.close()
    if args.stats_json:
        write_json(args.stats_json, summary)
    if args.json:
        write_json(args.json, summary)
    print(summary_text(summary, label), file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    return exit_code(summary)


def bench(args, rows: list[dict], log) -> list[tuple[dict, dict]]:
    """Run one pipeline per row (keys: name, backend, workers, optional synth_size,
    synth_pool, backend_options) on the synthetic station on demand, ``args.frames``
    frames each (default 60; the first 5 are warm-up: decided but not timed). Rows with
    the no-op backend need no model (a weightless bundle is written for them). Returns
    (row, summary) pairs; raises RuntimeError when a run fails."""
    from edge_runtime.backends.noop import write_bundle
    from edge_runtime.pipeline.store import bundle_info, resolve_model
    from edge_runtime.pipeline.supervisor import run_pipeline

    frames = args.frames or 60
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        model = None
        for i, row in enumerate(rows):
            if row["backend"] == "noop" and row.get("bundle", "noop") == "noop":
                bundle = write_bundle(Path(tmp) / "noop-bundle")
            else:
                model = model or resolve_model(args.model, log=log)
                bundle = model
            info = bundle_info(bundle)
            run_args = argparse.Namespace(**{**vars(args), "backend": row["backend"], "workers": row["workers"],
                                             "frames": frames, "source": "synth", "fps": None,
                                             "journal": str(Path(tmp) / f"run{i}.sqlite")})
            cfg = make_config(run_args, bundle, info)
            cfg.warmup = min(5, frames // 4)
            cfg.synth_size = row.get("synth_size") or cfg.synth_size
            cfg.synth_pool = row.get("synth_pool", cfg.synth_pool)
            cfg.backend_options = dict(row.get("backend_options") or {})
            cfg.queue = max(cfg.queue, 2 * cfg.workers * cfg.batch)
            log(f"bench: {row['name']}, {row['workers']} worker(s), {cfg.synth_size} px frames, {frames} frames "
                f"({cfg.warmup} warm-up)")
            summary = run_pipeline(cfg, on_log=log)
            if summary.get("error"):
                raise RuntimeError(f"bench run {row['name']} failed: {summary['error']}")
            results.append((row, summary))
    return results


def bench_table(results: list[tuple[dict, dict]]) -> str:
    """Markdown table of bench results: throughput, per-frame time, the pipeline's overhead
    per frame for a model of known cost, e2e and per-stage p50 ms.

    Two overheads: against the model's nominal cost (``delay_ms``), and against the model's
    own measured time (the mean of the detector's step timings per frame, which for the
    no-op model includes its sleep's overshoot and its score computation): frame time minus
    what the model itself spent is what the pipeline costs."""
    lines = ["| run | workers | frame px | frames/s | ms/frame | overhead ms (%) vs nominal | model ms (own, mean) | "
             "overhead ms (%) vs own | e2e p50 ms | e2e p99 ms | capture p50 | preprocess p50 | "
             "wait before infer p50 | infer p50 | alert p50 |", "|" + "---|" * 15]
    for row, s in results:
        lat = s["latency_ms"]
        cells = [lat["e2e"]["p50"], lat["e2e"]["p99"], lat["stage"]["capture"]["p50"],
                 lat["stage"]["preprocess"]["p50"], lat["queue_wait"]["infer"]["p50"], lat["stage"]["infer"]["p50"],
                 lat["stage"]["alert"]["p50"]]
        per_frame = 1000.0 / s["throughput_fps"] if s["throughput_fps"] else float("nan")
        model_ms = (row.get("backend_options") or {}).get("delay_ms")
        own = sum(w.get("mean", 0.0) for w in (lat.get("infer_steps") or {}).values())

        def over(base: float | None) -> str:
            if not base:
                return "-"
            extra = per_frame * row["workers"] - base
            return f"{extra:.2f} ({100 * extra / base:.1f} %)"

        lines.append(f"| {row['name']} ({s['detector']}) | {row['workers']} | {s['config']['synth_size']} | "
                     f"{s['throughput_fps']:.2f} | {per_frame:.2f} | {over(model_ms)} | "
                     f"{own:.2f} | {over(own if model_ms else None)} | "
                     + " | ".join(f"{c:.1f}" for c in cells) + " |")
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
        write_json(args.json, {"rows": [{**row, **s} for row, s in results]})
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
            return EXIT_USAGE
        print(f"public key (give to gateways): {public}\nsecret key (keep on this station): {secret}")
        return EXIT_OK
    try:
        _check(args)
        if args.model is None:
            from edge_runtime.pipeline.store import default_model

            args.model = default_model()
            if not args.model:
                raise ValueError("no --model given and no installed method offers a default demo")
    except (EdgeError, ValueError) as exc:
        log(str(exc))
        return EXIT_USAGE
    try:
        return run_bench(args, log) if args.bench else run_once(args, log)
    except (EdgeError, ValueError) as exc:  # bad model, source, endpoint, keys: before the run started
        log(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        log(f"{exc}")
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
