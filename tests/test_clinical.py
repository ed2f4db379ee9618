"""Cuffless-BP evaluation in metrics.py (issue 22): BP-range bands, regression to the mean,
ISO 81060-2:2018 criterion 2 and the population audit, subject-wise split-conformal
intervals, tracking of within-subject changes, subject-level, subgroup and recalibration
blocks, each on hand-made arrays with a known answer."""
import numpy as np
import pytest

import metrics

# ISO 81060-2:2018, table of criterion 2: mean error -> largest SD of the subject means
ISO_TABLE = {0.0: 6.95, 0.5: 6.93, 1.0: 6.87, 1.5: 6.78, 2.0: 6.65, 2.5: 6.47, 3.0: 6.25,
             3.5: 5.97, 4.0: 5.64, 4.5: 5.24, 5.0: 4.79}


# ----------------------------------------------------------------------------- bands
@pytest.mark.parametrize("name, expected", [
    ("right_arm_sbp", "sbp"), ("left_arm_DBP", "dbp"), ("left_arm_mbp", "mbp"),
    ("right_arm_pp", "pp"), ("sbp", "sbp"), ("heart_rate", None)])
def test_band_set_follows_the_target_name(name, expected):
    assert metrics.band_set(name) == expected


def test_band_edges_are_lower_inclusive():
    edges = metrics.BAND_EDGES["sbp"]
    assert metrics.band_labels(edges) == ["<100", "100-120", "120-130", "130-140", "140-160",
                                          "160-180", ">=180"]
    values = np.array([99.99, 100.0, 119.9, 120.0, 139.99, 140.0, 179.9, 180.0, 250.0])
    assert metrics.band_index(values, edges).tolist() == [0, 1, 1, 2, 3, 4, 5, 6, 6]
    assert metrics.band_labels(metrics.BAND_EDGES["dbp"]) == ["<60", "60-80", "80-90",
                                                             "90-100", ">=100"]


def test_range_block_lists_every_band_with_its_n_and_known_errors():
    t = np.array([110.0, 115.0, 150.0, 150.0, 190.0])
    p = np.array([112.0, 111.0, 140.0, 144.0, 160.0])  # errors +2, -4, -10, -6, -30
    block = metrics.range_block(t, p, "sbp")
    rows = {r["band"]: r for r in block["bands"]}
    assert [r["n"] for r in block["bands"]] == [0, 2, 0, 0, 2, 0, 1]
    assert rows["<100"]["mae"] is None and rows["<100"]["within_5"] is None  # shown, empty
    assert rows["100-120"]["mae"] == pytest.approx(3.0)
    assert rows["100-120"]["me"] == pytest.approx(-1.0)
    assert rows["100-120"]["sd"] == pytest.approx(np.std([2, -4], ddof=1))
    assert rows["140-160"]["within_10"] == 1.0 and rows["140-160"]["within_5"] == 0.0
    assert rows[">=180"]["mae"] == 30.0 and rows[">=180"]["sd"] == 0.0
    assert metrics.worst_band(block)["band"] == ">=180"


def test_regression_to_the_mean_numbers():
    t = np.array([100.0, 120.0, 140.0, 160.0])
    assert metrics.regression_to_mean(t, t) == pytest.approx((1.0, 1.0))
    # a prediction halfway to the mean: slope 0.5, SD ratio 0.5
    slope, ratio = metrics.regression_to_mean(t, 130 + 0.5 * (t - 130))
    assert (slope, ratio) == pytest.approx((0.5, 0.5))
    assert metrics.regression_to_mean(t, np.full(4, 127.0)) == pytest.approx((0.0, 0.0))
    assert metrics.regression_to_mean(np.full(3, 120.0), t[:3]) == (None, None)


def test_by_range_uses_given_band_sets_and_notes_a_target_without_one():
    t = np.array([[120.0, 80.0], [130.0, 85.0]])
    sets = metrics.target_band_sets(["sbp", "hr"], ["auto", "auto"])
    assert sets == ["sbp", None]
    block = metrics.by_range(t, t + 1, ["sbp", "hr"], sets)
    assert block["sbp"]["band_set"] == "sbp" and "--bands" in block["hr"]["note"]
    assert metrics.target_band_sets(["hr"], ["dbp"]) == ["dbp"]


# ----------------------------------------------------------------------------- ISO 81060-2
@pytest.mark.parametrize("me", sorted(ISO_TABLE))
def test_criterion_2_limit_follows_the_standards_rule_and_table(me):
    limit = metrics.iso_sd_limit(me)
    # the rule itself: P(|e| <= 10) = 0.85 for e ~ N(me, limit)
    from scipy.stats import norm
    assert norm.cdf((10 - me) / limit) - norm.cdf((-10 - me) / limit) == pytest.approx(0.85, abs=1e-7)
    assert metrics.iso_sd_limit(-me) == limit
    # the printed table, to its two decimals; its last entry (4.79 at 5.0) lies 0.016 below
    # the rule (4.806), the one entry that is not the rule rounded (docs/metrics.md)
    assert limit == pytest.approx(ISO_TABLE[me], abs=0.01 if me < 5 else 0.02)


def test_criterion_2_limit_ends_where_criterion_1_fails():
    assert metrics.iso_sd_limit(5.01) is None


def test_iso_criteria_on_subject_means():
    # subject a errors +1, +3 (mean 2), b: -2 (mean -2), c: +6 (mean 6)
    t = np.full(4, 120.0)
    p = t + np.array([1.0, 3.0, -2.0, 6.0])
    out = metrics.iso_criteria(t, p, ["a", "a", "b", "c"])
    c2 = out["criterion_2"]
    assert c2["n_subjects"] == 3 and c2["me"] == pytest.approx(2.0)
    assert c2["sd"] == pytest.approx(4.0)  # SD of 2, -2, 6 (ddof 1)
    assert c2["sd_limit"] == pytest.approx(metrics.iso_sd_limit(2.0)) and c2["pass"]
    assert out["criterion_1"] == {"me": 2.0, "sd": pytest.approx(np.std([1, 3, -2, 6], ddof=1)),
                                  "pass": True}
    wide = metrics.iso_criteria(t, t + np.array([8.0, 8.0, -8.0, 0.0]), ["a", "a", "b", "c"])
    assert wide["criterion_2"]["sd"] == pytest.approx(8.0) and not wide["criterion_2"]["pass"]


def test_population_audit_counts_against_the_minimums():
    subjects = [f"s{k // 3}" for k in range(255)]  # 85 subjects, 255 readings
    sbp = np.full(255, 125.0)
    sbp[:13] = 165.0   # 13/255 = 5.1 % >= 160 (and >= 140)
    sbp[13:26] = 100.0  # 5.1 % <= 100 (the limit counts)
    sbp[26:52] = 145.0  # with the first 13: 39/255 = 15.3 % >= 140: fails 20 %
    dbp = np.full(255, 75.0)
    sex = ["M" if k < 150 else "F" for k in range(255)]  # subjects: 50 M / 35 F
    audit = metrics.population_audit(subjects, sbp, dbp, sex)
    checks = audit["checks"]
    assert checks["subjects"] == {"n": 85, "minimum": 85, "pass": True}
    assert checks["readings"]["pass"] and checks["sbp_ge_160"]["n"] == 13
    assert checks["sbp_le_100"]["pass"] and checks["sbp_ge_160"]["pass"]
    assert checks["sbp_ge_140"]["share"] == pytest.approx(39 / 255)
    assert not checks["sbp_ge_140"]["pass"]
    assert checks["dbp_le_60"]["n"] == 0 and not checks["dbp_le_60"]["pass"]
    assert checks["sex"]["shares"] == pytest.approx({"F": 35 / 85, "M": 50 / 85})
    assert checks["sex"]["pass"] and not audit["pass"] and audit["not_assessed"] == []
    small = metrics.population_audit(subjects[:84], sbp[:84], None, None)
    assert not small["checks"]["readings"]["pass"] and not small["pass"]
    assert "sex: no sex column" in small["not_assessed"]
    assert any(n.startswith("dbp_le_60") for n in small["not_assessed"])


def test_sex_check_needs_two_sexes_of_at_least_30_percent():
    subjects = list("abcdefghij")
    assert metrics.sex_check(np.array(subjects), [1] * 7 + [0] * 3)["pass"]  # 30 % counts
    assert not metrics.sex_check(np.array(subjects), [1] * 8 + [0] * 2)["pass"]
    assert not metrics.sex_check(np.array(subjects), [1] * 10)["pass"]


def test_iso_block_says_when_criterion_1_passes_on_a_failing_population():
    t = np.array([[120.0, 80.0], [130.0, 85.0], [125.0, 82.0]])
    block = metrics.iso_block(t, t + 1, ["a", "b", "c"], ["sbp", "dbp"], ["sbp", "dbp"])
    assert block["per_target"]["sbp"]["criterion_1"]["pass"]
    assert "not a validation" in block["per_target"]["sbp"]["note"]
    assert "subjects" in block["per_target"]["sbp"]["note"]
    assert not block["population"]["pass"]


# ----------------------------------------------------------------------------- intervals
def test_conformal_quantile_rank():
    scores = np.arange(1.0, 20.0)  # 19 scores: rank ceil(20 * 0.9) = 18
    assert metrics.conformal_quantile(scores, 0.9) == 18.0
    assert metrics.conformal_quantile(scores[:8], 0.9) is None  # needs 9 for 0.9


def test_subject_scores_are_each_subjects_largest_residual():
    assert metrics.subject_scores(np.array([1.0, 5.0, 2.0, 0.5]), ["b", "b", "a", "c"]).tolist() \
        == [2.0, 5.0, 0.5]


def _exchangeable(rng, n_subjects):
    """Records of subjects with 1-4 records each: residual = subject effect + noise."""
    counts = rng.integers(1, 5, n_subjects)
    subjects = np.repeat(np.arange(n_subjects), counts)
    resid = rng.normal(0, 6, n_subjects)[subjects] + rng.normal(0, 3, len(subjects))
    truth = rng.normal(125, 15, len(subjects))
    return truth, truth + resid, subjects


def test_conformal_coverage_of_new_subjects_is_within_the_finite_sample_bound():
    # n = 19 calibration subjects at 0.9: a new subject has all its records covered with
    # probability exactly 18 / 20 = 0.9 (continuous scores); averaged over 3000 draws
    rng = np.random.default_rng(0)
    subject_hits, record_hits = [], []
    for _ in range(3000):
        t, p, s = _exchangeable(rng, 19)
        cal = metrics.fit_conformal(t[:, None], p[:, None], s, ["sbp"], 0.9)
        t_new, p_new, _ = _exchangeable(rng, 1)
        lo, hi = metrics.conformal_intervals(p_new[:, None], cal, ["sbp"])
        inside = (lo[:, 0] <= t_new) & (t_new <= hi[:, 0])
        subject_hits.append(inside.all())
        record_hits.append(inside.mean())
    mc = 3 * np.sqrt(0.9 * 0.1 / 3000)
    assert 0.9 - mc <= np.mean(subject_hits) <= 0.9 + 1 / 20 + mc
    assert np.mean(record_hits) >= 0.9 - mc


def test_conformal_interval_block_coverage_width_and_bands():
    t = np.array([[100.0], [130.0], [150.0], [170.0]])
    lo, hi = t - np.array([[5.0], [5.0], [5.0], [5.0]]) + np.array([[0], [0], [8], [0]]), t + 5
    cal = {"level": 0.9, "n_subjects": 20}
    block = metrics.interval_block(t, lo, hi, ["a", "b", "c", "c"], ["sbp"], ["sbp"], cal)
    entry = block["per_target"]["sbp"]
    assert entry["coverage"] == 0.75 and entry["subject_coverage"] == pytest.approx(2 / 3)
    assert entry["mean_width"] == pytest.approx((10 + 10 + 2 + 10) / 4)
    bands = {b["band"]: b for b in entry["by_band"]}
    assert bands["140-160"] == {"band": "140-160", "n": 1, "coverage": 0.0, "mean_width": 2.0}
    assert bands["<100"] == {"band": "<100", "n": 0, "coverage": None, "mean_width": None}


def test_too_few_calibration_subjects_give_no_interval_and_a_note():
    t = np.array([[120.0], [130.0]])
    cal = metrics.fit_conformal(t, t + 1, ["a", "b"], ["sbp"], 0.9)
    assert cal["per_target"]["sbp"]["quantile"] is None
    lo, hi = metrics.conformal_intervals(t, cal, ["sbp"])
    assert np.isnan(lo).all() and np.isnan(hi).all()
    block = metrics.interval_block(t, lo, hi, ["a", "b"], ["sbp"], ["sbp"], cal)
    assert "too few calibration subjects (2)" in block["per_target"]["sbp"]["note"]


def test_mondrian_gives_wide_intervals_at_high_predicted_bp():
    rng = np.random.default_rng(1)
    p = np.r_[np.full(40, 120.0), np.full(40, 170.0)]
    resid = np.r_[rng.uniform(-2, 2, 40), rng.uniform(-20, 20, 40)]
    subjects = np.arange(80)
    cal = metrics.fit_conformal((p - resid)[:, None], p[:, None], subjects, ["sbp"], 0.9,
                                mondrian=["sbp"])
    m = cal["per_target"]["sbp"]["mondrian"]
    q = dict(zip(m["bands"], m["quantiles"]))
    assert q["120-130"] == pytest.approx(np.sort(np.abs(resid[:40]))[36])  # rank ceil(41 .9)
    assert q["160-180"] == pytest.approx(np.sort(np.abs(resid[40:]))[36])
    assert q["<100"] == cal["per_target"]["sbp"]["quantile"]  # no subjects: the overall one
    assert m["fallback"][0] and not m["fallback"][2]
    lo, hi = metrics.conformal_intervals(np.array([[121.0], [171.0]]), cal, ["sbp"])
    assert (hi - lo)[:, 0] == pytest.approx([2 * q["120-130"], 2 * q["160-180"]])


# ----------------------------------------------------------------------------- tracking
def test_tracking_on_constructed_changes():
    # subject a: 120 -> 130 (+10), predicted 121 -> 126 (+5: concordant)
    # subject b: 140 -> 132 (-8), predicted 139 -> 141 (+2: discordant)
    # subject c: 110 -> 112 (+2, inside the 5 mmHg exclusion zone), predicted 111 -> 110
    t = np.array([120.0, 130.0, 140.0, 132.0, 110.0, 112.0])
    p = np.array([121.0, 126.0, 139.0, 141.0, 111.0, 110.0])
    s = ["a", "a", "b", "b", "c", "c"]
    block = metrics.tracking_block(t[:, None], p[:, None], s, np.arange(6), ["sbp"])
    assert block["n_subjects"] == 3 and block["n_changes"] == 3 and block["exclusion_mmhg"] == 5.0
    m = block["per_target"]["sbp"]
    assert m["n_concordance"] == 2 and m["concordance"] == 0.5
    dt, dp = np.array([10.0, -8.0, 2.0]), np.array([5.0, 2.0, -1.0])
    assert m["change"]["mae"] == pytest.approx(np.abs(dp - dt).mean())
    assert m["change"]["pearson"] == pytest.approx(np.corrcoef(dt, dp)[0, 1])
    sizes = {r["change"]: r for r in m["by_change_size"]}
    assert sizes["<5"]["n"] == 1 and sizes["<5"]["reading_mae"] == 2.0
    assert sizes["5-10"]["n"] == 1 and sizes["5-10"]["change_mae"] == 10.0
    assert sizes["10-15"]["n"] == 1 and sizes["10-15"]["change_mae"] == 5.0
    assert sizes[">=20"] == {"change": ">=20", "n": 0, "reading_mae": None, "change_mae": None}


def test_tracking_follows_the_given_order_and_skips_constant_truth():
    t = np.array([[130.0, 80.0], [120.0, 80.0]])
    p = np.array([[125.0, 79.0], [126.0, 81.0]])
    block = metrics.tracking_block(t, p, ["a", "a"], [2, 1], ["sbp", "dbp"])
    # record 1 comes first: the change is 120 -> 130 (+10), predicted +(-1)
    assert block["per_target"]["sbp"]["change"]["me"] == pytest.approx(-11.0)
    assert "never changes" in block["per_target"]["dbp"]["skipped"]
    assert metrics.tracking_block(t, p, ["a", "b"], [1, 2], ["sbp", "dbp"]) == \
        {"skipped": "no subject has two or more records"}


# ----------------------------------------------------------------------------- subjects
def test_subject_level_compares_subject_means():
    t = np.array([[120.0], [130.0], [140.0]])
    p = np.array([[110.0], [140.0], [150.0]])  # a: mean 125 vs 125; b: 150 vs 140
    block = metrics.subject_level(t, p, ["a", "a", "b"], ["sbp"])
    assert block["n_subjects"] == 2
    assert block["per_target"]["sbp"]["mae"] == 5.0 and block["per_target"]["sbp"]["me"] == 5.0


def test_subgroups_by_sex_and_age_band_with_subject_bootstrap():
    t = np.array([[120.0], [120.0], [120.0], [120.0]])
    p = t + np.array([[2.0], [4.0], [10.0], [0.0]])
    groups = {"sex": metrics._group_text([1.0, 1.0, 0.0, None]),
              "age": metrics.age_groups([35, "35", 72.5, ""])}
    assert groups["sex"] == ["1", "1", "0", "missing"]
    assert groups["age"] == ["<40", "<40", ">=70", "missing"]
    block = metrics.subgroup_block(t, p, ["a", "b", "c", "d"], ["sbp"], groups, n_boot=200)
    men = next(g for g in block["sex"] if g["group"] == "1")
    assert men["n_records"] == 2 and men["n_subjects"] == 2
    assert men["per_target"]["sbp"]["mae"] == 3.0
    lo, hi = men["per_target"]["sbp"]["mae_ci95"]
    assert 2.0 <= lo <= 3.0 <= hi <= 4.0
    assert [g["group"] for g in block["age"]] == ["<40", ">=70", "missing"]


# ----------------------------------------------------------------------------- recalibration
def test_affine_recalibration_recovers_a_known_map():
    t = np.array([[100.0], [120.0], [140.0], [160.0]])
    p = 130 + 0.5 * (t - 130)  # regressed to the mean: truth = 2 pred - 130
    affine = metrics.fit_affine(t, p, ["sbp"])
    assert affine["sbp"] == pytest.approx({"slope": 2.0, "intercept": -130.0})
    assert metrics.apply_affine(p, affine, ["sbp"]) == pytest.approx(t)
    block = metrics.recalibration_block(t, p, affine, ["sbp"], applied=False)
    assert block["affine"]["per_target"]["sbp"]["mae"] == pytest.approx(0.0)
    assert block["raw"]["per_target"]["sbp"]["mae"] == pytest.approx(10.0)
    constant = metrics.fit_affine(t, np.full((4, 1), 125.0), ["sbp"])
    assert constant["sbp"] == {"slope": 1.0, "intercept": 5.0}


def test_clinical_blocks_of_one_split():
    rng = np.random.default_rng(2)
    t = rng.normal([[125.0, 80.0]], [[15.0, 10.0]], (30, 2))
    p = t + rng.normal(0, 5, (30, 2))
    s = np.repeat(np.arange(10), 3)
    cal = metrics.fit_conformal(t, p, s, ["sbp", "dbp"], 0.8)
    lo, hi = metrics.conformal_intervals(p, cal, ["sbp", "dbp"])
    out = metrics.clinical_blocks(t, p, s, ["sbp", "dbp"], ["sbp", "dbp"],
                                  sex=s % 2, age=np.full(30, 45.0), intervals=(lo, hi, cal))
    assert set(out) == {"by_range", "iso81060_2", "subject_level", "tracking", "subgroups",
                        "intervals"}
    # in-sample: the 9th largest of 10 subject scores (rank ceil(11 x 0.8)) covers 9 subjects
    assert out["intervals"]["per_target"]["sbp"]["subject_coverage"] == pytest.approx(0.9)
    assert out["iso81060_2"]["population"]["checks"]["sex"]["pass"]
    assert out["tracking"]["n_subjects"] == 10
    assert [g["group"] for g in out["subgroups"]["age"]] == ["40-50"]


# ----------------------------------------------------------------------------- end to end
TARGETS = ["right_arm_sbp", "right_arm_dbp"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from conftest import prepared_cohort
    return prepared_cohort(tmp_path_factory.mktemp("cohort"), 30, 3, 5, TARGETS, 200,
                           extra_cols=("age", "sex"))


def _train(cohort, out, labels=None, *extra):
    import train_bp
    train_bp.main(["--npz_dir", cohort["npz"], "--labels_csv", labels or cohort["labels"],
                   "--out_dir", str(out), "--target_cols", *TARGETS, "--modality", "none",
                   "--covariates", "age", "sex", "--epochs", "1", "--batch_size", "32",
                   "--num_workers", "0", "--val_ratio", "0.34", "--test_ratio", "0.3",
                   "--seed", "3", *extra])
    return out


@pytest.fixture(scope="module")
def runs(cohort, tmp_path_factory):
    """A default run, and one with --recalibrate affine whose test labels are noise."""
    import pandas as pd
    base = tmp_path_factory.mktemp("runs")
    plain = _train(cohort, base / "plain")
    split = pd.read_csv(plain / "split.csv", dtype=str)
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    test = labels["ssoid"].isin(split.loc[split["split"] == "test", "ssoid"])
    rng = np.random.default_rng(0)
    for col in TARGETS:
        labels.loc[test, col] = rng.uniform(60, 200, int(test.sum())).round()
    labels.to_csv(base / "noisy.csv", index=False)
    affine = _train(cohort, base / "affine", str(base / "noisy.csv"), "--recalibrate", "affine")
    return plain, affine


def _load(out):
    import json
    import pandas as pd
    import torch
    return (torch.load(out / "bp_best.pth", weights_only=True),
            json.load(open(out / "final_metrics.json")),
            pd.read_csv(out / "test_predictions.csv", dtype={"ssoid": str}))


def test_run_reports_every_block_and_interval_columns_after_the_contract_ones(runs):
    ckpt, report, test = _load(runs[0])
    contract = ["ssoid"] + [f"{t}_{k}" for t in TARGETS for k in ("true", "pred")]
    assert list(test.columns) == contract + [f"{t}_{k}" for t in TARGETS for k in ("lo", "hi")]
    for split in ("val", "test"):
        assert {"by_range", "iso81060_2", "subject_level", "tracking", "subgroups", "intervals",
                "recalibration"} <= set(report[split])
        assert [g["group"] for g in report[split]["subgroups"]["sex"]] == ["0", "1"]
    cal = ckpt["conformal"]
    assert cal["level"] == 0.9 and cal["n_subjects"] == 10 and not ckpt["recalibration"]["applied"]
    for t in TARGETS:
        q = cal["per_target"][t]["quantile"]
        assert test[f"{t}_hi"].to_numpy() == pytest.approx(test[f"{t}_pred"] + q, abs=1e-4)
        assert test[f"{t}_lo"].to_numpy() == pytest.approx(test[f"{t}_pred"] - q, abs=1e-4)
        inside = (test[f"{t}_lo"] <= test[f"{t}_true"]) & (test[f"{t}_true"] <= test[f"{t}_hi"])
        assert report["test"]["intervals"]["per_target"][t]["coverage"] == pytest.approx(inside.mean())
        bands = report["test"]["by_range"][t]["bands"]
        assert sum(b["n"] for b in bands) == len(test)


def test_recalibration_and_intervals_are_fitted_on_validation_only(runs):
    plain, affine = (_load(r) for r in runs)
    # test labels replaced by noise change none of the fitted parameters
    assert affine[0]["recalibration"]["map"] == plain[0]["recalibration"]["map"]
    assert affine[0]["recalibration"]["applied"]
    raw = plain[2][[f"{t}_pred" for t in TARGETS]].to_numpy()
    mapped = metrics.apply_affine(raw, plain[0]["recalibration"]["map"], TARGETS)
    assert affine[2][[f"{t}_pred" for t in TARGETS]].to_numpy() == pytest.approx(mapped, abs=1e-4)
    block = affine[1]["test"]["recalibration"]
    assert block["affine"]["per_target"][TARGETS[0]]["mae"] == \
        pytest.approx(affine[1]["test"]["per_target"][TARGETS[0]]["mae"])
    # the intervals are calibrated on the recalibrated validation predictions
    assert affine[0]["conformal"]["per_target"] != plain[0]["conformal"]["per_target"]


def test_predict_applies_the_checkpoints_recalibration_and_intervals(runs, cohort, tmp_path):
    import json
    import pandas as pd
    import predict_bp
    affine = runs[1]
    out = tmp_path / "preds.csv"
    predict_bp.main(["--checkpoint", str(affine / "bp_best.pth"), "--npz_dir", cohort["npz"],
                     "--labels_csv", str(affine.parent / "noisy.csv"), "--output", str(out),
                     "--device", "cpu"])
    pred = pd.read_csv(out, dtype={"ssoid": str})
    contract = ["ssoid"] + [f"{t}_{k}" for t in TARGETS for k in ("true", "pred")] + ["split"]
    assert list(pred.columns) == contract + [f"{t}_{k}" for t in TARGETS for k in ("lo", "hi")]
    test = pd.read_csv(affine / "test_predictions.csv", dtype={"ssoid": str}).set_index("ssoid")
    ours = pred[pred["split"] == "test"].set_index("ssoid").loc[test.index]
    for t in TARGETS:
        for kind in ("pred", "lo", "hi"):
            assert ours[f"{t}_{kind}"].to_numpy() == pytest.approx(test[f"{t}_{kind}"], abs=1e-3)
    report = json.load(open(tmp_path / "preds_metrics.json"))
    trained = json.load(open(affine / "final_metrics.json"))["test"]
    for key in ("by_range", "intervals", "recalibration", "tracking", "iso81060_2"):
        assert key in report["test"]
    cover = report["test"]["intervals"]["per_target"][TARGETS[0]]["coverage"]
    assert cover == pytest.approx(trained["intervals"]["per_target"][TARGETS[0]]["coverage"])
