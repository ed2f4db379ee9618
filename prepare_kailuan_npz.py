"""Step 1: convert a cohort HDF5 in the Kailuan layout (CONTRACT section 1) into one
``<id>.npz`` per usable record and a labels CSV (CONTRACT section 2).

    python prepare_kailuan_npz.py --h5_path kailuan_dataset.h5 --id_key new_id \\
      --target_cols right_arm_dbp left_arm_mbp right_arm_pp right_arm_sbp left_arm_sbp \\
      --output_npz data/npz --output_csv data/labels.csv --target_seq_len 7500 --workers 8

Each ``<id>.npz`` holds ``x``: float32 (target_seq_len, 2), column 0 ECG, column 1 PPG, each
resampled over the whole record by ``resample_signal``.

Resampling (``resample_signal``, the project's one resampler): band-limited resampling of the
record's mirror-symmetric extension (DCT-II, keep or zero-pad the coefficients, inverse DCT).
Output sample m lies at input position (m + 0.5) * n / target_len - 0.5, so both channels keep
their common span whatever their lengths. Dropping the coefficients above the new Nyquist
frequency is the anti-aliasing (an ideal low-pass). Unlike FFT resampling, the record's end does
not wrap around onto its start, which would ring at both edges; unlike ``resample_poly``, the
cost is O(n log n) for any pair of lengths, also for variable-length rows whose lengths share no
factor (where a polyphase filter would need tens of thousands of taps).

Time base: by default each row is resampled over its whole length, so when rows differ in
duration one sample means a different time in each record (and pulse arrival time, the delay
that carries BP, is rescaled with it). ``--fs_ecg``/``--fs_ppg`` (the native rates) resample
each channel to ``--target_fs`` instead and keep its first ``--target_seq_len`` samples (the
record's start: both channels stay aligned at t = 0), padding a shorter record after its end
with the channel's mean (z-scoring maps it to about 0). ``--record_seconds`` says that every
row spans that many seconds, which changes no sample but records the output rate
(``target_seq_len / record_seconds``). The manifest holds the rate as ``sample_rate_hz``;
training copies it into the checkpoint and predict_bp.py refuses records at another rate.

Cohorts with one signal: ``--ecg_key none`` (a PPG-only cohort, the usual public set) or
``--ppg_key none`` (ECG only). Nothing is invented for the missing signal: its npz column is
all NaN, the manifest lists the signals present (``"channels": ["ppg"]``; both:
``["ecg", "ppg"]``), the signal checks and the digest cover the present signal alone, only
its native rate is needed (``--fs_ppg`` without ``--fs_ecg``), and every feature that needs
the missing signal (pulse arrival time, ECG heart rate) is an empty cell. Training refuses a
``--modality`` that needs the missing signal.

Rejected records (not written; listed in ``<output_csv stem>_rejected.csv`` as
``row,id,reason,duplicate_of``):
``empty_ecg``/``empty_ppg`` (no samples), ``nan_or_inf_ecg``/``_ppg`` (a NaN or Inf sample, or a
value beyond float32), ``flat_ecg``/``_ppg`` (peak-to-peak <= 1e-6 * max(1, largest magnitude)),
``unsafe_id`` (not ``[A-Za-z0-9][A-Za-z0-9._-]*``, holds ``..``, or longer than 200 characters, so
it can never name a file outside ``--output_npz``), ``duplicate_id`` (the id of an earlier row:
the first row with an id is used, later ones are rejected; each written file then pairs the
signals and labels of one HDF5 row, and nothing usable is thrown away when records were exported
twice), ``duplicate_signal`` (ECG and PPG identical to those of an earlier usable row, whose id
is in ``duplicate_of``: the same recording stored under two ids, which a subject-wise split
could put in train and test). A record with a missing (NaN) label is written; its CSV cell is
empty.

Signal digests: each row's digest is blake2b (16 bytes) of its raw ECG row then its raw PPG row,
both as little-endian float32 (so a float64 copy of float32 samples matches); the labels CSV
ends with it, as ``signal_digest`` (hex), so that ``train_bp.py`` can check that no recording
sits in two splits. Only the digests (O(N) small values) are kept in memory.

Subjects (``--subject_key``): with one field, ``subject_id`` is that field's value (text as
it is, numbers in decimal without a trailing ``.0``); with several (e.g. ``name age sex``),
``subject_id`` is ``subject_hash`` of their values: 12 hex digits of blake2b (6 bytes) of the
normalised values (text stripped and lower-cased, numbers in decimal without a trailing
``.0``) joined with ``SUBJECT_SEP``, so the same person gets the same id in every run and no
name is written. A record with a missing value (NaN, empty text) in any key field is kept
with the subject ``unknown_<record id>``: its own subject, never paired with another record;
the summary counts and lists them.

Re-runs and interruptions: every file is written to a temporary name and renamed, so an existing
``<id>.npz`` is complete; a re-run does not rewrite those (it reads their rows only for the
digest, so it finds the same duplicates), so running the same command again after an
interruption (Ctrl-C, a killed job) finishes the job. Temporary files left by a killed run are
removed at start. The labels and rejected CSVs are written whole at the end. ``--output_npz``
keeps a small manifest (input file size and time, keys, ``--target_seq_len``): a re-run into a
folder prepared from another input or with other settings is refused instead of mixing records,
and so is a folder of ``.npz`` files that this script did not write. An existing ``--output_csv``
is replaced only if it is a labels CSV (first column ``ssoid``), and only by a run with the same
input and settings, which ``<output_csv stem>_prepare.json`` records, unless ``--overwrite``:
then changing ``--target_cols`` or ``--extra_cols`` and running again only rewrites the CSV.
Missing folders of ``--output_npz`` and ``--output_csv`` are created.

Memory: signals are read in chunks of rows by each worker (``--chunk_rows``), so memory does not
grow with the cohort; the 1-D metadata columns (ids and labels, a few numbers per record, needed
whole for the duplicate check and the CSV) are read at once.

Reusable by ``predict_bp.py --h5_path`` and the training code: ``resample_signal``,
``record_to_x``, ``iter_records``, ``decode_text``, ``is_safe_id``, ``signal_digest``,
``subject_ids``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import h5py
import numpy as np
import pandas as pd
import scipy.fft

import physio
from utils import NPZ_CHANNELS, NPZ_MANIFEST, ArgumentParser, UserError, progress, run_cli, \
    save_npz_atomic, subject_of, write_csv_atomic, write_json_atomic

META_GROUP, ECG_KEY, PPG_KEY = "metadata", "signals/ecg", "signals/ppg"
MAX_SEQ_LEN = 1_000_000
MAX_ID_LEN = 200
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FLAT_TOL = 1e-6
# Files written before duplicate_of was added end at reason: the header check takes both.
REJECTED_COLUMNS = ["row", "id", "reason", "duplicate_of"]
DIGEST_COLUMN = "signal_digest"
SUBJECT_SEP = "\x1f"  # ASCII unit separator: never part of a name, age or sex
UNKNOWN_SUBJECT = "unknown_"
MANIFEST = NPZ_MANIFEST
LOCK = ".prepare_kailuan_npz.lock"
NO_SIGNAL = "none"  # --ecg_key/--ppg_key value of a cohort without that signal


# ----------------------------------------------------------------------------- resampling
def resample_signal(x, target_len: int) -> np.ndarray:
    """``x`` (n,) or a batch of rows (rows, n) resampled to ``target_len`` samples, float64.

    Band-limited resampling of the mirror-symmetric extension (see the module docstring);
    exact for any sum of cosines that the shorter length can hold.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    if n == 0 or target_len < 1:
        raise ValueError(f"cannot resample {n} samples to {target_len}")
    if n == target_len:
        return x.copy()
    coeffs = scipy.fft.dct(x, type=2, norm="ortho", axis=-1)
    out = scipy.fft.idct(coeffs, type=2, n=target_len, norm="ortho", axis=-1, overwrite_x=True)
    return out * np.sqrt(target_len / n)


def signal_problem(row: np.ndarray, name: str) -> Optional[str]:
    """The rejection reason for one signal row, or None if it can be used."""
    if row.size == 0:
        return f"empty_{name}"
    lo, hi = row.min(), row.max()  # NaN and Inf propagate into these
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"nan_or_inf_{name}"
    if hi - lo <= FLAT_TOL * max(1.0, abs(lo), abs(hi)):
        return f"flat_{name}"
    return None


@dataclass(frozen=True)
class TimeBase:
    """How samples map to time (module docstring, "Time base"): without rates, each row is
    resampled over its whole length; ``record_seconds`` states that span; ``fs`` (ECG and
    PPG native rates in Hz, None for a signal the cohort lacks) resamples each row to
    ``target_fs`` and crops or pads it."""
    record_seconds: Optional[float] = None
    fs: Optional[Tuple[Optional[float], Optional[float]]] = None
    target_fs: Optional[float] = None

    def sample_rate(self, target_len: int) -> Optional[float]:
        """The output rate in Hz (None when the records' duration is unknown)."""
        if self.fs:
            return self.target_fs
        return target_len / self.record_seconds if self.record_seconds else None

    def as_dict(self) -> dict:
        return {"record_seconds": self.record_seconds,
                "fs_ecg": self.fs[0] if self.fs else None,
                "fs_ppg": self.fs[1] if self.fs else None,
                "target_fs": self.target_fs if self.fs else None}


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` cut to its first ``n`` samples, or padded after its end with its own mean
    (which per-record z-scoring maps to about 0) up to ``n``."""
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x, np.full(n - len(x), x.mean())])


def record_to_x(ecg, ppg, target_len: int,
                time_base: TimeBase = TimeBase()) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """One record's raw ECG and PPG rows as ``(x, None)``, x float32 (target_len, 2) with
    column 0 ECG and column 1 PPG, or ``(None, reason)`` when the record can't be used.
    A signal the cohort lacks is None: its column is all NaN, and only the other is checked."""
    rows = {name: None if row is None else np.asarray(row, dtype=np.float64).ravel()
            for name, row in (("ecg", ecg), ("ppg", ppg))}
    if all(row is None for row in rows.values()):
        raise ValueError("a record needs an ECG or a PPG row")
    for name, row in rows.items():
        reason = None if row is None else signal_problem(row, name)
        if reason:
            return None, reason
    x = np.full((target_len, 2), np.nan, dtype=np.float32)
    for col, (name, row) in enumerate(rows.items()):
        if row is None:
            continue
        with np.errstate(over="ignore"):  # checked on the next line
            if time_base.fs:
                n_out = max(1, int(round(len(row) * time_base.target_fs / time_base.fs[col])))
                x[:, col] = fit_length(resample_signal(row, n_out), target_len)
            else:
                x[:, col] = resample_signal(row, target_len)
        if not np.isfinite(x[:, col]).all():  # beyond float32
            return None, f"nan_or_inf_{name}"
    return x, None


def x_features(x: np.ndarray, rate: float, mains_hz: Optional[float]) -> Dict[str, float]:
    """``physio.record_features`` of a ``record_to_x`` record at ``rate`` Hz; a column that
    record_to_x left all NaN (a signal the cohort lacks) is given as None, so every feature
    that needs it is NaN, never computed from filler."""
    ecg, ppg = (None if np.isnan(col).all() else col for col in x.T)
    return physio.record_features(ecg, ppg, rate, rate, mains_hz)


def signal_digest(ecg, ppg) -> str:
    """Hex blake2b (16 bytes) of the raw ECG row then the raw PPG row as little-endian
    float32: equal for the same recording stored twice, also in float64. A signal the
    cohort lacks (None) adds nothing: the digest covers the present one."""
    h = hashlib.blake2b(digest_size=16)
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 hash as inf
        for row in (r for r in (ecg, ppg) if r is not None):
            h.update(np.ascontiguousarray(np.ravel(row), dtype="<f4").tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- ids and text
def decode_text(values) -> List[str]:
    """Text of an id or text column: bytes (fixed or variable length) as UTF-8, str as is,
    integers as decimal. Undecodable bytes are kept visible as ``\\xNN``."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return [str(int(v)) for v in arr]
    return [v.decode("utf-8", errors="backslashreplace") if isinstance(v, bytes) else str(v)
            for v in arr.ravel()]


def is_safe_id(record_id: str) -> bool:
    """True when ``record_id`` can name ``<id>.npz`` inside the output folder and nowhere else."""
    return (len(record_id) <= MAX_ID_LEN and ".." not in record_id
            and SAFE_ID.fullmatch(record_id) is not None)


def _is_text(dtype: np.dtype) -> bool:
    return dtype.kind in "SU" or h5py.check_string_dtype(dtype) is not None


def key_text(value) -> Optional[str]:
    """One subject-key value as text, or None when missing (NaN, empty text): text as it is,
    numbers in decimal without a trailing ``.0`` (the shortest form of their own precision)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else np.format_float_positional(value, trim="-")
    return str(int(value))


def subject_hash(texts: Sequence[str]) -> str:
    """The subject id of several key values: 12 hex digits of blake2b (6 bytes) of the
    stripped, lower-cased values joined with ``SUBJECT_SEP`` (UTF-8)."""
    joined = SUBJECT_SEP.join(t.strip().lower() for t in texts)
    return hashlib.blake2b(joined.encode("utf-8"), digest_size=6).hexdigest()


def subject_ids(key_columns: Sequence[Sequence[object]],
                ids: Sequence[str]) -> Tuple[List[str], List[bool]]:
    """Each row's subject id and whether it is unknown, from the ``--subject_key`` columns
    (see the module docstring): one column gives its value, several ``subject_hash``; a
    missing value gives ``unknown_<record id>``."""
    subjects, unknown = [], []
    for row, rid in enumerate(ids):
        texts = [key_text(col[row]) for col in key_columns]
        missing = any(t is None for t in texts)
        unknown.append(missing)
        if missing:
            subjects.append(UNKNOWN_SUBJECT + rid)
        else:
            subjects.append(texts[0] if len(texts) == 1 else subject_hash(texts))
    return subjects, unknown


def subject_rule(subject_key: Optional[Sequence[str]]) -> str:
    """How ``subject_id`` is made, in words (printed and kept in ``_prepare.json``)."""
    if not subject_key:
        return ("no subject_id column: training takes the part of the id before the first "
                "'_' (--subject_key sets it)")
    unknown = f"; a missing value gives {UNKNOWN_SUBJECT}<id>"
    if len(subject_key) == 1:
        return f"subject_id = metadata field {subject_key[0]}{unknown}"
    return (f"subject_id = blake2b-48 hash of the normalised values of "
            f"{', '.join(subject_key)}{unknown}")


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Cohort:
    """Where the parts of a Kailuan-layout file are, and its number of rows (records);
    ``ecg_key``/``ppg_key`` None for a signal the cohort lacks."""
    h5_path: str
    meta_group: str
    ecg_key: Optional[str]
    ppg_key: Optional[str]
    n_rows: int

    @property
    def channels(self) -> List[str]:
        """The signals present, in npz column order (the manifest's ``channels``)."""
        return [name for name, key in zip(NPZ_CHANNELS, (self.ecg_key, self.ppg_key)) if key]


class Record(NamedTuple):
    row: int
    id: str
    ecg: Optional[np.ndarray]  # None: the cohort has no ECG (--ecg_key none)
    ppg: Optional[np.ndarray]
    meta: Dict[str, object]


def signal_key(key: Optional[str]) -> Optional[str]:
    """An --ecg_key/--ppg_key value as a dataset path, None for ``none`` (no such signal)."""
    return None if key is None or key == NO_SIGNAL else key


def present_channels(args) -> List[str]:
    """The signals that the --ecg_key/--ppg_key flags of ``args`` say the cohort has."""
    return [name for name, key in zip(NPZ_CHANNELS, (args.ecg_key, args.ppg_key))
            if signal_key(key)]


def _dataset(f: h5py.File, key: str, flag: str, path: str) -> h5py.Dataset:
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        found = "is a group, not a dataset" if isinstance(obj, h5py.Group) else "does not exist"
        raise UserError(f"{flag}: {key} {found} in {path}")
    return obj


def _signal_dataset(f: h5py.File, flag: str, key: str, other: Optional[str],
                    path: str) -> h5py.Dataset:
    """The dataset of one signal; when it is missing beside the other one, the message
    names the flag value for a cohort that lacks it."""
    if key not in f and other and isinstance(f.get(other), h5py.Dataset):
        signal_name = flag[2:5].upper()
        raise UserError(f"{flag}: {key} does not exist in {path}; for a file without "
                        f"{signal_name} give {flag} {NO_SIGNAL}")
    return _dataset(f, key, flag, path)


def _check_signal_dataset(ds: h5py.Dataset, flag: str, path: str) -> None:
    vlen = h5py.check_vlen_dtype(ds.dtype)
    fixed = ds.ndim == 2 and ds.dtype.kind in "fiu"
    ragged = ds.ndim == 1 and vlen is not None and vlen.kind in "fiu"
    if not (fixed or ragged):
        raise UserError(f"{flag}: {ds.name} in {path} must be a 2-D numeric dataset or 1-D "
                        f"variable-length numeric rows (found shape {ds.shape}, dtype {ds.dtype})")


def check_cohort(f: h5py.File, path: str, fields: Sequence[Tuple[str, str]], meta_group: str,
                 ecg_key: Optional[str], ppg_key: Optional[str]) -> Cohort:
    """Validate an open file against the layout; ``fields`` are (flag, metadata field) pairs.
    A signal key ``none`` (or None) is a signal the cohort lacks; one of the two must exist."""
    ecg_key, ppg_key = signal_key(ecg_key), signal_key(ppg_key)
    if not (ecg_key or ppg_key):
        raise UserError("--ecg_key and --ppg_key are both none: a record needs a signal")
    if not isinstance(f.get(meta_group), h5py.Group):
        raise UserError(f"--meta_group: group {meta_group} does not exist in {path}")
    signals = {flag: _signal_dataset(f, flag, key, other, path)
               for flag, key, other in (("--ecg_key", ecg_key, ppg_key),
                                        ("--ppg_key", ppg_key, ecg_key)) if key}
    for flag, ds in signals.items():
        _check_signal_dataset(ds, flag, path)
    first = next(iter(signals.values()))
    n_rows = first.shape[0]
    if n_rows == 0:
        raise UserError(f"{path}: {first.name.lstrip('/')} holds no records")
    for flag, field in fields:
        ds = _dataset(f, f"{meta_group}/{field}", flag, path)
        if ds.ndim != 1:
            raise UserError(f"{flag}: {ds.name} in {path} must be 1-D (found shape {ds.shape})")
    for flag, ds in [*signals.items(),
                     *((flag, f[f"{meta_group}/{field}"]) for flag, field in fields)]:
        if ds.shape[0] != n_rows:
            raise UserError(f"{flag}: {ds.name} in {path} has {ds.shape[0]} rows but "
                            f"{first.name.lstrip('/')} has {n_rows}")
    return Cohort(path, meta_group, ecg_key, ppg_key, n_rows)


@contextlib.contextmanager
def open_h5(path: str) -> Iterator[h5py.File]:
    """The HDF5 file read-only; ``UserError`` if it is missing or not HDF5."""
    if not os.path.isfile(path):
        raise UserError(f"--h5_path {path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"--h5_path {path} is not a readable HDF5 file ({exc})") from None
    with f:
        yield f


def iter_records(h5_path: str, id_key: str = "new_id", meta_fields: Sequence[str] = (),
                 meta_group: str = META_GROUP, ecg_key: str = ECG_KEY, ppg_key: str = PPG_KEY,
                 start: int = 0, stop: Optional[int] = None,
                 chunk_rows: int = 256) -> Iterator[Record]:
    """Yield ``Record(row, id, ecg, ppg, meta)`` for rows ``start``..``stop``-1, reading
    ``chunk_rows`` rows at a time; ``meta`` maps each of ``meta_fields`` to its value.
    ``ecg_key``/``ppg_key`` ``none``: the cohort lacks that signal, and its rows are None."""
    fields = [("--id_key", id_key), *(("meta_fields", m) for m in meta_fields)]
    with open_h5(h5_path) as f:
        cohort = check_cohort(f, h5_path, fields, meta_group, ecg_key, ppg_key)
        stop = cohort.n_rows if stop is None else min(stop, cohort.n_rows)
        meta = f[meta_group]
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            ids = decode_text(meta[id_key][a:b])
            ecg, ppg = ((f[key][a:b] if key else [None] * (b - a))
                        for key in (cohort.ecg_key, cohort.ppg_key))
            values = {m: column_values(meta[m], a, b) for m in meta_fields}
            for j in range(b - a):
                yield Record(a + j, ids[j], ecg[j], ppg[j], {m: v[j] for m, v in values.items()})


def column_values(ds: h5py.Dataset, a: int = 0, b: Optional[int] = None):
    """Rows a..b-1 of a 1-D metadata field: numbers as an array, text as a list of str."""
    raw = ds[a:b]
    return decode_text(raw) if _is_text(ds.dtype) else raw


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Task:
    """A range of rows for one worker, the rows to digest and write (row, id), and those
    of them whose npz is already there (digested only)."""
    h5_path: str
    id_key: str
    meta_group: str
    ecg_key: str
    ppg_key: str
    out_dir: str
    target_len: int
    start: int
    stop: int
    rows: Tuple[Tuple[int, str], ...]
    present: Tuple[int, ...] = ()
    time_base: TimeBase = TimeBase()
    mains_hz: Optional[float] = None  # compute the physiological features (--features)


class Result(NamedTuple):
    """What a worker reports for each row it handled."""
    row: int
    id: str
    reason: Optional[str]  # None when the record is usable
    digest: str  # signal_digest
    features: Optional[Dict[str, float]] = None  # physio.record_features, with --features


def screen_ids(ids: Sequence[str]) -> Tuple[List[Tuple[int, str]], List[Tuple[int, str, str]]]:
    """Rows whose id is usable, and (row, id, reason) for unsafe and repeated ids."""
    usable, rejected, seen = [], [], set()
    for row, rid in enumerate(ids):
        if not is_safe_id(rid):
            rejected.append((row, rid, "unsafe_id"))
        elif rid in seen:
            rejected.append((row, rid, "duplicate_id"))
        else:
            seen.add(rid)
            usable.append((row, rid))
    return usable, rejected


def make_tasks(todo: List[Tuple[int, str]], chunk_rows: int, workers: int,
               present: frozenset = frozenset(), **common) -> List[Task]:
    """Group the rows by blocks of at most ``chunk_rows`` HDF5 rows; smaller blocks when
    there are few rows, so that every worker gets several tasks. Rows in ``present`` (row
    numbers) are only read and digested: a re-run finds the same duplicates."""
    size = max(1, min(chunk_rows, -(-len(todo) // (4 * workers))))
    tasks = []
    for _, group in itertools.groupby(todo, key=lambda item: item[0] // size):
        rows = tuple(group)
        tasks.append(Task(start=rows[0][0], stop=rows[-1][0] + 1, rows=rows,
                          present=tuple(r for r, _ in rows if r in present), **common))
    return tasks


def process_task(task: Task) -> List[Result]:
    """Digest each of the task's rows, and resample, compress and atomically write the npz
    of those not already there (in a worker); with ``mains_hz`` (--features) compute the
    features of every usable row from the resampled rows that the npz holds. Returns a
    ``Result`` per row."""
    wanted, present = dict(task.rows), set(task.present)
    rate = task.time_base.sample_rate(task.target_len)
    done = []
    for rec in iter_records(task.h5_path, task.id_key, (), task.meta_group, task.ecg_key,
                            task.ppg_key, task.start, task.stop, task.stop - task.start):
        if rec.row not in wanted:
            continue
        x, reason, features = None, None, None
        if rec.row not in present or task.mains_hz:
            x, reason = record_to_x(rec.ecg, rec.ppg, task.target_len, task.time_base)
        if x is not None and rec.row not in present:
            save_npz_atomic(os.path.join(task.out_dir, wanted[rec.row] + ".npz"), x=x)
        if x is not None and task.mains_hz:
            features = x_features(x, rate, task.mains_hz)
        done.append(Result(rec.row, wanted[rec.row], reason, signal_digest(rec.ecg, rec.ppg),
                           features))
    return done


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group: let the main process alone stop the run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_tasks(tasks: List[Task], workers: int) -> Iterator[List[Result]]:
    """Each task's results as it finishes: in-process for one worker, else in a pool."""
    if workers == 1:
        yield from map(process_task, tasks)
        return
    # fork starts the workers at once; the main process holds no HDF5 file open by now.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_ignore_sigint) as pool:
        yield from pool.imap_unordered(process_task, tasks)


def run_with_progress(tasks: List[Task], workers: int,
                      total: int) -> List[Result]:
    """All tasks' results behind a progress bar; a clean message on Ctrl-C."""
    results: List[Result] = []
    with progress(total=total, unit="rec", desc="prepare") as bar:
        try:
            for done in run_tasks(tasks, workers):
                results += done
                bar.update(len(done))
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted after {len(results)} of {total} records; every npz written is "
                  f"complete: run the same command again to finish", file=sys.stderr)
            raise SystemExit(130) from None
    return results


# ----------------------------------------------------------------------------- output folder
def _first_line(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.readline().decode("utf-8", errors="replace").strip()


def rejected_path(output_csv: str) -> str:
    """``<output_csv stem>_rejected.csv`` beside the labels CSV."""
    return os.path.splitext(output_csv)[0] + "_rejected.csv"


def settings_path(output_csv: str) -> str:
    """``<output_csv stem>_prepare.json``: the input and settings that made the labels CSV."""
    return os.path.splitext(output_csv)[0] + "_prepare.json"


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_outputs(output_npz: str, output_csv: str) -> None:
    """Refuse output paths that can't be written or hold files this script did not write.
    Missing folders are fine (created when writing starts), a file in their place is not."""
    for flag, path in (("--output_npz", output_npz), ("--output_csv", output_csv)):
        parent = os.path.dirname(os.path.abspath(path))
        blocker = _nearest_existing(parent)
        if not os.path.isdir(blocker):
            raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")
    if os.path.exists(output_npz) and not os.path.isdir(output_npz):
        raise UserError(f"--output_npz {output_npz} exists and is not a folder")
    headers = {output_csv: "ssoid", rejected_path(output_csv): ",".join(REJECTED_COLUMNS[:3])}
    for path, header in headers.items():
        if os.path.isdir(path):
            raise UserError(f"--output_csv: {path} is a folder")
        if os.path.exists(path) and not _first_line(path).startswith(header):
            raise UserError(f"--output_csv: {path} exists and was not written by this script "
                            f"(its first line is not '{header}...'); choose another path")


def settings_changes(path: str, settings: dict) -> str:
    """``"key old -> new; ..."`` for each of ``settings`` that the JSON file ``path`` (a
    manifest or labels settings written by an earlier run) holds otherwise; "" when none.
    The input file's path may change (a moved cohort is the same input)."""
    with open(path, encoding="utf-8") as fh:
        old = _as_now(json.load(fh))
    return "; ".join(f"{k} {old.get(k)} -> {v}" for k, v in settings.items()
                     if k != "h5_path" and old.get(k) != v)


def check_labels_settings(output_csv: str, settings: dict, overwrite: bool) -> None:
    """An existing labels CSV is rewritten only by a run with the same input and settings
    (a re-run that finishes an interrupted one), or with ``--overwrite``."""
    if overwrite or not os.path.exists(output_csv):
        return
    path = settings_path(output_csv)
    if not os.path.isfile(path):
        raise UserError(f"--output_csv {output_csv} already exists and {path}, which says how "
                        f"it was made, does not; add --overwrite to replace it, or choose "
                        f"another --output_csv")
    what = settings_changes(path, settings)
    if what:
        raise UserError(f"--output_csv {output_csv} was made with other input or settings "
                        f"({what}); add --overwrite to replace it, or choose another "
                        f"--output_csv")


def labels_settings(manifest: dict, args) -> dict:
    """What the labels CSV depends on: the npz manifest, the npz folder, the columns and
    the subject rule (``subject_key`` one field name as text, as before, or a list)."""
    key = args.subject_key
    return {**manifest, "output_npz": os.path.abspath(args.output_npz),
            "subject_key": key[0] if key and len(key) == 1 else key,
            "subject_rule": subject_rule(key), "target_cols": list(args.target_cols),
            "extra_cols": list(args.extra_cols), "features": args.features,
            "mains_hz": args.mains_hz if args.features else None}


def manifest_for(cohort: Cohort, id_key: str, target_len: int, time_base: TimeBase) -> dict:
    """What the npz files in a folder depend on: the input file and the settings, and the
    records' output sampling rate (``sample_rate_hz``, None when unknown), which training
    stores in its checkpoint and predict_bp.py checks."""
    stat = os.stat(cohort.h5_path)
    return {"h5_path": os.path.abspath(cohort.h5_path), "h5_size": stat.st_size,
            "h5_mtime_ns": stat.st_mtime_ns, "id_key": id_key, "meta_group": cohort.meta_group,
            "ecg_key": cohort.ecg_key, "ppg_key": cohort.ppg_key, "channels": cohort.channels,
            "target_seq_len": target_len, **time_base.as_dict(),
            "sample_rate_hz": time_base.sample_rate(target_len)}


def _as_now(old: dict) -> dict:
    """A manifest (or labels settings) written by an older prep, with the keys it lacked
    at their meaning then: both signals."""
    return {"channels": list(NPZ_CHANNELS), **old}


def existing_npz(output_npz: str, manifest: dict) -> set:
    """Ids already written in ``output_npz`` by this script with the same input and settings."""
    if not os.path.isdir(output_npz):
        return set()
    stems = {name[:-4] for name in os.listdir(output_npz)
             if name.endswith(".npz") and not name.startswith(".")}
    if not stems:
        return stems
    path = os.path.join(output_npz, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"--output_npz {output_npz} already holds {len(stems)} .npz files that "
                        f"this script did not write; choose an empty or new folder")
    what = settings_changes(path, manifest)
    if what:
        raise UserError(f"--output_npz {output_npz} holds {len(stems)} .npz files made from "
                        f"another input or settings ({what}); choose a new folder or empty it")
    return stems


def remove_leftovers(output_npz: str, output_csv: str) -> int:
    """Delete temporary files of a killed run (``.<name>.<random>.tmp``); return how many."""
    removed = 0
    csv_dir = os.path.dirname(os.path.abspath(output_csv))
    csv_names = tuple(os.path.basename(p) for p in (output_csv, rejected_path(output_csv),
                                                     settings_path(output_csv)))
    for folder, names in ((output_npz, None), (csv_dir, csv_names)):
        for name in os.listdir(folder):
            ours = (name.startswith(".") and name.endswith(".tmp")
                    and (".npz." in name if names is None else
                         any(name.startswith(f".{n}.") for n in names)))
            if ours:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def _names_file(path: str, fh) -> bool:
    """Whether ``path`` still leads to the open file ``fh`` (not removed or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def folder_lock(output_npz: str) -> Iterator[None]:
    """Hold a lock on the output folder, so that two runs never write (or clean) it at once.

    The lock file is removed at the end while still locked, so no other run holds it then.
    A run that opened the file before that removal may lock it just after: it then finds
    that the name leads elsewhere (or nowhere) and starts again, since a lock on a removed
    file keeps nobody out."""
    path = os.path.join(output_npz, LOCK)
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UserError(f"--output_npz {output_npz}: another prepare_kailuan_npz.py is "
                            f"writing to this folder") from None
        if _names_file(path, fh):
            break
        fh.close()
    with fh:
        try:
            yield
        finally:
            os.remove(path)


# ----------------------------------------------------------------------------- labels
def labels_frame(rows: List[Tuple[int, str]], columns: Dict[str, object],
                 subjects: Optional[Sequence[str]], target_cols: Sequence[str],
                 extra_cols: Sequence[str], results: Dict[int, Result]) -> pd.DataFrame:
    """The labels CSV: ssoid, [subject_id], targets, extras, the physiological features
    (with --features), signal_digest; one row per written record. ``subjects`` (from
    ``subject_ids``) and ``columns`` hold every HDF5 row, ``results`` the workers' report of
    each written row (its digest and features)."""
    idx = np.array([r for r, _ in rows], dtype=np.int64)
    data = {"ssoid": [rid for _, rid in rows]}
    if subjects is not None:
        data["subject_id"] = [subjects[i] for i in idx]
    for col in [*target_cols, *extra_cols]:
        values = columns[col]
        data[col] = values[idx] if isinstance(values, np.ndarray) else [values[i] for i in idx]
    if len(idx) and results[idx[0]].features is not None:
        for col in physio.FEATURE_COLUMNS:
            data[col] = [results[i].features[col] for i in idx]
    data[DIGEST_COLUMN] = [results[i].digest for i in idx]
    return pd.DataFrame(data)


def read_columns(meta: h5py.Group, names: Sequence[str], text: Sequence[str]) -> Dict[str, object]:
    """Whole 1-D metadata columns: ``text`` ones as lists of str, others as ``column_values``."""
    return {name: decode_text(meta[name][:]) if name in text else column_values(meta[name])
            for name in dict.fromkeys([*text, *names])}


def check_columns(meta: h5py.Group, path: str, args) -> None:
    """Targets must be numeric, ids text or integers, subject keys and extras numbers or text."""
    for flag, names, ok, what in (
            ("--id_key", [args.id_key], "iuSO", "text or integers"),
            ("--subject_key", args.subject_key or [], "fiuSO", "numbers or text"),
            ("--target_cols", args.target_cols, "fiu", "numeric"),
            ("--extra_cols", args.extra_cols, "fiubSO", "numbers or text")):
        for name in names:
            dtype = meta[name].dtype
            if dtype.kind not in ok or (dtype.kind == "O" and not _is_text(dtype)):
                raise UserError(f"{flag}: {meta.name.lstrip('/')}/{name} in {path} must hold "
                                f"{what} (found dtype {dtype})")


def add_time_base_flags(p: ArgumentParser) -> None:
    """--record_seconds, --fs_ecg, --fs_ppg, --target_fs (also predict_bp.py's)."""
    p.add_argument("--record_seconds", type=float, default=None,
                   help="time span of every HDF5 row in seconds (rows of one common "
                        "duration): records the output rate target_seq_len / record_seconds "
                        "in the manifest and the checkpoint; the npz files are unchanged")
    p.add_argument("--fs_ecg", type=float, default=None,
                   help="native sampling rate of the ECG rows in Hz (with --fs_ppg): each row "
                        "is resampled to --target_fs and cut to its first --target_seq_len "
                        "samples, or padded after its end with its mean, so one sample is "
                        "the same time in every record, also for rows of different durations; "
                        "with --ppg_key none, alone")
    p.add_argument("--fs_ppg", type=float, default=None,
                   help="native sampling rate of the PPG rows in Hz (with --fs_ecg; with "
                        "--ecg_key none, alone)")
    p.add_argument("--target_fs", type=float, default=500.0,
                   help="output sampling rate in Hz with --fs_ecg/--fs_ppg (ECGFounder was "
                        "pre-trained on ECG at 500 Hz)")


def time_base_of(args) -> TimeBase:
    """The ``TimeBase`` the time-base flags ask for; ``UserError`` for a bad combination.
    The native rate of each signal present (--ecg_key/--ppg_key, ``present_channels``) is
    needed, and none of a signal the cohort lacks."""
    present = present_channels(args)
    rates = {"ecg": args.fs_ecg, "ppg": args.fs_ppg}
    for name, rate in rates.items():
        if rate is not None and name not in present:
            raise UserError(f"--fs_{name}: the cohort has no {name.upper()} "
                            f"(--{name}_key none); leave it out")
    given = [rates[name] is not None for name in present]
    if any(given) and not all(given):
        raise UserError("--fs_ecg and --fs_ppg go together: give both native rates")
    if any(given) and args.record_seconds is not None:
        raise UserError("give either --record_seconds (rows of one duration) or "
                        "--fs_ecg/--fs_ppg (native rates), not both")
    for flag, value in (("--record_seconds", args.record_seconds), ("--fs_ecg", args.fs_ecg),
                        ("--fs_ppg", args.fs_ppg), ("--target_fs", args.target_fs)):
        if value is not None and not (math.isfinite(value) and value > 0):
            unit = "seconds" if flag == "--record_seconds" else "Hz"
            raise UserError(f"{flag} must be a positive number of {unit}, got {value:g}")
    if any(given):
        return TimeBase(fs=(args.fs_ecg, args.fs_ppg), target_fs=args.target_fs)
    return TimeBase(record_seconds=args.record_seconds)


def file_time_base(args) -> None:
    """A cohort file's own ``record_seconds`` attribute (make_cohort_h5.py writes it: every
    row spans that many seconds) as ``--record_seconds`` when no time-base flag is given; a
    ``--record_seconds`` that contradicts it is an error. Other flags are left as given."""
    if not os.path.isfile(args.h5_path):
        return  # open_h5 reports it
    try:
        with h5py.File(args.h5_path, "r") as f:
            value = f.attrs.get("record_seconds")
    except OSError:
        return
    if value is None:
        return
    value = float(value)
    if args.record_seconds is not None and not math.isclose(args.record_seconds, value):
        raise UserError(f"--record_seconds {args.record_seconds:g}: the rows of {args.h5_path} "
                        f"span {value:g} s (its record_seconds attribute)")
    if args.record_seconds is None and args.fs_ecg is None and args.fs_ppg is None:
        args.record_seconds = value
        print(f"time base: record_seconds {value:g}, from {args.h5_path}'s attribute")


def check_args(args) -> None:
    """Flag values that are wrong whatever the input file."""
    if not 2 <= args.target_seq_len <= MAX_SEQ_LEN:
        raise UserError(f"--target_seq_len must be in [2, {MAX_SEQ_LEN}], "
                        f"got {args.target_seq_len}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if not present_channels(args):
        raise UserError("--ecg_key and --ppg_key are both none: a record needs a signal")
    if args.chunk_rows < 1:
        raise UserError(f"--chunk_rows must be >= 1, got {args.chunk_rows}")
    if args.features and time_base_of(args).sample_rate(args.target_seq_len) is None:
        raise UserError("--features needs the records' time span for times in ms and rates "
                        "in bpm: give --record_seconds S (rows of one duration) or "
                        "--fs_ecg/--fs_ppg (native rates)")
    if args.mains_hz <= 0:
        raise UserError(f"--mains_hz must be a positive frequency, got {args.mains_hz:g}")
    if args.subject_key and len(set(args.subject_key)) < len(args.subject_key):
        raise UserError(f"--subject_key names a field twice: {' '.join(args.subject_key)}")
    names = ["ssoid", *(["subject_id"] if args.subject_key else []), *args.target_cols,
             *args.extra_cols, *(physio.FEATURE_COLUMNS if args.features else []),
             DIGEST_COLUMN]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--target_cols/--extra_cols: column {', '.join(repeated)} would appear "
                        f"twice in the labels CSV")


# ----------------------------------------------------------------------------- CLI
def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--h5_path", required=True, help="cohort HDF5 in the Kailuan layout")
    p.add_argument("--id_key", default="new_id", help="metadata field that names each record")
    p.add_argument("--target_cols", nargs="*", default=[],
                   help="metadata fields written as label columns, in this order; none: a "
                        "labels CSV without targets (unlabelled records, e.g. pre-training)")
    p.add_argument("--output_npz", required=True, help="folder for <id>.npz (created if missing)")
    p.add_argument("--output_csv", required=True,
                   help="labels CSV; <stem>_rejected.csv is written beside it")
    p.add_argument("--target_seq_len", type=int, default=7500,
                   help="samples per signal after resampling the whole record")
    add_time_base_flags(p)
    p.add_argument("--features", action="store_true",
                   help="add the physiological features of each record to the labels CSV "
                        "(heart rate and variability, pulse arrival time, PPG morphology, "
                        "signal quality: physio.py), computed from the resampled rows the "
                        "npz holds; needs --record_seconds or --fs_ecg/--fs_ppg")
    p.add_argument("--mains_hz", type=float, default=physio.MAINS_HZ,
                   help="mains frequency notched out of the ECG before beat detection "
                        "(--features): 50 in Europe and Asia, 60 in the Americas")
    p.add_argument("--subject_key", nargs="+", default=None, metavar="FIELD",
                   help="metadata field(s) that identify the person, written as subject_id: "
                        "one field (e.g. uid) as its value; several (e.g. name age sex) as a "
                        "12-hex-digit hash of their stripped, lower-cased values, so no name "
                        "reaches the CSV. A record with a missing value (NaN, empty text) in "
                        "a key field is kept as subject unknown_<id>, its own subject, and "
                        "listed in the summary. Without it training takes the subject from "
                        "the id's part before the first '_'")
    p.add_argument("--extra_cols", nargs="*", default=[],
                   help="more metadata fields for the CSV, e.g. age sex for --covariates")
    p.add_argument("--meta_group", default=META_GROUP, help="HDF5 group of the metadata fields")
    p.add_argument("--ecg_key", default=ECG_KEY,
                   help="HDF5 dataset of the ECG rows; 'none' for a cohort without ECG (the "
                        "npz ECG column is then all NaN, the manifest lists channels ['ppg'], "
                        "and features that need the ECG are empty)")
    p.add_argument("--ppg_key", default=PPG_KEY,
                   help="HDF5 dataset of the PPG rows; 'none' for a cohort without PPG")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that resample, compress and write (compression "
                        "dominates) (default: min(8, CPU cores), %(default)s here)")
    p.add_argument("--chunk_rows", type=int, default=256,
                   help="rows a worker reads at once; memory per worker grows with it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output_csv (and its _rejected.csv) made from "
                        "another input or with other columns; without it such a run is "
                        "refused, while a re-run with the same settings finishes the job")
    return p


def summarize(n_rows: int, labels: pd.DataFrame, n_present: int, rejected: list,
              target_cols: Sequence[str], paths: Dict[str, str],
              subjects: Sequence[str] = ()) -> str:
    """The report printed at the end: counts, rejections by reason, the ``subjects`` lines
    (``subject_lines``), output paths."""
    lines = [f"{n_rows} records: {len(labels)} written ({n_present} already there), "
             f"{len(rejected)} rejected"]
    lines += [f"  rejected {reason}: {count}"
              for reason, count in sorted(Counter(r[2] for r in rejected).items())]
    n_missing = int(labels[list(target_cols)].isna().any(axis=1).sum())
    if n_missing:
        lines.append(f"  written with an empty label cell: {n_missing}")
    lines += subjects
    lines += [f"  {name}: {path}" for name, path in paths.items()]
    return "\n".join(lines)


def subject_lines(labels: pd.DataFrame, subject_key: Optional[Sequence[str]],
                  unknown_ids: Sequence[str], n_other_subject: Optional[int],
                  shown: int = 10) -> List[str]:
    """Summary lines on subjects: records per subject over the written records, the
    records of unknown subject, and (``n_other_subject`` not None) the duplicate recordings
    whose subject differs from the original's."""
    lines = []
    if n_other_subject is not None:
        lines.append(f"  same recording, different subject: {n_other_subject} (duplicate_signal "
                     f"rows whose subject differs from the original's: the ids or the "
                     f"--subject_key fields may be wrong)")
    if len(labels):
        subjects = labels["subject_id"] if subject_key else labels["ssoid"].map(subject_of)
        counts = subjects.value_counts()
        rule = ("subject_id from --subject_key " + " ".join(subject_key) if subject_key
                else "id part before the first '_', no --subject_key")
        lines.append(f"  subjects ({rule}): {len(counts)}; records per subject min "
                     f"{counts.min()} / median {counts.median():g} / max {counts.max()}; "
                     f"{int((counts == 1).sum())} subjects with one record")
    if unknown_ids:
        more = len(unknown_ids) - shown
        lines.append(f"  unknown subjects (a --subject_key value is missing; each record is "
                     f"kept as its own subject {UNKNOWN_SUBJECT}<id>): {len(unknown_ids)}: "
                     + ", ".join(unknown_ids[:shown]) + (f" and {more} more" if more > 0 else ""))
    return lines


def duplicate_signals(results: Sequence[Result]) -> Dict[int, Tuple[int, str]]:
    """Usable rows whose signal digest equals an earlier usable row's, in row order:
    row -> (the first row with that digest, its id)."""
    first: Dict[str, Tuple[int, str]] = {}
    repeats = {}
    for r in sorted(results):
        if r.reason is not None:
            continue
        if r.digest in first:
            repeats[r.row] = first[r.digest]
        else:
            first[r.digest] = (r.row, r.id)
    return repeats


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    file_time_base(args)
    check_args(args)
    fields = [("--id_key", args.id_key), *(("--target_cols", c) for c in args.target_cols),
              *(("--extra_cols", c) for c in args.extra_cols),
              *(("--subject_key", k) for k in args.subject_key or [])]
    with open_h5(args.h5_path) as f:
        cohort = check_cohort(f, args.h5_path, fields, args.meta_group, args.ecg_key, args.ppg_key)
        check_columns(f[args.meta_group], args.h5_path, args)
        columns = read_columns(f[args.meta_group], [name for _, name in fields], [args.id_key])
    subjects, unknown = (subject_ids([columns[k] for k in args.subject_key], columns[args.id_key])
                         if args.subject_key else (None, None))
    check_outputs(args.output_npz, args.output_csv)
    manifest = manifest_for(cohort, args.id_key, args.target_seq_len, time_base_of(args))
    settings = labels_settings(manifest, args)
    check_labels_settings(args.output_csv, settings, args.overwrite)
    present = existing_npz(args.output_npz, manifest)
    usable, rejected = screen_ids(columns[args.id_key])
    # ---- nothing is written before this line
    os.makedirs(args.output_npz, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_csv)), exist_ok=True)
    with folder_lock(args.output_npz):
        n_leftovers = remove_leftovers(args.output_npz, args.output_csv)
        if n_leftovers:
            print(f"removed {n_leftovers} temporary files of an interrupted run")
        write_json_atomic(os.path.join(args.output_npz, MANIFEST), manifest)
        # first: a killed run's re-run with the same settings may then finish the CSVs
        write_json_atomic(settings_path(args.output_csv), settings)
        # rows already written are read again for their digest, not resampled
        tasks = make_tasks(usable, args.chunk_rows, args.workers,
                           present=frozenset(row for row, rid in usable if rid in present),
                           h5_path=args.h5_path, id_key=args.id_key, meta_group=args.meta_group,
                           ecg_key=args.ecg_key, ppg_key=args.ppg_key, out_dir=args.output_npz,
                           target_len=args.target_seq_len, time_base=time_base_of(args),
                           mains_hz=args.mains_hz if args.features else None)
        results = run_with_progress(tasks, args.workers, len(usable))
        repeats = duplicate_signals(results)
        for r in results:
            if r.row in repeats:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.output_npz, r.id + ".npz"))
        written = sorted((r.row, r.id) for r in results
                         if r.reason is None and r.row not in repeats)
        rejected = sorted([(*r, "") for r in rejected]
                          + [(r.row, r.id, r.reason, "") for r in results if r.reason is not None]
                          + [(r.row, r.id, "duplicate_signal", repeats[r.row][1])
                             for r in results if r.row in repeats])
        labels = labels_frame(written, columns, subjects, args.target_cols, args.extra_cols,
                              {r.row: r for r in results})
        write_csv_atomic(args.output_csv, labels)
        write_csv_atomic(rejected_path(args.output_csv),
                         pd.DataFrame(rejected, columns=REJECTED_COLUMNS))
    other_subject = None if subjects is None else sum(
        subjects[row] != subjects[first] and not (unknown[row] or unknown[first])
        for row, (first, _) in repeats.items())
    unknown_ids = [] if unknown is None else [rid for row, rid in written if unknown[row]]
    print(summarize(cohort.n_rows, labels, sum(rid in present for _, rid in written), rejected,
                    args.target_cols, {"npz": args.output_npz, "labels": args.output_csv,
                                       "rejected": rejected_path(args.output_csv)},
                    subject_lines(labels, args.subject_key, unknown_ids,
                                  other_subject if repeats else None)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
