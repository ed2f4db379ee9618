"""crossval_bp.py and train_bp.py --folds: fold assignment, no leakage, pooled metrics
equal to a recomputation from cv_predictions.csv, kill-and-rerun, and refusals."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import crossval_bp
import utils
from conftest import ROOT, error_line, prepared_cohort, wait_for_epochs

TARGETS = ["right_arm_sbp", "right_arm_dbp"]
FOLDS = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return prepared_cohort(tmp_path_factory.mktemp("cv_cohort"), 15, 2, 5, TARGETS, 200,
                           extra_cols=("age", "sex", "bmi"))


def cv_argv(cohort, out, *extra):
    return ["--folds", str(FOLDS), "--out_dir", str(out), "--npz_dir", cohort["npz"],
            "--labels_csv", cohort["labels"], "--target_cols", *TARGETS, "--arch", "tiny",
            "--epochs", "2", "--batch_size", "8", "--num_workers", "0", "--seed", "4",
            "--val_ratio", "0.2", "--covariates", "age", "sex", "bmi", *extra]


@pytest.fixture(scope="module")
def cv(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "run"
    crossval_bp.main(cv_argv(cohort, out))
    return out


def test_every_record_is_predicted_once_by_the_fold_that_never_saw_its_subject(cv, cohort):
    pred = pd.read_csv(cv / "cv_predictions.csv", dtype={"ssoid": str})
    assert list(pred.columns) == ["ssoid", "fold"] + [f"{t}_{k}" for t in TARGETS
                                                       for k in ("true", "pred")] \
        + [f"{t}_{k}" for t in TARGETS for k in ("lo", "hi")]  # each fold's own interval
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    assert sorted(pred["ssoid"]) == sorted(labels["ssoid"]) and pred["ssoid"].is_unique
    subjects = pred["ssoid"].str.split("_").str[0]
    folds = utils.subject_folds(subjects, FOLDS, seed=4)
    assert pred["fold"].tolist() == [folds[s] for s in subjects]
    for k in range(FOLDS):
        split = pd.read_csv(cv / f"fold_{k}" / "split.csv", dtype=str)
        assert list(split.columns) == ["ssoid", "subject_id", "split", "fold"]
        assert (split.groupby("subject_id")["split"].nunique() == 1).all()  # no leakage
        test = split[split["split"] == "test"]
        assert set(test["ssoid"]) == set(pred.loc[pred["fold"] == k, "ssoid"])
        assert (test["fold"].astype(int) == k).all()
        assert (split.loc[split["split"] != "test", "fold"].astype(int) != k).all()


def test_pooled_metrics_equal_a_recomputation_from_cv_predictions(cv):
    report = json.loads((cv / "cv_metrics.json").read_text())
    pred = pd.read_csv(cv / "cv_predictions.csv", dtype={"ssoid": str})
    pooled = report["pooled"]
    assert pooled["n_records"] == len(pred) == 30 and pooled["n_subjects"] == 15
    for t in TARGETS:
        e = pred[f"{t}_pred"] - pred[f"{t}_true"]
        assert pooled["per_target"][t]["mae"] == pytest.approx(e.abs().mean(), rel=1e-12)
        assert pooled["per_target"][t]["me"] == pytest.approx(e.mean(), rel=1e-12, abs=1e-12)
        # the baseline of each record is its own fold's train mean (from that checkpoint)
        means = {k: torch.load(cv / f"fold_{k}" / "bp_best.pth", weights_only=True)
                 ["target_mean"][TARGETS.index(t)] for k in range(FOLDS)}
        base = (pred["fold"].map(means) - pred[f"{t}_true"]).abs().mean()
        assert pooled["baseline"]["per_target"][t]["mae"] == pytest.approx(base, rel=1e-12)
    fold_maes = [report["per_fold"][str(k)]["mean"]["mae"] for k in range(FOLDS)]
    assert report["across_folds"]["mean"]["mae_mean"] == pytest.approx(np.mean(fold_maes))
    assert report["across_folds"]["mean"]["mae_sd"] == pytest.approx(np.std(fold_maes, ddof=1))
    assert {"covariate_baseline", "calibrated", "baseline"} <= set(pooled)
    assert pooled["calibrated"]["n_calibration_records"] == 15  # two records per subject
    assert (cv / "plots" / "out-of-fold_scatter.png").is_file()


def test_killed_cv_run_reruns_to_the_same_numbers(cv, cohort, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "crossval_bp.py"),
                             *cv_argv(cohort, out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_epochs(proc, out / "fold_1" / "history.csv", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (out / "fold_0" / "final_metrics.json").is_file()
    assert not (out / "cv_metrics.json").exists()
    finished = (out / "fold_0" / "final_metrics.json").stat().st_mtime_ns
    crossval_bp.main(cv_argv(cohort, out))
    assert (out / "fold_0" / "final_metrics.json").stat().st_mtime_ns == finished  # kept
    # same machine and settings: bit for bit
    assert (out / "cv_predictions.csv").read_text() == (cv / "cv_predictions.csv").read_text()
    assert json.loads((out / "cv_metrics.json").read_text()) == \
        json.loads((cv / "cv_metrics.json").read_text())


def test_a_finished_fold_with_other_settings_is_refused(cv, cohort):
    before = (cv / "cv_metrics.json").read_text()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "crossval_bp.py"),
                             *cv_argv(cohort, cv, "--dropout", "0.3")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "finished fold trained with other settings (--dropout 0.1, now 0.3)" in \
        error_line(result.stderr)
    assert (cv / "cv_metrics.json").read_text() == before


@pytest.mark.parametrize("extra, fragment", [
    (["--fold", "1"], "--fold is set by crossval_bp.py for each fold"),
    (["--resume"], "--resume is set by crossval_bp.py"),
])
def test_flags_the_script_sets_are_refused(cohort, tmp_path, extra, fragment):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "crossval_bp.py"),
                             *cv_argv(cohort, tmp_path / "x", *extra)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and fragment in error_line(result.stderr)
    assert not (tmp_path / "x").exists()
