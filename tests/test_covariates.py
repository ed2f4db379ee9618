"""Covariates: their encoding against hand-computed values, a model that learns a target
from a covariate that determines it (and cannot without it), the ridge baseline against an
independent closed-form fit, the checkpoint round trip through predict_bp.py, and the
one-line errors for covariates that are missing or unusable."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import backbones
import dataset
import metrics
import predict_bp
import train_bp
from conftest import MMHG_ATOL, ROOT, error_line, prepared_cohort
from utils import UserError

TARGETS = ["right_arm_sbp", "right_arm_dbp", "left_arm_mbp"]
COVARIATES = ["age", "sex", "bmi"]


# ----------------------------------------------------------------------------- encoding
def frame(**columns):
    return pd.DataFrame(columns)


def test_numeric_column_is_standardised_with_median_fill_and_indicator():
    train = frame(age=[40.0, 50.0, np.nan, 70.0, 80.0])
    [spec] = dataset.fit_covariates(train, ["age"], "x.csv")
    observed = np.array([40.0, 50.0, 70.0, 80.0])
    assert spec == {"name": "age", "kind": "numeric", "mean": 60.0, "std": observed.std(),
                    "fill": 60.0, "missing_indicator": True}
    assert dataset.covariate_names([spec]) == ["age", "age_missing"]
    new = frame(age=[40.0, np.nan, 95.0])
    cov, filled = dataset.encode_covariates(new, [spec])
    sd = observed.std()  # 15.811...
    np.testing.assert_allclose(cov, [[-20 / sd, 0], [0, 1], [35 / sd, 0]], rtol=1e-6)
    assert cov.dtype == np.float32 and filled == {"age": 1}


@pytest.mark.parametrize("values, levels, name", [
    (["M", "F", "f", " m", "M"], ["f", "m"], "sex=m"),
    (["male", "Female", "MALE", "female", "male"], ["female", "male"], "sex=male"),
    ([0, 1, 1, 0, 1], ["0", "1"], "sex=1"),
    ([1.0, 2.0, 2.0, 1.0, 1.0], ["1", "2"], "sex=2"),
])
def test_two_valued_column_becomes_one_indicator_of_its_second_level(values, levels, name):
    [spec] = dataset.fit_covariates(frame(sex=values), ["sex"], "x.csv")
    assert spec["kind"] == "categorical" and spec["levels"] == levels
    assert not spec["missing_indicator"]
    assert dataset.covariate_names([spec]) == [name]
    cov, filled = dataset.encode_covariates(frame(sex=values), [spec])
    np.testing.assert_array_equal(cov[:, 0], [float(dataset._level(v) == levels[1])
                                              for v in values])
    assert filled == {"sex": 0}


def test_categorical_fill_is_the_train_mode_and_unseen_levels_count_as_missing():
    train = frame(smoking=["never", "former", "never", None, "current", "never"])
    [spec] = dataset.fit_covariates(train, ["smoking"], "x.csv")
    assert spec["levels"] == ["current", "former", "never"] and spec["fill"] == "never"
    assert dataset.covariate_names([spec]) == ["smoking=former", "smoking=never",
                                               "smoking_missing"]
    cov, filled = dataset.encode_covariates(frame(smoking=["former", None, "unknown", "current"]),
                                            [spec])
    np.testing.assert_array_equal(cov, [[1, 0, 0], [0, 1, 1], [0, 1, 1], [0, 0, 0]])
    assert filled == {"smoking": 2}


def test_several_columns_keep_their_order():
    train = frame(age=[50, 60, 70], sex=["M", "F", "M"])
    specs = dataset.fit_covariates(train, ["sex", "age"], "x.csv")
    assert dataset.covariate_names(specs) == ["sex=m", "age"]
    cov, _ = dataset.encode_covariates(train, specs)
    np.testing.assert_allclose(cov, [[1, -np.sqrt(1.5)], [0, 0], [1, np.sqrt(1.5)]], rtol=1e-6)


@pytest.mark.parametrize("values, fragment", [
    ([np.nan, np.nan, np.nan], "has no value in the train split"),
    ([3.0, 3.0, np.nan], "is constant in the train split (3)"),
    ([f"name_{i}" for i in range(11)], "has 11 distinct text values"),
])
def test_unusable_column_is_a_user_error_naming_file_and_column(values, fragment):
    with pytest.raises(UserError, match=r"x\.csv: covariate c ") as info:
        dataset.fit_covariates(frame(c=values), ["c"], "x.csv")
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------- ridge
def test_ridge_equals_an_independent_closed_form_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x @ rng.normal(size=(3, 2)) + rng.normal(size=(40, 2)) + [120.0, 80.0]
    alpha = 2.5
    # the ridge problem as least squares: rows sqrt(alpha) * I penalise the slopes only
    aug_x = np.block([[np.ones((40, 1)), x], [np.zeros((3, 1)), np.sqrt(alpha) * np.eye(3)]])
    aug_y = np.vstack([y, np.zeros((3, 2))])
    beta, *_ = np.linalg.lstsq(aug_x, aug_y, rcond=None)
    new = rng.normal(size=(5, 3))
    expected = beta[0] + new @ beta[1:]
    np.testing.assert_allclose(metrics.fit_ridge(x, y, alpha)(new), expected, rtol=1e-10)


def test_split_metrics_covariate_block_and_paired_difference():
    t = np.array([[100.0], [110.0], [120.0], [130.0]])
    model, ridge = t + [[1.0], [-1.0], [2.0], [-2.0]], t + [[4.0], [-4.0], [4.0], [-4.0]]
    block = metrics.split_metrics(t, model, ["a", "a", "b", "b"], ["sbp"], [115.0],
                                  covariate_pred=ridge)
    cov = block["covariate_baseline"]["per_target"]["sbp"]
    assert cov["mae"] == 4.0 and cov["mase"] == pytest.approx(4.0 / 10.0)
    assert cov["model_mae_diff"] == pytest.approx(1.5 - 4.0)
    # subject a differs by -3 on average, b by -2: every resample lies between
    lo, hi = cov["model_mae_diff_ci95"]
    assert -3.0 <= lo <= hi <= -2.0
    assert block["covariate_baseline"]["mean"]["model_mae_diff"] == pytest.approx(-2.5)
    without = metrics.split_metrics(t, model, ["a", "a", "b", "b"], ["sbp"], [115.0])
    assert "covariate_baseline" not in without
    assert without["per_target"] == block["per_target"]


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("cov_cohort")
    data = prepared_cohort(base, 30, 3, 5, TARGETS, extra_cols=COVARIATES)
    table = pd.read_csv(data["labels"], dtype={"ssoid": str})
    rng = np.random.default_rng(0)
    # "secret" determines right_arm_sbp exactly; "noise" says nothing about anything
    table["secret"] = table["right_arm_sbp"] * 0.1 - 12.0
    table["noise"] = rng.normal(size=len(table))
    table.loc[table.index[::7], "bmi"] = np.nan  # some missing values to fill
    data["labels"] = str(base / "labels_extended.csv")
    table.to_csv(data["labels"], index=False)
    return data


def cov_argv(cohort, out, *extra):
    return ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--out_dir", str(out),
            "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "3", "--batch_size", "8",
            "--lr_backbone", "1e-3", "--lr_head", "1e-3", "--num_workers", "0",
            "--val_ratio", "0.2", "--test_ratio", "0.2", "--seed", "7", *extra]


def split_mae(out, target):
    report = json.loads((out / "final_metrics.json").read_text())["test"]
    return report["per_target"][target]["mae"], report["baseline"]["per_target"][target]["mae"]


@pytest.fixture(scope="module")
def learn(cohort, tmp_path_factory):
    """Covariates-only models given a determining covariate, and a useless one."""
    base = tmp_path_factory.mktemp("learn")
    fast = ("--epochs", "40", "--lr_head", "1e-2", "--weight_decay", "0", "--dropout", "0",
            "--patience", "0", "--modality", "none")
    for name in ("secret", "noise"):
        train_bp.main(cov_argv(cohort, base / name, *fast, "--covariates", name))
    return base


def test_a_covariate_that_determines_a_target_is_learned(learn):
    mae, baseline = split_mae(learn / "secret", "right_arm_sbp")
    assert baseline > 5.0 and mae < 0.15 * baseline


def test_without_that_covariate_the_target_is_not_learned(learn):
    mae, baseline = split_mae(learn / "noise", "right_arm_sbp")
    assert mae > 0.85 * baseline


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cov_run") / "run"
    train_bp.main(cov_argv(cohort, out, "--covariates", *COVARIATES))
    return out


def test_checkpoint_holds_the_encoding_and_rebuilds(run):
    ckpt = torch.load(run / "bp_best.pth", weights_only=True)
    names = dataset.covariate_names(ckpt["covariates"])
    assert names == ["age", "sex=1", "bmi", "bmi_missing"]
    assert ckpt["model_config"]["n_covariates"] == 4 and ckpt["args"]["covariates"] == COVARIATES
    split = pd.read_csv(run / "split.csv", dtype=str)
    labels = pd.read_csv(json.loads((run / "args.json").read_text())["labels_csv"],
                         dtype={"ssoid": str})
    train = labels[labels["ssoid"].isin(split.loc[split["split"] == "train", "ssoid"])]
    age = ckpt["covariates"][0]
    assert age["mean"] == pytest.approx(train["age"].mean())
    assert age["std"] == pytest.approx(train["age"].std(ddof=0))
    assert ckpt["covariates"][2]["fill"] == pytest.approx(train["bmi"].median())


def test_ridge_block_equals_a_closed_form_fit_on_the_train_split(run, cohort):
    report = json.loads((run / "final_metrics.json").read_text())
    ckpt = torch.load(run / "bp_best.pth", weights_only=True)
    split = pd.read_csv(run / "split.csv", dtype=str).set_index("ssoid")
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str}).set_index("ssoid")
    labels = labels.loc[split.index]
    x, _ = dataset.encode_covariates(labels, ckpt["covariates"])
    x = x.astype(np.float64)
    y = labels[TARGETS].to_numpy(np.float64)
    train = (split["split"] == "train").to_numpy()
    k = x.shape[1]
    aug_x = np.block([[np.ones((train.sum(), 1)), x[train]],
                      [np.zeros((k, 1)), np.sqrt(metrics.RIDGE_ALPHA) * np.eye(k)]])
    beta, *_ = np.linalg.lstsq(aug_x, np.vstack([y[train], np.zeros((k, 3))]), rcond=None)
    for name in ("val", "test"):
        part = (split["split"] == name).to_numpy()
        ridge = beta[0] + x[part] @ beta[1:]
        block = report[name]["covariate_baseline"]
        assert block["inputs"] == ["age", "sex=1", "bmi", "bmi_missing"]
        assert block["model"] == "ridge" and block["alpha"] == metrics.RIDGE_ALPHA
        for j, t in enumerate(TARGETS):
            assert block["per_target"][t]["mae"] == pytest.approx(
                np.abs(ridge[:, j] - y[part, j]).mean(), rel=1e-9)
            assert block["per_target"][t]["model_mae_diff"] == pytest.approx(
                report[name]["per_target"][t]["mae"] - block["per_target"][t]["mae"], rel=1e-9)


def test_predict_reproduces_test_predictions_from_csv_and_from_hdf5(run, cohort, tmp_path):
    test = pd.read_csv(run / "test_predictions.csv", dtype={"ssoid": str})
    for source in (["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"]],
                   ["--h5_path", cohort["h5"]]):
        out = tmp_path / f"{source[0][2:]}.csv"
        predict_bp.main(["--checkpoint", str(run / "bp_best.pth"), *source,
                         "--output", str(out), "--device", "cpu"])
        pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid").loc[test["ssoid"]]
        for t in TARGETS:
            if source[0] == "--npz_dir":  # other batches than training's: float rounding
                np.testing.assert_allclose(pred[f"{t}_pred"], test[f"{t}_pred"], rtol=0,
                                           atol=MMHG_ATOL)
            else:  # the HDF5 has the BMI values the extended CSV blanked: other inputs
                assert np.isfinite(pred[f"{t}_pred"]).all()
    with_bmi = pd.read_csv(tmp_path / "h5_path.csv", dtype={"ssoid": str}).set_index("ssoid")
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str}).set_index("ssoid")
    kept = [s for s in test["ssoid"] if not np.isnan(labels.loc[s, "bmi"])]
    np.testing.assert_allclose(with_bmi.loc[kept, f"{TARGETS[0]}_pred"],
                               test.set_index("ssoid").loc[kept, f"{TARGETS[0]}_pred"],
                               rtol=0, atol=MMHG_ATOL)


def _predict_cli(argv):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "predict_bp.py"), *argv],
                            cwd=ROOT, capture_output=True, text=True)
    return result.returncode, result.stderr


def test_predict_refuses_a_covariate_model_without_its_covariates(run, cohort, tmp_path):
    ckpt = ["--checkpoint", str(run / "bp_best.pth"), "--output", str(tmp_path / "p.csv")]
    code, err = _predict_cli([*ckpt, "--npz_dir", cohort["npz"]])
    assert code == 2 and "takes the covariates age, sex, bmi: give --labels_csv" in error_line(err)
    no_bmi = tmp_path / "no_bmi.csv"
    pd.read_csv(cohort["labels"]).drop(columns=["bmi"]).to_csv(no_bmi, index=False)
    code, err = _predict_cli([*ckpt, "--npz_dir", cohort["npz"], "--labels_csv", str(no_bmi)])
    assert code == 2 and f"{no_bmi} has no column bmi" in error_line(err)
    h5 = tmp_path / "no_bmi.h5"
    with h5py.File(cohort["h5"]) as src, h5py.File(h5, "w") as dst:
        for key in ("metadata", "signals"):
            src.copy(key, dst)
        del dst["metadata/bmi"]
    code, err = _predict_cli([*ckpt, "--h5_path", str(h5)])
    assert code == 2 and "has no metadata/bmi" in error_line(err)
    assert not (tmp_path / "p.csv").exists()


def test_records_missing_from_the_csv_are_skipped_not_guessed(run, cohort, tmp_path):
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    part = tmp_path / "part.csv"
    labels.iloc[:10].to_csv(part, index=False)
    out = tmp_path / "p.csv"
    predict_bp.main(["--checkpoint", str(run / "bp_best.pth"), "--npz_dir", cohort["npz"],
                     "--labels_csv", str(part), "--output", str(out)])
    assert len(pd.read_csv(out)) == 10
    skipped = pd.read_csv(tmp_path / "p_skipped.csv")
    assert len(skipped) == len(labels) - 10
    assert skipped["reason"].str.contains("covariates are unknown").all()


TRAIN_ERRORS = {
    "unknown column": (["--covariates", "age", "waist"], "has no column waist"),
    "a target": (["--covariates", "right_arm_sbp"], "right_arm_sbp is an id or a target"),
    "twice": (["--covariates", "age", "age"], "--covariates names a column twice"),
    "none without covariates": (["--modality", "none"], "give --covariates"),
    "none with pretrain": (["--modality", "none", "--covariates", "age", "--pretrain", "x.pth"],
                           "--pretrain needs an encoder"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_ERRORS))
def test_bad_covariates_are_one_line_errors(cohort, tmp_path, case):
    extra, needle = TRAIN_ERRORS[case]
    argv = [sys.executable, os.path.join(ROOT, "train_bp.py"),
            *cov_argv(cohort, tmp_path / "out", *extra)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and needle in error_line(result.stderr)
    assert not (tmp_path / "out").exists()


def test_an_identifier_column_is_refused_before_training(cohort, tmp_path):
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    labels["name"] = [f"name_{s}" for s in labels["ssoid"]]
    path = tmp_path / "with_name.csv"
    labels.to_csv(path, index=False)
    argv = cov_argv(cohort, tmp_path / "out", "--covariates", "name")
    argv[argv.index("--labels_csv") + 1] = str(path)
    with pytest.raises(UserError, match="covariate name has .* distinct text values"):
        train_bp.main(argv)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- ridge floor
def test_a_model_with_the_ridge_offset_starts_as_the_ridge():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.normal(120, 15, size=(40, 2))
    ridge = metrics.fit_ridge(x, y)
    mean, std = y.mean(axis=0), y.std(axis=0)
    model = backbones.build_bp_model(dict(arch="tiny", modality="ecg", n_targets=2,
                                          n_covariates=3, covariate_offset=True)).eval()
    model.set_covariate_offset((ridge.coef / std).T, (ridge.intercept - mean) / std)
    with torch.no_grad():
        out = model(torch.randn(40, 1, 200), torch.from_numpy(x)).numpy() * std + mean
    np.testing.assert_allclose(out, ridge(x), rtol=0, atol=1e-3)  # the head starts at 0


def test_training_starts_from_the_ridge_and_keeps_it_unless_beaten(cohort, tmp_path, capsys):
    out = tmp_path / "floor"
    train_bp.main(cov_argv(cohort, out, "--epochs", "2", "--covariates", "age", "sex", "bmi"))
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("epoch 0/2  the ridge on the covariates, before training")
               for ln in lines)
    report = json.loads((out / "final_metrics.json").read_text())
    ridge_val = report["val"]["covariate_baseline"]["mean"]["mae"]
    trained = pd.read_csv(out / "history.csv")["val_mae_mean"]
    # epoch 0 is the ridge: it is best unless an epoch beat the ridge on validation
    expected = 0 if ridge_val <= trained.min() else int(trained.idxmin()) + 1
    assert report["best_epoch"] == expected
    assert report["val"]["mean"]["mae"] <= ridge_val + 1e-3  # never worse than the ridge
    ckpt = torch.load(out / "bp_best.pth", weights_only=True)
    assert ckpt["model_config"]["covariate_offset"] and len(ckpt["ridge"]["intercept"]) == 3
    if expected == 0:
        for t in TARGETS:
            assert abs(report["test"]["covariate_baseline"]["per_target"][t]
                       ["model_mae_diff"]) < 1e-3


def test_no_ridge_offset_trains_the_whole_mapping(cohort, tmp_path):
    out = tmp_path / "plain"
    train_bp.main(cov_argv(cohort, out, "--epochs", "1", "--covariates", "age",
                           "--no_ridge_offset"))
    ckpt = torch.load(out / "bp_best.pth", weights_only=True)
    assert not ckpt["model_config"]["covariate_offset"] and "offset_weight" not in ckpt["model"]
    assert ckpt["epoch"] == 1
