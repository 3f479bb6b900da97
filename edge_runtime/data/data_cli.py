"""``edge-data``: check and summarise a dataset in the MVTec 3D-AD layout.

    edge-data check DIR [--json FILE|-] [--progress]
        Reads every file; prints one line per problem, ``path: problem``.
        Exit 0 when the dataset is clean, 2 when any problem was found (bad input).
        An RGB-only category (no xyz folder) gets a warning line on stderr.
    edge-data summary DIR [--json FILE|-]
        Counts per category / split / defect type, image size, xyz present or not
        (reads no pixels). Exit 0, or 2 when DIR is not a usable dataset root.

``--json FILE`` also writes the result as JSON to FILE; ``--json -`` writes only the
JSON to stdout (instead of the human-readable text). Exit 2 is also argparse's usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_runtime.data.mvtec import SPLITS, MVTec3D, check_dataset, summarize
from edge_runtime.errors import DataError
from edge_runtime.outputs import EXIT_OK, EXIT_USAGE, JSON_METAVAR, write_json


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


def rgb_only_categories(root: Path) -> list[str]:
    """Categories of the dataset at ``root`` that have no xyz folder anywhere (RGB-only)."""
    try:
        ds = MVTec3D(root)
        return [c for c in ds.categories() if not ds.has_xyz(c)]
    except DataError:
        return []


def _check(args: argparse.Namespace) -> int:
    """``edge-data check``: one line per problem on stdout; exit 2 if any (bad input)."""
    problems = check_dataset(args.dir, progress=args.progress)
    rgb_only = rgb_only_categories(args.dir)
    for category in rgb_only:
        print(f"warning: {category}: RGB-only (no xyz folders): usable by methods in rgb mode only "
              "(e.g. --modality rgb); methods that need a point cloud will refuse it", file=sys.stderr)
    write_json(args.json, {"root": str(args.dir), "ok": not problems, "rgb_only": rgb_only,
                           "problems": [{"path": p.path, "problem": p.problem} for p in problems]})
    if args.json != "-":
        for p in problems:
            print(p)
        if problems:
            print(f"{len(problems)} problem(s) found in {args.dir}", file=sys.stderr)
        else:
            print(f"{args.dir}: OK, no problems found")
    return EXIT_USAGE if problems else EXIT_OK


def _summary(args: argparse.Namespace) -> int:
    """``edge-data summary``: table on stdout (and/or JSON); exit 2 for an unusable root."""
    try:
        summary = summarize(args.dir)
    except DataError as err:
        print(f"edge-data: {err}", file=sys.stderr)
        return EXIT_USAGE
    write_json(args.json, summary)
    if args.json != "-":
        print(format_summary(summary))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``edge-data`` argument parser (sub-commands ``check`` and ``summary``)."""
    parser = argparse.ArgumentParser(
        prog="edge-data", description="Check or summarise a dataset in the MVTec 3D-AD layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="read every file and list every problem (exit 2 if any)")
    check.add_argument("dir", type=Path, help="dataset root (the folder holding the categories)")
    check.add_argument("--json", metavar=JSON_METAVAR,
                       help="also write the problems as JSON ('-' = stdout)")
    check.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    check.set_defaults(func=_check)
    summary = sub.add_parser("summary", help="counts per category / split / defect type")
    summary.add_argument("dir", type=Path, help="dataset root (the folder holding the categories)")
    summary.add_argument("--json", metavar=JSON_METAVAR,
                         help="also write the summary as JSON ('-' = stdout)")
    summary.set_defaults(func=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edge-data`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
