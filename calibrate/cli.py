"""``edge-calibrate``: decision thresholds and score normalisation for a model bundle.

    edge-calibrate --model BUNDLE --data DIR --category C [--target-fpr 0.01]
                   [--split validation] [--backend torch] [--device cpu] [--json FILE|-]

Runs the bundle's detector over every image of one split of one category, then
(``calibrate.thresholds``):

* image threshold: conservative (1 - fpr) order statistic of the good images' scores,
  i.e. the false-reject rate on new good parts is at most ``--target-fpr`` in
  expectation; resolution 1 / (n_good + 1);
* pixel threshold: the same order statistic over the good images' valid pixels (pixels
  with a 3D point after preprocessing; all pixels for RGB-only inputs). Pixels of one
  image are correlated, so its real resolution is closer to the image count's;
* if the split also holds defective images: the F1-optimal image threshold, reported
  for information only (it never replaces the quantile threshold);
* normalisation: ``(score - threshold) / good_std`` per image and pixel score.

The result is written into the bundle's manifest (``thresholds`` and ``normalisation``)
via ``edge_runtime.bundle.update_manifest``. Exit status: 0 done, 2 refused (too few
good images for the rate, bad data, bad bundle), 1 a failure while scoring; the message
says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibrate.thresholds import (
    CalibrationError,
    f1_optimal_threshold,
    normalisation_entry,
    order_statistic_rank,
    quantile_threshold,
)
from edge_runtime import methods
from edge_runtime.backends import CHOICES, Detector, load_detector
from edge_runtime.bundle import update_manifest
from edge_runtime.outputs import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, add_json_flag, write_json
from edge_runtime.pipeline.store import resolve_model
from edge_runtime.data.mvtec import MVTec3D, SampleRef
from edge_runtime.errors import DataError, EdgeError


def split_refs(data: Path, category: str, split: str, target_fpr: float) -> list[SampleRef]:
    """The split's sample references, after checking (without reading pixels) that it
    holds enough good images for ``target_fpr``; CalibrationError otherwise."""
    refs = MVTec3D(data).index(category, split)
    n_good = sum(ref.label == 0 for ref in refs)
    try:
        order_statistic_rank(n_good, target_fpr)
    except CalibrationError as exc:
        raise CalibrationError(f"{data / category / split}: {exc}") from None
    return refs


def score_split(det: Detector, refs: list[SampleRef], progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``det`` over ``refs``: (image scores float64 [n], labels int [n] 0 good / 1
    defective, good images' valid-pixel scores float32 [m]) in score units."""
    scores, labels, good_pixels = [], [], []
    method = methods.for_manifest(det.manifest)
    for ref in tqdm(refs, desc="scoring", disable=not progress, unit="img"):
        sample = ref.load()
        try:
            inputs = det.preprocess(sample.rgb, sample.xyz)
            result = det.infer(inputs)
        except (DataError, ValueError) as exc:  # name the frame the model could not score
            raise DataError(ref.paths.get("xyz") or ref.paths.get("rgb") or ref.key,
                            getattr(exc, "problem", str(exc))) from None
        scores.append(result.score)
        labels.append(ref.label)
        if ref.label == 0:
            valid = method.valid_mask(inputs, result.amap.shape, det.manifest)
            good_pixels.append(np.asarray(result.amap, np.float32)[valid])
    pixels = np.concatenate(good_pixels) if good_pixels else np.zeros(0, np.float32)
    return np.asarray(scores, np.float64), np.asarray(labels, np.int64), pixels


def calibrate_scores(scores: np.ndarray, labels: np.ndarray, good_pixels: np.ndarray, target_fpr: float,
                     split: str, category: str) -> tuple[dict, dict]:
    """(manifest "thresholds", manifest "normalisation") from one split's scores.

    scores/labels: image scores and 0/1 labels; good_pixels: valid-pixel scores of the
    good images. Raises CalibrationError when the good images are too few for
    ``target_fpr`` (see ``calibrate.thresholds``) or their scores are degenerate.
    """
    good = scores[labels == 0]
    if good.size == 0:
        raise CalibrationError(f"the {split} split of {category} holds no good images")
    image = quantile_threshold(good, target_fpr)
    pixel = quantile_threshold(good_pixels, target_fpr) if good_pixels.size else None
    if pixel is None:
        raise CalibrationError("the good images have no valid pixels (empty point clouds?)")
    f1 = f1_optimal_threshold(scores, labels)
    n_def = int(np.sum(labels == 1))
    thresholds = {
        "image": image["threshold"],
        "pixel": pixel["threshold"],
        "target_fpr": float(target_fpr),
        "n_images": int(good.size),
        "n_defective_images": n_def,
        "n_pixels": int(pixel["n"]),
        "expected_fpr": image["expected_fpr"],
        "resolution": image["resolution"],
        "empirical_fpr": image["empirical_fpr"],
        "rank": image["rank"],
        "decision": "anomalous iff score > threshold",
        "split": split,
        "category": category,
        "method": "quantile",
        "f1_optimal": f1,
        "defect_recall_at_threshold": (float(np.mean(scores[labels == 1] > image["threshold"]))
                                       if n_def else None),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    normalisation = {
        "formula": "(score - threshold) / good_std",
        "image": normalisation_entry(good, image["threshold"]),
        "pixel": normalisation_entry(good_pixels, pixel["threshold"]),
    }
    return thresholds, normalisation


def _summary(t: dict, backend: str) -> str:
    """Human summary of a thresholds dict (what it rests on, what it means)."""
    lines = [
        f"calibrated {t['category']}/{t['split']} with {backend}: {t['n_images']} good images"
        f" ({t['n_defective_images']} defective)",
        f"  image threshold {t['image']:.6g}: expected false-reject rate {t['expected_fpr']:.4g}"
        f" (target {t['target_fpr']:g}, resolution 1/{t['n_images'] + 1} = {t['resolution']:.3g},"
        f" {t['empirical_fpr']:.3g} of these good images above it)",
        f"  pixel threshold {t['pixel']:.6g} over {t['n_pixels']} good valid pixels",
    ]
    f1 = t["f1_optimal"]
    if f1 is None:
        lines.append("  F1-optimal threshold: not computed (the split has no defective images)")
    else:
        lines.append(f"  for information, F1-optimal threshold {f1['threshold']:.6g}: F1 {f1['f1']:.3f},"
                     f" recall {f1['recall']:.3f}, false rejects {f1['fpr']:.3f}"
                     + (" (degenerate: flags all or nothing)" if f1["degenerate"] else "")
                     + "; NOT used for decisions")
        lines.append(f"  defect recall at the quantile threshold: {t['defect_recall_at_threshold']:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``edge-calibrate``."""
    p = argparse.ArgumentParser(prog="edge-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="bundle directory or model-store name")
    p.add_argument("--data", required=True, type=Path, help="dataset root (MVTec 3D-AD layout)")
    p.add_argument("--category", required=True, help="category whose split is scored")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="false-reject rate on good parts to calibrate for (default 0.01; needs >= 99 good images)")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                   help="split whose good images set the thresholds (default validation)")
    p.add_argument("--backend", default="torch", choices=CHOICES, help="inference backend (default torch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_json_flag(p, "the thresholds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edge-calibrate``; returns the exit status (0 written, 2 refused, 1 failed)."""
    args = build_parser().parse_args(argv)
    try:
        bundle = resolve_model(args.model, build=False)
        refs = split_refs(args.data, args.category, args.split, args.target_fpr)
        det = load_detector(bundle, backend=args.backend, device=args.device)
        scores, labels, pixels = score_split(det, refs, progress=not args.quiet)
        thresholds, normalisation = calibrate_scores(scores, labels, pixels, args.target_fpr,
                                                     args.split, args.category)
    except (CalibrationError, EdgeError, ValueError) as exc:
        print(f"edge-calibrate: refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        print(f"edge-calibrate: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    thresholds["backend"] = det.name
    update_manifest(bundle, thresholds=thresholds, normalisation=normalisation)
    out = {"bundle": str(bundle), "thresholds": thresholds, "normalisation": normalisation}
    print(_summary(thresholds, det.name), file=sys.stderr if args.json == "-" else sys.stdout)
    write_json(args.json, out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
