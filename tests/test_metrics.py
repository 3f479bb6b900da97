"""Metrics against independent computations: scikit-learn, brute force, hand-made cases."""

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from edge_runtime.metrics import MetricError, aupro, image_auroc, pixel_auroc, pro_curve
from edge_runtime.report import evaluate, write_report


def brute_pro_curve(maps, gts):
    """Direct definition: for each distinct score t (descending), FPR and PRO of score >= t."""
    maps = np.asarray(maps, dtype=np.float64)
    gts = np.asarray(gts) > 0
    regions = []
    for m, g in zip(maps, gts):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [(m[lab == r]) for r in range(1, n + 1)]
    normal = maps[~gts]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append((normal >= t).mean())
        pros.append(np.mean([(r >= t).mean() for r in regions]))
    return np.array(fprs), np.array(pros)


def brute_aupro(maps, gts, limit):
    fpr, pro = brute_pro_curve(maps, gts)
    # dense integration by linear interpolation on a fine grid, independent of the library
    xs = np.linspace(0, limit, 200001)
    return float(np.trapezoid(np.interp(xs, fpr, pro), xs) / limit)


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(5, 60)
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    maps = rng.random((6, 16, 16))
    gts = np.zeros((6, 16, 16), bool)
    gts[2, 3:7, 4:9] = True
    gts[4, 10:12, 10:15] = True
    maps[gts] += 0.3
    assert pixel_auroc(maps, gts) == pytest.approx(roc_auc_score(gts.ravel(), maps.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("limit", [0.3, 0.01, 1.0])
def test_aupro_exact_matches_brute_force(seed, limit):
    rng = np.random.default_rng(seed)
    maps = np.round(rng.random((3, 12, 12)), 2)  # rounding creates ties
    gts = np.zeros((3, 12, 12), bool)
    gts[0, 2:5, 2:5] = True
    gts[0, 8, 8] = True  # a one-pixel region
    gts[1, 6:11, 1:3] = True
    gts[1, 0, 11] = True
    maps[gts] += rng.random() * 0.5
    assert aupro(maps, gts, fpr_limit=limit) == pytest.approx(brute_aupro(maps, gts, limit), abs=1e-5)


def test_pro_curve_points_match_brute_force():
    rng = np.random.default_rng(3)
    maps = np.round(rng.random((2, 9, 9)), 1)
    gts = np.zeros((2, 9, 9), bool)
    gts[0, 1:4, 1:4] = True
    gts[1, 5:9, 5:7] = True
    fpr, pro = pro_curve(maps, gts)
    bf, bp = brute_pro_curve(maps, gts)
    np.testing.assert_allclose(fpr, bf, atol=1e-12)
    np.testing.assert_allclose(pro, bp, atol=1e-12)


def test_aupro_regions_are_8_connected_and_weighted_equally():
    # two diagonal pixels form ONE region (8-connectivity); a separate big region
    gts = np.zeros((1, 10, 10), bool)
    gts[0, 0, 0] = gts[0, 1, 1] = True
    gts[0, 5:10, 5:10] = True
    maps = np.zeros((1, 10, 10))
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # the small region is fully found first
    # at FPR 0 the PRO is already 0.5 (one of two regions fully covered), not 2/27
    fpr, pro = pro_curve(maps, gts)
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)


def test_perfect_and_constant_maps():
    gts = np.zeros((2, 8, 8), bool)
    gts[1, 2:5, 2:5] = True
    perfect = gts.astype(float)
    assert aupro(perfect, gts, 0.3) == pytest.approx(1.0)
    assert pixel_auroc(perfect, gts) == pytest.approx(1.0)
    const = np.ones((2, 8, 8))
    # a constant map: one threshold takes everything at once; the curve is the diagonal
    assert aupro(const, gts, 0.3) == pytest.approx(0.15)
    assert pixel_auroc(const, gts) == pytest.approx(0.5)


def test_sampled_variant_is_close_at_30_and_coarse_at_1():
    rng = np.random.default_rng(5)
    maps = rng.random((10, 32, 32))
    gts = np.zeros((10, 32, 32), bool)
    gts[::2, 8:16, 8:16] = True
    maps[gts] += 0.4
    exact = aupro(maps, gts, 0.3)
    sampled = aupro(maps, gts, 0.3, num_thresholds=99)
    assert abs(exact - sampled) < 0.02
    assert 0.0 <= aupro(maps, gts, 0.01, num_thresholds=99) <= 1.0


def test_degenerate_inputs_raise_clear_errors():
    with pytest.raises(MetricError, match="only one class"):
        image_auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(MetricError, match="anomalous region"):
        aupro(np.random.rand(2, 4, 4), np.zeros((2, 4, 4)), 0.3)
    with pytest.raises(MetricError, match="differ in shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(MetricError, match="NaN"):
        image_auroc([np.nan, 1.0], [0, 1])
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2)), 0.0)


def test_report_keys_and_per_defect(tmp_path):
    rng = np.random.default_rng(0)
    n = 8
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    types = ["good"] * 4 + ["dent", "dent", "stain", "stain"]
    gts = np.zeros((n, 16, 16), bool)
    gts[4:, 4:8, 4:8] = True
    maps = rng.random((n, 16, 16)) + gts
    scores = maps.reshape(n, -1).max(1)
    out = tmp_path / "r.json"
    rep = write_report(out, "puck", "cfm", "tiny", scores, labels, maps, gts, types, extra={"fps": 3.0})
    on_disk = json.loads(out.read_text())
    assert on_disk == rep
    for key in ("category", "method", "variant", "i_auroc", "p_auroc", "aupro_30", "aupro_1",
                "n_good", "n_defect", "per_defect", "fps"):
        assert key in rep
    assert rep["n_good"] == 4 and rep["n_defect"] == 4
    assert set(rep["per_defect"]) == {"dent", "stain"}
    assert rep["per_defect"]["dent"]["n"] == 2
    assert rep["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)


def test_report_without_defects_marks_metrics_undefined():
    rep = evaluate("puck", "cfm", "tiny", [0.1, 0.2], [0, 0], np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), ["good", "good"])
    assert rep["i_auroc"] is None and rep["aupro_30"] is None
    assert any("i_auroc" in u for u in rep["undefined"])
