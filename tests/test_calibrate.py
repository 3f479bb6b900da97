"""Calibration: quantile thresholds meet the asked false-reject rate, refusal, F1, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.thresholds import (
    CalibrationError,
    f1_optimal_threshold,
    min_good_count,
    normalisation_entry,
    normalise,
    order_statistic_rank,
    quantile_threshold,
)


def test_rank_and_minimum_count():
    assert min_good_count(0.01) == 99
    assert min_good_count(0.05) == 19
    assert min_good_count(0.5) == 1
    assert order_statistic_rank(99, 0.01) == 99  # the maximum, expected FPR 1/100
    assert order_statistic_rank(199, 0.01) == 198
    with pytest.raises(CalibrationError, match="need at least 99"):
        order_statistic_rank(98, 0.01)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_meets_target_fpr_on_held_back_good(fpr):
    """Average over many calibration draws: held-back false rejects <= target within
    sampling error (conformal guarantee: E[FPR] = (n+1-k)/(n+1) <= fpr)."""
    rng = np.random.default_rng(0)
    n_cal, n_hold, reps = 400, 4000, 200
    rates, expected = [], []
    for _ in range(reps):
        cal = rng.gamma(2.0, 1.0, n_cal)
        hold = rng.gamma(2.0, 1.0, n_hold)
        t = quantile_threshold(cal, fpr)
        rates.append(np.mean(hold > t["threshold"]))
        expected.append(t["expected_fpr"])
    mean_rate = float(np.mean(rates))
    # Var of the conditional FPR is Beta-like ~ fpr(1-fpr)/n_cal; averaged over reps.
    se = np.sqrt(fpr * (1 - fpr) / n_cal / reps + fpr * (1 - fpr) / n_hold / reps)
    assert mean_rate <= fpr + 3 * se
    assert mean_rate == pytest.approx(expected[0], abs=4 * se)
    assert expected[0] <= fpr


def test_threshold_fields_and_conservative_choice():
    scores = np.arange(1.0, 101.0)  # 100 good scores 1..100
    t = quantile_threshold(scores, 0.05)
    # k = ceil(101 * 0.95) = 96 -> threshold 96, 4 scores above it
    assert t["rank"] == 96 and t["threshold"] == 96.0
    assert t["empirical_fpr"] == pytest.approx(0.04)
    assert t["resolution"] == pytest.approx(1 / 101)
    assert t["expected_fpr"] == pytest.approx(5 / 101)


def test_refuses_too_few_images_and_bad_scores():
    with pytest.raises(CalibrationError, match="cannot certify"):
        quantile_threshold(np.ones(10), 0.01)
    with pytest.raises(CalibrationError, match="NaN"):
        quantile_threshold(np.r_[np.ones(200), np.nan], 0.05)
    with pytest.raises(CalibrationError, match="in \\(0, 1\\)"):
        quantile_threshold(np.ones(200), 0.0)
    with pytest.raises(CalibrationError, match="identical"):
        normalisation_entry(np.ones(50), 1.0)


def test_f1_optimal_threshold():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9, 0.4])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    f1 = f1_optimal_threshold(scores, labels)
    # best: flag {0.8, 0.9, 0.4} -> threshold is the next lower score 0.35
    assert f1["threshold"] == pytest.approx(0.35)
    assert f1["f1"] == pytest.approx(1.0) and f1["recall"] == 1.0 and f1["fpr"] == 0.0
    assert not f1["degenerate"]
    assert np.all((scores > f1["threshold"]) == labels.astype(bool))


def test_f1_absent_or_degenerate():
    assert f1_optimal_threshold(np.array([0.1, 0.2]), np.array([0, 0])) is None
    assert f1_optimal_threshold(np.array([0.1, 0.2]), np.array([1, 1])) is None
    # inseparable: defects score below every good -> the optimum flags everything
    f1 = f1_optimal_threshold(np.array([0.9, 0.8, 0.1]), np.array([0, 0, 1]))
    assert f1["degenerate"] and f1["threshold"] < 0.1


def test_normalise_zero_is_threshold():
    good = np.random.default_rng(1).normal(2.0, 0.5, 500)
    t = quantile_threshold(good, 0.05)["threshold"]
    entry = normalisation_entry(good, t)
    assert normalise(t, entry) == 0.0
    assert normalise(t + entry["good_std"], entry) == pytest.approx(1.0)
    assert entry["good_mean"] == pytest.approx(2.0, abs=0.1)


# ----------------------------------------------------------------------------- edge-calibrate CLI


@pytest.fixture(scope="module")
def cal_setup(tmp_path_factory):
    """A tiny random-weight bundle and a 64 px synthetic-station dataset (category "puck"):
    6 good validation images; test: 4 good, 5 defective."""
    import torch

    from tests.conftest import save_cfm_bundle
    from edge_runtime.methods.cfm.model import CFMModel, cfm_config
    from edge_runtime.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("cal")
    torch.manual_seed(0)
    model = CFMModel(cfm_config("tiny", resolution=64, mapper_resolution=32, num_groups=32, group_size=16))
    bundle = save_cfm_bundle(root / "bundle", model, {"preprocessing": {"clean": True}})
    generate_dataset(root / "data", size=64, categories=["puck"], n_train=1, n_val=6, n_test_good=4,
                     n_test_defect=1)
    return bundle, root / "data"


def test_cli_writes_thresholds(cal_setup, tmp_path):
    import json

    from calibrate import cli
    from edge_runtime.bundle import load_bundle

    bundle, data = cal_setup
    out = tmp_path / "cal.json"
    code = cli.main(["--model", str(bundle), "--data", str(data), "--category", "puck",
                     "--target-fpr", "0.2", "--quiet", "--json", str(out)])
    assert code == 0
    t = load_bundle(bundle).manifest["thresholds"]
    assert t == json.loads(out.read_text())["thresholds"]
    assert t["method"] == "quantile" and t["n_images"] == 6 and t["split"] == "validation"
    assert t["rank"] == 6 and t["expected_fpr"] == pytest.approx(1 / 7)  # k = ceil(7 * 0.8) = 6
    assert t["f1_optimal"] is None and t["defect_recall_at_threshold"] is None
    n = load_bundle(bundle).manifest["normalisation"]
    assert n["image"]["threshold"] == t["image"] and n["image"]["good_std"] > 0
    assert n["pixel"]["threshold"] == t["pixel"] and t["n_pixels"] > 0


def test_cli_test_split_reports_f1_but_keeps_quantile(cal_setup, capsys):
    from calibrate import cli
    from edge_runtime.bundle import load_bundle

    bundle, data = cal_setup
    assert cli.main(["--model", str(bundle), "--data", str(data), "--category", "puck", "--split", "test",
                     "--target-fpr", "0.25", "--quiet"]) == 0
    t = load_bundle(bundle).manifest["thresholds"]
    assert t["n_images"] == 4 and t["n_defective_images"] == 5
    assert t["f1_optimal"] is not None and t["f1_optimal"]["n_defect"] == 5
    assert "NOT used for decisions" in capsys.readouterr().out
    # the decision threshold stays the quantile one: ceil(5 * 0.75) = 4 -> max of the 4 good scores
    assert t["method"] == "quantile" and t["rank"] == 4 and t["empirical_fpr"] == 0.0


def test_cli_refuses_too_few_good_images_before_scoring(cal_setup, capsys):
    from calibrate import cli

    bundle, data = cal_setup
    assert cli.main(["--model", str(bundle), "--data", str(data), "--category", "puck", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "6 good samples cannot certify a false-reject rate of 0.01" in err and "need at least 99" in err
