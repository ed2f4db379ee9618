"""One sample means the same time in every record: prep's time base (--fs_ecg/--fs_ppg,
--record_seconds), the sampling rate in the manifest and the checkpoint, and predict_bp.py
refusing records at another rate."""
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import predict_bp
import prepare_kailuan_npz as prep
import train_bp
from conftest import MMHG_ATOL, prepared_cohort
from utils import run_cli

FS_ECG, FS_PPG, TARGET_FS, SEQ = 242.0, 282.0, 100.0, 1400
DURATIONS = [13.5, 13.8, 14.2, 14.5, 14.8, 15.0] * 2  # 12 rows: 6 subjects x 2 records
PAT_S, FIRST_BEAT_S = 0.25, 0.8


def beats(t, centre, width):
    """Gaussian pulses every 0.9 s from ``centre``."""
    return sum(np.exp(-0.5 * ((t - (centre + 0.9 * k)) / width) ** 2) for k in range(17))


@pytest.fixture(scope="module")
def vlen_h5(tmp_path_factory):
    """Rows of different durations at fixed native rates: every R peak at 0.8 s + 0.9 k,
    every PPG pulse 250 ms later."""
    path = str(tmp_path_factory.mktemp("vlen") / "vlen.h5")
    with h5py.File(path, "w") as f:
        ecg = f.create_dataset("signals/ecg", (len(DURATIONS),), dtype=h5py.vlen_dtype(np.float32))
        ppg = f.create_dataset("signals/ppg", (len(DURATIONS),), dtype=h5py.vlen_dtype(np.float32))
        noise = np.random.default_rng(0)  # no two rows alike (prep rejects copies)
        for i, d in enumerate(DURATIONS):
            t_e, t_p = np.arange(int(d * FS_ECG)) / FS_ECG, np.arange(int(d * FS_PPG)) / FS_PPG
            ecg[i] = (beats(t_e, FIRST_BEAT_S, 0.012)
                      + 0.01 * noise.standard_normal(len(t_e))).astype(np.float32)
            ppg[i] = (beats(t_p, FIRST_BEAT_S + PAT_S, 0.03)
                      + 0.01 * noise.standard_normal(len(t_p))).astype(np.float32)
        f["metadata/new_id"] = np.array([f"s{i % 6}_{i // 6}".encode() for i in range(12)])
        f["metadata/sbp"] = np.linspace(100, 150, 12)
    return path


def prep_argv(h5, out, *extra, seq=SEQ):
    return ["--h5_path", h5, "--target_cols", "sbp", "--output_npz", str(out / "npz"),
            "--output_csv", str(out / "labels.csv"), "--target_seq_len", str(seq),
            "--workers", "1", *extra]


def delays(npz_dir):
    """Per record: (first R peak, first PPG peak after it) in samples."""
    out = []
    for name in sorted(os.listdir(npz_dir)):
        if name.endswith(".npz"):
            x = np.load(os.path.join(npz_dir, name))["x"]
            r = int(np.argmax(x[: len(x) // 12, 0]))  # the first beat, at 0.8 of 1.1+ s
            p = r + int(np.argmax(x[r: r + len(x) // 20, 1]))
            out.append((r, p))
    return np.array(out)


def test_native_rates_give_one_time_per_sample_in_every_record(vlen_h5, tmp_path):
    prep.main(prep_argv(vlen_h5, tmp_path, "--fs_ecg", str(FS_ECG), "--fs_ppg", str(FS_PPG),
                        "--target_fs", str(TARGET_FS)))
    d = delays(tmp_path / "npz")
    assert len(d) == 12
    # the R peak at 0.8 s and the pulse 250 ms later: the same sample in every record
    assert np.abs(d[:, 0] - FIRST_BEAT_S * TARGET_FS).max() <= 1
    assert np.abs(d[:, 1] - d[:, 0] - PAT_S * TARGET_FS).max() <= 1
    manifest = json.load(open(tmp_path / "npz" / prep.MANIFEST))
    assert manifest["sample_rate_hz"] == TARGET_FS and manifest["fs_ecg"] == FS_ECG
    # 13.5 s at 100 Hz is 1350 samples: padded to 1400 with the record's mean
    short = np.load(tmp_path / "npz" / "s0_0.npz")["x"][:, 0]
    np.testing.assert_allclose(short[1350:], short[:1350].mean(), rtol=1e-5)


def test_whole_record_resampling_rescales_the_delay_with_the_duration(vlen_h5, tmp_path):
    # the default (no rates): one sample is 13.5/1400 s in one record and 15/1400 in another
    prep.main(prep_argv(vlen_h5, tmp_path))
    d = delays(tmp_path / "npz")
    spread = (d[:, 1] - d[:, 0]).max() - (d[:, 1] - d[:, 0]).min()
    assert spread >= 2  # 0.25 s is 23.3 to 25.9 samples
    assert json.load(open(tmp_path / "npz" / prep.MANIFEST))["sample_rate_hz"] is None


def test_record_seconds_changes_no_sample_and_records_the_rate(tmp_path):
    (tmp_path / "a").mkdir()
    plain = prepared_cohort(tmp_path / "a", 4, 1, 2, ["right_arm_sbp"], 300)
    stated = tmp_path / "b"
    prep.main(["--h5_path", plain["h5"], "--target_cols", "right_arm_sbp", "--output_npz",
               str(stated / "npz"), "--output_csv", str(stated / "labels.csv"),
               "--target_seq_len", "300", "--workers", "1", "--record_seconds", "15"])
    for name in os.listdir(plain["npz"]):
        if name.endswith(".npz"):
            np.testing.assert_array_equal(np.load(os.path.join(plain["npz"], name))["x"],
                                          np.load(stated / "npz" / name)["x"])
    assert json.load(open(stated / "npz" / prep.MANIFEST))["sample_rate_hz"] == 20.0


@pytest.mark.parametrize("extra, fragment", [
    (["--fs_ecg", "242"], "--fs_ecg and --fs_ppg go together"),
    (["--fs_ecg", "242", "--fs_ppg", "282", "--record_seconds", "15"], "not both"),
    (["--record_seconds", "0"], "--record_seconds must be a positive number of seconds, got 0"),
    (["--fs_ecg", "242", "--fs_ppg", "-1"], "--fs_ppg must be a positive number of Hz"),
])
def test_bad_time_base_flags_are_one_line_errors(vlen_h5, tmp_path, capsys, extra, fragment):
    assert run_cli(prep.main, prep_argv(vlen_h5, tmp_path, *extra)) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "npz").exists()


def test_checkpoint_keeps_the_rate_and_predict_refuses_another(vlen_h5, tmp_path, capsys):
    rates = ["--fs_ecg", str(FS_ECG), "--fs_ppg", str(FS_PPG), "--target_fs", str(TARGET_FS)]
    prep.main(prep_argv(vlen_h5, tmp_path, *rates))
    run = tmp_path / "run"
    train_bp.main(["--npz_dir", str(tmp_path / "npz"), "--labels_csv", str(tmp_path / "labels.csv"),
                   "--out_dir", str(run), "--target_cols", "sbp", "--arch", "tiny", "--epochs",
                   "1", "--batch_size", "4", "--num_workers", "0", "--val_ratio", "0.2",
                   "--test_ratio", "0.2"])
    ckpt = str(run / "bp_best.pth")
    assert torch.load(ckpt, weights_only=True)["sample_rate_hz"] == TARGET_FS
    assert f"training records of length {SEQ} at 100 Hz" in capsys.readouterr().out
    # the HDF5 through the same time base gives the npz predictions
    from_npz, from_h5 = tmp_path / "a.csv", tmp_path / "b.csv"
    predict_bp.main(["--checkpoint", ckpt, "--npz_dir", str(tmp_path / "npz"), "--output",
                     str(from_npz)])
    predict_bp.main(["--checkpoint", ckpt, "--h5_path", vlen_h5, "--output", str(from_h5),
                     "--id_key", "new_id", *rates[:4]])
    a = pd.read_csv(from_npz, index_col="ssoid")
    b = pd.read_csv(from_h5, index_col="ssoid").loc[a.index]
    np.testing.assert_allclose(b["sbp_pred"], a["sbp_pred"], rtol=0, atol=MMHG_ATOL)
    # records at another rate, or rows without a time base, are refused
    other = tmp_path / "other"
    prep.main(prep_argv(vlen_h5, other, *rates[:4], "--target_fs", "50"))
    capsys.readouterr()
    for argv, fragment in (
            (["--npz_dir", str(other / "npz")], "holds records at 50 Hz, but the model in"),
            (["--h5_path", vlen_h5], "was trained on records at 100 Hz: with --h5_path give"),
            (["--h5_path", vlen_h5, "--record_seconds", "15"],
             "--record_seconds 15 makes 1400 samples 93.3333 Hz")):
        assert run_cli(predict_bp.main, ["--checkpoint", ckpt, "--output",
                                         str(tmp_path / "x.csv"), *argv]) == 2
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
