"""Evaluation plots (``edge-eval --plots DIR``): ROC, PRO up to 30 % FPR, score
histograms with the threshold, and the worst false accepts / false rejects.

matplotlib is an optional extra (``pip install matplotlib``), imported only when a
plot is written. Curves come from ``edge_runtime.metrics`` where it has them
(``pro_curve``, ``aupro``, ``image_auroc``); the image ROC curve is computed here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime import metrics
from edge_runtime.errors import DataError

PRO_FPR_LIMIT = 0.3
WORST_PER_KIND = 4  # images per row of the worst-cases grid
DPI = 110
FILES = ("eval_roc.png", "eval_pro.png", "eval_hist.png", "eval_worst.png")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("evaluation plots need matplotlib: pip install matplotlib (or the 'line' extra)") from None
    return plt


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` from (0, 0) to (1, 1), one point per distinct score."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, (~labels).sum())], np.r_[0.0, tp / max(1, labels.sum())]


def _check(scores, labels, maps, gts, threshold):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise DataError(None, f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise DataError(None, "labels must be 0 (good) or 1 (defective)")
    if not (labels == 0).any() or not (labels == 1).any():
        raise DataError(None, "plots need both good (0) and defective (1) parts")
    if not np.isfinite(scores).all():
        raise DataError(None, "scores must be finite")
    if threshold is not None and not np.isfinite(threshold):
        raise DataError(None, f"threshold must be finite or None, got {threshold}")
    if (maps is None) != (gts is None):
        raise DataError(None, "maps and gts go together (both or neither)")
    if maps is not None and (len(maps) != len(scores) or len(gts) != len(scores)):
        raise DataError(None, f"maps ({len(maps)}) and gts ({len(gts)}) need one per score ({len(scores)})")
    return scores, labels.astype(bool)


def write_eval_plots(out_dir, scores, labels, maps, gts, threshold, images=None) -> list[Path]:
    """Write the plot set into ``out_dir``; returns the files written.

    scores: image scores (N). labels: 1 = defective. maps / gts: N anomaly maps and
    ground-truth masks of one shape (None: no PRO plot, worst cases without maps).
    threshold: the image threshold (None: not drawn; worst cases then undefined).
    images: optional N uint8 H x W x 3 images shown under the maps.
    """
    scores, labels = _check(scores, labels, maps, gts, threshold)
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_roc(plt, out, scores, labels)]
    if maps is not None:
        pro = _pro(plt, out, np.asarray(maps, dtype=np.float32), np.asarray(gts) > 0)
        if pro is not None:
            written.append(pro)
    written.append(_hist(plt, out, scores, labels, threshold))
    if threshold is not None:
        written.append(_worst(plt, out, scores, labels, threshold, maps, images))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _roc(plt, out, scores, labels) -> Path:
    fpr, tpr = roc_curve(scores, labels)
    auroc = metrics.image_auroc(scores, labels.astype(int))
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(fpr, tpr, lw=2, label=f"I-AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate (good parts rejected)", ylabel="true positive rate (defects caught)",
           title="Image-level ROC", xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    ax.legend(loc="lower right")
    return _save(plt, fig, out / FILES[0])


def _pro(plt, out, maps, gts) -> Path | None:
    if not gts.any():
        return None  # PRO is undefined without any defect pixel
    fpr, pro = metrics.pro_curve(maps, gts, fpr_limit=PRO_FPR_LIMIT)
    keep = fpr <= PRO_FPR_LIMIT
    value = metrics.aupro(maps, gts, fpr_limit=PRO_FPR_LIMIT)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(fpr[keep], pro[keep], lw=2, label=f"AUPRO@30% {value:.3f}")
    ax.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title="PRO curve (FPR <= 30 %)",
           xlim=(0, PRO_FPR_LIMIT), ylim=(0, 1.02))  # fmt: skip
    ax.legend(loc="lower right")
    return _save(plt, fig, out / FILES[1])


def _hist(plt, out, scores, labels, threshold) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(scores.min(), scores.max(), 30) if scores.max() > scores.min() else 10
    ax.hist(scores[~labels], bins=bins, alpha=0.6, label=f"good ({(~labels).sum()})", color="tab:green")
    ax.hist(scores[labels], bins=bins, alpha=0.6, label=f"defective ({labels.sum()})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=2, ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="parts", title="Scores of good vs defective parts")
    ax.legend()
    return _save(plt, fig, out / FILES[2])


def _worst(plt, out, scores, labels, threshold, maps, images) -> Path:
    """Top row: defective parts accepted (lowest scores first); bottom: good parts
    rejected (highest first). Each cell: the image (if any) with the map over it."""
    fa = [i for i in np.argsort(scores) if labels[i] and scores[i] <= threshold][:WORST_PER_KIND]
    fr = [i for i in np.argsort(-scores) if not labels[i] and scores[i] > threshold][:WORST_PER_KIND]
    fig, axes = plt.subplots(2, WORST_PER_KIND, figsize=(2.6 * WORST_PER_KIND, 5.6), squeeze=False)
    for row, (name, idx) in enumerate((("false accept", fa), ("false reject", fr))):
        for col in range(WORST_PER_KIND):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(idx):
                if col == 0:
                    ax.text(0.5, 0.5, f"no {name}s", ha="center", va="center", transform=ax.transAxes)
                continue
            i = idx[col]
            if images is not None:
                ax.imshow(np.asarray(images[i]))
            if maps is not None:
                m = np.asarray(maps[i])
                h, w = np.asarray(images[i]).shape[:2] if images is not None else m.shape
                ax.imshow(m, cmap="jet", alpha=0.5 if images is not None else 1.0, extent=(0, w, h, 0),
                          vmin=0, vmax=max(float(m.max()), 1e-12))  # fmt: skip
            ax.set_title(f"{name} #{i}\nscore {scores[i]:.4g}", fontsize=9)
    fig.suptitle(f"Worst cases at threshold {threshold:.4g}")
    return _save(plt, fig, out / FILES[3])
