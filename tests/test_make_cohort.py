"""make_cohort_h5.py: WFDB records, PulseDB subset files and plain arrays into the cohort
layout, read by prep with the time base the file records; exact BP per window on
constructed records, exact round trips, one precise error per PulseDB layout difference, a
chunked read equal to a whole read, and convert -> prep -> one training epoch."""
import json
import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

import make_cohort_h5 as mc
import prepare_kailuan_npz as prep
import train_bp
from conftest import DATA, error_line
from utils import NPZ_MANIFEST, run_cli

FS, BEAT, WIN = 125, 125, 1250  # 1 s beats: a 10 s window holds 10 whole beats
SBP = [110.0, 120.5, 131.2, 140.0, 125.3, 118.7]
DBP = [70.0, 75.5, 80.1, 85.0, 78.4, 72.6]


# ----------------------------------------------------------------------------- records
def pulse() -> np.ndarray:
    """One beat of 0..1: 0 only at its first sample, 1 only at sample 25 (so each window's
    systolic peaks and diastolic troughs lie on samples with known values)."""
    j = np.arange(BEAT)
    rise = np.sin(np.pi / 2 * j / 25) ** 2
    fall = 0.25 + 0.75 * np.exp(-(j - 25) / 30.0) + 0.06 * np.exp(-0.5 * ((j - 60) / 6) ** 2)
    p = np.where(j <= 25, rise, np.minimum(fall, 0.999))
    p[25] = 1.0
    return p


def write_record(folder, name, sbp, dbp, seed, comments=("<age>: 61 <sex>: F",),
                 channels=("II", "PLETH", "ABP"), edit=None):
    """A WFDB record of len(sbp) windows whose arterial beats in window k peak at sbp[k] and
    start at dbp[k] (stored in tenths of mmHg: exact), with a noisy ECG and PPG;
    ``edit(d)`` may change the digital samples (ECG, PPG, ABP columns) before writing."""
    import wfdb

    rng = np.random.default_rng(seed)
    p, n = pulse(), len(sbp) * WIN
    abp = np.concatenate([np.tile(d + (s - d) * p, WIN // BEAT) for s, d in zip(sbp, dbp)])
    phase = np.arange(n) % BEAT
    ecg = (np.exp(-0.5 * ((phase - 10) / 1.5) ** 2) + 0.2 * np.exp(-0.5 * ((phase - 45) / 6) ** 2)
           + 0.01 * rng.standard_normal(n))
    ppg = np.roll(np.tile(p, n // BEAT), 30) + 0.005 * rng.standard_normal(n)
    d = np.column_stack([np.round(ecg * 1000), np.round(ppg * 1000),
                         np.round(abp * 10)]).astype(np.int64)
    if edit:
        edit(d)
    keep = [i for i, c in enumerate(("II", "PLETH", "ABP")) if c in channels]
    wfdb.wrsamp(name, fs=FS, units=[["mV", "NU", "mmHg"][i] for i in keep],
                sig_name=[list(channels)[keep.index(i)] for i in keep], d_signal=d[:, keep],
                fmt=["16"] * len(keep), adc_gain=[[1000.0, 1000.0, 10.0][i] for i in keep],
                baseline=[0] * len(keep), comments=list(comments), write_dir=str(folder))


def convert(*argv):
    mc.main([*map(str, argv)])


def read_h5(path):
    """Every dataset and the file attributes, text decoded."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                values = obj[:]
                if h5py.check_string_dtype(obj.dtype):
                    values = obj.asstr()[:]
                out[name] = values
        f.visititems(visit)
        out["attrs"] = dict(f.attrs)
    return out


def cli_error(capsys, argv) -> str:
    assert run_cli(mc.main, [*map(str, argv)]) == 2
    return error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Six records of six windows with known BP, one per subject."""
    folder = tmp_path_factory.mktemp("wfdb")
    for r in range(6):
        write_record(folder, f"r{r}", [s + r for s in SBP], [d + r / 2 for d in DBP], seed=r)
    return folder


# ----------------------------------------------------------------------------- wfdb
def test_wfdb_windows_carry_the_exact_bp_of_their_beats(records, tmp_path):
    out = tmp_path / "c.h5"
    convert("wfdb", "--records", records, "--out", out)
    h = read_h5(out)
    assert h["signals/ecg"].shape == h["signals/ppg"].shape == (36, WIN)
    assert list(h["metadata/new_id"][:7]) == [f"r0_w{k:05d}" for k in range(6)] + ["r1_w00000"]
    for r in range(6):
        rows = h["metadata/record"] == f"r{r}"
        np.testing.assert_array_equal(h["metadata/sbp"][rows], np.float32([s + r for s in SBP]))
        np.testing.assert_array_equal(h["metadata/dbp"][rows],
                                      np.float32([d + r / 2 for d in DBP]))
        assert set(h["metadata/subject"][rows]) == {f"r{r}"}
    np.testing.assert_array_equal(h["metadata/start_s"][:6], np.arange(6) * 10.0)
    assert (h["metadata/age"] == 61).all() and set(h["metadata/sex"]) == {"F"}
    assert h["attrs"]["record_seconds"] == 10.0 and h["attrs"]["fs_ecg"] == FS


def test_wfdb_window_samples_are_the_records_samples(records, tmp_path):
    import wfdb

    out = tmp_path / "c.h5"
    convert("wfdb", "--records", records, "--out", out, "--window_s", 4, "--step_s", 2.4)
    h = read_h5(out)
    rec = wfdb.rdrecord(str(records / "r2")).p_signal
    rows = np.flatnonzero(h["metadata/record"] == "r2")
    assert len(rows) == (7500 - 500) // 300 + 1 == 24
    for k, row in enumerate(rows):
        a = k * 300
        np.testing.assert_array_equal(h["signals/ecg"][row], rec[a:a + 500, 0].astype(np.float32))
        np.testing.assert_array_equal(h["signals/ppg"][row], rec[a:a + 500, 1].astype(np.float32))
    assert h["attrs"]["record_seconds"] == 4.0


def test_wfdb_rejects_bad_windows_by_reason(tmp_path, capsys):
    def damage(d):
        d[1 * WIN:2 * WIN, 1] = 500  # window 1: flat PPG
        d[2 * WIN + 100:2 * WIN + 120, 0] = 5000  # window 2: ECG held at its maximum
        d[3 * WIN + 7, 1] = -32768  # window 3: a missing PPG sample (NaN)

    folder = tmp_path / "recs"
    folder.mkdir()
    write_record(folder, "bad", [*SBP[:4], 300.0, 120.0], DBP, seed=0, edit=damage)
    write_record(folder, "noabp", SBP, DBP, seed=1, channels=("II", "PLETH"))
    write_record(folder, "noppg", SBP, DBP, seed=2, channels=("II", "ABP"))
    out = tmp_path / "c.h5"
    convert("wfdb", "--records", folder, "--out", out)
    printed = capsys.readouterr().out
    for line in ("rejected flat_ppg: 1", "rejected clipped_ecg: 1", "rejected nan_or_inf_ppg: 1",
                 "rejected implausible_bp: 1", "skipped no_ppg_channel: 1"):
        assert line in printed
    h = read_h5(out)
    assert list(h["metadata/new_id"]) == ["bad_w00000", "bad_w00005",
                                          *[f"noabp_w{k:05d}" for k in range(6)]]
    np.testing.assert_array_equal(h["metadata/sbp"][:2], np.float32([SBP[0], 120.0]))
    assert np.isnan(h["metadata/sbp"][2:]).all()  # no arterial channel: no BP, none invented


def test_wfdb_bp_from_real_arterial_pressure_matches_the_fixture_labels(tmp_path):
    """Six contiguous 10 s windows of a real ICU record (c2010_a11, ECG + PPG + ABP)."""
    import wfdb

    z = np.load(os.path.join(DATA, "abp_ecg_ppg_windows_10s.npz"))
    labels = pd.read_csv(os.path.join(DATA, "abp_ecg_ppg_windows_10s_labels.csv"))
    rows = labels.index[labels["subject"] == "c2010_a11"][:6]
    assert (np.diff(labels["start_s"][rows]) == 10).all()
    signal = np.column_stack([np.concatenate(z[k][rows]) for k in ("ecg", "ppg", "abp")])
    folder = tmp_path / "real"
    folder.mkdir()
    wfdb.wrsamp("a11", fs=FS, units=["mV", "NU", "mmHg"], sig_name=["II", "PLETH", "ABP"],
                p_signal=signal.astype(np.float64), fmt=["16"] * 3, write_dir=str(folder))
    convert("wfdb", "--records", folder, "--out", tmp_path / "c.h5")
    h = read_h5(tmp_path / "c.h5")
    assert len(h["metadata/sbp"]) == 6
    np.testing.assert_allclose(h["metadata/sbp"], labels["sbp"][rows], atol=2.0)
    np.testing.assert_allclose(h["metadata/dbp"], labels["dbp"][rows], atol=2.0)


def test_wfdb_bp_from_cuff_readings_by_record_and_time(records, tmp_path, capsys):
    cuff = tmp_path / "cuff.csv"
    cuff.write_text("record,time_s,sbp,dbp\nr0,4,101,61\nr0,33,102,62\nr1,200,1,1\n")
    subjects = tmp_path / "map.csv"
    subjects.write_text("record,subject\n" + "".join(f"r{r},person{r // 2}\n" for r in range(6)))
    out = tmp_path / "c.h5"
    convert("wfdb", "--records", records, "--out", out, "--cuff_csv", cuff,
            "--cuff_max_gap_s", 6, "--subject_map", subjects)
    assert "rejected no_cuff_reading: 34" in capsys.readouterr().out
    h = read_h5(out)
    # window centres 5, 15, 25, 35 ... s: 4 s is within 6 s of window 0, 33 s of window 3
    assert list(h["metadata/new_id"]) == ["r0_w00000", "r0_w00003"]
    np.testing.assert_array_equal(h["metadata/sbp"], [101, 102])
    assert list(h["metadata/subject"]) == ["person0", "person0"]


def test_bidmc_record_without_arterial_channel_goes_through_prep_without_targets(tmp_path,
                                                                                capsys):
    out = tmp_path / "bidmc.h5"
    convert("wfdb", "--records", os.path.join(DATA, "bidmc"), "--out", out)
    # the suggested prep command is one prep accepts: no --target_cols without BP
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"next: python prepare_kailuan_npz.py --h5_path {out} --subject_key subject "
        f"--target_seq_len 1250 --output_npz DIR --output_csv labels.csv")
    h = read_h5(out)
    assert h["signals/ppg"].shape == (48, WIN) and "metadata/sbp" not in h
    assert h["metadata/age"][0] == 88 and h["metadata/sex"][0] == "M"
    assert h["signals/ppg"].dtype == np.float32
    with h5py.File(out, "r") as f:
        assert f["signals/ppg"].attrs["channel"] == "PLETH"
        assert f["signals/ppg"].attrs["units"] == "NU"
    prep.main(["--h5_path", str(out), "--subject_key", "subject", "--extra_cols", "age", "sex",
               "--output_npz", str(tmp_path / "npz"), "--output_csv", str(tmp_path / "l.csv"),
               "--target_seq_len", "1250", "--workers", "1"])
    labels = pd.read_csv(tmp_path / "l.csv")
    assert list(labels.columns) == ["ssoid", "subject_id", "age", "sex", "signal_digest"]
    assert len(labels) == 48 and set(labels["subject_id"]) == {"bidmc01"}
    manifest = json.loads((tmp_path / "npz" / NPZ_MANIFEST).read_text())
    assert manifest["record_seconds"] == 10.0 and manifest["sample_rate_hz"] == 125.0


def test_prep_takes_the_time_base_from_the_file_and_refuses_a_contradiction(records, tmp_path,
                                                                            capsys):
    out = tmp_path / "c.h5"
    convert("wfdb", "--records", records, "--out", out)
    argv = ["--h5_path", str(out), "--target_cols", "sbp", "--output_npz", str(tmp_path / "n"),
            "--output_csv", str(tmp_path / "l.csv"), "--target_seq_len", "500", "--workers", "1"]
    capsys.readouterr()
    assert run_cli(prep.main, argv + ["--record_seconds", "15"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: --record_seconds 15: the rows of {out} span 10 s (its record_seconds "
        f"attribute)")
    assert not (tmp_path / "n").exists()
    prep.main(argv + ["--features"])  # needs a time base: the file's
    manifest = json.loads((tmp_path / "n" / NPZ_MANIFEST).read_text())
    assert manifest["sample_rate_hz"] == 50.0  # 500 samples over 10 s
    assert pd.read_csv(tmp_path / "l.csv")["hr_bpm"].between(59, 61).all()


def test_convert_prep_train_one_epoch(records, tmp_path):
    h5 = tmp_path / "c.h5"
    convert("wfdb", "--records", records, "--out", h5)
    prep.main(["--h5_path", str(h5), "--subject_key", "subject", "--target_cols", "sbp", "dbp",
               "--extra_cols", "age", "--output_npz", str(tmp_path / "npz"), "--output_csv",
               str(tmp_path / "labels.csv"), "--target_seq_len", "1250", "--workers", "1"])
    run = tmp_path / "run"
    train_bp.main(["--npz_dir", str(tmp_path / "npz"), "--labels_csv",
                   str(tmp_path / "labels.csv"), "--out_dir", str(run), "--target_cols", "sbp",
                   "dbp", "--arch", "tiny", "--epochs", "1", "--batch_size", "8",
                   "--num_workers", "0", "--val_ratio", "0.2", "--test_ratio", "0.2",
                   "--seed", "1"])
    metrics = json.loads((run / "final_metrics.json").read_text())
    split = pd.read_csv(run / "split.csv")
    assert len(split) == 36 and split.groupby("subject_id")["split"].nunique().max() == 1
    assert metrics["test"]["n_records"] == (split["split"] == "test").sum() == 6
    truth = pd.read_csv(run / "test_predictions.csv")["sbp_true"]
    assert set(np.round(truth, 1)) <= {round(s + r, 1) for s in SBP for r in range(6)}


def test_wfdb_bad_input_is_one_line_and_writes_nothing(records, tmp_path, capsys):
    out = tmp_path / "c.h5"
    assert cli_error(capsys, ["wfdb", "--records", tmp_path / "nope", "--out", out]) == (
        f"error: --records {tmp_path / 'nope'}: no such folder")
    assert cli_error(capsys, ["wfdb", "--records", records, "--out", out,
                              "--window_s", 10.003]) == (
        "error: --window_s 10.003 is not a whole number of samples at 125 Hz")
    assert cli_error(capsys, ["wfdb", "--records", records, "--out", out,
                              "--ecg", "none", "--ppg", "none"]) == (
        "error: --ecg and --ppg are both none: a window needs a signal")
    broken = tmp_path / "broken"
    shutil.copytree(records, broken)
    with open(broken / "r3.dat", "r+b") as fh:
        fh.truncate(1000)  # a record whose samples end early: found while writing
    assert cli_error(capsys, ["wfdb", "--records", broken, "--out", out]).startswith(
        f"error: --records: {broken / 'r3'} cannot be read")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    out.write_text("x")
    assert cli_error(capsys, ["wfdb", "--records", records, "--out", out]) == (
        f"error: --out {out} already exists; add --overwrite to replace it")


# ----------------------------------------------------------------------------- pulsedb
N_SEG = 23


def _char(f, name, text):
    ds = f.create_dataset(f"#refs#/{name}", data=np.array([[ord(c)] for c in text], np.uint16))
    ds.attrs["MATLAB_class"] = np.bytes_("char")
    return ds.ref


def write_pulsedb(path, n=N_SEG, edit=None):
    """A subset file laid out as Generate_Subsets.m saves it with MATLAB -v7.3; returns the
    arrays written. ``edit(f, subset)`` may change the layout afterwards."""
    rng = np.random.default_rng(5)
    signals = rng.standard_normal((1250, 3, n))
    subjects = [f"p{100 + j // 4:06d}_{j // 4 % 2}" for j in range(n)]
    values = {"SBP": rng.uniform(90, 180, n), "DBP": rng.uniform(50, 100, n),
              "Age": rng.integers(20, 90, n).astype(float)}
    for k in ("Height", "Weight", "BMI"):
        values[k] = np.where([s.endswith("_1") for s in subjects], rng.uniform(20, 190, n),
                             np.nan)
    with h5py.File(path, "w") as f:
        subset = f.create_group("Subset")
        subset.attrs["MATLAB_class"] = np.bytes_("struct")
        ds = subset.create_dataset("Signals", data=signals)
        ds.attrs["MATLAB_class"] = np.bytes_("double")
        for k, v in values.items():
            subset.create_dataset(k, data=v[None, :]).attrs["MATLAB_class"] = np.bytes_("double")
        for k, texts in (("Subject", subjects), ("Gender", ["MF"[j % 2] for j in range(n)])):
            refs = [_char(f, f"{k}{j}", t) for j, t in enumerate(texts)]
            ds = subset.create_dataset(k, data=np.array([refs], dtype=h5py.ref_dtype))
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
        if edit:
            edit(f, subset)
    return {"signals": signals, "subjects": subjects, **values}


def test_pulsedb_segments_subjects_and_covariates_are_kept(tmp_path):
    src = write_pulsedb(tmp_path / "s.mat")
    out = tmp_path / "c.h5"
    convert("pulsedb", "--subset", tmp_path / "s.mat", "--out", out, "--chunk", 5)
    h = read_h5(out)
    np.testing.assert_array_equal(h["signals/ecg"], src["signals"][:, 0].T.astype(np.float32))
    np.testing.assert_array_equal(h["signals/ppg"], src["signals"][:, 1].T.astype(np.float32))
    assert "signals/abp" not in h
    for k in ("SBP", "DBP", "Age", "Height", "Weight", "BMI"):
        np.testing.assert_array_equal(h[f"metadata/{k.lower()}"], src[k])  # NaN stays NaN
    assert list(h["metadata/subject"]) == src["subjects"]
    assert list(h["metadata/sex"][:3]) == ["M", "F", "M"]
    assert list(h["metadata/source"][::4]) == ["MIMIC-III", "VitalDB"] * 3
    assert h["metadata/new_id"][5] == "p000101_1-0000005"
    assert h["attrs"]["record_seconds"] == 10.0 and h["attrs"]["source_format"] == "pulsedb"


def test_pulsedb_chunked_read_equals_whole_read(tmp_path):
    write_pulsedb(tmp_path / "s.mat")
    for chunk in (1, 7, 10 ** 6):
        convert("pulsedb", "--subset", tmp_path / "s.mat", "--out", tmp_path / f"{chunk}.h5",
                "--chunk", chunk)
    whole = read_h5(tmp_path / f"{10 ** 6}.h5")
    for chunk in (1, 7):
        part = read_h5(tmp_path / f"{chunk}.h5")
        assert part.keys() == whole.keys()
        for key in whole:
            if key != "attrs":
                np.testing.assert_array_equal(part[key], whole[key])


def _drop(name):
    return lambda f, s: s.__delitem__(name)


def _replace(name, data, matlab_class="double"):
    def edit(f, s):
        del s[name]
        s.create_dataset(name, data=data).attrs["MATLAB_class"] = np.bytes_(matlab_class)
    return edit


def _point_subject_at_double(f, s):
    target = f.create_dataset("#refs#/number", data=np.zeros((1, 1)))
    target.attrs["MATLAB_class"] = np.bytes_("double")
    refs = s["Subject"][:]
    refs[0, 3] = target.ref
    s["Subject"][...] = refs


def _wrapped(f, s):
    f.move("Subset", "Data")


LAYOUT_ERRORS = [
    (_wrapped, "no group Subset at the top (found: #refs#, Data)"),
    (_drop("Signals"), "Subset/Signals is missing"),
    (_drop("Subject"), "Subset/Subject is missing"),
    (_replace("Signals", np.zeros((N_SEG, 3, 1250))),
     f"Subset/Signals has shape ({N_SEG}, 3, 1250): segments first, samples last"),
    (_replace("Signals", np.zeros((1250, 2, N_SEG))),
     f"Subset/Signals has shape (1250, 2, {N_SEG}); expected (samples, 3, segments)"),
    (_replace("Signals", np.zeros((1250, 3, N_SEG), np.int16)),
     "Subset/Signals holds int16; expected double"),
    (_replace("SBP", np.zeros((N_SEG, 1))),
     f"Subset/SBP has shape ({N_SEG}, 1) (a column, not MATLAB's (1, N) row); expected "
     f"(1, {N_SEG})"),
    (_replace("DBP", np.zeros((1, N_SEG - 1))), f"Subset/DBP has shape (1, {N_SEG - 1})"),
    (_replace("Age", np.zeros((1, N_SEG), np.float32), "single"),
     "Subset/Age holds float32 (MATLAB_class single); expected double"),
    (_replace("Gender", np.zeros((1, N_SEG), np.uint16), "char"),
     "Subset/Gender holds uint16 (MATLAB_class char); expected a cell array of references"),
    (_point_subject_at_double, "Subset/Subject segment 3 points to float64 (MATLAB_class "
                               "double); expected a uint16 char array"),
]


@pytest.mark.parametrize("edit,message", LAYOUT_ERRORS, ids=[m[:30] for _, m in LAYOUT_ERRORS])
def test_pulsedb_layout_differences_are_one_precise_error(tmp_path, capsys, edit, message):
    path, out = tmp_path / "s.mat", tmp_path / "c.h5"
    write_pulsedb(path, edit=edit)
    line = cli_error(capsys, ["pulsedb", "--subset", path, "--out", out, "--chunk", 4])
    assert line.startswith(f"error: --subset {path}: {message}"), line
    assert line.endswith("(docs/cohorts.md)") and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_pulsedb_v5_file_and_describe(tmp_path, capsys):
    v5 = tmp_path / "old.mat"
    v5.write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + bytes(100))
    assert cli_error(capsys, ["pulsedb", "--subset", v5, "--out", tmp_path / "c.h5"]) == (
        f"error: --subset {v5} is a MATLAB v5 file, not v7.3 (HDF5): PulseDB subsets are "
        f"saved with -v7.3; re-save it so")
    write_pulsedb(tmp_path / "s.mat", n=4)
    convert("pulsedb", "--subset", tmp_path / "s.mat", "--describe")
    lines = capsys.readouterr().out.splitlines()
    assert "Subset/Signals: dataset shape (1250, 3, 4) dtype float64 MATLAB_class double" in lines
    assert "Subset/Subject: dataset shape (1, 4) dtype object MATLAB_class cell" in lines
    assert lines[-1] == "#refs#: group of 8 objects"


# ----------------------------------------------------------------------------- arrays
def array_file(path, n, seed, **extra):
    rng = np.random.default_rng(seed)
    arrays = {"ecg": rng.standard_normal((n, 500)), "ppg": rng.standard_normal((n, 500)),
              "fs": np.float64(50.0), "subject": np.array([f"s{seed}_{i // 2}" for i in range(n)]),
              "sbp": rng.uniform(90, 180, n), "age": rng.integers(20, 90, n),
              "sex": np.array(["M", "F"] * (n // 2) + ["M"] * (n % 2)), **extra}
    np.savez(path, **arrays)
    return arrays


def test_arrays_round_trip_exactly(tmp_path):
    folder = tmp_path / "arr"
    folder.mkdir()
    a = array_file(folder / "a.npz", 5, 0)
    b = array_file(folder / "b.npz", 4, 1)
    convert("arrays", "--npz", folder, "--out", tmp_path / "c.h5")
    h = read_h5(tmp_path / "c.h5")
    for s in ("ecg", "ppg"):
        assert h[f"signals/{s}"].dtype == np.float64
        np.testing.assert_array_equal(h[f"signals/{s}"], np.concatenate([a[s], b[s]]))
    for k in ("sbp", "age", "sex", "subject"):
        np.testing.assert_array_equal(h[f"metadata/{k}"], np.concatenate([a[k], b[k]]))
    assert h["metadata/age"].dtype == a["age"].dtype
    assert list(h["metadata/new_id"][4:6]) == ["a_000004", "b_000000"]
    assert h["attrs"]["record_seconds"] == 10.0 and h["attrs"]["fs_ppg"] == 50.0


def test_arrays_ppg_only_and_ids(tmp_path):
    arrays = {"ppg": np.arange(12, dtype=np.float32).reshape(3, 4), "fs": np.float64(2.0),
              "subject": np.array([7, 7, 8]), "id": np.array(["x1", "x2", "y1"])}
    np.savez(tmp_path / "p.npz", **arrays)
    convert("arrays", "--npz", tmp_path / "p.npz", "--out", tmp_path / "c.h5")
    h = read_h5(tmp_path / "c.h5")
    assert "signals/ecg" not in h and h["signals/ppg"].dtype == np.float32
    np.testing.assert_array_equal(h["signals/ppg"], arrays["ppg"])
    assert list(h["metadata/new_id"]) == ["x1", "x2", "y1"]
    assert list(h["metadata/subject"]) == ["7", "7", "8"] and h["attrs"]["record_seconds"] == 2.0


def test_arrays_bad_input_is_one_line(tmp_path, capsys):
    out = tmp_path / "c.h5"
    np.savez(tmp_path / "nosubj.npz", ppg=np.zeros((2, 4)), fs=1.0)
    assert cli_error(capsys, ["arrays", "--npz", tmp_path / "nosubj.npz", "--out", out]) == (
        f"error: --npz {tmp_path / 'nosubj.npz'}: needs subject (N,): the person of each row "
        f"(one row per person: subject = np.arange(N))")
    np.savez(tmp_path / "short.npz", ppg=np.zeros((2, 4)), fs=1.0, subject=np.arange(2),
             sbp=np.zeros(3))
    assert cli_error(capsys, ["arrays", "--npz", tmp_path / "short.npz", "--out", out]) == (
        f"error: --npz {tmp_path / 'short.npz'}: sbp has shape (3,); metadata arrays must be "
        f"(N,) = (2,)")
    folder = tmp_path / "mixed"
    folder.mkdir()
    array_file(folder / "a.npz", 2, 0)
    array_file(folder / "b.npz", 2, 1, fs=np.float64(100.0))
    assert "differ from" in cli_error(capsys, ["arrays", "--npz", folder, "--out", out])
    assert not out.exists()
