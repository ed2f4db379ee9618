"""Issue 19 (trust fixes) on the model inputs: augmentation sized in real time and relative
to each record, edge padding of the conditioning filters, and npz checks that say what is
wrong with a file (a missing signal, a missing array, a file that is no npz)."""
import os

import numpy as np
import pandas as pd
import pytest
import scipy.signal

import dataset
import physio
import predict_bp
import train_bp
from conftest import MMHG_ATOL, error_line, prepared_cohort
from utils import UserError, run_cli

TARGETS = ["right_arm_sbp", "right_arm_dbp"]


def _z(shape, seed=0):
    return dataset.zscore(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# ----------------------------------------------------------------------------- wander (item 2)
def _frequency(y, fs):
    """The frequency (Hz) of the pure sine ``y``, by least squares over a 0.01 Hz grid."""
    t = np.arange(len(y)) / fs
    best = []
    for f in np.arange(0.01, 5.0, 0.01):
        basis = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], 1)
        best.append(np.linalg.lstsq(basis, y, rcond=None)[1].sum())
    return 0.01 * (1 + int(np.argmin(best)))


def test_wander_of_a_short_record_stays_below_half_a_hertz_of_real_time():
    fs, x = 500.0, _z((1, 1050))  # 2.1 s, as a PPG-BP segment
    aug = dataset.Augmenter(["wander"], seed=4, fs=fs)
    drifts = [aug(x, index=i, epoch=1)[0] - x[0] for i in range(40)]
    freqs = np.array([_frequency(d.astype(np.float64), fs) for d in drifts])
    assert freqs.min() >= 0.05 - 0.01 and freqs.max() <= 0.5 + 0.01  # never a pulse rate
    assert freqs.max() - freqs.min() > 0.2  # drawn across the band
    assert max(np.abs(d).max() for d in drifts) <= dataset.WANDER_SD + 1e-6


def test_wander_is_left_out_with_a_note_when_the_rate_is_unknown(capsys):
    x = _z((2, 300))
    aug = dataset.Augmenter(["wander"], seed=1)
    assert "wander left out" in capsys.readouterr().out
    np.testing.assert_array_equal(aug(x, 0, 1), x)


def test_training_hands_the_records_sampling_rate_to_the_augmenter(tmp_path, monkeypatch):
    import prepare_kailuan_npz as prep
    import make_synthetic_cohort

    h5 = str(tmp_path / "cohort.h5")
    make_synthetic_cohort.make_cohort(h5, n_subjects=8, records_per_subject=2, seed=3)
    prep.main(["--h5_path", h5, "--target_cols", *TARGETS, "--output_npz",
               str(tmp_path / "npz"), "--output_csv", str(tmp_path / "labels.csv"),
               "--target_seq_len", "300", "--workers", "1", "--record_seconds", "15"])
    seen = []

    class Spy(dataset.Augmenter):
        def __init__(self, parts, seed, fs=None):
            seen.append(fs)
            super().__init__(parts, seed, fs)

    monkeypatch.setattr(dataset, "Augmenter", Spy)
    train_bp.main(["--npz_dir", str(tmp_path / "npz"), "--labels_csv",
                   str(tmp_path / "labels.csv"), "--out_dir", str(tmp_path / "run"),
                   "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "1",
                   "--batch_size", "8", "--num_workers", "0", "--val_ratio", "0.25",
                   "--test_ratio", "0.25"])
    assert seen == [pytest.approx(300 / 15)]


# ----------------------------------------------------------------------------- raw inputs (item 3)
def test_augmenting_a_raw_record_matches_augmenting_it_z_scored():
    z = _z((2, 800), seed=2)
    mean = np.array([[3.0], [-40.0]], np.float32)
    sd = np.array([[2.0], [0.05]], np.float32)
    raw = mean + sd * z
    for parts in (["shift"], ["gain"], ["noise"], ["wander"], dataset.AUGMENTATIONS):
        aug = dataset.Augmenter(parts, seed=7, fs=250.0)
        for index in range(3):
            np.testing.assert_allclose(aug(raw, index, 2), mean + sd * aug(z, index, 2),
                                       rtol=0, atol=2e-4 * np.abs(mean).max())


def test_a_shift_repeats_the_last_value_instead_of_stepping_to_zero():
    raw = np.stack([np.linspace(5.0, 6.0, 500), np.full(500, -3.0)]).astype(np.float32)
    out = dataset.Augmenter(["shift"], seed=0)(raw, index=1, epoch=1)
    k = int(np.sum(out[0] == raw[0, -1])) - 1  # samples held after the original last one
    assert k > 0
    np.testing.assert_array_equal(out[:, :-k], raw[:, k:])
    np.testing.assert_array_equal(out[:, -k:], np.repeat(raw[:, -1:], k, axis=1))


# ----------------------------------------------------------------------------- edges (item 7)
def _pulse_train(seconds, fs, seed):
    """Pulses at 63-80 bpm on a breathing baseline and a slow drift."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fs)) / fs
    beats = np.cumsum(rng.uniform(0.75, 0.95, int(seconds) + 2))
    x = sum(np.exp(-((t - b) / 0.12) ** 2) + 0.4 * np.exp(-((t - b - 0.3) / 0.1) ** 2)
            for b in beats)
    return x + 0.5 * np.sin(2 * np.pi * 0.2 * t + rng.uniform(0, 6)) + 0.3 * t / seconds


def test_a_short_record_is_filtered_close_to_the_same_span_of_a_long_recording():
    fs, n = 500.0, 1050  # 2.1 s
    errors = []
    for seed in range(4):
        long = _pulse_train(30, fs, seed)
        truth = physio.condition(long, fs, "ppg")
        for start in range(2500, 12500, 2000):
            alone = physio.condition(long[start:start + n], fs, "ppg")
            ref = truth[start:start + n]
            errors.append(np.sqrt(np.mean((alone - ref) ** 2) / np.mean(ref ** 2)))
    # sosfiltfilt's default 15-sample odd padding measured 0.27 on these spans
    assert np.median(errors) < 0.2
    sos, _, padlen = physio._design("ppg", fs, None)
    assert padlen == int(physio.EDGE_PAD_S * fs)
    seg = long[2500:2500 + n]
    np.testing.assert_array_equal(physio.condition(seg, fs, "ppg"), scipy.signal.sosfiltfilt(
        sos, seg, padtype="even", padlen=n - 1))


# ----------------------------------------------------------------------------- npz checks (16, 17)
def _save(folder, name, **arrays):
    np.savez(os.path.join(folder, f"{name}.npz"), **arrays)


def test_each_unreadable_npz_says_what_is_missing_or_wrong(tmp_path):
    x = np.ones((20, 2), np.float32)
    _save(tmp_path, "two", a=x, b=x)
    _save(tmp_path, "obj", x=np.array([1, "a", None], dtype=object))
    np.save(tmp_path / "bare.npy", x)
    os.rename(tmp_path / "bare.npy", tmp_path / "bare.npz")
    (tmp_path / "text.npz").write_text("ssoid,sbp\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    reasons = {name: dataset._inspect(str(tmp_path / f"{name}.npz"))[1]
               for name in ("two", "obj", "bare", "text", "empty")}
    assert reasons == {"two": "no array 'x' (holds: a, b)",
                       "obj": "array 'x' is a pickled object array (refused)",
                       "bare": "a bare .npy array, not an npz file",
                       "text": "not an npz/zip file", "empty": "empty file"}


def test_an_all_nan_column_is_a_missing_signal_and_a_partial_one_is_bad_values(tmp_path):
    x = np.ones((20, 2), np.float32)
    x[:, 0] = np.nan
    _save(tmp_path, "ppg_only", x=x)
    x = np.ones((20, 2), np.float32)
    x[[2, 5], 0] = np.inf
    _save(tmp_path, "two_bad", x=x)
    assert dataset._inspect(str(tmp_path / "ppg_only.npz"))[1] == \
        "the ECG column is all NaN (no ECG signal)"
    assert dataset._inspect(str(tmp_path / "two_bad.npz"))[1] == \
        "non-finite values in the ECG column (2 of 20 samples)"
    assert dataset._inspect(str(tmp_path / "two_bad.npz"), [1]) == (20, "")


@pytest.fixture(scope="module")
def copied_without_manifest(tmp_path_factory):
    """A prepared cohort whose ECG is all NaN, copied without prep's manifest (`cp *.npz`)."""
    base = tmp_path_factory.mktemp("no_manifest")
    cohort = prepared_cohort(base, 8, 2, seed=5, target_cols=TARGETS, seq_len=300)
    folder = base / "copied"
    folder.mkdir()
    for name in os.listdir(cohort["npz"]):
        if name.endswith(".npz"):
            x = dataset.load_x(os.path.join(cohort["npz"], name))
            x[:, 0] = np.nan
            np.savez(folder / name, x=x)
    return {"npz": str(folder), "labels": cohort["labels"]}


def _train_argv(cohort, out, modality):
    return ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--out_dir",
            str(out), "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "1",
            "--batch_size", "8", "--num_workers", "0", "--val_ratio", "0.25",
            "--test_ratio", "0.25", "--modality", modality]


def test_a_ppg_only_folder_without_its_manifest_names_the_modality_to_use(
        copied_without_manifest, tmp_path, capsys):
    out = tmp_path / "both"
    assert run_cli(train_bp.main, _train_argv(copied_without_manifest, out, "both")) == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"error: --npz_dir {copied_without_manifest['npz']}: the ECG column is all "
                    f"NaN in every file (a PPG-only folder copied without its manifest "
                    f".prepare_kailuan_npz.json?): use --modality ppg")
    assert not out.exists()
    ids = [f[:-4] for f in sorted(os.listdir(copied_without_manifest["npz"]))]
    with pytest.raises(UserError, match="use --modality ppg"):
        dataset.check_records(ids, copied_without_manifest["npz"])


def test_modality_ppg_trains_on_a_ppg_only_folder_without_its_manifest(
        copied_without_manifest, tmp_path):
    out = tmp_path / "ppg"
    train_bp.main(_train_argv(copied_without_manifest, out, "ppg"))
    assert open(out / "skipped_records.csv").read().strip() == "ssoid,path,reason"
    # prediction reads the same folder alike: only the PPG the model reads must be finite
    pred = tmp_path / "pred.csv"
    predict_bp.main(["--checkpoint", str(out / "bp_best.pth"), "--npz_dir",
                     copied_without_manifest["npz"], "--output", str(pred)])
    ours = pd.read_csv(pred, dtype={"ssoid": str}).set_index("ssoid")
    test = pd.read_csv(out / "test_predictions.csv", dtype={"ssoid": str}).set_index("ssoid")
    assert len(ours) == 16 and pd.read_csv(tmp_path / "pred_skipped.csv").empty
    for t in TARGETS:
        np.testing.assert_allclose(ours.loc[test.index, f"{t}_pred"], test[f"{t}_pred"],
                                   rtol=0, atol=MMHG_ATOL)
