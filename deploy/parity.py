"""Parity of an exported / compiled backend against the PyTorch FP32 reference.

Both detectors see the same frames (fresh random inputs and synthetic-station frames)
through their own ``preprocess`` + ``infer``. Reported:

* anomaly maps: maximum absolute difference (score units, and relative to the
  reference maps' largest magnitude), Pearson correlation pooled over all pixels of all
  frames, and the worst per-frame Pearson correlation;
* image scores: Spearman rank correlation and maximum absolute difference;
* decisions at the calibrated image threshold (``score > threshold``): the number of
  frames decided differently, which must be zero; when the bundle is uncalibrated this
  check is skipped and said so. Pixel decisions at the pixel threshold are reported as
  a fraction (informational).

``passed`` applies the tolerances of ``TOLERANCES`` for the candidate's precision.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.detector import Detector, Result

# precision -> minimum pooled Pearson of maps, maximum relative map difference,
# minimum Spearman of image scores. FP16 engines round activations to ~3 significant
# digits, so their bounds are looser; decisions must agree in both cases.
TOLERANCES = {
    "fp32": {"amap_pearson": 0.9999, "amap_rel_max_abs_diff": 1e-3, "score_spearman": 0.99},
    "fp16": {"amap_pearson": 0.999, "amap_rel_max_abs_diff": 3e-2, "score_spearman": 0.95},
}


def random_frames(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` fresh random (rgb uint8 size x size x 3, xyz float32 size x size x 3 metres)
    frames: uniform colour noise over a random smooth surface ~0.5 m from the camera
    (a tilted plane plus a random bump), with ~10 % random missing points (exact zeros)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    frames = []
    for _ in range(n):
        rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        cx, cy, amp = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.005, 0.02)
        tilt = rng.uniform(-0.02, 0.02, 2)
        z = 0.5 + tilt[0] * u + tilt[1] * v - amp * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / 0.02)
        xyz = np.stack([u * 0.1, v * 0.1, z], axis=-1).astype(np.float32)
        xyz[rng.random((size, size)) < 0.1] = 0.0
        frames.append((rgb, xyz))
    return frames


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    return (start + (counts - 1) / 2.0)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally sized arrays (flattened); 1.0 when both are
    constant and equal, 0.0 when exactly one of them is constant."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt(np.dot(da, da)), np.sqrt(np.dot(db, db))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb and np.array_equal(a, b) else 0.0
    return float(np.dot(da, db) / (na * nb))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64)))


def compare_results(reference: list[Result], candidate: list[Result], precision: str = "fp32",
                    thresholds: dict | None = None) -> dict:
    """Parity figures of ``candidate`` against ``reference`` (same frames, same order).

    thresholds: the bundle's manifest["thresholds"] (needs "image", optionally "pixel"),
    or None when uncalibrated. Returns a JSON-ready dict (see the module docstring) with
    "passed" and, when not passed, "failures" naming each violated bound.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need equally many non-zero results, got {len(reference)} and {len(candidate)}")
    tol = TOLERANCES[precision]
    ref_maps = np.stack([r.amap for r in reference]).astype(np.float64)
    cand_maps = np.stack([c.amap for c in candidate]).astype(np.float64)
    if ref_maps.shape != cand_maps.shape:
        raise ValueError(f"anomaly map shapes differ: {ref_maps.shape[1:]} vs {cand_maps.shape[1:]}")
    ref_scores = np.array([r.score for r in reference], np.float64)
    cand_scores = np.array([c.score for c in candidate], np.float64)
    max_abs = float(np.max(np.abs(ref_maps - cand_maps)))
    scale = float(np.max(np.abs(ref_maps)))
    out = {
        "n_frames": len(reference),
        "precision": precision,
        "amap_max_abs_diff": max_abs,
        "amap_rel_max_abs_diff": max_abs / scale if scale > 0 else max_abs,
        "amap_pearson": pearson(ref_maps, cand_maps),
        "amap_pearson_min_frame": min(pearson(r, c) for r, c in zip(ref_maps, cand_maps)),
        "score_max_abs_diff": float(np.max(np.abs(ref_scores - cand_scores))),
        "score_spearman": spearman(ref_scores, cand_scores) if len(reference) > 1 else 1.0,
        "tolerances": tol,
    }
    failures = [f"{name} {out[name]:.6g} below {bound}" for name, bound in tol.items()
                if name != "amap_rel_max_abs_diff" and out[name] < bound]
    if out["amap_rel_max_abs_diff"] > tol["amap_rel_max_abs_diff"]:
        failures.append(f"amap_rel_max_abs_diff {out['amap_rel_max_abs_diff']:.3g} above "
                        f"{tol['amap_rel_max_abs_diff']}")
    if thresholds and thresholds.get("image") is not None:
        t = float(thresholds["image"])
        mismatches = int(np.sum((ref_scores > t) != (cand_scores > t)))
        out["decisions"] = {"checked": True, "image_threshold": t, "mismatches": mismatches}
        if thresholds.get("pixel") is not None:
            tp = float(thresholds["pixel"])
            out["decisions"]["pixel_mismatch_fraction"] = float(np.mean((ref_maps > tp) != (cand_maps > tp)))
        if mismatches:
            failures.append(f"{mismatches} of {len(reference)} frames decided differently at threshold {t:.6g}")
    else:
        out["decisions"] = {"checked": False,
                            "note": "bundle is uncalibrated (run edge-calibrate): decision check skipped"}
    out["passed"] = not failures
    if failures:
        out["failures"] = failures
    return out


def run_parity(reference: Detector, candidate: Detector, frames: list[tuple[np.ndarray, np.ndarray | None]],
               precision: str = "fp32", thresholds: dict | None = None) -> dict:
    """Run both detectors on ``frames`` [(rgb, xyz)] and ``compare_results``; adds the two
    backend names."""
    ref = [reference.infer(reference.preprocess(rgb, xyz)) for rgb, xyz in frames]
    cand = [candidate.infer(candidate.preprocess(rgb, xyz)) for rgb, xyz in frames]
    out = compare_results(ref, cand, precision=precision, thresholds=thresholds)
    out["reference"] = reference.name
    out["candidate"] = candidate.name
    return out


def format_parity(label: str, p: dict) -> str:
    """One human line per parity result, e.g. for edge-deploy's console output."""
    dec = p["decisions"]
    dec_text = (f"decisions: {dec['mismatches']} mismatches at t={dec['image_threshold']:.4g}"
                if dec["checked"] else "decisions: not checked (uncalibrated)")
    return (f"{label}: {'PASS' if p['passed'] else 'FAIL'} on {p['n_frames']} frames  "
            f"map max|d|={p['amap_max_abs_diff']:.3g} (rel {p['amap_rel_max_abs_diff']:.2g}) "
            f"pearson={p['amap_pearson']:.6f} (worst frame {p['amap_pearson_min_frame']:.6f})  "
            f"score spearman={p['score_spearman']:.4f} max|d|={p['score_max_abs_diff']:.3g}  {dec_text}"
            + ("" if p["passed"] else "  FAILED: " + "; ".join(p["failures"])))
