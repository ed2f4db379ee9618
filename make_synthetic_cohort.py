"""A synthetic cohort in the Kailuan HDF5 layout (CONTRACT section 1), for the demo,
the tests and the benchmarks, since nobody here holds the real ``kailuan_dataset.h5``.

    python make_synthetic_cohort.py --out cohort.h5 --n_subjects 160 --records_per_subject 4

Layout written (same seed and flags give a byte-identical file):
- ``metadata/``: ``new_id`` (``<uid>_<k>`` with k = 1..K, as fixed-length bytes or variable-length
  str; with ``--id_type int`` it is ``uid * 100 + k`` and the subject is only given by ``uid``, so
  prepare with ``--subject_key uid``), ``uid`` (int64, 100001 + subject index), ``name``, ``age``
  (years), ``sex`` (1 male, 0 female), ``bmi`` (kg/m2, float32) and the eight BP labels
  ``{right,left}_arm_{sbp,mbp,dbp,pp}`` (float32, mmHg).
- ``signals/ecg`` (N, 3630) and ``signals/ppg`` (N, 4230) over the same ``--duration_s`` (default
  15 s, i.e. 242 Hz and 282 Hz); float32 or float64; with ``--vlen`` variable-length rows whose
  durations are 27/30 .. 30/30 of ``--duration_s`` (lengths 121*a and 141*a, a = 27..30).
- ``truth/``: the generating quantities per record (``pat_ms``, ``hr_bpm``, ``stiffness``,
  ``sbp_subject_offset``, ``duration_s``) and ``fault``: the injected fault, named as the reason
  ``prepare_kailuan_npz.py`` gives for it (or ``missing_label``; empty when none).

Waveforms. Beats follow RR intervals with respiratory sinus arrhythmia and random jitter; a record
starts at a random cardiac phase. ECG: P, Q, R, S, T Gaussians per beat (QT ~ sqrt(RR)), white
noise, baseline wander and a little 50 Hz. PPG: each pulse starts at its foot = R peak + PAT
(+-1 % per beat): a gamma-shaped systolic wave, a reflected wave that arrives earlier and larger in
stiffer arteries (dicrotic notch between them), a diastolic run-off, respiratory baseline and
amplitude modulation, and noise. ``--noise_scale`` multiplies every record's noise, wander and
mains amplitudes (default 1: the cohort described here; 2 or 4 for harder signals).

Ground truth (right arm; L = ln(PAT / 250 ms), HR in bpm, age in years, s = arterial stiffness
in [0.05, 0.95], sex 1/0, BMI in kg/m2, u = per-subject offset, e = per-record noise):
    SBP = 125 - 60 L + 0.30 (HR - 70) + 0.45 (age - 55) + 10 (s - 0.45) + 5 sex
          + 1.5 (BMI - 25) + u_s + e_s
    DBP =  78 - 30 L + 0.35 (HR - 70) + 0.15 (age - 55) -  4 (s - 0.45) + 3 sex
          + 0.8 (BMI - 25) + u_d + e_d
with u_s ~ N(0, 2.5), u_d = 0.5 u_s + N(0, 1.5), e_s, e_d ~ N(0, 1.5); SBP and DBP are rounded to
whole mmHg and clipped to [85, 210] and [45, 125] with SBP - DBP >= 15; PP = SBP - DBP;
MBP = DBP + PP / 3 + N(0, 1), to 0.1 mmHg. The left arm adds a per-subject difference
(N(0, 3) SBP, N(0, 2) DBP) plus N(0, 1.5) per record. Per record, ln(PAT / 250 ms) ~ N(m, 0.12)
around a subject mean m ~ N(0, 0.16), PAT kept in 150-400 ms; HR ~ N(h, 5) around h ~ N(70, 7),
kept in 45-120 bpm; s = 0.45 + 0.012 (age - 55) + N(0, 0.08) per subject + N(0, 0.04) per
record; age ~ N(55, 11) in 25-90, 70 % men, BMI ~ N(25, 3.5) in 16-42, independent of the rest.
Each source of information has its own share of SBP's SD of about 15 mmHg: PAT, visible only
in the ECG-to-PPG timing, about 12; age, sex and BMI, which are metadata only (s also reflects
age), about 8 together; HR and s are visible in the signals; u and e can't be learnt (SD about
2.9 together). So a model of the signals alone, of the covariates alone and of both should
rank in that order, each above the train mean.

Faults (for tests; disjoint rows, drawn with the seed): ``--n_nan``/``--n_inf`` put NaN/Inf
into the ECG or the PPG (alternately), ``--n_flat`` makes a row constant, ``--n_duplicate`` gives
a row the id of an earlier clean row, ``--n_unsafe_ids`` ids such as ``../x`` or ``a/b`` (bytes or
str ids only), ``--n_missing_labels`` NaN for one arm's four labels (such records stay usable).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np

from utils import ArgumentParser, UserError, atomic_path, check_output_file, run_cli

ECG_LEN, PPG_LEN = 3630, 4230
LEN_UNIT = 30  # ECG_LEN = 121 * 30, PPG_LEN = 141 * 30: vlen rows keep both spans equal
CHUNK = 256  # records generated at once; fixed, so the file depends only on the flags
BP_FIELDS = [f"{arm}_arm_{bp}" for arm in ("right", "left") for bp in ("sbp", "mbp", "dbp", "pp")]
ID_TYPES = ("bytes", "str", "int")
UNSAFE_IDS = ["../x", "a/b", "..", "", "a\\b", "/abs", ".hidden", "-flag", "x" * 300, "a b"]
PAT_REF_MS = 250.0
BP_MODEL = {  # coefficients of the module docstring's formula, also stored in the file
    "sbp": {"base": 125.0, "ln_pat": -60.0, "hr": 0.30, "age": 0.45, "stiffness": 10.0,
            "sex": 5.0, "bmi": 1.5},
    "dbp": {"base": 78.0, "ln_pat": -30.0, "hr": 0.35, "age": 0.15, "stiffness": -4.0,
            "sex": 3.0, "bmi": 0.8},
}


# ----------------------------------------------------------------------------- latents
def draw_subjects(rng: np.random.Generator, n: int) -> Dict[str, np.ndarray]:
    """Per-subject quantities: demographics, set points, offsets and waveform morphology."""
    age = np.clip(np.round(rng.normal(55, 11, n)), 25, 90)
    u_sbp = rng.normal(0, 2.5, n)
    return {
        "uid": 100001 + np.arange(n, dtype=np.int64), "age": age,
        "sex": (rng.random(n) < 0.7).astype(np.int64),
        "hr_mean": rng.normal(70, 7, n), "ln_pat_mean": rng.normal(0, 0.16, n),
        "stiffness": 0.45 + 0.012 * (age - 55) + rng.normal(0, 0.08, n),
        "u_sbp": u_sbp, "u_dbp": 0.5 * u_sbp + rng.normal(0, 1.5, n),
        "arm_sbp": rng.normal(0, 3, n), "arm_dbp": rng.normal(0, 2, n),
        "r_amp": rng.uniform(0.7, 1.5, n), "t_amp": rng.uniform(0.15, 0.35, n),
        "p_amp": rng.uniform(0.08, 0.15, n), "qrs_width": rng.uniform(0.85, 1.2, n),
        "ppg_amp": rng.uniform(0.5, 2.0, n), "ppg_offset": rng.uniform(-1, 1, n),
        "bmi": np.round(np.clip(rng.normal(25, 3.5, n), 16, 42), 1),
    }


def draw_records(rng: np.random.Generator, subj: Dict[str, np.ndarray],
                 s_idx: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-record quantities for the records of subjects ``s_idx``."""
    n = len(s_idx)
    ln_pat = subj["ln_pat_mean"][s_idx] + rng.normal(0, 0.12, n)
    return {
        "hr": np.clip(subj["hr_mean"][s_idx] + rng.normal(0, 5, n), 45, 120),
        "pat": np.clip(PAT_REF_MS * np.exp(ln_pat), 150, 400) / 1000.0,
        "stiffness": np.clip(subj["stiffness"][s_idx] + rng.normal(0, 0.04, n), 0.05, 0.95),
        "e_sbp": rng.normal(0, 1.5, n), "e_dbp": rng.normal(0, 1.5, n),
        "e_mbp": rng.normal(0, 1.0, (2, n)), "e_arm": rng.normal(0, 1.5, (2, n)),
        "resp_hz": rng.uniform(0.2, 0.33, n), "phase": rng.uniform(0, 2 * np.pi, (4, n)),
        "ecg_noise": rng.uniform(0.01, 0.04, n), "ecg_wander": rng.uniform(0.05, 0.25, n),
        "wander_hz": rng.uniform(0.05, 0.4, n), "mains": rng.uniform(0, 0.02, n),
        "ppg_noise": rng.uniform(0.005, 0.02, n), "ppg_wander": rng.uniform(0.05, 0.15, n),
    }


# ----------------------------------------------------------------------------- BP labels
def _arm(sbp: np.ndarray, dbp: np.ndarray, e_mbp: np.ndarray) -> Dict[str, np.ndarray]:
    sbp = np.clip(np.round(sbp), 85, 210)
    dbp = np.minimum(np.clip(np.round(dbp), 45, 125), sbp - 15)
    pp = sbp - dbp
    return {"sbp": sbp, "dbp": dbp, "pp": pp, "mbp": np.round(dbp + pp / 3 + e_mbp, 1)}


def bp_labels(rec: Dict[str, np.ndarray], subj: Dict[str, np.ndarray],
              s_idx: np.ndarray) -> Dict[str, np.ndarray]:
    """The eight BP fields from the ground-truth formula of the module docstring."""
    feats = {"base": 1.0, "ln_pat": np.log(rec["pat"] * 1000 / PAT_REF_MS),
             "hr": rec["hr"] - 70, "age": subj["age"][s_idx] - 55,
             "stiffness": rec["stiffness"] - 0.45, "sex": subj["sex"][s_idx],
             "bmi": subj["bmi"][s_idx] - 25}
    sbp, dbp = (sum(c * feats[k] for k, c in BP_MODEL[bp].items())
                + subj[f"u_{bp}"][s_idx] + rec[f"e_{bp}"] for bp in ("sbp", "dbp"))
    right = _arm(sbp, dbp, rec["e_mbp"][0])
    left = _arm(right["sbp"] + subj["arm_sbp"][s_idx] + rec["e_arm"][0],
                right["dbp"] + subj["arm_dbp"][s_idx] + rec["e_arm"][1], rec["e_mbp"][1])
    return {f"{arm}_arm_{k}": v.astype(np.float32)
            for arm, values in (("right", right), ("left", left)) for k, v in values.items()}


# ----------------------------------------------------------------------------- waveforms
def beat_times(rng: np.random.Generator, rec: Dict[str, np.ndarray],
               duration: float) -> np.ndarray:
    """R-peak times (n, B) in seconds, from before 0 to past ``duration``."""
    rr0 = 60.0 / rec["hr"][:, None]
    n_beats = int(np.ceil((duration + 3.0) / rr0.min() * 1.1)) + 4
    k = np.arange(n_beats)[None, :]
    rsa = 0.03 * np.sin(2 * np.pi * rec["resp_hz"][:, None] * k * rr0 + rec["phase"][0][:, None])
    rr = rr0 * (1 + rsa + rng.normal(0, 0.015, (len(rr0), n_beats)))
    start = -rr0 * (2 + rng.random((len(rr0), 1)))  # random cardiac phase at t = 0
    return start + np.concatenate([np.zeros_like(rr0), np.cumsum(rr[:, :-1], axis=1)], axis=1)


def _col(values) -> np.ndarray:
    """A per-record value as a column that broadcasts over the samples of each row."""
    return np.asarray(values)[:, None]


def _time_since(events: np.ndarray, t: np.ndarray, shifts: Sequence[int]) -> List[np.ndarray]:
    """For each row and time, ``t`` minus the event ``shift`` places after the last one at or
    before ``t`` (0: the last, 1: the next, -1: the one before the last)."""
    n, n_ev = events.shape
    span = max(events.max(), t.max()) - min(events.min(), t.min()) + 1.0
    offset = span * np.arange(n)[:, None]  # rows side by side on one axis: one searchsorted
    idx = np.searchsorted((events + offset).ravel(), (t[None, :] + offset).ravel(), side="right")
    idx = idx.reshape(n, -1) - 1 - n_ev * np.arange(n)[:, None]
    rows = np.arange(n)[:, None]
    return [t[None, :] - events[rows, np.clip(idx + s, 0, n_ev - 1)] for s in shifts]


def _gauss(u: np.ndarray, sigma) -> np.ndarray:
    return np.exp(-0.5 * (u / sigma) ** 2)


def render_ecg(r_times: np.ndarray, t: np.ndarray, rec, subj, s_idx) -> np.ndarray:
    """Noise-free ECG (n, len(t)) in mV: the P-QRS-T of the last and of the next beat."""
    r_amp, w = _col(subj["r_amp"][s_idx]), _col(subj["qrs_width"][s_idx])
    p_amp, t_amp = _col(subj["p_amp"][s_idx]), _col(subj["t_amp"][s_idx])
    qt = 0.28 * np.sqrt(60.0 / _col(rec["hr"]))
    ecg = 0.0
    for tau in _time_since(r_times, t, (0, 1)):
        ecg = ecg + (p_amp * _gauss(tau + 0.16, 0.025)
                     - 0.12 * r_amp * _gauss(tau + 0.025 * w, 0.008 * w)
                     + r_amp * _gauss(tau, 0.010 * w)
                     - 0.25 * r_amp * _gauss(tau - 0.028 * w, 0.010 * w)
                     + t_amp * _gauss(tau - qt, 0.045))
    return ecg


def _pulse(tau: np.ndarray, stiff: np.ndarray) -> np.ndarray:
    """One PPG pulse at ``tau`` seconds after its foot (0 before the foot): systolic wave,
    reflected wave (earlier and larger when stiff: the dicrotic notch fills in) and run-off."""
    t_sys = 0.12 - 0.04 * (stiff - 0.45)
    t_refl = t_sys + 0.22 - 0.12 * (stiff - 0.45)
    after = np.maximum(tau, 1e-9)
    x = after / t_sys
    systolic = np.exp(4.0 * (np.log(x) + 1.0 - x))
    reflected = (0.35 + 0.3 * (stiff - 0.45)) * _gauss(tau - t_refl, 0.04)
    runoff = 0.3 * (1 - np.exp(-after / 0.06)) * np.exp(-after / 0.5)
    return np.where(tau > 0, systolic + reflected + runoff, 0.0)


def render_ppg(r_times: np.ndarray, t: np.ndarray, rec, rng) -> np.ndarray:
    """Noise-free pulse train (n, len(t)): a pulse at each R peak + PAT (+-1 % per beat),
    summed over the last five pulses (older run-off is below 0.2 % of a pulse at 120 bpm)."""
    feet = np.sort(r_times + _col(rec["pat"]) * (1 + rng.normal(0, 0.01, r_times.shape)), axis=1)
    stiff = _col(rec["stiffness"])
    return sum(_pulse(tau, stiff) for tau in _time_since(feet, t, (0, -1, -2, -3, -4)))


def add_noise(clean_ecg, clean_ppg, t_ecg, t_ppg, rec, subj, s_idx, rng):
    """Measured signals: baseline wander, respiration, mains and white noise."""
    ph = rec["phase"]
    wander = np.sin(2 * np.pi * _col(rec["wander_hz"]) * t_ecg + _col(ph[1]))
    ecg = (clean_ecg + _col(rec["ecg_wander"]) * wander
           + _col(rec["mains"]) * np.sin(2 * np.pi * 50 * t_ecg + _col(ph[2]))
           + _col(rec["ecg_noise"]) * rng.standard_normal(clean_ecg.shape))
    breath = np.sin(2 * np.pi * _col(rec["resp_hz"]) * t_ppg + _col(ph[3]))
    amp = _col(subj["ppg_amp"][s_idx])
    ppg = (amp * (clean_ppg * (1 + 0.05 * breath) + _col(rec["ppg_wander"]) * breath
                  + _col(rec["ppg_noise"]) * rng.standard_normal(clean_ppg.shape))
           + _col(subj["ppg_offset"][s_idx]))
    return ecg, ppg


# ----------------------------------------------------------------------------- faults
def fault_plan(rng: np.random.Generator, n: int, n_nan=0, n_inf=0, n_flat=0, n_duplicate=0,
               n_missing_labels=0, n_unsafe_ids=0) -> Dict[int, tuple]:
    """Row -> (fault, detail) for disjoint random rows.

    The detail is the value written (NaN, Inf, 0, the unsafe id), the arm whose labels are
    missing, or for ``duplicate_id`` the earlier clean row whose id is copied.
    """
    kinds = [("nan", n_nan), ("inf", n_inf), ("flat", n_flat), ("unsafe_id", n_unsafe_ids),
             ("missing_label", n_missing_labels)]
    if min(n_duplicate, *(c for _, c in kinds)) < 0:
        raise UserError("fault counts (--n_nan ... --n_unsafe_ids) must be >= 0")
    total = n_duplicate + sum(c for _, c in kinds)
    if total > n - (n_duplicate > 0):
        raise UserError(f"{total} faults asked for but the cohort has {n} records "
                        f"(duplicates also need a clean earlier row)")
    order = rng.permutation(n)
    plan, pos = {}, 0
    for kind, count in kinds:
        for i, row in enumerate(order[pos:pos + count]):
            signal = ("ecg", "ppg")[i % 2]
            plan[int(row)] = {"nan": ("nan_or_inf_" + signal, np.nan),
                              "inf": ("nan_or_inf_" + signal, np.inf * (-1) ** (i // 2)),
                              "flat": ("flat_" + signal, 0.0),
                              "unsafe_id": ("unsafe_id", _unsafe_id(i)),
                              "missing_label": ("missing_label", ("left", "right")[i % 2])}[kind]
        pos += count
    rest = order[pos:]
    # The lowest remaining row stays clean, so every duplicate has a clean earlier row to copy.
    targets = [r for r in rest[:n_duplicate + 1] if r != rest.min()][:n_duplicate]
    clean = np.sort(np.setdiff1d(rest, targets))
    for row in targets:
        plan[int(row)] = ("duplicate_id", int(clean[rng.integers(np.searchsorted(clean, row))]))
    return plan


def _unsafe_id(i: int) -> str:
    return UNSAFE_IDS[i] if i < len(UNSAFE_IDS) else f"../u{i}"


def apply_signal_faults(ecg, ppg, rows: np.ndarray, plan: Dict[int, tuple]) -> None:
    """Overwrite the faulty rows of a chunk in place (NaN/Inf runs, constant rows)."""
    for j, row in enumerate(rows):
        fault, value = plan.get(int(row), ("", None))
        if not fault.startswith(("nan_or_inf_", "flat_")):
            continue
        target = ecg if fault.endswith("_ecg") else ppg
        if fault.startswith("flat_"):
            target[j, :] = value
        else:
            target[j, 100:150] = value


# ----------------------------------------------------------------------------- ids
def record_ids(uid: np.ndarray, k: np.ndarray, id_type: str, plan: Dict[int, tuple]) -> list:
    """``new_id`` values for all rows, with the unsafe and duplicate faults applied."""
    if id_type == "int":
        ids: list = list(uid * 100 + k)
    else:
        ids = [f"{u}_{j}" for u, j in zip(uid, k)]
    for row in sorted(plan):
        fault, detail = plan[row]
        if fault == "unsafe_id":
            ids[row] = detail
        elif fault == "duplicate_id":
            ids[row] = ids[detail]
    return ids


def _text_dataset(group, name: str, values: Sequence[str], as_str: bool) -> None:
    if as_str:
        group.create_dataset(name, data=list(values), dtype=h5py.string_dtype("utf-8"))
    else:
        group.create_dataset(name, data=np.array([v.encode("utf-8") for v in values], dtype="S"))


# ----------------------------------------------------------------------------- writing
def _check(n_subjects: int, records_per_subject: int, id_type: str, dtype: str,
           duration_s: float, n_unsafe_ids: int) -> None:
    if n_subjects < 1 or records_per_subject < 1:
        raise UserError("--n_subjects and --records_per_subject must be >= 1")
    if id_type not in ID_TYPES:
        raise UserError(f"--id_type must be one of {', '.join(ID_TYPES)}, got {id_type}")
    if id_type == "int" and records_per_subject > 99:
        raise UserError("--id_type int encodes new_id as uid * 100 + k: "
                        "--records_per_subject must be <= 99")
    if id_type == "int" and n_unsafe_ids:
        raise UserError("--n_unsafe_ids needs --id_type bytes or str "
                        "(an integer id is always safe)")
    if dtype not in ("float32", "float64"):
        raise UserError(f"--dtype must be float32 or float64, got {dtype}")
    if not 1.0 <= duration_s <= 600.0:
        raise UserError(f"--duration_s must be in [1, 600], got {duration_s}")


def _create_datasets(f: h5py.File, n: int, vlen: bool, dtype: str) -> None:
    for name, length in (("ecg", ECG_LEN), ("ppg", PPG_LEN)):
        if vlen:
            f.create_dataset(f"signals/{name}", (n,), dtype=h5py.vlen_dtype(np.dtype(dtype)))
        else:
            f.create_dataset(f"signals/{name}", (n, length), dtype=dtype)
    for name in BP_FIELDS:
        f.create_dataset(f"metadata/{name}", (n,), dtype=np.float32)
    for name in ("pat_ms", "hr_bpm", "stiffness", "sbp_subject_offset", "duration_s"):
        f.create_dataset(f"truth/{name}", (n,), dtype=np.float64)


def _write_chunk(f: h5py.File, a: int, b: int, subj, plan, seed: int, duration_s: float,
                 vlen: bool, records_per_subject: int, noise_scale: float = 1.0) -> None:
    """Generate records a..b-1 and write their signals, labels and truth."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, a // CHUNK]))
    rows = np.arange(a, b)
    s_idx = rows // records_per_subject
    rec = draw_records(rng, subj, s_idx)
    for name in ("ecg_noise", "ecg_wander", "mains", "ppg_noise", "ppg_wander"):
        rec[name] = rec[name] * noise_scale  # x * 1.0 == x: the default file is unchanged
    t_ecg = np.arange(ECG_LEN) * (duration_s / ECG_LEN)
    t_ppg = np.arange(PPG_LEN) * (duration_s / PPG_LEN)
    r_times = beat_times(rng, rec, duration_s)
    ecg, ppg = add_noise(render_ecg(r_times, t_ecg, rec, subj, s_idx),
                         render_ppg(r_times, t_ppg, rec, rng), t_ecg, t_ppg, rec, subj, s_idx, rng)
    apply_signal_faults(ecg, ppg, rows, plan)
    units = np.full(len(rows), LEN_UNIT)
    if vlen:
        units = rng.integers(LEN_UNIT - 3, LEN_UNIT + 1, len(rows))
        ecg = _ragged([e[:121 * u] for e, u in zip(ecg, units)], f["signals/ecg"])
        ppg = _ragged([p[:141 * u] for p, u in zip(ppg, units)], f["signals/ppg"])
    f["signals/ecg"][a:b] = ecg
    f["signals/ppg"][a:b] = ppg
    labels = bp_labels(rec, subj, s_idx)
    for j, row in enumerate(rows):
        fault, arm = plan.get(int(row), ("", None))
        for name in BP_FIELDS:
            if fault == "missing_label" and name.startswith(arm):
                labels[name][j] = np.nan
    for name in BP_FIELDS:
        f[f"metadata/{name}"][a:b] = labels[name]
    truth = {"pat_ms": rec["pat"] * 1000, "hr_bpm": rec["hr"], "stiffness": rec["stiffness"],
             "sbp_subject_offset": subj["u_sbp"][s_idx],
             "duration_s": duration_s * units / LEN_UNIT}
    for name, values in truth.items():
        f[f"truth/{name}"][a:b] = values


def _ragged(rows: List[np.ndarray], ds) -> np.ndarray:
    """Rows of different lengths as the object array h5py writes into a vlen dataset."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [r.astype(h5py.check_vlen_dtype(ds.dtype)) for r in rows]
    return out


def make_cohort(path: str, n_subjects: int = 40, records_per_subject: int = 3, seed: int = 0,
                id_type: str = "bytes", vlen: bool = False, dtype: str = "float32",
                duration_s: float = 15.0, n_nan: int = 0, n_inf: int = 0, n_flat: int = 0,
                n_duplicate: int = 0, n_missing_labels: int = 0, n_unsafe_ids: int = 0,
                noise_scale: float = 1.0) -> dict:
    """Write the cohort to ``path`` (atomically) and return what a test needs to know.

    Returns ``{"n_records", "faults": {row: fault}, "duplicate_of": {row: source row}}``, where a
    fault is the reason ``prepare_kailuan_npz.py`` should give (or ``missing_label``).
    """
    _check(n_subjects, records_per_subject, id_type, dtype, duration_s, n_unsafe_ids)
    if not noise_scale >= 0:
        raise UserError(f"--noise_scale must be >= 0, got {noise_scale}")
    n = n_subjects * records_per_subject
    subj = draw_subjects(np.random.default_rng(np.random.SeedSequence([seed, 0])), n_subjects)
    plan = fault_plan(np.random.default_rng(np.random.SeedSequence([seed, 1])), n, n_nan, n_inf,
                      n_flat, n_duplicate, n_missing_labels, n_unsafe_ids)
    s_idx = np.arange(n) // records_per_subject
    ids = record_ids(subj["uid"][s_idx], np.arange(n) % records_per_subject + 1, id_type, plan)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if id_type == "int":
            f.create_dataset("metadata/new_id", data=np.asarray(ids, dtype=np.int64))
        else:
            _text_dataset(f, "metadata/new_id", ids, as_str=id_type == "str")
        _text_dataset(f, "metadata/name", [f"name_{u}" for u in subj["uid"][s_idx]],
                      as_str=id_type == "str")
        f.create_dataset("metadata/uid", data=subj["uid"][s_idx])
        f.create_dataset("metadata/age", data=subj["age"][s_idx].astype(np.int64))
        f.create_dataset("metadata/sex", data=subj["sex"][s_idx])
        f.create_dataset("metadata/bmi", data=subj["bmi"][s_idx].astype(np.float32))
        _create_datasets(f, n, vlen, dtype)
        for a in range(0, n, CHUNK):
            _write_chunk(f, a, min(a + CHUNK, n), subj, plan, seed, duration_s, vlen,
                         records_per_subject, noise_scale)
        _text_dataset(f, "truth/fault", [plan.get(r, ("", None))[0] for r in range(n)],
                      as_str=False)
        f.attrs.update({"generator": "make_synthetic_cohort.py", "seed": seed,
                        "duration_s": duration_s, "bp_model": json.dumps(BP_MODEL)})
    return {"n_records": n, "faults": {r: fault for r, (fault, _) in plan.items()},
            "duplicate_of": {r: d for r, (fault, d) in plan.items() if fault == "duplicate_id"}}


# ----------------------------------------------------------------------------- CLI
def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--n_subjects", type=int, default=40, help="persons in the cohort")
    p.add_argument("--records_per_subject", type=int, default=3,
                   help="records (visits) per person")
    p.add_argument("--seed", type=int, default=0, help="same seed and flags = identical file")
    p.add_argument("--id_type", choices=ID_TYPES, default="bytes",
                   help="new_id as fixed-length bytes, variable-length str, or int (uid*100+k)")
    p.add_argument("--vlen", action="store_true",
                   help="signals as variable-length rows of different durations")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="storage type of the signal rows")
    p.add_argument("--duration_s", type=float, default=15.0,
                   help="record duration; sets the rates (3630 and 4230 samples per record)")
    p.add_argument("--noise_scale", type=float, default=1.0,
                   help="multiplies the noise, baseline wander and mains amplitudes of every "
                        "record (2 or 4: harder signals for the feature extraction)")
    faults = p.add_argument_group("fault injection (for tests)")
    for name, what in (("n_nan", "rows with NaN in ECG or PPG"), ("n_inf", "rows with +-Inf"),
                       ("n_flat", "constant rows"),
                       ("n_duplicate", "ids repeated from an earlier row"),
                       ("n_missing_labels", "rows with one arm's labels NaN"),
                       ("n_unsafe_ids", "ids that are not safe file names")):
        faults.add_argument(f"--{name}", type=int, default=0, help=what)
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_output_file("--out", args.out, args.overwrite)
    info = make_cohort(args.out, args.n_subjects, args.records_per_subject, args.seed,
                       args.id_type, args.vlen, args.dtype, args.duration_s, args.n_nan,
                       args.n_inf, args.n_flat, args.n_duplicate, args.n_missing_labels,
                       args.n_unsafe_ids, noise_scale=args.noise_scale)
    print(f"wrote {args.out}: {info['n_records']} records of {args.n_subjects} subjects, "
          f"{len(info['faults'])} with injected faults")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
