"""prepare_kailuan_npz.py --features (physio.py's columns in the labels CSV) against the
synthetic cohort's truth and real ICU windows, and the features as covariates in training
and in predict_bp.py --h5_path."""
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import physio
import predict_bp
import prepare_kailuan_npz as prep
import train_bp
from conftest import DATA, MMHG_ATOL, prepared_cohort
from utils import run_cli

TARGETS = ["right_arm_sbp", "right_arm_dbp"]


def prep_argv(h5, out, *extra, targets=TARGETS, seq=7500):
    return ["--h5_path", str(h5), "--target_cols", *targets, "--output_npz", str(out / "npz"),
            "--output_csv", str(out / "labels.csv"), "--target_seq_len", str(seq),
            "--workers", "1", *extra]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("features")
    plain = prepared_cohort(base, 15, 3, 11, TARGETS, 400, extra_cols=("age", "sex"))
    out = base / "with_features"
    prep.main(prep_argv(plain["h5"], out, "--extra_cols", "age", "sex", "--features",
                        "--record_seconds", "15", seq=3000))
    return {**plain, "npz": str(out / "npz"), "labels": str(out / "labels.csv")}


def test_feature_columns_follow_the_extras_and_match_the_truth(cohort):
    labels = pd.read_csv(cohort["labels"])
    assert list(labels.columns) == (["ssoid", *TARGETS, "age", "sex"] + physio.FEATURE_COLUMNS
                                    + ["signal_digest"])
    with h5py.File(cohort["h5"], "r") as f:
        ids = [i.decode() for i in f["metadata/new_id"][:]]
        truth = pd.DataFrame({"hr": f["truth/hr_bpm"][:], "pat": f["truth/pat_ms"][:]},
                             index=ids).loc[labels["ssoid"]]
    assert np.corrcoef(labels["hr_bpm"], truth["hr"])[0, 1] >= 0.99
    assert np.corrcoef(labels["pat_foot_ms"], truth["pat"])[0, 1] >= 0.95
    # the tangent foot lies a fixed ~15 ms after the generator's onset (physio docstring)
    offset = labels["pat_foot_ms"].to_numpy() - truth["pat"].to_numpy()
    assert 5 < np.median(offset) < 25 and np.std(offset) < 5
    assert (labels["n_beats_ecg"] >= 10).all() and (labels["sqi_ppg"] > 0.9).all()


def test_icu_windows_heart_rate_and_pulse_arrival_time(tmp_path):
    src = np.load(os.path.join(DATA, "abp_ecg_ppg_windows_10s.npz"))
    h5 = tmp_path / "icu.h5"
    with h5py.File(h5, "w") as f:
        f["metadata/new_id"] = np.array([f"w_{i}".encode() for i in range(len(src["hr"]))])
        f["metadata/sbp"], f["metadata/hr"] = src["sbp"], src["hr"]
        f["signals/ecg"], f["signals/ppg"] = src["ecg"], src["ppg"]
    # 10 s windows at 125 Hz, kept at 125 Hz: 1250 samples
    prep.main(prep_argv(h5, tmp_path, "--extra_cols", "hr", "--features", "--record_seconds",
                        "10", targets=["sbp"], seq=1250))
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert len(labels) == 83  # the windows with PPG; the others are rejected as NaN
    close = (labels["hr_bpm"] - labels["hr"]).abs() <= 5
    assert close.mean() >= 0.9
    pat = labels["pat_foot_ms"].dropna()
    assert len(pat) >= 0.9 * len(labels) and pat.between(100, 600).all()


def test_features_need_a_time_base(cohort, tmp_path, capsys):
    assert run_cli(prep.main, prep_argv(cohort["h5"], tmp_path, "--features")) == 2
    assert "--features needs the records' time span" in capsys.readouterr().err
    assert not (tmp_path / "npz").exists()


def test_training_takes_features_as_covariates_and_predict_computes_them(cohort, tmp_path):
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    blank = labels["ssoid"].iloc[[0, 7]]
    labels.loc[labels["ssoid"].isin(blank), "pat_foot_ms"] = np.nan  # no detectable pairs
    csv = tmp_path / "labels.csv"
    labels.to_csv(csv, index=False)
    run = tmp_path / "run"
    train_bp.main(["--npz_dir", cohort["npz"], "--labels_csv", str(csv), "--out_dir", str(run),
                   "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "2",
                   "--batch_size", "8", "--num_workers", "0", "--covariates", "age",
                   "pat_foot_ms", "hr_bpm"])
    ckpt = torch.load(run / "bp_best.pth", weights_only=True)
    pat = next(s for s in ckpt["covariates"] if s["name"] == "pat_foot_ms")
    split = pd.read_csv(run / "split.csv", dtype=str).set_index("ssoid")
    assert pat["missing_indicator"] == (split.loc[blank, "split"] == "train").any()
    assert ckpt["sample_rate_hz"] == 200.0
    # the HDF5 rows through the same time base and the same feature code
    out = tmp_path / "h5.csv"
    predict_bp.main(["--checkpoint", str(run / "bp_best.pth"), "--h5_path", cohort["h5"],
                     "--output", str(out), "--record_seconds", "15"])
    ours = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    test = pd.read_csv(run / "test_predictions.csv", dtype={"ssoid": str}).set_index("ssoid")
    kept = [s for s in test.index if s not in set(blank)]
    for t in TARGETS:
        np.testing.assert_allclose(ours.loc[kept, f"{t}_pred"], test.loc[kept, f"{t}_pred"],
                                   rtol=0, atol=MMHG_ATOL)


def test_predict_computes_features_with_the_mains_frequency_prep_used(cohort, tmp_path,
                                                                       monkeypatch):
    csv = tmp_path / "labels.csv"
    shutil.copy(cohort["labels"], csv)
    settings = json.loads(Path(prep.settings_path(cohort["labels"])).read_text())
    assert settings["features"] and settings["mains_hz"] == 50.0  # prep's default
    Path(prep.settings_path(str(csv))).write_text(json.dumps({**settings, "mains_hz": 60.0}))
    run = tmp_path / "run"
    train_bp.main(["--npz_dir", cohort["npz"], "--labels_csv", str(csv), "--out_dir", str(run),
                   "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "1",
                   "--num_workers", "0", "--covariates", "hr_bpm"])
    assert torch.load(run / "bp_best.pth", weights_only=True)["features_mains_hz"] == 60.0
    used = []
    real = prep.x_features
    monkeypatch.setattr(prep, "x_features", lambda x, rate, mains: used.append(mains) or
                        real(x, rate, mains))
    argv = ["--checkpoint", str(run / "bp_best.pth"), "--h5_path", cohort["h5"],
            "--record_seconds", "15", "--overwrite"]
    predict_bp.main([*argv, "--output", str(tmp_path / "p.csv")])
    assert set(used) == {60.0} and len(used) == 45
    used.clear()
    predict_bp.main([*argv, "--output", str(tmp_path / "p.csv"), "--mains_hz", "50"])
    assert set(used) == {50.0}


def test_an_unreadable_prep_settings_file_is_a_one_line_error(cohort, tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    shutil.copy(cohort["labels"], csv)
    Path(prep.settings_path(str(csv))).write_text("{")
    assert run_cli(train_bp.main, ["--npz_dir", cohort["npz"], "--labels_csv", str(csv),
                                   "--out_dir", str(tmp_path / "run"), "--target_cols",
                                   *TARGETS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {prep.settings_path(str(csv))} (prep's settings for "
                          f"--labels_csv) is unreadable")
    assert not (tmp_path / "run").exists()


def test_filter_is_stored_and_applied_alike_by_the_cache_and_predict(cohort, tmp_path):
    argv = ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--target_cols",
            *TARGETS, "--arch", "tiny", "--epochs", "1", "--batch_size", "8",
            "--num_workers", "0", "--filter", "ecgfounder", "--mains_hz", "60"]
    train_bp.main([*argv, "--out_dir", str(tmp_path / "a")])
    train_bp.main([*argv, "--out_dir", str(tmp_path / "b"), "--cache_dir", str(tmp_path / "c")])
    ckpt = torch.load(tmp_path / "a" / "bp_best.pth", weights_only=True)
    assert ckpt["conditioning"] == {"filter": "ecgfounder", "fs": 200.0, "mains_hz": 60.0}
    # the cache holds filtered records: the same numbers as filtering each npz on reading
    assert (tmp_path / "a" / "test_predictions.csv").read_text() == \
        (tmp_path / "b" / "test_predictions.csv").read_text()
    out = tmp_path / "p.csv"
    predict_bp.main(["--checkpoint", str(tmp_path / "a" / "bp_best.pth"), "--npz_dir",
                     cohort["npz"], "--output", str(out)])
    ours = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    test = pd.read_csv(tmp_path / "a" / "test_predictions.csv", dtype={"ssoid": str})
    for t in TARGETS:
        np.testing.assert_allclose(ours.loc[test["ssoid"], f"{t}_pred"], test[f"{t}_pred"],
                                   rtol=0, atol=MMHG_ATOL)


def test_the_input_filter_notches_the_mains_frequency_prep_used(cohort, tmp_path):
    csv = tmp_path / "labels.csv"
    shutil.copy(cohort["labels"], csv)
    settings = json.loads(Path(prep.settings_path(cohort["labels"])).read_text())
    Path(prep.settings_path(str(csv))).write_text(json.dumps({**settings, "mains_hz": 60.0}))
    argv = ["--npz_dir", cohort["npz"], "--labels_csv", str(csv), "--target_cols", *TARGETS,
            "--arch", "tiny", "--epochs", "1", "--num_workers", "0", "--filter", "ecgfounder"]
    train_bp.main([*argv, "--out_dir", str(tmp_path / "prep")])
    assert torch.load(tmp_path / "prep" / "bp_best.pth",
                      weights_only=True)["conditioning"]["mains_hz"] == 60.0
    train_bp.main([*argv, "--out_dir", str(tmp_path / "flag"), "--mains_hz", "50"])
    assert torch.load(tmp_path / "flag" / "bp_best.pth",
                      weights_only=True)["conditioning"]["mains_hz"] == 50.0


def test_filter_auto_follows_the_pretrained_encoder(cohort, tmp_path, capsys):
    argv = ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--target_cols",
            *TARGETS, "--arch", "tiny", "--epochs", "1", "--batch_size", "8",
            "--num_workers", "0"]
    train_bp.main([*argv, "--out_dir", str(tmp_path / "scratch")])  # --filter auto
    first = tmp_path / "scratch" / "bp_best.pth"
    assert torch.load(first, weights_only=True)["conditioning"] is None
    capsys.readouterr()
    # a project checkpoint: its own conditioning, whichever it was
    train_bp.main([*argv, "--out_dir", str(tmp_path / "tuned"), "--pretrain", str(first)])
    out = capsys.readouterr().out
    assert torch.load(tmp_path / "tuned" / "bp_best.pth", weights_only=True)["conditioning"] \
        is None
    assert f"--filter auto: none, as --pretrain {first} was trained" in out
    assert f"warning: {first} was trained" not in out
    train_bp.main([*argv, "--out_dir", str(tmp_path / "filtered"), "--filter", "ecgfounder"])
    filtered = tmp_path / "filtered" / "bp_best.pth"
    train_bp.main([*argv, "--out_dir", str(tmp_path / "again"), "--pretrain", str(filtered)])
    assert torch.load(tmp_path / "again" / "bp_best.pth", weights_only=True)["conditioning"] \
        == {"filter": "ecgfounder", "fs": 200.0, "mains_hz": 50.0}
    capsys.readouterr()
    # set otherwise on purpose: trained as asked, with the load report's warning
    train_bp.main([*argv, "--out_dir", str(tmp_path / "asked"), "--pretrain", str(first),
                   "--filter", "ecgfounder"])
    assert (f"warning: {first} was trained on records filtered none, this run filters "
            f"ecgfounder at 200 Hz: give train_bp.py --filter as in that run") \
        in capsys.readouterr().out
    # ECGFounder's file: ecgfounder; but records without a sampling rate stay unfiltered,
    # with a warning
    founder = os.path.join(DATA, "net1d_tiny_ecgfounder_format.pth")
    train_bp.main([*argv, "--out_dir", str(tmp_path / "founder"), "--pretrain", founder])
    assert "--filter auto: ecgfounder (ECGFounder's" in capsys.readouterr().out
    plain = prepared_cohort(tmp_path, 6, 1, 3, TARGETS, 400)
    train_bp.main(["--npz_dir", plain["npz"], "--labels_csv", plain["labels"], "--target_cols",
                   *TARGETS, "--arch", "tiny", "--epochs", "1", "--num_workers", "0",
                   "--out_dir", str(tmp_path / "plain"), "--pretrain", founder])
    assert "warning: --filter auto stays none" in capsys.readouterr().out
    assert torch.load(tmp_path / "plain" / "bp_best.pth",
                      weights_only=True)["conditioning"] is None


def test_filter_needs_a_sampling_rate(tmp_path, capsys):
    plain = prepared_cohort(tmp_path, 6, 1, 3, TARGETS, 300)
    assert run_cli(train_bp.main, ["--npz_dir", plain["npz"], "--labels_csv", plain["labels"],
                                   "--out_dir", str(tmp_path / "run"), "--target_cols",
                                   *TARGETS, "--filter", "ecgfounder"]) == 2
    assert "--filter ecgfounder needs the records' sampling rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
