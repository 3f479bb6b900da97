"""Wall-clock ms of ``det.infer`` on one synthetic frame at several torch thread counts.

    python scripts/bench_threads.py --model cfm-tiny --threads 1 2
    python scripts/bench_threads.py --model cfm-tiny --threads 1 --contiguous   # without channels-last
    python scripts/bench_threads.py --model cfm-tiny --threads 1 --unfused      # batch-norms kept
    EDGE_RUNTIME_KEEP_HEAP=0 python scripts/bench_threads.py ...                # glibc's default heap

Run it on an idle machine and beside a busy one to see what oversubscribed OpenMP threads
cost (docs/benchmarks.md, "torch threads per worker"). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from edge_runtime.backends import load_detector
from edge_runtime.data.synth import SynthStation
from edge_runtime.pipeline.store import resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cfm-tiny", help="bundle directory or store name")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--contiguous", action="store_true",
                   help="store the weights contiguous (NCHW) instead of the backend's channels-last, to compare")
    p.add_argument("--unfused", action="store_true",
                   help="keep the extractors' batch-norms (the backend folds them into the convolutions by default)")
    args = p.parse_args()
    det = load_detector(resolve_model(args.model), backend="torch", device="cpu", fuse=not args.unfused)
    if args.contiguous:
        det.model = det.model.to(memory_format=torch.contiguous_format)
    frame = SynthStation(size=args.size, seed=0).render("puck", 0, "stream")
    inputs = det.preprocess(frame.rgb, frame.xyz)
    print("| torch threads | infer ms (wall, mean) | infer ms CPU of this thread (1 thread: all of it) | page faults "
          "per frame | system ms per frame | stages ms (last frame) |\n|---|---|---|---|---|---|")
    for n in args.threads:
        torch.set_num_threads(n)
        det.infer(inputs)  # warm-up
        r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.thread_time()
        timings = [det.infer(inputs).timings_ms for _ in range(args.frames)]
        ms = (time.perf_counter() - t0) / args.frames * 1e3
        cpu_ms = (time.thread_time() - c0) / args.frames * 1e3
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults = (r1.ru_minflt - r0.ru_minflt) / args.frames
        sys_ms = (r1.ru_stime - r0.ru_stime) / args.frames * 1e3
        stages = ", ".join(f"{k} {v:.0f}" for k, v in timings[-1].items() if v >= 0.5)
        print(f"| {n} | {ms:.1f} | {cpu_ms:.1f} | {faults:.0f} | {sys_ms:.1f} | {stages} |")


if __name__ == "__main__":
    main()
