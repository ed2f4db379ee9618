"""Tests for metrics.py: CONTRACT metrics, the clinical fields on hand-built error vectors
(edges included), the subject bootstrap and the final_metrics.json split block."""
import json

import numpy as np
import pytest

import metrics

TRUE = np.array([100.0, 110.0, 120.0, 130.0])


def errors_to_arrays(errors, base=120.0):
    """Truth and prediction whose difference is exactly ``errors`` (integers stay exact)."""
    e = np.asarray(errors, dtype=np.float64)
    return np.full_like(e, base), base + e


# ----------------------------------------------------------------------------- CONTRACT metrics
def test_target_metrics_match_hand_computation():
    p = np.array([102.0, 108.0, 125.0, 129.0])
    m = metrics.target_metrics(TRUE, p)
    e = np.array([2.0, -2.0, 5.0, -1.0])
    assert m["mae"] == pytest.approx(2.5)
    assert m["rmse"] == pytest.approx(np.sqrt(34 / 4))
    assert m["me"] == pytest.approx(1.0)
    assert m["sd"] == pytest.approx(np.sqrt(np.sum((e - 1.0) ** 2) / 3))
    assert m["r2"] == pytest.approx(1 - 34 / 500)
    assert m["pearson"] == pytest.approx(np.corrcoef(TRUE, p)[0, 1])


def test_target_metrics_constant_inputs_are_finite():
    m = metrics.target_metrics(np.array([5.0, 5.0]), np.array([4.0, 6.0]))
    assert m["pearson"] == 0.0 and m["r2"] == 0.0
    assert metrics.target_metrics(np.array([1.0]), np.array([2.0]))["sd"] == 0.0


def test_regression_metrics_mean_averages_targets():
    t = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    p = t + np.array([[1.0, 2.0], [1.0, 2.0], [-1.0, 2.0]])
    out = metrics.regression_metrics(t, p, ["a", "b"])
    assert out["per_target"]["a"]["mae"] == pytest.approx(1.0)
    assert out["per_target"]["b"]["mae"] == pytest.approx(2.0)
    assert out["mean"]["mae"] == pytest.approx(1.5)
    assert set(out["mean"]) == {"mae", "rmse", "pearson", "r2"}
    assert list(out["per_target"]["a"]) == list(
        metrics.METRIC_KEYS + metrics.BLAND_ALTMAN_KEYS + metrics.CLINICAL_KEYS)


@pytest.mark.parametrize("true,pred", [([1.0, np.nan], [1.0, 2.0]), ([1.0], [np.inf]),
                                       ([], []), ([1.0, 2.0], [1.0])])
def test_target_metrics_refuse_non_finite_empty_or_mismatched(true, pred):
    with pytest.raises(ValueError):
        metrics.target_metrics(np.array(true), np.array(pred))


# ----------------------------------------------------------------------------- within k mmHg
def test_within_counts_the_limit_itself():
    # |e| <= 5: 0, 5, -5 | <= 10: + 5.5, 10, -10 | <= 15: + 12, 15, -15 | 20 never
    t, p = errors_to_arrays([0, 5, -5, 5.5, 10, -10, 12, 15, -15, 20])
    m = metrics.target_metrics(t, p)
    assert (m["within_5"], m["within_10"], m["within_15"]) == (0.3, 0.6, 0.9)


def test_within_absorbs_float_rounding_but_not_real_excess():
    assert 128.3 - 123.3 > 5.0  # 5.000000000000014: a 5 mmHg error as floats see it
    assert metrics.within(np.array([128.3 - 123.3, 123.3 - 128.3, -5.0]), 5) == 1.0
    assert metrics.within(np.array([5.001, -5.001, 4.999]), 5) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- BHS
@pytest.mark.parametrize("shares,grade", [
    ((0.60, 0.85, 0.95), "A"),       # exactly on every A threshold
    ((0.599, 0.85, 0.95), "B"),      # just below A on 5 mmHg
    ((0.50, 0.75, 0.90), "B"),
    ((0.90, 0.90, 0.94), "B"),       # A fails on 15 mmHg only: all three must hold
    ((0.40, 0.65, 0.85), "C"),
    ((0.70, 0.60, 0.99), "D"),       # 10 mmHg below every grade's threshold
    ((0.39, 0.99, 0.99), "D"),
])
def test_bhs_grade_thresholds_are_inclusive_and_cumulative(shares, grade):
    assert metrics.bhs_grade(*shares) == grade


def test_bhs_grade_from_errors_at_exactly_60_85_95_percent():
    # 20 records: 12 within 5 (60 %), 17 within 10 (85 %), 19 within 15 (95 %)
    errors = [5] * 12 + [-10] * 5 + [15] * 2 + [16]
    m = metrics.target_metrics(*errors_to_arrays(errors))
    assert (m["within_5"], m["within_10"], m["within_15"]) == (0.6, 0.85, 0.95)
    assert m["bhs_grade"] == "A"
    errors[0] = 6  # 55 % within 5
    assert metrics.target_metrics(*errors_to_arrays(errors))["bhs_grade"] == "B"


# ----------------------------------------------------------------------------- AAMI, IEEE 1708
def test_aami_pass_at_exactly_me_5_and_sd_8():
    # e = 5 + 8 z with z = (-1, 0, 1): ME 5, SD (ddof=1) 8 exactly
    m = metrics.target_metrics(*errors_to_arrays([-3.0, 5.0, 13.0]))
    assert (m["me"], m["sd"], m["aami_pass"]) == (5.0, 8.0, True)
    assert metrics.target_metrics(*errors_to_arrays([-7.0, -5.0, -3.0]))["aami_pass"] is True
    assert metrics.target_metrics(*errors_to_arrays([-3.1, 5.0, 13.1]))["aami_pass"] is False
    assert metrics.target_metrics(*errors_to_arrays([-2.9, 5.1, 13.1]))["aami_pass"] is False


@pytest.mark.parametrize("mae,grade", [(0.0, "A"), (5.0, "A"), (5.01, "B"), (6.0, "B"),
                                       (6.5, "C"), (7.0, "C"), (7.01, "D"), (30.0, "D")])
def test_ieee1708_grade_limits_are_inclusive(mae, grade):
    assert metrics.ieee1708_grade(mae) == grade


def test_ieee1708_grade_from_errors():
    assert metrics.target_metrics(*errors_to_arrays([5, -5, 5, -5]))["ieee1708_grade"] == "A"
    assert metrics.target_metrics(*errors_to_arrays([7, -7, 7, -8]))["ieee1708_grade"] == "D"


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_resamples_subjects_not_records():
    # subject a: 9 records with error 0; subject b: 1 record with error 10. Drawing 2
    # subjects gives MAE 0 (a, a: p = 1/4), 1 (a, b: 1/2) or 10 (b, b: 1/4), so the 2.5 and
    # 97.5 percentiles are 0 and 10; resampling records would give a narrow interval.
    abs_err = np.array([0.0] * 9 + [10.0])[:, None]
    subjects = ["a"] * 9 + ["b"]
    lo, hi = metrics.bootstrap_mae_ci(abs_err, subjects, n_boot=1000, seed=0)[0]
    assert (lo, hi) == (0.0, 10.0)


def test_bootstrap_equals_a_plain_loop_over_resampled_subjects():
    rng = np.random.default_rng(5)
    subjects = rng.integers(0, 7, size=40).astype(str)
    abs_err = rng.random((40, 2)) * 10
    names = np.unique(subjects)
    draws = np.random.default_rng(3).integers(0, len(names), size=(200, len(names)),
                                              dtype=np.int32)
    maes = []
    for row in draws:
        idx = np.concatenate([np.flatnonzero(subjects == names[i]) for i in row])
        maes.append(abs_err[idx].mean(axis=0))
    expected = np.percentile(maes, [2.5, 97.5], axis=0).T
    got = metrics.bootstrap_mae_ci(abs_err, subjects, n_boot=200, seed=3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bootstrap_is_seeded_order_free_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    subjects = rng.integers(0, 50, size=300).astype(str)
    abs_err = np.abs(rng.normal(0, 8, size=(300, 3)))
    ci = metrics.bootstrap_mae_ci(abs_err, subjects, seed=11)
    perm = rng.permutation(300)
    np.testing.assert_allclose(ci, metrics.bootstrap_mae_ci(abs_err[perm], subjects[perm],
                                                            seed=11), rtol=1e-12)
    assert not np.array_equal(ci, metrics.bootstrap_mae_ci(abs_err, subjects, seed=12))
    mae = abs_err.mean(axis=0)
    assert np.all(ci[:, 0] < mae) and np.all(mae < ci[:, 1])
    assert np.all(ci[:, 1] - ci[:, 0] < 2.0)


def test_bootstrap_of_one_subject_is_the_point_estimate():
    abs_err = np.array([[1.0, 2.0], [3.0, 5.0], [2.3, 0.1]])
    ci = metrics.bootstrap_mae_ci(abs_err, ["s"] * 3)
    np.testing.assert_array_equal(ci, np.repeat(abs_err.mean(axis=0)[:, None], 2, axis=1))


# ----------------------------------------------------------------------------- split block
def test_split_metrics_block_layout_mase_and_baseline():
    t = np.stack([TRUE, TRUE + 10], axis=1)
    p = t + np.array([[2.0, 1.0], [-2.0, 1.0], [5.0, 1.0], [-1.0, 1.0]])
    train_mean = [115.0, 120.0]  # baseline errors: (15, 5, -5, -15) and (10, 0, -10, -20)
    block = metrics.split_metrics(t, p, ["s1", "s1", "s2", "s3"], ["sbp", "dbp"], train_mean,
                                  n_boot=1000, seed=0)
    assert (block["n_records"], block["n_subjects"]) == (4, 3)
    assert list(block) == ["n_records", "n_subjects", "per_target", "mean", "baseline",
                           "bootstrap"]
    sbp, base = block["per_target"]["sbp"], block["baseline"]["per_target"]["sbp"]
    assert (sbp["mae"], base["mae"]) == (2.5, 10.0)
    assert sbp["mase"] == 0.25
    assert block["per_target"]["dbp"]["mase"] == pytest.approx(1.0 / 10.0)
    assert block["mean"]["mase"] == pytest.approx((0.25 + 0.1) / 2)
    assert base["pearson"] == 0.0 and base["me"] == pytest.approx(0.0)
    assert (base["within_5"], base["within_10"], base["within_15"]) == (0.5, 0.5, 1.0)
    assert (base["bhs_grade"], base["aami_pass"], base["ieee1708_grade"]) == ("D", False, "D")
    assert set(block["baseline"]["mean"]) == set(metrics.MEAN_KEYS)
    assert "mase" not in base
    lo, hi = sbp["mae_ci95"]
    assert lo <= sbp["mae"] <= hi and base["mae_ci95"][0] <= 10.0 <= base["mae_ci95"][1]
    assert block["bootstrap"] == {"resamples": 1000, "seed": 0, "unit": "subject"}
    assert block == metrics.split_metrics(t, p, ["s1", "s1", "s2", "s3"], ["sbp", "dbp"],
                                          train_mean)


def test_split_metrics_of_one_record_is_json_safe():
    block = metrics.split_metrics(np.array([[120.0]]), np.array([[125.0]]), ["s"], ["sbp"],
                                  [120.0])
    m = block["per_target"]["sbp"]
    assert (m["sd"], m["within_5"], m["aami_pass"], m["mae_ci95"]) == (0.0, 1.0, True, [5.0, 5.0])
    assert m["mase"] is None  # the baseline is exact: MAE 0, no ratio
    assert block["mean"]["mase"] is None
    text = json.dumps(block, allow_nan=False)
    assert json.loads(text) == block


def test_split_metrics_refuse_mismatched_subjects():
    with pytest.raises(ValueError, match="2 subjects for 1 records"):
        metrics.split_metrics(np.array([[120.0]]), np.array([[125.0]]), ["a", "b"], ["sbp"],
                              [120.0])


def test_constant_predictor_has_pearson_exactly_zero():
    # a constant column's float64 SD can come out as 1e-14 rather than 0 (the mean is
    # rounded); the rule "0.0 when either side is constant" must hold exactly anyway
    t = np.array([101.0, 87.5, 93.25, 120.0, 99.0, 110.5, 95.0])
    p = np.full_like(t, 123.3)
    assert metrics.target_metrics(t, p)["pearson"] == 0.0
    assert metrics.target_metrics(p, t)["pearson"] == 0.0


def test_proportional_bias_is_the_least_squares_line_of_error_on_mean():
    t = np.array([100.0, 110.0, 120.0, 130.0, 140.0])
    p = 0.8 * t + 25.0  # under-predicts high pressures: error = 25 - 0.2 t
    m = metrics.target_metrics(t, p)
    mean, err = (t + p) / 2, p - t
    slope, intercept = np.polyfit(mean, err, 1)
    assert m["ba_slope"] == pytest.approx(slope, rel=1e-12)
    assert m["ba_intercept"] == pytest.approx(intercept, rel=1e-12)
    # error = 25 - 0.2 t and mean = 0.9 t + 12.5, so error = 25 - 0.2 (mean - 12.5) / 0.9
    assert m["ba_slope"] == pytest.approx(-0.2 / 0.9, rel=1e-12)
    flat = metrics.target_metrics(np.array([100.0, 110.0]), np.array([110.0, 100.0]))
    assert (flat["ba_slope"], flat["ba_intercept"]) == (0.0, 0.0)


def test_one_point_calibration_by_hand():
    # rows deliberately out of order: the order column, not the row order, picks the
    # calibration record (A: order 1, B: order 5); C has one record and is left out
    rows = [("A", 3, 125.0, 118.0), ("B", 6, 104.0, 101.0), ("A", 1, 120.0, 110.0),
            ("C", 1, 140.0, 135.0), ("A", 2, 130.0, 128.0), ("B", 5, 100.0, 103.0)]
    subj, order, t, p = (np.array(c) for c in zip(*rows))
    block = metrics.calibrated_block(t[:, None], p[:, None], subj, order, ["sbp"], n_boot=50)
    # A: offset 120 - 110 = +10 -> errors (128 - 125, 138 - 130) = 3, 8; B: offset -3 -> -6
    m = block["per_target"]["sbp"]
    assert (block["n_records"], block["n_subjects"]) == (3, 2)
    assert (block["n_calibration_records"], block["n_subjects_left_out"]) == (2, 1)
    assert m["mae"] == pytest.approx(17 / 3) and m["me"] == pytest.approx(5 / 3)
    # the calibrated baseline predicts the calibration record's own truth: -5, -10, -4
    base = block["baseline"]["per_target"]["sbp"]
    assert base["mae"] == pytest.approx(19 / 3) and base["me"] == pytest.approx(-19 / 3)
    assert m["mase"] == pytest.approx(17 / 19)
    assert metrics.calibrated_block(t[:2, None], p[:2, None], ["A", "B"], [1, 1], ["sbp"]) is None
