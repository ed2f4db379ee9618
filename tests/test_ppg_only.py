"""A cohort without ECG (``--ecg_key none``) through prep, training, prediction and
cross-validation: the ECG column is NaN and never invented, the manifest says so, features
that need the ECG are empty, a model that reads the ECG is refused with one line."""
import argparse
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

import crossval_bp
import make_synthetic_cohort
import physio
import predict_bp
import prepare_kailuan_npz as prep
import train_bp
from conftest import MMHG_ATOL, ROOT, error_line
from utils import NPZ_MANIFEST, run_cli

TARGETS = ["right_arm_sbp", "right_arm_dbp"]
SEQ, SECONDS = 1500, "15"
ECG_FEATURES = ["hr_bpm", "hrv_sdnn_ms", "hrv_rmssd_ms", "pat_foot_ms", "pat_peak_ms",
                "sqi_ecg"]
COVARIATES = ["age", "sex", "bmi", "ppg_rate_bpm"]


def prep_argv(h5, out, *extra):
    return ["--h5_path", str(h5), "--target_cols", *TARGETS, "--output_npz", str(out / "npz"),
            "--output_csv", str(out / "labels.csv"), "--target_seq_len", str(SEQ),
            "--workers", "1", "--record_seconds", SECONDS, "--features",
            "--extra_cols", "age", "sex", "bmi", *extra]


def train_argv(npz, labels, out, *extra):
    return ["--npz_dir", str(npz), "--labels_csv", str(labels), "--out_dir", str(out),
            *common_argv(*extra)]


def common_argv(*extra):
    return ["--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "1", "--batch_size", "8",
            "--num_workers", "0", "--val_ratio", "0.2", "--test_ratio", "0.25", "--seed", "3",
            *extra]


def without_ecg(src, dst):
    """A copy of the cohort HDF5 ``src`` with its metadata and PPG only."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        f.copy("metadata", g)
        g.create_group("signals")
        f.copy("signals/ppg", g["signals"])


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ppg_only")
    full_h5, ppg_h5 = base / "full.h5", base / "ppg.h5"
    make_synthetic_cohort.make_cohort(str(full_h5), n_subjects=16, records_per_subject=2, seed=21)
    without_ecg(full_h5, ppg_h5)
    prep.main(prep_argv(ppg_h5, base / "ppg", "--ecg_key", "none"))
    prep.main(prep_argv(full_h5, base / "full"))
    return {"base": base, "h5": str(ppg_h5), "full_h5": str(full_h5),
            "npz": base / "ppg" / "npz", "labels": base / "ppg" / "labels.csv",
            "full_npz": base / "full" / "npz", "full_labels": base / "full" / "labels.csv"}


@pytest.fixture(scope="module")
def ppg_run(cohorts):
    out = cohorts["base"] / "run_ppg"
    train_bp.main(train_argv(cohorts["npz"], cohorts["labels"], out, "--modality", "ppg",
                             "--covariates", *COVARIATES))
    return out


def test_prep_writes_a_nan_ecg_column_and_records_the_channels(cohorts):
    manifest = json.loads((cohorts["npz"] / NPZ_MANIFEST).read_text())
    assert manifest["channels"] == ["ppg"] and manifest["ecg_key"] is None
    assert json.loads((cohorts["full_npz"] / NPZ_MANIFEST).read_text())["channels"] == \
        ["ecg", "ppg"]
    names = sorted(os.listdir(cohorts["npz"]))
    # the records and the manifest (prep removes its lock file)
    assert sorted(os.listdir(cohorts["full_npz"])) == names and len(names) == 32 + 1
    with h5py.File(cohorts["h5"], "r") as f:
        ppg_rows = f["signals/ppg"][:]
    labels = pd.read_csv(cohorts["labels"], dtype={"ssoid": str})
    for row, ssoid in enumerate(labels["ssoid"]):
        x = np.load(cohorts["npz"] / f"{ssoid}.npz")["x"]
        full = np.load(cohorts["full_npz"] / f"{ssoid}.npz")["x"]
        assert x.shape == (SEQ, 2) and x.dtype == np.float32
        assert np.isnan(x[:, 0]).all() and np.isfinite(x[:, 1]).all()
        np.testing.assert_array_equal(x[:, 1], full[:, 1])  # the same PPG as with the ECG
        # the digest covers the PPG alone
        assert labels["signal_digest"][row] == prep.signal_digest(None, ppg_rows[row])


def test_features_that_need_the_ecg_are_empty_not_invented(cohorts):
    ours = pd.read_csv(cohorts["labels"], dtype={"ssoid": str}).set_index("ssoid")
    full = pd.read_csv(cohorts["full_labels"], dtype={"ssoid": str}).set_index("ssoid")
    assert list(ours.columns) == list(full.columns)
    assert ours[ECG_FEATURES].isna().all().all() and full[ECG_FEATURES].notna().any().all()
    assert (ours["n_beats_ecg"] == 0).all() and (ours["pat_beats"] == 0).all()
    ppg_cols = [c for c in physio.FEATURE_COLUMNS if c.startswith("ppg_")] + ["sqi_ppg",
                                                                             "n_beats_ppg"]
    pd.testing.assert_frame_equal(ours[ppg_cols], full.loc[ours.index, ppg_cols])
    assert ours["ppg_rate_bpm"].notna().mean() > 0.9


def _time_base(**flags):
    args = argparse.Namespace(**{"record_seconds": None, "fs_ecg": None, "fs_ppg": None,
                                 "target_fs": 500.0, "ecg_key": "signals/ecg",
                                 "ppg_key": "signals/ppg", **flags})
    return prep.time_base_of(args)


def test_only_the_present_signal_needs_its_native_rate():
    assert _time_base(ecg_key="none", fs_ppg=282.0).fs == (None, 282.0)
    assert _time_base(ppg_key="none", fs_ecg=242.0).sample_rate(100) == 500.0
    with pytest.raises(prep.UserError, match="--fs_ecg: the cohort has no ECG"):
        _time_base(ecg_key="none", fs_ecg=242.0, fs_ppg=282.0)
    with pytest.raises(prep.UserError, match="go together"):
        _time_base(fs_ppg=282.0)
    x, reason = prep.record_to_x(None, np.sin(np.arange(282 * 3) / 20.0), 1000,
                                 prep.TimeBase(fs=(None, 282.0), target_fs=500.0))
    assert reason is None and np.isnan(x[:, 0]).all() and np.isfinite(x[:, 1]).all()
    assert prep.record_to_x(None, np.zeros(50), 100) == (None, "flat_ppg")


def test_prep_refusals_are_one_line(cohorts, tmp_path, capsys):
    for extra, fragment in ((["--ecg_key", "none", "--ppg_key", "none"], "both none"),
                            (["--ecg_key", "none", "--fs_ecg", "242"], "--fs_ecg: the cohort"),
                            ([], "--ecg_key: signals/ecg does not exist")):
        argv = [a for a in prep_argv(cohorts["h5"], tmp_path) if a not in ("--record_seconds",
                                                                            SECONDS)]
        argv += ["--record_seconds", SECONDS] if "--fs_ecg" not in extra else []
        assert run_cli(prep.main, argv + extra) == 2
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "npz").exists() and not (tmp_path / "labels.csv").exists()


def test_training_on_ppg_alone_works_end_to_end(ppg_run):
    final = json.loads((ppg_run / "final_metrics.json").read_text())
    for split in ("val", "test"):
        assert np.isfinite([final[split]["per_target"][t]["mae"] for t in TARGETS]).all()
    assert final["test"]["n_records"] > 0
    assert pd.read_csv(ppg_run / "skipped_records.csv").empty  # NaN ECG is not a bad file


def test_the_cache_reads_the_ppg_column_alone(cohorts, ppg_run, tmp_path):
    out = tmp_path / "cached"
    train_bp.main(train_argv(cohorts["npz"], cohorts["labels"], out, "--modality", "ppg",
                             "--covariates", *COVARIATES, "--cache_dir", str(tmp_path / "c")))
    cached = pd.read_csv(out / "test_predictions.csv")
    plain = pd.read_csv(ppg_run / "test_predictions.csv")
    # the truths and predictions; the interval columns may be empty (too few val subjects)
    assert np.isfinite(cached[[f"{t}_{k}" for t in TARGETS for k in ("true", "pred")]]
                       .to_numpy()).all()
    np.testing.assert_allclose(cached.drop(columns="ssoid").to_numpy(),
                               plain.drop(columns="ssoid").to_numpy(), rtol=0, atol=MMHG_ATOL)


@pytest.mark.parametrize("modality", ["both", "ecg"])
def test_a_modality_that_needs_the_ecg_is_refused(cohorts, tmp_path, modality):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_bp.py"),
                             *train_argv(cohorts["npz"], cohorts["labels"], out, "--modality",
                                         modality)], cwd=ROOT, capture_output=True, text=True)
    line = error_line(result.stderr)
    assert result.returncode == 2 and f"--modality {modality} needs the ECG" in line
    assert str(cohorts["npz"]) in line and "holds only PPG" in line
    assert not out.exists()


def _same_as_test_predictions(pred_csv, run):
    ours = pd.read_csv(pred_csv, dtype={"ssoid": str}).set_index("ssoid")
    test = pd.read_csv(run / "test_predictions.csv", dtype={"ssoid": str}).set_index("ssoid")
    cols = [f"{t}_pred" for t in TARGETS]
    np.testing.assert_allclose(ours.loc[test.index, cols].to_numpy(), test[cols].to_numpy(),
                               rtol=0, atol=MMHG_ATOL)
    assert (ours.loc[test.index, "split"] == "test").all()


def test_predict_from_the_npz_folder_and_the_h5_without_ecg(cohorts, ppg_run, tmp_path):
    ckpt = str(ppg_run / "bp_best.pth")
    predict_bp.main(["--checkpoint", ckpt, "--npz_dir", str(cohorts["npz"]),
                     "--labels_csv", str(cohorts["labels"]), "--output", str(tmp_path / "a.csv")])
    _same_as_test_predictions(tmp_path / "a.csv", ppg_run)
    # the HDF5 rows, with the PPG feature computed from them as prep does
    predict_bp.main(["--checkpoint", ckpt, "--h5_path", cohorts["h5"], "--ecg_key", "none",
                     "--record_seconds", SECONDS, "--output", str(tmp_path / "b.csv")])
    _same_as_test_predictions(tmp_path / "b.csv", ppg_run)
    assert pd.read_csv(tmp_path / "b_skipped.csv").empty


def test_predict_refuses_a_model_that_reads_the_ecg(cohorts, tmp_path):
    run = tmp_path / "both"
    train_bp.main(train_argv(cohorts["full_npz"], cohorts["full_labels"], run))
    for source in (["--npz_dir", str(cohorts["npz"])],
                   ["--h5_path", cohorts["h5"], "--ecg_key", "none", "--record_seconds", SECONDS]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "predict_bp.py"),
                                 "--checkpoint", str(run / "bp_best.pth"), *source,
                                 "--output", str(tmp_path / "p.csv")], cwd=ROOT,
                                capture_output=True, text=True)
        line = error_line(result.stderr)
        assert result.returncode == 2 and "(modality both) needs the ECG signal" in line
        assert not (tmp_path / "p.csv").exists()


def test_crossval_runs_on_a_ppg_only_cohort(cohorts, tmp_path):
    out = tmp_path / "cv"
    crossval_bp.main(["--folds", "2", "--out_dir", str(out), "--npz_dir", str(cohorts["npz"]),
                      "--labels_csv", str(cohorts["labels"]),
                      *common_argv("--modality", "ppg", "--covariates", "age", "sex", "bmi")])
    report = json.loads((out / "cv_metrics.json").read_text())
    pooled = report["pooled"]
    assert pooled["n_records"] == 32 and pooled["n_subjects"] == 16
    assert np.isfinite([pooled["per_target"][t]["mae"] for t in TARGETS]).all()
    assert np.isfinite([pooled["covariate_baseline"]["per_target"][t]["mae"]
                        for t in TARGETS]).all()
    pred = pd.read_csv(out / "cv_predictions.csv")
    contract = ["ssoid", "fold", *(f"{t}_{k}" for t in TARGETS for k in ("true", "pred"))]
    assert sorted(pred["fold"].unique()) == [0, 1] and pred[contract].notna().all().all()
