"""prepare_kailuan_npz.py: the files of CONTRACT section 2, the resampler against analytic
sines, every rejection reason, id safety, kill-and-rerun, id and storage types, and real
ICU waveforms keeping their heart rate."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

import make_synthetic_cohort as msc
import prepare_kailuan_npz as prep
from conftest import DATA, ROOT
from utils import run_cli

TARGETS = ["right_arm_dbp", "left_arm_mbp", "right_arm_pp", "right_arm_sbp", "left_arm_sbp"]
SEQ = 1000
FAULTS = dict(n_nan=2, n_inf=2, n_flat=2, n_duplicate=2, n_missing_labels=2, n_unsafe_ids=4)


def prep_argv(h5, out, *extra, targets=TARGETS, seq=SEQ):
    return ["--h5_path", str(h5), "--target_cols", *targets, "--output_npz", str(out / "npz"),
            "--output_csv", str(out / "labels.csv"), "--target_seq_len", str(seq),
            "--workers", "1", *extra]


def load_npz(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npz"):
            with np.load(os.path.join(folder, name)) as z:
                assert z.files == ["x"]
                out[name[:-4]] = z["x"]
    return out


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A 30-record cohort with every fault, prepared once with subject and extra columns."""
    base = tmp_path_factory.mktemp("faulty")
    h5 = base / "cohort.h5"
    info = msc.make_cohort(str(h5), n_subjects=10, records_per_subject=3, seed=11, **FAULTS)
    out = base / "out"
    out.mkdir()
    prep.main(prep_argv(h5, out, "--subject_key", "uid", "--extra_cols", "age", "sex", "name"))
    with h5py.File(h5) as f:
        meta = {k: f["metadata"][k][:] for k in f["metadata"]}
        ecg, ppg = f["signals/ecg"][:], f["signals/ppg"][:]
    return {"h5": h5, "out": out, "info": info, "meta": meta, "ecg": ecg, "ppg": ppg,
            "labels": pd.read_csv(out / "labels.csv", dtype={"ssoid": str, "subject_id": str}),
            "rejected": pd.read_csv(out / "labels_rejected.csv", dtype={"id": str},
                                    keep_default_na=False)}


# ----------------------------------------------------------------------------- outputs
def test_files_shapes_dtype_and_column_order(faulty):
    labels, arrays = faulty["labels"], load_npz(faulty["out"] / "npz")
    assert list(labels.columns) == ["ssoid", "subject_id", *TARGETS, "age", "sex", "name",
                                    "signal_digest"]
    assert set(labels["ssoid"]) == set(arrays)
    assert len(labels) == len(arrays) == 30 - 14 + 2  # 14 faults, 2 of them missing labels only
    for x in arrays.values():
        assert x.shape == (SEQ, 2) and x.dtype == np.float32
    assert all(s == i.split("_")[0] for s, i in zip(labels["subject_id"], labels["ssoid"]))


def test_labels_equal_the_hdf5_values_and_missing_ones_are_empty(faulty):
    meta, labels = faulty["meta"], faulty["labels"]
    ids = [v.decode() for v in meta["new_id"]]
    rows = [ids.index(i) for i in labels["ssoid"]]
    for col in TARGETS:
        expected = meta[col][rows]
        got = labels[col].to_numpy(dtype=np.float32)
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        assert np.array_equal(got[~np.isnan(got)], expected[~np.isnan(expected)])  # no rounding
    assert list(labels["age"]) == list(meta["age"][rows])
    assert list(labels["name"]) == [meta["name"][r].decode() for r in rows]
    missing = [r for r, f in faulty["info"]["faults"].items() if f == "missing_label"]
    assert {ids[r] for r in missing} == set(labels["ssoid"][labels[TARGETS].isna().any(axis=1)])


def test_x_holds_resampled_ecg_then_ppg(faulty):
    arrays, ids = load_npz(faulty["out"] / "npz"), [v.decode() for v in faulty["meta"]["new_id"]]
    for rid, x in list(arrays.items())[:4]:
        row = ids.index(rid)
        ecg, ppg = faulty["ecg"][row], faulty["ppg"][row]
        np.testing.assert_array_equal(x[:, 0], prep.resample_signal(ecg, SEQ).astype(np.float32))
        np.testing.assert_array_equal(x[:, 1], prep.resample_signal(ppg, SEQ).astype(np.float32))
        # Independent check: linear interpolation of the raw rows at the output positions.
        for col, raw in ((0, ecg), (1, ppg)):
            pos = (np.arange(SEQ) + 0.5) * len(raw) / SEQ - 0.5
            other = ppg if col == 0 else ecg
            other_pos = (np.arange(SEQ) + 0.5) * len(other) / SEQ - 0.5
            assert np.corrcoef(x[:, col], np.interp(pos, np.arange(len(raw)), raw))[0, 1] > 0.95
            assert np.corrcoef(x[:, col],
                               np.interp(other_pos, np.arange(len(other)), other))[0, 1] < 0.5


def test_every_fault_is_rejected_with_its_reason(faulty):
    ids = [v.decode() for v in faulty["meta"]["new_id"]]
    expected = {r: f for r, f in faulty["info"]["faults"].items() if f != "missing_label"}
    rej = faulty["rejected"]
    assert list(rej.columns) == ["row", "id", "reason", "duplicate_of"]
    assert set(rej["duplicate_of"]) == {""}  # no repeated recording in this cohort
    assert dict(zip(rej["row"], rej["reason"])) == expected
    assert list(rej["row"]) == sorted(expected)
    assert list(rej["id"]) == [ids[r] for r in rej["row"]]
    assert {"../x", "a/b", "..", ""} <= set(rej["id"])


def test_unsafe_ids_write_nothing_outside_the_output_folder(faulty):
    base = faulty["out"].parent
    found = {os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs}
    npz = {f"out/npz/{i}.npz" for i in faulty["labels"]["ssoid"]}
    assert found == npz | {"cohort.h5", "out/labels.csv", "out/labels_rejected.csv",
                           "out/labels_prepare.json",
                           f"out/npz/{prep.MANIFEST}"}  # and no lock file left


def test_summary_counts_written_and_rejected_by_reason(faulty, tmp_path, capsys):
    prep.main(prep_argv(faulty["h5"], tmp_path))
    out = capsys.readouterr().out
    assert "30 records: 18 written (0 already there), 12 rejected" in out
    for line in ("rejected duplicate_id: 2", "rejected flat_ecg: 1", "rejected flat_ppg: 1",
                 "rejected nan_or_inf_ecg: 2", "rejected nan_or_inf_ppg: 2",
                 "rejected unsafe_id: 4", "written with an empty label cell: 2",
                 f"labels: {tmp_path / 'labels.csv'}"):
        assert line in out


# ----------------------------------------------------------------------------- resampling
def _zero_crossing_frequency(y, fs):
    """Frequency from the first and last upward zero crossing (linearly interpolated)."""
    i = np.where((y[:-1] < 0) & (y[1:] >= 0))[0]
    t = (i + y[i] / (y[i] - y[i + 1])) / fs
    return (len(t) - 1) / (t[-1] - t[0])


@pytest.mark.parametrize("n, m, f", [(3630, 7500, 7.3), (4230, 7500, 1.13), (3631, 7500, 11.7),
                                     (4230, 1000, 5.1), (7500, 2501, 21.0)])
def test_resampled_sine_keeps_frequency_and_amplitude(n, m, f):
    duration = 15.0
    x = 1.7 * np.sin(2 * np.pi * f * np.arange(n) * duration / n + 0.4)
    y = prep.resample_signal(x, m)
    t_out = ((np.arange(m) + 0.5) * n / m - 0.5) * duration / n  # the documented positions
    inner = slice(m // 20, m - m // 20)
    expected = 1.7 * np.sin(2 * np.pi * f * t_out + 0.4)
    np.testing.assert_allclose(y[inner], expected[inner], atol=2e-3)
    assert _zero_crossing_frequency(y[inner], m / duration) == pytest.approx(f, rel=2e-4)
    assert np.ptp(y[inner]) / 2 == pytest.approx(1.7, rel=2e-3)
    assert np.sqrt(np.mean((y - expected) ** 2)) < 0.02  # edges included


def test_resampling_removes_what_the_new_rate_cannot_hold():
    n, m, fs = 3630, 1000, 242.0  # new rate 66.7 Hz: 40 Hz must go, 10 Hz must stay
    t = np.arange(n) / fs
    y = prep.resample_signal(np.sin(2 * np.pi * 40 * t) + np.sin(2 * np.pi * 10 * t), m)
    t_out = ((np.arange(m) + 0.5) * n / m - 0.5) / fs
    inner = slice(m // 10, m - m // 10)
    np.testing.assert_allclose(y[inner], np.sin(2 * np.pi * 10 * t_out[inner]), atol=0.02)


def test_resampling_a_batch_equals_row_by_row_and_same_length_is_identity():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 500))
    np.testing.assert_allclose(prep.resample_signal(batch, 777),
                               np.stack([prep.resample_signal(r, 777) for r in batch]), atol=1e-12)
    np.testing.assert_array_equal(prep.resample_signal(batch[0], 500), batch[0])
    constant = prep.resample_signal(np.full(333, 2.5), 1000)
    np.testing.assert_allclose(constant, 2.5, atol=1e-12)


def test_record_to_x_reasons():
    good = np.sin(np.arange(100) / 5.0)
    assert prep.record_to_x(good, good, 50)[0].shape == (50, 2)
    cases = [(np.array([]), good, "empty_ecg"), (good, np.full(100, 3.0), "flat_ppg"),
             (np.where(np.arange(100) == 7, np.nan, good), good, "nan_or_inf_ecg"),
             (good, np.where(np.arange(100) == 7, -np.inf, good), "nan_or_inf_ppg"),
             (good * 1e300, good, "nan_or_inf_ecg")]  # finite, but not in float32
    for ecg, ppg, reason in cases:
        assert prep.record_to_x(ecg, ppg, 50) == (None, reason)


@pytest.mark.parametrize("rid, safe", [("100001_1", True), ("A.b-c_9", True), ("../x", False),
                                       ("a/b", False), ("a\\b", False), ("", False), ("..", False),
                                       (".hidden", False), ("-flag", False), ("a b", False),
                                       ("x" * 200, True), ("x" * 201, False), ("é", False)])
def test_is_safe_id(rid, safe):
    assert prep.is_safe_id(rid) is safe


def test_iter_records_reads_rows_across_chunks(faulty):
    recs = list(prep.iter_records(str(faulty["h5"]), meta_fields=["age", "name"], start=5,
                                  stop=19, chunk_rows=4))
    assert [r.row for r in recs] == list(range(5, 19))
    for r in recs:
        assert r.id == faulty["meta"]["new_id"][r.row].decode("utf-8", "backslashreplace")
        np.testing.assert_array_equal(r.ppg, faulty["ppg"][r.row])
        assert r.meta == {"age": faulty["meta"]["age"][r.row],
                          "name": faulty["meta"]["name"][r.row].decode()}


# ----------------------------------------------------------------------------- bad invocations
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    h5 = base / "c.h5"
    msc.make_cohort(str(h5), n_subjects=2, records_per_subject=2, seed=0)
    bad_rows = base / "bad_rows.h5"
    with h5py.File(h5) as src, h5py.File(bad_rows, "w") as dst:
        for name in ("metadata", "signals"):
            src.copy(name, dst)
        del dst["metadata/right_arm_sbp"]
        dst["metadata/right_arm_sbp"] = np.zeros(3, np.float32)
    (base / "text.h5").write_text("not hdf5\n")
    (base / "mine.csv").write_text("subject,sbp\n1,120\n")
    return base


BAD = [
    (["--h5_path", "{b}/nope.h5"], "--h5_path {b}/nope.h5: no such file"),
    (["--h5_path", "{b}/text.h5"], "is not a readable HDF5 file"),
    (["--meta_group", "meta"], "--meta_group: group meta does not exist"),
    (["--id_key", "ssoid"], "--id_key: metadata/ssoid does not exist"),
    (["--target_cols", "right_arm_sbp", "right_arm_xbp"], "--target_cols: metadata/right_arm_xbp"),
    (["--extra_cols", "height"], "--extra_cols: metadata/height does not exist"),
    (["--subject_key", "subject"], "--subject_key: metadata/subject does not exist"),
    (["--ecg_key", "signals/ECG"], "--ecg_key: signals/ECG does not exist"),
    (["--ppg_key", "metadata"], "--ppg_key: metadata is a group, not a dataset"),
    (["--h5_path", "{b}/bad_rows.h5"], "metadata/right_arm_sbp in {b}/bad_rows.h5 has 3 rows"),
    (["--target_cols", "name"], "--target_cols: metadata/name in {b}/c.h5 must hold numeric"),
    (["--target_seq_len", "1"], "--target_seq_len must be in [2, 1000000], got 1"),
    (["--target_seq_len", "10000000"], "--target_seq_len must be in"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--output_csv", "{b}/c.h5/labels.csv"], "--output_csv {b}/c.h5/labels.csv: {b}/c.h5 is a file"),
    (["--output_csv", "{b}/mine.csv"], "{b}/mine.csv exists and was not written by this script"),
    (["--extra_cols", "right_arm_sbp"], "column right_arm_sbp would appear twice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


def _flags(tokens):
    """``["--a", "1", "2", "--b"]`` -> ``{"--a": ["1", "2"], "--b": []}``."""
    out = {}
    for tok in tokens:
        if tok.startswith("--"):
            out[tok] = []
            last = tok
        else:
            out[last].append(tok)
    return out


@pytest.mark.parametrize("change, needle", BAD)
def test_bad_invocation_is_one_line_status_2_and_writes_nothing(small, capsys, change, needle):
    base = ["--h5_path", "{b}/c.h5", "--target_cols", "right_arm_sbp", "--output_npz", "{b}/npz",
            "--output_csv", "{b}/labels.csv", "--workers", "1"]
    flags = {**_flags(base), **_flags(change)}
    argv = [t.format(b=small) for flag, values in flags.items() for t in (flag, *values)]
    before = sorted(os.listdir(small))
    assert run_cli(prep.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert needle.format(b=small) in err
    assert sorted(os.listdir(small)) == before


def test_bad_invocation_in_a_process_has_no_traceback(small):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_kailuan_npz.py"),
                          "--h5_path", str(small / "c.h5"), "--target_cols", "sbp",
                          "--output_npz", str(small / "npz"), "--output_csv",
                          str(small / "labels.csv")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: --target_cols: metadata/sbp does not exist in {small / 'c.h5'}\n"
    assert not (small / "npz").exists()


def test_npz_folder_from_other_settings_or_foreign_is_refused(small, tmp_path, capsys):
    argv = prep_argv(small / "c.h5", tmp_path, targets=["right_arm_sbp"], seq=300)
    prep.main(argv)
    capsys.readouterr()
    assert run_cli(prep.main, argv[:-4] + ["--target_seq_len", "400", "--workers", "1"]) == 2
    assert "target_seq_len 300 -> 400" in capsys.readouterr().err
    os.remove(tmp_path / "npz" / prep.MANIFEST)
    assert run_cli(prep.main, argv) == 2
    assert "already holds 4 .npz files that this script did not write" in capsys.readouterr().err


# ----------------------------------------------------------------------------- re-runs
def test_rerun_skips_written_files_and_rewrites_only_the_csv(small, tmp_path, capsys):
    argv = prep_argv(small / "c.h5", tmp_path, targets=["right_arm_sbp"], seq=300)
    prep.main(argv)
    npz = tmp_path / "npz"
    stamps = {f: os.stat(npz / f).st_mtime_ns for f in os.listdir(npz) if f.endswith(".npz")}
    (npz / ".100001_1.npz.abcd1234.tmp").write_bytes(b"partial")  # left by a killed run
    capsys.readouterr()
    prep.main(argv)  # the same settings again: a resume, allowed
    assert "4 records: 4 written (4 already there), 0 rejected" in capsys.readouterr().out
    other = prep_argv(small / "c.h5", tmp_path, targets=["left_arm_dbp"], seq=300)
    labels_before = (tmp_path / "labels.csv").read_text()
    assert run_cli(prep.main, other) == 2  # other columns would replace the user's CSV
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add --overwrite" in err
    assert "target_cols ['right_arm_sbp'] -> ['left_arm_dbp']" in err
    assert (tmp_path / "labels.csv").read_text() == labels_before
    prep.main(other + ["--overwrite"])
    assert "4 records: 4 written (4 already there), 0 rejected" in capsys.readouterr().out
    assert {f: os.stat(npz / f).st_mtime_ns for f in stamps} == stamps
    assert not (npz / ".100001_1.npz.abcd1234.tmp").exists()
    assert list(pd.read_csv(tmp_path / "labels.csv").columns) == ["ssoid", "left_arm_dbp",
                                                                  "signal_digest"]


def test_missing_output_folders_are_created(small, tmp_path):
    run = tmp_path / "data" / "run1"
    prep.main(["--h5_path", str(small / "c.h5"), "--target_cols", "right_arm_sbp",
               "--output_npz", str(run / "npz"), "--output_csv", str(run / "labels.csv"),
               "--target_seq_len", "300", "--workers", "1"])
    assert len(list((run / "npz").glob("*.npz"))) == 4
    assert sorted(os.listdir(run)) == ["labels.csv", "labels_prepare.json",
                                       "labels_rejected.csv", "npz"]
    settings = json.load(open(run / "labels_prepare.json"))
    assert settings["target_cols"] == ["right_arm_sbp"] and settings["target_seq_len"] == 300


def test_labels_csv_without_its_settings_file_is_kept(small, tmp_path, capsys):
    argv = prep_argv(small / "c.h5", tmp_path, targets=["right_arm_sbp"], seq=300)
    (tmp_path / "labels.csv").write_text("ssoid,right_arm_sbp\nmine,1\n")
    assert run_cli(prep.main, argv) == 2
    assert "labels_prepare.json, which says how it was made, does not" in capsys.readouterr().err
    assert (tmp_path / "labels.csv").read_text() == "ssoid,right_arm_sbp\nmine,1\n"
    assert not (tmp_path / "npz").exists()


def test_killed_run_then_rerun_equals_a_clean_run(tmp_path):
    h5 = tmp_path / "c.h5"
    msc.make_cohort(str(h5), n_subjects=100, records_per_subject=3, seed=4)
    killed = tmp_path / "killed"
    killed.mkdir()
    argv = prep_argv(h5, killed, "--chunk_rows", "8", seq=4000)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare_kailuan_npz.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    npz = killed / "npz"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if npz.is_dir() and sum(f.endswith(".npz") for f in os.listdir(npz)) >= 20:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = sum(f.endswith(".npz") for f in os.listdir(npz))
    assert 20 <= n_before < 300 and not (killed / "labels.csv").exists()
    prep.main(argv)
    clean = tmp_path / "clean"
    clean.mkdir()
    prep.main(prep_argv(h5, clean, "--chunk_rows", "8", seq=4000))
    resumed, fresh = load_npz(npz), load_npz(clean / "npz")
    assert sorted(resumed) == sorted(fresh) and len(fresh) == 300
    for rid, x in fresh.items():
        np.testing.assert_array_equal(resumed[rid], x)
    assert (killed / "labels.csv").read_text() == (clean / "labels.csv").read_text()
    assert not [f for f in os.listdir(npz) if f.endswith(".tmp")]


def test_two_workers_write_the_same_files_as_one(faulty, tmp_path):
    prep.main(prep_argv(faulty["h5"], tmp_path)[:-2] + ["--workers", "2"])
    one, two = load_npz(faulty["out"] / "npz"), load_npz(tmp_path / "npz")
    assert sorted(one) == sorted(two)
    for rid in one:
        np.testing.assert_array_equal(one[rid], two[rid])
    assert (tmp_path / "labels_rejected.csv").read_text() == \
        (faulty["out"] / "labels_rejected.csv").read_text()


# ----------------------------------------------------------------------------- input variants
@pytest.mark.parametrize("id_type", ["bytes", "str", "int"])
def test_id_types_name_the_files(tmp_path, id_type):
    h5 = tmp_path / "c.h5"
    msc.make_cohort(str(h5), n_subjects=2, records_per_subject=2, seed=1, id_type=id_type)
    prep.main(prep_argv(h5, tmp_path, "--subject_key", "uid", targets=["right_arm_sbp"], seq=200))
    labels = pd.read_csv(tmp_path / "labels.csv", dtype=str)
    expected = (["10000101", "10000102", "10000201", "10000202"] if id_type == "int" else
                ["100001_1", "100001_2", "100002_1", "100002_2"])
    assert list(labels["ssoid"]) == expected
    assert list(labels["subject_id"]) == ["100001", "100001", "100002", "100002"]
    assert sorted(load_npz(tmp_path / "npz")) == expected


@pytest.mark.parametrize("vlen", [True, False])
def test_float64_and_vlen_rows_are_each_resampled_over_their_own_span(tmp_path, vlen):
    h5 = tmp_path / "c.h5"
    msc.make_cohort(str(h5), n_subjects=3, records_per_subject=2, seed=2, vlen=vlen,
                    dtype="float64", n_nan=1)
    prep.main(prep_argv(h5, tmp_path, targets=["right_arm_sbp"], seq=500))
    with h5py.File(h5) as f:
        ids = [v.decode() for v in f["metadata/new_id"][:]]
        ecg, ppg = f["signals/ecg"][:], f["signals/ppg"][:]
    arrays = load_npz(tmp_path / "npz")
    assert len(arrays) == 5 and ecg[0].dtype == np.float64
    assert (len({len(e) for e in ecg}) > 1) is vlen
    for rid, x in arrays.items():
        row = ids.index(rid)
        for col, raw in ((0, ecg[row]), (1, ppg[row])):
            expected = prep.resample_signal(raw, 500).astype(np.float32)
            np.testing.assert_array_equal(x[:, col], expected)


# ----------------------------------------------------------------------------- real waveforms
def _spectral_hr(x, fs):
    """Heart rate (bpm) at the strongest spectral peak in 36-210 bpm (zero-padded FFT)."""
    n = 1 << 16
    spec = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), n))
    freq = np.fft.rfftfreq(n, 1 / fs)
    band = (freq > 0.6) & (freq < 3.5)
    return 60 * freq[band][np.argmax(spec[band])]


def test_real_icu_windows_nan_rows_rejected_rest_keep_heart_rate(tmp_path):
    src = np.load(os.path.join(DATA, "abp_ecg_ppg_windows_10s.npz"))
    n = len(src["hr"])
    h5 = tmp_path / "icu.h5"
    with h5py.File(h5, "w") as f:
        f["metadata/new_id"] = np.array([f"w_{i}".encode() for i in range(n)])
        for key in ("sbp", "dbp", "hr"):
            f[f"metadata/{key}"] = src[key]
        f["signals/ecg"], f["signals/ppg"] = src["ecg"], src["ppg"]
    prep.main(prep_argv(h5, tmp_path, "--extra_cols", "hr", targets=["sbp", "dbp"], seq=2000))
    rejected = pd.read_csv(tmp_path / "labels_rejected.csv")
    no_ppg = np.where(~src["has_ppg"])[0]
    assert list(rejected["row"]) == list(no_ppg) and set(rejected["reason"]) == {"nan_or_inf_ppg"}
    arrays = load_npz(tmp_path / "npz")
    assert len(arrays) == n - len(no_ppg) == 83
    fs_in, fs_out = float(src["fs"]), 2000 / 10.0
    gaps, vs_label = [], []
    for rid, x in arrays.items():
        i = int(rid.split("_")[1])
        before = _spectral_hr(src["ppg"][i], fs_in)
        gaps.append(abs(_spectral_hr(x[:, 1], fs_out) - before))
        vs_label.append(abs(before - src["hr"][i]) / src["hr"][i])
    assert max(gaps) < 0.5  # bpm; the zero-padded FFT resolves about 0.2 bpm
    assert np.median(vs_label) < 0.05  # the PPG rhythm is the ABP-derived heart rate
