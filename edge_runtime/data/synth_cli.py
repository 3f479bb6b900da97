"""``edge-synth``: write a synthetic-station dataset (MVTec 3D-AD layout) or a preview picture.

    edge-synth --out DIR [--size PX|HxW] [--seed N] [--categories a b ...]
               [--train N] [--val N] [--test-good N] [--test-defect N] [--json FILE|-]
    edge-synth --preview PNG [--size PX] [--seed N] [--categories a b ...]

Prints the counts per category / split / defect type (and the wall time). The
preview is a grid made with OpenCV: one row per category, for a good part and one
defect of each modality (rgb only, 3D only, both): rgb | height above the background
plane computed from xyz (colour-mapped, high = warm, missing points black) | gt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.data.synth import CATEGORIES, DEFECT_MODALITY, DEFECT_TYPES, SynthStation, generate_dataset
from edge_runtime.outputs import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, add_json_flag, write_json


def _size(text: str) -> int | tuple[int, int]:
    """``--size``: "224" (square) or "300x400" (height x width), pixels."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW in pixels, got {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"size must be N or HxW in pixels, got {text!r}")


def _count(text: str) -> int:
    """A non-negative image count."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"count must be >= 0, got {n}")
    return n


def depth_image(xyz: np.ndarray, border: int = 10) -> np.ndarray:
    """BGR uint8 picture of an organized cloud (metres): height above the background plane.

    The plane is a least-squares fit z = a x + b y + c to the valid points of a
    ``border``-pixel strip; heights from 0 to their 99.5th percentile are turbo
    colour-mapped (high = warm); missing points are black.
    """
    valid = np.any(xyz != 0, axis=-1)
    out = np.zeros(xyz.shape[:2] + (3,), np.uint8)
    strip = np.zeros_like(valid)
    strip[:border], strip[-border:], strip[:, :border], strip[:, -border:] = True, True, True, True
    pts = xyz[strip & valid]
    if len(pts) < 3:
        return out
    coef, *_ = np.linalg.lstsq(np.c_[pts[:, :2], np.ones(len(pts))], pts[:, 2], rcond=None)
    height = xyz[..., 0] * coef[0] + xyz[..., 1] * coef[1] + coef[2] - xyz[..., 2]
    top = max(float(np.percentile(height[valid], 99.5)), 1e-4)
    level = np.clip(height / top * 255.0, 0, 255).astype(np.uint8)
    out[valid] = cv2.applyColorMap(level, cv2.COLORMAP_TURBO)[valid]
    return out


def preview(station: SynthStation, index: int = 0) -> np.ndarray:
    """BGR uint8 preview grid (see module doc) of test part ``index`` of each category.

    The 3D-only column alternates dent / bump and the both-modalities column crack /
    hole from row to row, so every defect type appears.
    """
    h, w = station.height_px, station.width_px
    scale = max(0.4, min(h, w) / 220.0)
    columns = [("good",), ("color",), ("dent", "bump"), ("crack", "hole")]
    rows = []
    for r, category in enumerate(station.categories):
        tiles = []
        for kinds in columns:
            kind = kinds[r % len(kinds)]
            s = station.render(category, index, "test", None if kind == "good" else kind)
            rgb = cv2.cvtColor(s.rgb, cv2.COLOR_RGB2BGR)
            gt = np.repeat((s.gt * 255).astype(np.uint8)[..., None], 3, axis=2)
            label = f"{category}: {kind}" + ("" if kind == "good" else f" ({DEFECT_MODALITY[kind]})")
            cv2.putText(rgb, label, (4, int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                        (255, 255, 255), 1, cv2.LINE_AA)
            tiles += [rgb, depth_image(s.xyz), gt]
        tiles = [cv2.copyMakeBorder(t, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=(90, 90, 90)) for t in tiles]
        rows.append(np.hstack(tiles))
    header = np.full((int(28 * scale) + 6, rows[0].shape[1], 3), 30, np.uint8)
    tile_w = w + 2
    for i, name in enumerate(["rgb", "height from xyz", "gt"] * len(columns)):
        cv2.putText(header, name, (i * tile_w + 4, int(20 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX,
                    0.55 * scale, (230, 230, 230), 1, cv2.LINE_AA)
    return np.vstack([header] + rows)


def _print_summary(summary: dict, seconds: float) -> None:
    """Counts per category (rows) and split / folder (columns), then totals."""
    cols = [("train", "good"), ("validation", "good"), ("test", "good")] + [("test", t) for t in DEFECT_TYPES]
    names = ["category"] + [f"{s[:5]}/{f}" for s, f in cols]
    width = [max(10, len(n)) for n in names]
    print(f"synthetic dataset: {summary['root']}  ({summary['size'][0]}x{summary['size'][1]} px, "
          f"seed {summary['seed']})")
    print("  ".join(n.ljust(wd) for n, wd in zip(names, width)))
    for cat, per in summary["counts"].items():
        cells = [cat] + [str(per.get(s, {}).get(f, 0)) for s, f in cols]
        print("  ".join(c.ljust(wd) for c, wd in zip(cells, width)))
    print(f"{summary['samples']} samples, {summary['files']} files in {seconds:.1f} s; defect modality: "
          + ", ".join(f"{k}={v}" for k, v in DEFECT_MODALITY.items()))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``edge-synth``."""
    ap = argparse.ArgumentParser(prog="edge-synth", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="dataset root to write (MVTec 3D-AD layout)")
    what.add_argument("--preview", type=Path, metavar="PNG", help="write a preview grid picture instead")
    ap.add_argument("--size", type=_size, default=224, help="image size: N (square) or HxW pixels (default 224)")
    ap.add_argument("--seed", type=int, default=0, help="station seed (default 0)")
    ap.add_argument("--categories", nargs="+", choices=CATEGORIES, metavar="CAT",
                    help=f"categories (default all: {' '.join(CATEGORIES)})")
    ap.add_argument("--train", type=_count, default=40, help="train/good images per category (default 40)")
    ap.add_argument("--val", type=_count, default=10, help="validation/good images per category (default 10)")
    ap.add_argument("--test-good", type=_count, default=15, help="test/good images per category (default 15)")
    ap.add_argument("--test-defect", type=_count, default=5,
                    help="test images per defect type per category (default 5)")
    ap.add_argument("--index", type=int, default=0, help="--preview: which test part to show (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="write into non-empty category folders")
    add_json_flag(ap, "the summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    try:
        station = SynthStation(args.size, args.seed, args.categories)
    except ValueError as exc:
        ap.error(str(exc))
    if args.preview:
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        picture = preview(station, args.index)
        if not cv2.imwrite(str(args.preview), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            print(f"edge-synth: {args.preview}: could not write the picture", file=sys.stderr)
            return EXIT_RUNTIME
        print(f"preview written: {args.preview}")
        return 0

    t0 = time.perf_counter()
    try:
        summary = generate_dataset(args.out, args.size, args.seed, args.categories, args.train, args.val,
                                   args.test_good, args.test_defect, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"edge-synth: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 2)
    if args.json != "-":
        _print_summary(summary, seconds)
    write_json(args.json, summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
