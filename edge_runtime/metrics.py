"""Anomaly-detection metrics of the MVTec 3D-AD evaluation (docs/methods.md, metrics).

* ``image_auroc(scores, labels)`` — ROC AUC of image scores (good = 0, defective = 1).
* ``pixel_auroc(maps, gts)`` — ROC AUC over every pixel of every test image.
* ``aupro(maps, gts, fpr_limit)`` — area under the per-region-overlap curve up to a
  false-positive rate, divided by that rate. Exact: every distinct score is a
  threshold. ``aupro(..., num_thresholds=99)`` gives the fixed-threshold variant of the
  MVTec/CFM scripts for comparison.

All three are vectorised (one sort of the scores); a test set of MVTec size (1197 maps
of 224 x 224) takes seconds on a laptop CPU.

Conventions: higher score = more anomalous; ``gts`` are masks where anything > 0 is
anomalous; ties are handled exactly (a ROC/PRO point is placed only after all pixels
sharing a score), which is what scikit-learn's ``roc_auc_score`` does too.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["image_auroc", "pixel_auroc", "aupro", "pro_curve", "MetricError"]


class MetricError(ValueError):
    """The input cannot define the metric (e.g. only one class present)."""


def _as_maps(maps, name: str) -> np.ndarray:
    arr = np.asarray(maps) if not isinstance(maps, (list, tuple)) else np.stack([np.asarray(m) for m in maps])
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise MetricError(f"{name} must be N x H x W (or a list of H x W maps), got shape {arr.shape}")
    return arr


def _check_pair(maps, gts) -> tuple[np.ndarray, np.ndarray]:
    maps = _as_maps(maps, "maps")
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float64)
    gts = _as_maps(gts, "gts") > 0
    if maps.shape != gts.shape:
        raise MetricError(f"maps {maps.shape} and gts {gts.shape} differ in shape")
    if not np.isfinite(maps).all():
        raise MetricError("maps contain NaN or Inf")
    return maps, gts


def _binary_auroc(scores: np.ndarray, positive: np.ndarray, what: str) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) statistic with average ranks for ties.

    One sort of all scores; each positive's average rank comes from two binary searches,
    so no argsort of the (possibly 60 M) pixels is needed.
    """
    scores = np.asarray(scores).ravel()
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    positive = np.asarray(positive, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise MetricError(f"{what}: {scores.size} scores but {positive.size} labels")
    if not np.isfinite(scores).all():
        raise MetricError(f"{what}: scores contain NaN or Inf")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(
            f"{what} is undefined with only one class present ({n_pos} anomalous, {n_neg} normal)"
        )
    s = np.sort(scores)
    pos = scores[positive]
    lo = np.searchsorted(s, pos, side="left")
    hi = np.searchsorted(s, pos, side="right")
    rank_sum_pos = float(np.sum((lo + hi + 1) / 2.0))  # 1-based average ranks
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def image_auroc(scores, labels) -> float:
    """ROC AUC of image scores; ``labels`` 1 = defective, 0 = good."""
    labels = np.asarray(labels)
    if labels.size and not np.isin(labels, (0, 1, True, False)).all():
        raise MetricError("image labels must be 0 (good) or 1 (defective)")
    return _binary_auroc(scores, labels.astype(bool), "I-AUROC")


def pixel_auroc(maps, gts) -> float:
    """ROC AUC over all pixels of all maps (``gts`` > 0 = anomalous)."""
    maps, gts = _check_pair(maps, gts)
    return _binary_auroc(maps, gts, "P-AUROC")


def _regions(gts: np.ndarray) -> tuple[np.ndarray, int]:
    """Global region id per pixel (0 = anomaly-free), 8-connected components per map."""
    ids = np.zeros(gts.shape, dtype=np.int32)
    n_total = 0
    for i, g in enumerate(gts):
        if not g.any():
            continue
        n, lab = cv2.connectedComponents(g.astype(np.uint8), connectivity=8)
        ids[i] = np.where(lab > 0, lab + n_total, 0)
        n_total += n - 1
    return ids, n_total


def pro_curve(maps, gts, num_thresholds: int | None = None, fpr_limit: float | None = None):
    """The PRO curve as arrays ``(fpr, pro)``, starting at (0, 0), FPR increasing.

    FPR(t) = share of all anomaly-free pixels with score > t; PRO(t) = mean over all gt
    regions (each weighted equally) of the share of the region's pixels with score > t.
    Exact (``num_thresholds=None``): a point after each distinct score. Otherwise
    ``num_thresholds`` thresholds evenly spaced from the highest to the lowest score
    (the MVTec/CFM script convention).

    ``fpr_limit`` lets the exact version skip the pixels it will never reach: only
    scores at or above the anomaly-free score at that FPR are sorted.
    """
    maps, gts = _check_pair(maps, gts)
    region, n_regions = _regions(gts)
    normal = region == 0
    n_normal = int(normal.sum())
    if n_regions == 0:
        raise MetricError("AUPRO is undefined without any anomalous region in gts")
    if n_normal == 0:
        raise MetricError("AUPRO is undefined without any anomaly-free pixel")

    flat_region = region.ravel()
    flat_scores = maps.ravel()
    sizes = np.bincount(flat_region, minlength=n_regions + 1).astype(np.float64)

    def pro_weights(reg: np.ndarray) -> np.ndarray:
        """Each anomalous pixel's share of the PRO sum: 1 / (region size * number of regions)."""
        return np.where(reg > 0, 1.0 / (sizes[reg] * n_regions), 0.0)

    if num_thresholds is not None:
        if num_thresholds < 2:
            raise MetricError("num_thresholds must be at least 2")
        thr = np.linspace(flat_scores.max(), flat_scores.min(), num_thresholds)
        normal_sorted = np.sort(flat_scores[normal.ravel()])
        fpr = (n_normal - np.searchsorted(normal_sorted, thr, side="right")) / n_normal
        anomalous = flat_region > 0
        a_scores = flat_scores[anomalous]
        order = np.argsort(a_scores)
        cum = np.r_[0.0, np.cumsum(pro_weights(flat_region[anomalous])[order])]
        pro = cum[-1] - cum[np.searchsorted(a_scores[order], thr, side="right")]
        return np.r_[0.0, fpr], np.r_[0.0, pro]

    if fpr_limit is not None and fpr_limit < 1.0:
        normal_scores = flat_scores[normal.ravel()]
        k = min(n_normal - 1, int(np.ceil(fpr_limit * n_normal)))
        # the (k+1)-th largest anomaly-free score: below it FPR already exceeds the limit,
        # so pixels scoring lower never change the curve up to the limit
        floor = np.partition(normal_scores, n_normal - 1 - k)[n_normal - 1 - k]
        keep = flat_scores >= floor
        s, reg = flat_scores[keep], flat_region[keep]
    else:
        s, reg = flat_scores, flat_region
    order = np.argsort(s)[::-1]
    s, reg = s[order], reg[order]
    fpr_c = np.cumsum(reg == 0) / n_normal
    pro_c = np.cumsum(pro_weights(reg))
    last_of_run = np.r_[s[1:] != s[:-1], True]
    return np.r_[0.0, fpr_c[last_of_run]], np.r_[0.0, pro_c[last_of_run]]


def _integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid integral of y(x) from 0 to ``limit`` (x increasing), interpolating at limit."""
    if x[-1] < limit:
        # the curve ends early only if every anomaly-free pixel was counted; extend flat
        x = np.r_[x, limit]
        y = np.r_[y, y[-1]]
    i = int(np.searchsorted(x, limit, side="left"))
    if x[i] == limit:
        xs, ys = x[: i + 1], y[: i + 1]
    else:
        y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        xs, ys = np.r_[x[:i], limit], np.r_[y[:i], y_lim]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(maps, gts, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve from FPR 0 to ``fpr_limit`` (result in [0, 1]).

    ``num_thresholds=None`` is exact; ``num_thresholds=99`` reproduces the MVTec/CFM
    scripts' sampled curve (at ``fpr_limit=0.01`` that rests on very few points).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, gts, num_thresholds=num_thresholds, fpr_limit=fpr_limit)
    return _integrate_to(fpr, pro, fpr_limit) / fpr_limit
