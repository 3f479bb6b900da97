"""``edge-data``: check and summarise a dataset in the MVTec 3D-AD layout.

    edge-data check DIR [--json FILE|-] [--progress]
        Reads every file; prints one line per problem, ``path: problem``.
        Exit 0 when the dataset is clean, 1 when any problem was found.
    edge-data summary DIR [--json FILE|-]
        Counts per category / split / defect type, image size, xyz present or not
        (reads no pixels). Exit 0, or 1 when DIR is not a usable dataset root.

``--json FILE`` also writes the result as JSON to FILE; ``--json -`` writes only the
JSON to stdout (instead of the human-readable text). Exit 2 is argparse's usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_runtime.data.mvtec import SPLITS, check_dataset, summarize
from edge_runtime.errors import DataError


def _emit_json(obj, target: str) -> None:
    """Write ``obj`` as indented JSON to the file ``target`` or, for "-", to stdout."""
    text = json.dumps(obj, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        Path(target).write_text(text, encoding="utf-8")


def format_summary(summary: dict) -> str:
    """The ``summarize`` dict as a table: one row per category / split / defect type."""
    header = ("category", "split", "defect_type", "samples")
    rows = []
    for category, info in summary["categories"].items():
        for split in SPLITS:
            if split not in info["splits"]:
                continue
            for defect, count in info["splits"][split]["defect_types"].items():
                rows.append((category, split, defect, str(count)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:3]) + f"  {{:>{widths[3]}}}"
    lines = [f"dataset: {summary['root']}", fmt.format(*header)]
    lines += [fmt.format(*r) for r in rows]
    lines.append("")
    for category, info in summary["categories"].items():
        sizes = ", ".join(f"{h}x{w}" for h, w in info["image_sizes"]) or "unknown"
        xyz = "rgb + xyz" if info["has_xyz"] else "rgb only (no xyz)"
        counts = ", ".join(f"{s} {info['splits'][s]['total']}" for s in SPLITS
                           if s in info["splits"])
        line = f"{category}: {xyz}; image size (HxW) {sizes}; {counts or 'no splits'}"
        if info["structural_problems"]:
            line += (f"; {info['structural_problems']} structural problems "
                     "(run `edge-data check`)")
        lines.append(line)
    totals = summary["totals"]
    lines.append(f"total: {len(summary['categories'])} categories, "
                 + ", ".join(f"{s} {totals[s]}" for s in SPLITS) + f", all {totals['all']}")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    """``edge-data check``: one line per problem on stdout; exit 1 if any."""
    problems = check_dataset(args.dir, progress=args.progress)
    if args.json:
        _emit_json({"root": str(args.dir), "ok": not problems,
                    "problems": [{"path": p.path, "problem": p.problem} for p in problems]},
                   args.json)
    if args.json != "-":
        for p in problems:
            print(p)
        if problems:
            print(f"{len(problems)} problem(s) found in {args.dir}", file=sys.stderr)
        else:
            print(f"{args.dir}: OK, no problems found")
    return 1 if problems else 0


def _summary(args: argparse.Namespace) -> int:
    """``edge-data summary``: table on stdout (and/or JSON); exit 1 for an unusable root."""
    try:
        summary = summarize(args.dir)
    except DataError as err:
        print(err, file=sys.stderr)
        return 1
    if args.json:
        _emit_json(summary, args.json)
    if args.json != "-":
        print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``edge-data`` argument parser (sub-commands ``check`` and ``summary``)."""
    parser = argparse.ArgumentParser(
        prog="edge-data", description="Check or summarise a dataset in the MVTec 3D-AD layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="read every file and list every problem (exit 1 if any)")
    check.add_argument("dir", type=Path, help="dataset root (the folder holding the categories)")
    check.add_argument("--json", metavar="FILE",
                       help="also write the problems as JSON ('-' = stdout)")
    check.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    check.set_defaults(func=_check)
    summary = sub.add_parser("summary", help="counts per category / split / defect type")
    summary.add_argument("dir", type=Path, help="dataset root (the folder holding the categories)")
    summary.add_argument("--json", metavar="FILE",
                         help="also write the summary as JSON ('-' = stdout)")
    summary.set_defaults(func=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edge-data`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
