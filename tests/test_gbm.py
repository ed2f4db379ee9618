"""The boosted-tree baseline (issue 22 item 8): metrics.fit_gbm learns what a covariate
determines, gives the same trees for any thread count, never sees the test labels, and its
gbm_baseline block (MAE, the paired model-minus-GBM interval) in final_metrics.json and
the pooled cv_metrics.json equals a recomputation from each fold's own fitted trees."""
import json

import numpy as np
import pandas as pd
import pytest

import crossval_bp
import dataset
import metrics
import train_bp
import utils
from conftest import prepared_cohort

TARGETS = ["right_arm_sbp", "right_arm_dbp"]
COVARIATES = ["age", "sex", "bmi"]


def step_data(n, seed):
    """Age decides SBP by a step at 50 years (a ridge cannot fit a step); DBP is 60 + 0.3
    x age; sex and a noise column say nothing."""
    rng = np.random.default_rng(seed)
    age, sex, noise = rng.uniform(20, 80, n), rng.integers(0, 2, n), rng.normal(size=n)
    x = np.column_stack([age, sex, noise])
    y = np.column_stack([np.where(age >= 50, 140.0, 110.0), 60 + 0.3 * age])
    return x, y


def test_gbm_learns_a_step_that_the_ridge_cannot():
    x, y = step_data(700, 0)
    gbm = metrics.fit_gbm(x[:400], y[:400], x[400:550], y[400:550], seed=1)
    mae = np.abs(gbm(x[550:]) - y[550:]).mean(axis=0)
    ridge_mae = np.abs(metrics.fit_ridge(x[:400], y[:400])(x[550:]) - y[550:]).mean(axis=0)
    # a 30 mmHg step: the train mean is 15 mmHg off, the ridge's line 7, the trees 0.1
    # (measured; binning blurs a few ages next to 50)
    assert mae[0] < 0.5 and ridge_mae[0] > 5.0
    assert mae[1] < 0.6  # a line of SD 5.2 mmHg, in steps
    assert all(1 <= n < metrics.GBM_MAX_TREES for n in gbm.n_trees)  # stopped on validation


def test_the_same_trees_for_any_thread_count():
    x, y = step_data(500, 1)
    one = metrics.fit_gbm(x[:300], y[:300], x[300:400], y[300:400], seed=5, threads=1)
    two = metrics.fit_gbm(x[:300], y[:300], x[300:400], y[300:400], seed=5, threads=2)
    assert one.n_trees == two.n_trees
    np.testing.assert_array_equal(one(x[400:]), two(x[400:]))


def split_rows(n=600, seed=2):
    x, y = step_data(n, seed)
    rows = pd.DataFrame({"age": x[:, 0], "sex": x[:, 1], TARGETS[0]: y[:, 0],
                         TARGETS[1]: y[:, 1]})
    rows["split"] = np.array(["train", "val", "test"])[np.arange(n) % 5 // 2]  # 2:2:1
    return rows


def test_the_test_labels_never_reach_the_gbm():
    rows = split_rows()
    specs = dataset.fit_covariates(rows[rows["split"] == "train"], ["age", "sex"], "rows")
    test = rows["split"] == "test"
    x_test = dataset.encode_covariates(rows[test], specs)[0]

    def fitted(frame):
        gbm = metrics.GBM(**train_bp.covariate_gbm(frame, TARGETS, specs, seed=3, threads=1))
        return gbm.n_trees, gbm(x_test)

    rng = np.random.default_rng(9)
    noisy_test, noisy_val = rows.copy(), rows.copy()
    noisy_test.loc[test, TARGETS] = rng.normal(120, 30, (int(test.sum()), 2))
    val = rows["split"] == "val"
    noisy_val.loc[val, TARGETS] = rng.normal(120, 30, (int(val.sum()), 2))
    trees, pred = fitted(rows)
    assert fitted(noisy_test)[0] == trees
    np.testing.assert_array_equal(fitted(noisy_test)[1], pred)
    # the validation labels do choose the trees: noise there stops the fit elsewhere
    assert fitted(noisy_val)[0] != trees


def test_split_metrics_gbm_block_and_its_paired_difference():
    t = np.array([[100.0], [110.0], [120.0], [130.0]])
    model = t + [[1.0], [-1.0], [2.0], [-2.0]]
    ridge, gbm = t + [[4.0], [-4.0], [4.0], [-4.0]], t + [[3.0], [-3.0], [1.0], [-1.0]]
    subjects = ["a", "a", "b", "b"]
    block = metrics.split_metrics(t, model, subjects, ["sbp"], [115.0], covariate_pred=ridge,
                                  gbm_pred=gbm)
    g = block["gbm_baseline"]["per_target"]["sbp"]
    assert g["mae"] == 2.0 and g["mase"] == pytest.approx(2.0 / 10.0)
    assert g["model_mae_diff"] == pytest.approx(1.5 - 2.0)
    assert block["gbm_baseline"]["mean"]["model_mae_diff"] == pytest.approx(-0.5)
    # subject a: model 1 vs GBM 3 (-2), b: 2 vs 1 (+1); each resample lies between
    lo, hi = g["model_mae_diff_ci95"]
    assert -2.0 <= lo < hi <= 1.0
    # one bootstrap: the ridge block is what it is without the GBM
    ridge_only = metrics.split_metrics(t, model, subjects, ["sbp"], [115.0],
                                       covariate_pred=ridge)
    assert block["covariate_baseline"] == ridge_only["covariate_baseline"]
    assert "gbm_baseline" not in ridge_only


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return prepared_cohort(tmp_path_factory.mktemp("gbm_cohort"), 60, 2, 3, TARGETS, 200,
                           extra_cols=COVARIATES)


def train_argv(cohort, out, *extra):
    return ["--out_dir", str(out), "--npz_dir", cohort["npz"],
            "--labels_csv", cohort["labels"], "--target_cols", *TARGETS, "--modality", "none",
            "--epochs", "1", "--batch_size", "16", "--num_workers", "0", "--seed", "4",
            "--val_ratio", "0.3", "--covariates", *COVARIATES, *extra]


@pytest.fixture(scope="module")
def cv(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("gbm_cv") / "run"
    crossval_bp.main(["--folds", "2", *train_argv(cohort, out)])
    return out


def fold_gbm_predictions(cv, cohort, fold):
    """(ssoids, truths, predictions) of a fold's test records by its checkpoint's trees."""
    ckpt = utils.load_checkpoint(str(cv / f"fold_{fold}" / "bp_best.pth"))
    test = pd.read_csv(cv / f"fold_{fold}" / "test_predictions.csv", dtype={"ssoid": str})
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str}).set_index("ssoid")
    x = dataset.encode_covariates(labels.loc[test["ssoid"]], ckpt["covariates"])[0]
    return test["ssoid"], labels.loc[test["ssoid"], TARGETS].to_numpy(), train_bp.gbm_of(ckpt)(x)


def test_each_fold_and_the_pooled_block_report_their_own_trees(cv, cohort, capsys):
    pooled = json.loads((cv / "cv_metrics.json").read_text())["pooled"]
    ids, truths, preds = [], [], []
    for fold in range(2):
        fold_ids, t, p = fold_gbm_predictions(cv, cohort, fold)
        block = json.loads((cv / f"fold_{fold}" / "final_metrics.json").read_text())["test"]
        gbm = block["gbm_baseline"]
        assert gbm["model"] == "lightgbm" and gbm["stopped_on"] == "val"
        for k, c in enumerate(TARGETS):
            assert gbm["per_target"][c]["mae"] == pytest.approx(np.abs(p[:, k] - t[:, k]).mean())
            assert gbm["per_target"][c]["model_mae_diff"] == pytest.approx(
                block["per_target"][c]["mae"] - gbm["per_target"][c]["mae"])
            assert pooled["gbm_baseline"]["n_trees"][c][fold] == gbm["n_trees"][c]
        ids.append(fold_ids), truths.append(t), preds.append(p)
    cv_pred = pd.read_csv(cv / "cv_predictions.csv", dtype={"ssoid": str})
    assert cv_pred["ssoid"].tolist() == pd.concat(ids).tolist()
    t, p = np.vstack(truths), np.vstack(preds)
    for k, c in enumerate(TARGETS):
        entry = pooled["gbm_baseline"]["per_target"][c]
        assert entry["mae"] == pytest.approx(np.abs(p[:, k] - t[:, k]).mean())
        lo, hi = entry["model_mae_diff_ci95"]
        assert lo <= entry["model_mae_diff"] <= hi
    crossval_bp.print_summary(json.loads((cv / "cv_metrics.json").read_text()), str(cv))
    printed = capsys.readouterr().out
    assert "gradient-boosted trees (LightGBM) on the same covariates" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith(TARGETS[0])
                and "/" in ln.split()[-1])
    assert f"{pooled['gbm_baseline']['per_target'][TARGETS[0]]['mae']:.2f}" in line


def test_gbm_baseline_off_fits_no_trees(cohort, tmp_path):
    out = tmp_path / "off"
    train_bp.main(train_argv(cohort, out, "--gbm_baseline", "off"))
    report = json.loads((out / "final_metrics.json").read_text())
    assert "covariate_baseline" in report["test"] and "gbm_baseline" not in report["test"]
    assert utils.load_checkpoint(str(out / "bp_best.pth"))["gbm"] is None
