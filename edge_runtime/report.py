"""Evaluation report: the JSON every method's ``edge-eval`` writes for one category.

```
{"category", "method", "variant", "i_auroc", "p_auroc", "aupro_30", "aupro_1",
 "n_good", "n_defect", "per_defect": {type: {"i_auroc", "p_auroc", "aupro_30", "n"}}, ...extra}
```

``per_defect[type]`` compares that defect type's images against all good images.
A metric that the data cannot define (e.g. no defective image) is ``null`` and the
reason is listed under ``"undefined"``, instead of a crash or a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_runtime.outputs import write_json
from edge_runtime.metrics import MetricError, aupro, image_auroc, pixel_auroc

__all__ = ["evaluate", "write_report"]


def _metric(fn, undefined: list[str], label: str, *args, **kwargs) -> float | None:
    try:
        value = fn(*args, **kwargs)
    except MetricError as exc:
        undefined.append(f"{label}: {exc}")
        return None
    return None if math.isnan(value) else round(float(value), 6)


def _pixel_metrics(maps, gts, undefined: list[str], prefix: str) -> dict:
    if maps is None or gts is None:
        return {"p_auroc": None, "aupro_30": None, "aupro_1": None}
    return {
        "p_auroc": _metric(pixel_auroc, undefined, f"{prefix}p_auroc", maps, gts),
        "aupro_30": _metric(aupro, undefined, f"{prefix}aupro_30", maps, gts, fpr_limit=0.3),
        "aupro_1": _metric(aupro, undefined, f"{prefix}aupro_1", maps, gts, fpr_limit=0.01),
    }


def evaluate(
    category: str,
    method: str,
    variant: str,
    scores: Sequence[float],
    labels: Sequence[int],
    maps: np.ndarray | None,
    gts: np.ndarray | None,
    defect_types: Sequence[str],
    extra: dict | None = None,
) -> dict:
    """Compute the report dict (no I/O). ``maps``/``gts``: N x H x W (or None for image-only)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    types = np.asarray(list(defect_types), dtype=object)
    if not (scores.shape[0] == labels.shape[0] == types.shape[0]):
        raise ValueError(
            f"report: {scores.shape[0]} scores, {labels.shape[0]} labels, {types.shape[0]} defect types"
        )
    if maps is not None:
        maps = np.asarray(maps)
        gts = np.asarray(gts)
        if maps.shape[0] != scores.shape[0]:
            raise ValueError(f"report: {maps.shape[0]} maps for {scores.shape[0]} scores")
    undefined: list[str] = []
    report = {
        "category": category,
        "method": method,
        "variant": variant,
        "i_auroc": _metric(image_auroc, undefined, "i_auroc", scores, labels),
        **_pixel_metrics(maps, gts, undefined, ""),
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "per_defect": {},
    }
    good = labels == 0
    for dtype in sorted({str(t) for t in types[labels == 1]}):
        sel = good | (types == dtype)
        sub_maps = maps[sel] if maps is not None else None
        sub_gts = gts[sel] if gts is not None else None
        report["per_defect"][dtype] = {
            "i_auroc": _metric(image_auroc, undefined, f"{dtype}.i_auroc", scores[sel], labels[sel]),
            **_pixel_metrics(sub_maps, sub_gts, undefined, f"{dtype}."),
            "n": int((types == dtype).sum()),
        }
    if undefined:
        report["undefined"] = undefined
    if extra:
        report.update(extra)
    return report


def write_report(
    path: str | Path | None,
    category: str,
    method: str,
    variant: str,
    scores: Sequence[float],
    labels: Sequence[int],
    maps: np.ndarray | None,
    gts: np.ndarray | None,
    defect_types: Sequence[str],
    extra: dict | None = None,
) -> dict:
    """Compute the report and write it as JSON to ``path`` ("-" = stdout, None = don't write)."""
    report = evaluate(category, method, variant, scores, labels, maps, gts, defect_types, extra)
    write_json(path, report)
    return report
