"""Pipeline benchmark: sustained frames/s, end-to-end and per-stage latency of ``edge-run``.

    python scripts/bench_pipeline.py [--model cfm-tiny] [--frames 100] [--backend auto] [--json FILE]

Runs, one after the other, on the synthetic station on demand (lossless, no pacing):
the model with 1 and 2 inference workers (224 px frames, the demo's), then the no-op model
(edge_runtime/backends/noop.py) at 224 px and at 64 px frames: everything but inference,
i.e. the pipeline's own overhead (the 64 px run makes the simulated camera cheap, so
it shows the transport and bookkeeping ceiling). Prints a markdown table (what
docs/_parts/benchmarks_pipeline.md reports). The model is resolved like ``edge-run
--model`` (a demo bundle is built on first use).
"""

import argparse
import sys

from edge_runtime.cli.run import _write_json, bench, bench_table, build_parser


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cfm-tiny")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--json", help="also write every run's full summary to FILE")
    opts = ap.parse_args()
    args = build_parser().parse_args(["--model", opts.model, "--backend", opts.backend, "--device", opts.device,
                                      "--frames", str(opts.frames), "--quiet"])
    rows = [{"name": opts.model, "backend": opts.backend, "workers": 1},
            {"name": opts.model, "backend": opts.backend, "workers": 2},
            {"name": "no-op model", "backend": "noop", "workers": 1},
            {"name": "no-op model", "backend": "noop", "workers": 1, "synth_size": 64}]
    results = bench(args, rows, lambda text: print(f"bench: {text}", file=sys.stderr, flush=True))
    print(bench_table(results))
    if opts.json:
        _write_json(opts.json, {"rows": [{**row, **s} for row, s in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
