"""make_synthetic_cohort.py: the Kailuan layout, waveforms whose heart rate and pulse arrival
time are measurable by an independent beat detector, the documented BP formula, id types,
vlen/float64 storage, fault injection, determinism and the CLI's errors."""
import hashlib
import os
import subprocess
import sys
from collections import Counter

import h5py
import numpy as np
import pytest
from scipy.signal import find_peaks

import make_synthetic_cohort as msc
from conftest import ROOT
from utils import run_cli

FS_ECG, FS_PPG = 3630 / 15.0, 4230 / 15.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("syn") / "c.h5")
    info = msc.make_cohort(path, n_subjects=60, records_per_subject=4, seed=5)
    with h5py.File(path) as f:
        data = {k: f["metadata"][k][:] for k in f["metadata"]}
        data.update({f"truth_{k}": f["truth"][k][:] for k in f["truth"]})
        data["ecg"], data["ppg"] = f["signals/ecg"][:], f["signals/ppg"][:]
    return info, data


def r_peak_times(ecg, fs):
    """R peaks of a single-lead ECG: local maxima above half the highest, after removing wander."""
    k = int(0.2 * fs)
    hp = ecg - np.convolve(ecg, np.ones(k) / k, "same")
    peaks, _ = find_peaks(hp, height=0.5 * hp.max(), distance=int(0.35 * fs))
    return peaks / fs


def pat_max_upslope(ppg, fs, r_times):
    """Median time from each R peak to the steepest PPG upstroke 0.1-0.5 s after it."""
    k = int(0.02 * fs)
    slope = np.gradient(np.convolve(ppg, np.ones(k) / k, "same"))
    out = []
    for r in r_times:
        a, b = int((r + 0.1) * fs), int((r + 0.5) * fs)
        if a > k and b < len(ppg):
            out.append((a + np.argmax(slope[a:b])) / fs - r)
    return float(np.median(out))


def test_layout_fields_shapes_and_ids(cohort):
    info, d = cohort
    assert info["n_records"] == 240 and info["faults"] == {}
    for field in ["new_id", "uid", "name", "age", "sex", "bmi", *msc.BP_FIELDS]:
        assert d[field].shape == (240,), field
    assert d["ecg"].shape == (240, 3630) and d["ppg"].shape == (240, 4230)
    assert d["ecg"].dtype == np.float32 and d["ppg"].dtype == np.float32
    ids = [v.decode() for v in d["new_id"]]
    assert ids[:5] == ["100001_1", "100001_2", "100001_3", "100001_4", "100002_1"]
    assert len(set(ids)) == 240
    assert all(i.split("_")[0] == str(u) for i, u in zip(ids, d["uid"]))
    assert set(d["sex"]) == {0, 1} and 25 <= d["age"].min() and d["age"].max() <= 90
    assert d["bmi"].dtype == np.float32 and 16 <= d["bmi"].min() and d["bmi"].max() <= 42


def test_bp_ranges_and_identities(cohort):
    _, d = cohort
    for arm in ("right", "left"):
        sbp, dbp = d[f"{arm}_arm_sbp"], d[f"{arm}_arm_dbp"]
        pp, mbp = d[f"{arm}_arm_pp"], d[f"{arm}_arm_mbp"]
        assert 85 <= sbp.min() and sbp.max() <= 210 and 45 <= dbp.min() and dbp.max() <= 125
        assert np.array_equal(pp, sbp - dbp) and pp.min() >= 15
        assert np.abs(mbp - (dbp + pp / 3)).max() < 4.5
        assert (mbp - (dbp + pp / 3)).std() == pytest.approx(1.0, abs=0.2)
    arm_diff = np.abs(d["left_arm_sbp"] - d["right_arm_sbp"])
    assert 1.0 < arm_diff.mean() < 6.0
    assert 11 < d["right_arm_sbp"].std() < 18


def test_heart_rate_and_pulse_arrival_time_are_in_the_waveforms(cohort):
    _, d = cohort
    hr, pat = [], []
    for ecg, ppg in zip(d["ecg"], d["ppg"]):
        r = r_peak_times(ecg, FS_ECG)
        hr.append(60 / np.median(np.diff(r)))
        pat.append(1000 * pat_max_upslope(ppg, FS_PPG, r))
    hr, pat = np.array(hr), np.array(pat)
    assert np.abs(hr - d["truth_hr_bpm"]).max() < 3.0
    # The steepest upstroke follows the foot by a nearly fixed time, so PAT is recovered.
    assert np.corrcoef(pat, d["truth_pat_ms"])[0, 1] > 0.99
    lag = pat - d["truth_pat_ms"]
    assert 40 < np.median(lag) < 80 and np.abs(lag - np.median(lag)).max() < 20
    # PAT is the dominant BP carrier (about 12 of 15 mmHg SD): shorter arrival, higher pressure.
    assert np.corrcoef(pat, d["right_arm_sbp"])[0, 1] < -0.7


def test_sbp_follows_the_documented_formula(cohort):
    _, d = cohort
    x = np.column_stack([np.ones(240), np.log(d["truth_pat_ms"] / msc.PAT_REF_MS),
                         d["truth_hr_bpm"] - 70, d["age"] - 55, d["truth_stiffness"] - 0.45,
                         d["sex"], d["bmi"] - 25])
    for target, key in (("right_arm_sbp", "sbp"), ("right_arm_dbp", "dbp")):
        coef, *_ = np.linalg.lstsq(x, d[target], rcond=None)
        model = msc.BP_MODEL[key]
        assert coef[1] == pytest.approx(model["ln_pat"], rel=0.1)
        assert coef[2] == pytest.approx(model["hr"], rel=0.15)
        # subject-level covariates of 60 subjects: within about 3 standard errors
        assert coef[3] == pytest.approx(model["age"], abs=0.15)
        assert coef[5] == pytest.approx(model["sex"], abs=2.5)
        assert coef[6] == pytest.approx(model["bmi"], abs=0.35)
        residual = d[target] - x @ coef
        # per-subject offset and per-record noise (SD ~2.9 and ~2.4): learnable, not perfectly
        assert 1.8 < residual.std() < 3.5


def test_ppg_beats_have_a_dicrotic_notch(cohort):
    _, d = cohort
    with_notch = 0
    for i, (ecg, ppg) in enumerate(zip(d["ecg"], d["ppg"])):
        starts = (r_peak_times(ecg, FS_ECG) * FS_PPG).astype(int)
        n = int(0.9 * FS_PPG)
        beat = np.mean([ppg[s:s + n] for s in starts if s + n <= len(ppg)], axis=0)
        foot = int(d["truth_pat_ms"][i] / 1000 * FS_PPG)
        pulse = beat[foot:foot + int(0.5 * FS_PPG)]
        peaks, _ = find_peaks(pulse, prominence=0.01 * np.ptp(pulse))
        with_notch += len(peaks) >= 2  # systolic peak, notch, reflected peak
    assert with_notch == 240


def test_same_seed_same_bytes_other_seed_other_signals(tmp_path):
    paths = [str(tmp_path / f"{i}.h5") for i in range(3)]
    for path, seed in zip(paths, (7, 7, 8)):
        msc.make_cohort(path, n_subjects=3, records_per_subject=2, seed=seed)
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    assert digest[0] == digest[1] != digest[2]


@pytest.mark.parametrize("id_type", ["bytes", "str", "int"])
def test_id_types(tmp_path, id_type):
    path = str(tmp_path / "c.h5")
    msc.make_cohort(path, n_subjects=2, records_per_subject=3, seed=1, id_type=id_type)
    with h5py.File(path) as f:
        ds, uid = f["metadata/new_id"], f["metadata/uid"][:]
        if id_type == "int":
            assert ds.dtype == np.int64
            assert list(ds[:]) == [100001 * 100 + k for k in (1, 2, 3)] + \
                [100002 * 100 + k for k in (1, 2, 3)]
        elif id_type == "str":
            assert h5py.check_string_dtype(ds.dtype).length is None  # variable length
            assert list(ds.asstr()[:]) == [f"{u}_{k}" for u, k in zip(uid, [1, 2, 3] * 2)]
        else:
            assert ds.dtype.kind == "S" and ds[0] == b"100001_1"


def test_vlen_float64_rows_keep_a_common_span(tmp_path):
    path = str(tmp_path / "c.h5")
    msc.make_cohort(path, n_subjects=4, records_per_subject=3, seed=2, vlen=True, dtype="float64")
    with h5py.File(path) as f:
        assert h5py.check_vlen_dtype(f["signals/ecg"].dtype) == np.float64
        ecg, ppg, dur = f["signals/ecg"][:], f["signals/ppg"][:], f["truth/duration_s"][:]
    assert len({len(e) for e in ecg}) > 1
    for e, p, s in zip(ecg, ppg, dur):
        assert len(e) / FS_ECG == pytest.approx(s) and len(p) / FS_PPG == pytest.approx(s)
        assert 13.5 <= s <= 15.0


def test_faults_are_injected_where_reported(tmp_path):
    path = str(tmp_path / "c.h5")
    info = msc.make_cohort(path, n_subjects=10, records_per_subject=3, seed=3, n_nan=2, n_inf=2,
                           n_flat=2, n_duplicate=2, n_missing_labels=2, n_unsafe_ids=3)
    faults = info["faults"]
    assert sorted(Counter(faults.values()).items()) == [
        ("duplicate_id", 2), ("flat_ecg", 1), ("flat_ppg", 1), ("missing_label", 2),
        ("nan_or_inf_ecg", 2), ("nan_or_inf_ppg", 2), ("unsafe_id", 3)]
    with h5py.File(path) as f:
        ids = [v.decode() for v in f["metadata/new_id"][:]]
        ecg, ppg = f["signals/ecg"][:], f["signals/ppg"][:]
        labels = {k: f["metadata"][k][:] for k in msc.BP_FIELDS}
        stored = [v.decode() for v in f["truth/fault"][:]]
    assert stored == [faults.get(r, "") for r in range(30)]
    for row, fault in faults.items():
        sig = ecg if fault.endswith("_ecg") else ppg
        if fault.startswith("nan_or_inf"):
            assert (~np.isfinite(sig[row])).sum() == 50
        elif fault.startswith("flat"):
            assert np.ptp(sig[row]) == 0
        elif fault == "unsafe_id":
            assert ids[row] in msc.UNSAFE_IDS
        elif fault == "duplicate_id":
            src = info["duplicate_of"][row]
            assert src < row and ids[src] == ids[row] and src not in faults
        else:
            missing = [k for k in msc.BP_FIELDS if np.isnan(labels[k][row])]
            assert missing in ([k for k in msc.BP_FIELDS if k.startswith("left")],
                               [k for k in msc.BP_FIELDS if k.startswith("right")])
    clean = [r for r in range(30) if r not in faults]
    assert np.isfinite(ecg[clean]).all() and not np.isnan([labels[k][clean] for k in labels]).any()


def test_cli_writes_the_file_and_reports(tmp_path, capsys):
    out = str(tmp_path / "c.h5")
    msc.main(["--out", out, "--n_subjects", "2", "--records_per_subject", "2", "--n_flat", "1"])
    assert "4 records of 2 subjects, 1 with injected faults" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert f["signals/ppg"].shape == (4, 4230)
    before = open(out, "rb").read()
    assert run_cli(msc.main, ["--out", out, "--n_subjects", "3"]) == 2
    assert "already exists; add --overwrite" in capsys.readouterr().err
    assert open(out, "rb").read() == before
    msc.main(["--out", out, "--n_subjects", "3", "--records_per_subject", "1", "--overwrite"])
    with h5py.File(out) as f:
        assert f["signals/ppg"].shape == (3, 4230)


@pytest.mark.parametrize("argv, needle", [
    (["--n_subjects", "0"], "--n_subjects"),
    (["--n_subjects", "2", "--records_per_subject", "1", "--n_nan", "3"], "faults asked for"),
    (["--id_type", "int", "--n_unsafe_ids", "1"], "--n_unsafe_ids"),
    (["--id_type", "float"], "--id_type"),
])
def test_bad_invocations_give_one_line_and_status_2(tmp_path, capsys, argv, needle):
    status = run_cli(msc.main, ["--out", str(tmp_path / "c.h5"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert os.listdir(tmp_path) == []


def test_cli_process_exit_status_and_message(tmp_path):
    out = tmp_path / "missing" / "c.h5"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "make_synthetic_cohort.py"),
                          "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr == f"error: --out {out}: folder {out.parent} does not exist\n"
    assert os.listdir(tmp_path) == []
