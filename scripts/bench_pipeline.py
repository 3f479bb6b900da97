"""Pipeline benchmark: the pipeline's own cost per frame, and sustained throughput of ``edge-run``.

    python scripts/bench_pipeline.py [--frames 200] [--size 400] [--with-model cfm-tiny] [--json FILE]

Runs, one after the other, on the synthetic station on demand (lossless, no pacing),
with the no-op backend (edge_runtime/backends/noop.py; no model, nothing downloaded):

1. a simulated 60 ms model (``delay_ms`` 60) on ``--size`` px frames: frames/s against the
   ideal 1000 / 60; "overhead" = ms per frame - 60 ms, the pipeline's cost per frame
   (the target: <= 5 % of a 60 ms frame);
2. the same with the camera rendering every frame while streaming (``--synth-pool 0``,
   the old behaviour) to show what the pre-rendered pool removes;
3. no model at all (``delay_ms`` 0): the transport and bookkeeping ceiling.

``--with-model NAME`` adds that model with 1 and 2 workers (a demo bundle is built on
first use). Prints a markdown table (what docs/_parts/benchmarks_pipeline.md reports).
"""

import argparse
import sys

from edge_runtime.cli.run import bench, bench_table, build_parser
from edge_runtime.outputs import write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200, help="frames per run (first 5 warm-up)")
    ap.add_argument("--size", type=int, default=400, help="synthetic frame side in pixels")
    ap.add_argument("--model-ms", type=float, default=60.0, help="the simulated model's cost per frame")
    ap.add_argument("--with-model", metavar="NAME", help="also run this model (bundle or demo name)")
    ap.add_argument("--backend", default="auto", help="backend for --with-model")
    ap.add_argument("--device", default="cpu", help="device for --with-model")
    ap.add_argument("--json", metavar="FILE", help="also write every run's full summary to FILE")
    opts = ap.parse_args()
    argv = ["--frames", str(opts.frames), "--quiet", "--backend", "noop", "--device", opts.device,
            "--alerts", "tcp://127.0.0.1:*", "--replay-endpoint", "none"]
    if opts.with_model:
        argv += ["--model", opts.with_model]
    args = build_parser().parse_args(argv)
    delay = {"delay_ms": opts.model_ms}
    rows = [{"name": f"no-op, {opts.model_ms:g} ms model", "backend": "noop", "workers": 1,
             "synth_size": opts.size, "backend_options": delay},
            {"name": f"no-op, {opts.model_ms:g} ms model, camera renders live", "backend": "noop", "workers": 1,
             "synth_size": opts.size, "backend_options": delay, "synth_pool": 0},
            {"name": "no-op, no model", "backend": "noop", "workers": 1, "synth_size": opts.size}]
    if opts.with_model:
        rows += [{"name": opts.with_model, "backend": opts.backend, "workers": w, "bundle": "model"} for w in (1, 2)]
    results = bench(args, rows, lambda text: print(f"bench: {text}", file=sys.stderr, flush=True))
    print(bench_table(results))
    if opts.json:
        write_json(opts.json, {"rows": [{**row, **s} for row, s in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
