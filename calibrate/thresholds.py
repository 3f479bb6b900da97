"""Decision thresholds and score normalisation from anomaly-free calibration data.

Decision rule (everywhere in the project): a frame / pixel is anomalous iff
``score > threshold``.

Quantile threshold at a target false-reject rate (FPR, the fraction of good parts
rejected). With ``n`` good calibration scores sorted ascending ``s_(1) <= ... <= s_(n)``
the threshold is the order statistic ``s_(k)`` with

    k = ceil((n + 1) * (1 - target_fpr))

This is the conservative (split-conformal) choice: for a new good score exchangeable
with the calibration scores, P(score > s_(k)) = (n + 1 - k) / (n + 1) <= target_fpr
(exactly, for continuous scores), whereas the plain empirical quantile s_(ceil(n(1-fpr)))
is biased upwards in false rejects by up to 1 / (n + 1). The achievable rates come in
steps of 1 / (n + 1): that step is reported as the threshold's *resolution*.

Refusal rule: the choice needs k <= n, i.e. n >= ceil(1 / target_fpr) - 1 good images
(99 at 1 %, 19 at 5 %); with fewer, the asked rate cannot be certified by the data and
``CalibrationError`` is raised rather than returning the maximum score.

The F1-optimal threshold (only when the split holds both good and defective images) is
reported beside the quantile threshold for information; it never replaces it.

Score normalisation: ``z = (score - threshold) / good_std`` so that 0 is the decision
threshold and one unit is one standard deviation of good scores.
"""

from __future__ import annotations

import math

import numpy as np


class CalibrationError(ValueError):
    """The calibration data cannot support the requested threshold (too few or degenerate)."""


def _check_fpr(target_fpr: float) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise CalibrationError(f"target false-reject rate must be in (0, 1), got {target_fpr}")


def min_good_count(target_fpr: float) -> int:
    """Smallest number of good samples for which ``order_statistic_rank`` exists at
    ``target_fpr`` (fraction in (0, 1)): ceil(1 / fpr) - 1, e.g. 99 at 0.01."""
    _check_fpr(target_fpr)
    n = max(1, math.ceil(1.0 / target_fpr - 1e-9) - 1)
    while _rank(n, target_fpr) > n:  # guards float rounding of 1 / fpr
        n += 1
    return n


def _rank(n: int, target_fpr: float) -> int:
    """k = ceil((n + 1)(1 - fpr)), with a 1e-9 guard so e.g. 100 * 0.99 stays 99."""
    return max(1, math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9))


def order_statistic_rank(n: int, target_fpr: float) -> int:
    """1-based rank k of the threshold among ``n`` ascending good scores (see module doc).
    Raises CalibrationError when n is too small for ``target_fpr``."""
    _check_fpr(target_fpr)
    k = _rank(n, target_fpr)
    if k > n:
        raise CalibrationError(
            f"{n} good samples cannot certify a false-reject rate of {target_fpr:g}: "
            f"need at least {min_good_count(target_fpr)} (rule n >= ceil(1/fpr) - 1); "
            f"add good images or ask for a rate >= {1.0 / (n + 1):.4g}")
    return k


def quantile_threshold(good_scores: np.ndarray, target_fpr: float) -> dict:
    """Conservative (1 - fpr) order-statistic threshold over ``good_scores`` (any shape,
    flattened; same units as the scores).

    Returns {"threshold", "n", "rank", "expected_fpr" = (n+1-k)/(n+1), "resolution" =
    1/(n+1), "empirical_fpr" = fraction of the given scores above the threshold}.
    """
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise CalibrationError("no good scores to calibrate on")
    if not np.all(np.isfinite(scores)):
        raise CalibrationError(f"{int(np.sum(~np.isfinite(scores)))} good scores are NaN or infinite")
    n = scores.size
    k = order_statistic_rank(n, target_fpr)
    threshold = float(np.partition(scores, k - 1)[k - 1])
    return {
        "threshold": threshold,
        "n": n,
        "rank": k,
        "expected_fpr": (n + 1 - k) / (n + 1),
        "resolution": 1.0 / (n + 1),
        "empirical_fpr": float(np.mean(scores > threshold)),
    }


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> dict | None:
    """Threshold maximising F1 of "defective" (label 1) under ``score > threshold``.

    scores: image scores; labels: 0 good / 1 defective, same length. Candidate thresholds
    are the distinct scores (plus one below the minimum, i.e. flag everything).
    Returns None when the split lacks either class (F1 is undefined or meaningless);
    otherwise {"threshold", "f1", "precision", "recall", "fpr", "n_good", "n_defect",
    "degenerate"}, where degenerate is True when the optimum flags every image or no image
    (the split then does not separate the classes and the figure means little).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise CalibrationError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    n_def, n_good = int(y.sum()), int((~y).sum())
    if n_def == 0 or n_good == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Thresholds just below each distinct score: flag everything >= that score.
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    precision = tp / (tp + fp)
    recall = tp / n_def
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    distinct = s_sorted[last_of_run]  # distinct scores, descending
    # score > threshold must flag exactly the scores >= distinct[best]: the next lower
    # distinct score, or one below the minimum when everything is flagged.
    threshold = float(distinct[best + 1] if best + 1 < distinct.size else distinct[best] - 1.0)
    n_flagged = int(tp[best] + fp[best])
    return {
        "threshold": threshold,
        "f1": float(f1[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "fpr": float(fp[best] / n_good),
        "n_good": n_good,
        "n_defect": n_def,
        "degenerate": bool(n_flagged in (0, s.size) or f1[best] == 0.0),
    }


def normalisation_entry(good_scores: np.ndarray, threshold: float) -> dict:
    """{"good_mean", "good_std", "threshold"} for ``normalise``: mean and (population)
    standard deviation of the good scores, in score units. Refuses a zero spread."""
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    std = float(scores.std())
    if not std > 0.0:
        raise CalibrationError("all good scores are identical: the model does not vary, cannot normalise")
    return {"good_mean": float(scores.mean()), "good_std": std, "threshold": float(threshold)}


def normalise(score, entry: dict):
    """Normalised score ``(score - threshold) / good_std`` (0 = decision threshold,
    1 = one good-score standard deviation above it). Works on floats and arrays."""
    return (score - entry["threshold"]) / entry["good_std"]
