"""Bring a public or own cohort into the Kailuan HDF5 layout (CONTRACT section 1) that
``prepare_kailuan_npz.py`` reads: PhysioNet WFDB records, PulseDB subset files or plain arrays.

    python make_cohort_h5.py wfdb    --records DIR --out cohort.h5 [--window_s 10 --step_s 10]
    python make_cohort_h5.py pulsedb --subset CalFree_Test_Subset.mat --out cohort.h5
    python make_cohort_h5.py arrays  --npz FILE_OR_DIR --out cohort.h5
    python prepare_kailuan_npz.py --h5_path cohort.h5 --subject_key subject \\
        --target_cols sbp dbp --target_seq_len 1250 --output_npz npz --output_csv labels.csv

Layout written, by one writer (``CohortWriter``) for every format, one row per window
(WFDB), segment (PulseDB) or array row:
- ``metadata/new_id`` (text, unique), ``metadata/subject`` (text: the person; prepare with
  ``--subject_key subject``), then what the source holds and nothing else: BP targets in mmHg
  (NaN where a row has none), covariates (``age``, ``sex`` as the source writes it, ...), and
  where the row came from (``record``, ``start_s`` for WFDB; ``source`` and ``source_index``
  for PulseDB; ``source_file`` and ``source_index`` for arrays).
- ``signals/ecg`` and ``signals/ppg``: (N, L) rows, only the signals the source has (a cohort
  without ECG has no ``signals/ecg``: prepare it with ``--ecg_key none``); attributes ``fs``
  (Hz), ``units`` and ``channel`` (the source's name for it).
- file attributes: ``record_seconds`` = L / fs, the span of every row, which prep takes as its
  time base when no time-base flag is given; ``fs_ecg`` / ``fs_ppg``; ``source_format``,
  ``source`` and ``converter``.

wfdb: every record of ``--records`` (the folder's ``RECORDS`` file when it has one, as PhysioNet
databases do, else every ``.hea`` below it), single-segment records at one common rate. Channels
by name (``--ecg II``, ``--ppg PLETH``, ``--abp ABP ART``: the first one a record has, compared
without case or a trailing comma; ``none`` for a signal to leave out). A record without a
requested ECG or PPG channel is skipped and counted. Windows of ``--window_s`` every
``--step_s`` seconds. BP per window from the arterial channel: ``physio.ppg_beats`` finds the
beats (its systolic-peak detector and template-SQI acceptance, which ABP's pulse shape suits),
each peak is moved to the raw maximum within 0.1 s, SBP is the median of the peaks' raw values
and DBP the median of the raw minima between successive peaks; or from ``--cuff_csv``
(``record`` and value columns such as ``sbp,dbp``, with ``time_s`` the reading nearest the
window's centre within ``--cuff_max_gap_s``). Records without an arterial channel give windows
without BP. ``age``/``sex`` from header comments such as ``<age>: 88 <sex>: M``. One subject per
record unless ``--subject_map`` (``record,subject``). Windows that fail a check are not written
and are counted by reason: ``empty_<s>``, ``nan_or_inf_<s>``, ``flat_<s>`` (prep's
``signal_problem``), ``clipped_<s>`` (the window's maximum or minimum held for 0.1 s or more:
a saturated amplifier), ``no_abp_beats``, ``implausible_bp`` (SBP or DBP outside
``--sbp_range``/``--dbp_range``, or pulse pressure below ``--min_pp``), ``no_cuff_reading``.

pulsedb: one PulseDB subset file (MATLAB v7.3, read with h5py), laid out as the PulseDB
repository's ``Generate_Subsets.m`` saves it: ``Subset/Signals`` (1250, 3, N) float64 (ECG_F,
PPG_F, ABP_Raw at 125 Hz over 10 s), ``SBP``, ``DBP``, ``Age``, ``Height``, ``Weight``, ``BMI``
as (1, N) doubles, ``Subject`` and ``Gender`` as (1, N) references to uint16 char arrays (the
subject's last character names its database: 0 MIMIC-III, 1 VitalDB). Every field's presence,
shape, type and MATLAB class is checked first and each difference is one precise error;
``--describe`` prints the file's structure for a report. Read ``--chunk`` segments at a time
(memory stays flat); ECG_F and PPG_F are written, ABP_Raw is not (its SBP/DBP are).

arrays: an ``.npz`` or a folder of them, each with ``ecg`` and/or ``ppg`` (N, L), ``fs`` (or
``fs_ecg``/``fs_ppg``), ``subject`` (N,), optionally ``id`` (N,), and any other (N,) arrays
(targets, covariates) as metadata fields, kept with their dtype (an exact round trip).

Bad input: one ``error:`` line, exit status 2. The output is written under a temporary name and
renamed at the end, so it appears whole or not at all.
"""
from __future__ import annotations

import glob
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import pandas as pd

import physio
from prepare_kailuan_npz import signal_problem
from utils import ArgumentParser, UserError, atomic_path, check_output_file, progress, run_cli

CONVERTER = "make_cohort_h5.py"
TEXT = "text"  # the kind of a text metadata field (others are numpy dtype names)
BLOCK = 256  # rows read and written at once: memory does not grow with the cohort
SIGNALS = ("ecg", "ppg")
NONE = "none"
CLIP_RUN_S = 0.1  # a maximum or minimum held this long is a saturated amplifier
PEAK_SEARCH_S = 0.1  # a detected systolic peak moves to the raw maximum this close
PULSEDB_FS = 125.0
PULSEDB_CHANNELS = ("ECG_F", "PPG_F", "ABP_Raw")
PULSEDB_NUMBERS = {"SBP": "sbp", "DBP": "dbp", "Age": "age", "Height": "height",
                   "Weight": "weight", "BMI": "bmi"}
PULSEDB_TEXT = {"Subject": "subject", "Gender": "sex"}
PULSEDB_REQUIRED = ("Signals", "SBP", "DBP", "Subject")
PULSEDB_SOURCES = {"0": "MIMIC-III", "1": "VitalDB"}
REPORT = "run the same command with --describe and send its output (docs/cohorts.md)"


# ----------------------------------------------------------------------------- the writer
@dataclass(frozen=True)
class SignalSpec:
    """One signal's rows: rate, samples per row, storage type and what the source calls it."""
    fs: float
    length: int
    dtype: str = "float32"
    units: str = ""
    channel: str = ""


class CohortWriter:
    """The one writer of the cohort layout: rows appended block by block to resizable
    datasets of an open HDF5 file (``write_cohort`` gives it a temporary file)."""

    def __init__(self, f: h5py.File, signals: Dict[str, SignalSpec], fields: Dict[str, str],
                 attrs: Dict[str, object]):
        spans = {round(s.length / s.fs, 9) for s in signals.values()}
        if len(spans) != 1:
            raise UserError("the ECG and PPG rows must span the same time; got "
                            + ", ".join(f"{n} {s.length} samples at {s.fs:g} Hz"
                                        for n, s in signals.items()))
        self.f, self.n, self.fields, self.signals = f, 0, dict(fields), list(signals)
        for name, spec in signals.items():
            ds = f.create_dataset(f"signals/{name}", (0, spec.length), dtype=spec.dtype,
                                  maxshape=(None, spec.length), chunks=(BLOCK, spec.length))
            ds.attrs.update(fs=spec.fs, units=spec.units, channel=spec.channel)
            f.attrs[f"fs_{name}"] = spec.fs
        for name, kind in self.fields.items():
            dtype = h5py.string_dtype() if kind == TEXT else np.dtype(kind)
            f.create_dataset(f"metadata/{name}", (0,), dtype=dtype, maxshape=(None,),
                             chunks=(4096,))
        f.attrs.update(record_seconds=spans.pop(), converter=CONVERTER, **attrs)

    def append(self, signals: Dict[str, np.ndarray], meta: Dict[str, Sequence]) -> None:
        """Add rows: ``signals`` (n, L) per signal, ``meta`` n values per field."""
        n = len(meta["new_id"])
        if set(signals) != set(self.signals) or set(meta) != set(self.fields):
            raise ValueError(f"rows with {sorted(signals)} / {sorted(meta)}, writer holds "
                             f"{self.signals} / {sorted(self.fields)}")
        if n == 0:
            return
        for name, rows in signals.items():
            self._put(f"signals/{name}", np.asarray(rows))
        for name, values in meta.items():
            text = self.fields[name] == TEXT
            self._put(f"metadata/{name}", np.asarray(values, dtype=object if text else None))
        self.n += n

    def _put(self, key: str, values: np.ndarray) -> None:
        ds = self.f[key]
        ds.resize(self.n + len(values), axis=0)
        ds[self.n:] = values


def write_cohort(out: str, signals: Dict[str, SignalSpec], fields: Dict[str, str],
                 attrs: Dict[str, object],
                 blocks: Iterator[Tuple[Dict[str, np.ndarray], Dict[str, Sequence]]]) -> int:
    """Write every block to ``out`` atomically; the number of rows. No row: an error, and
    nothing is written."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        writer = CohortWriter(f, signals, {"new_id": TEXT, "subject": TEXT, **fields}, attrs)
        for sig, meta in blocks:
            writer.append(sig, meta)
        if writer.n == 0:
            raise UserError(f"no row passed the checks: {out} is not written")
        return writer.n


# ----------------------------------------------------------------------------- quality
def longest_run(mask: np.ndarray) -> int:
    """The length of the longest run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def window_problem(row: np.ndarray, name: str, fs: float) -> Optional[str]:
    """Why one window of one signal can't be used (prep's reasons, or ``clipped_<name>``)."""
    reason = signal_problem(row, name)
    if reason:
        return reason
    run = max(3, int(round(CLIP_RUN_S * fs)))
    if max(longest_run(row == row.max()), longest_run(row == row.min())) >= run:
        return f"clipped_{name}"
    return None


def arterial_bp(abp: np.ndarray, fs: float) -> Tuple[float, float, int]:
    """(SBP, DBP, beats) of one window of arterial pressure in mmHg (module docstring);
    NaN and 0 beats when the detector accepts fewer than two."""
    beats = physio.ppg_beats(abp, fs)
    if len(beats.peaks) < 2:
        return math.nan, math.nan, 0
    reach = max(1, int(round(PEAK_SEARCH_S * fs)))
    peaks = []
    for p in np.round(beats.peaks).astype(int):
        a, b = max(0, p - reach), min(len(abp), p + reach + 1)
        peaks.append(a + int(np.argmax(abp[a:b])))
    peaks = np.unique(peaks)
    if len(peaks) < 2:
        return math.nan, math.nan, 0
    troughs = [abp[a:b + 1].min() for a, b in zip(peaks[:-1], peaks[1:])]
    return float(np.median(abp[peaks])), float(np.median(troughs)), len(peaks)


@dataclass(frozen=True)
class BPLimits:
    sbp: Tuple[float, float]
    dbp: Tuple[float, float]
    min_pp: float

    def plausible(self, sbp: float, dbp: float) -> bool:
        return (self.sbp[0] <= sbp <= self.sbp[1] and self.dbp[0] <= dbp <= self.dbp[1]
                and sbp - dbp >= self.min_pp)


# ----------------------------------------------------------------------------- wfdb
def channel_key(name: str) -> str:
    """A channel name compared without case, blanks or the trailing comma some exports
    (BIDMC: ``PLETH,``) leave."""
    return name.strip().rstrip(",").strip().upper()


@dataclass
class WfdbRecord:
    """One record's header: where it is, its rate and length, the channel index of each
    signal used (``ecg``, ``ppg``, ``abp``), their units and the covariates of its comments."""
    path: str
    name: str
    fs: float
    n_samples: int
    channels: Dict[str, int]
    names: Dict[str, str]
    units: Dict[str, str]
    covariates: Dict[str, object] = field(default_factory=dict)


def list_records(folder: str) -> List[str]:
    """Record paths (without ``.hea``): the folder's RECORDS file, else every header below
    it (multi-segment layout headers left out)."""
    if not os.path.isdir(folder):
        raise UserError(f"--records {folder}: no such folder")
    listing = os.path.join(folder, "RECORDS")
    if os.path.isfile(listing):
        with open(listing, encoding="utf-8") as fh:
            names = [ln.strip() for ln in fh if ln.strip()]
        return [os.path.join(folder, n) for n in names]
    heads = sorted(glob.glob(os.path.join(folder, "**", "*.hea"), recursive=True))
    paths = [h[:-4] for h in heads if not h.endswith("_layout.hea")]
    if not paths:
        raise UserError(f"--records {folder}: no WFDB header (.hea) in it")
    return paths


COMMENT_FIELDS = {"age": re.compile(r"(?:<age>|\bage)\s*:\s*([^\s<]+)", re.I),
                  "sex": re.compile(r"(?:<(?:sex|gender)>|\b(?:sex|gender))\s*:\s*([^\s<]+)",
                                    re.I)}


def header_covariates(comments: Sequence[str]) -> Dict[str, object]:
    """``age`` (a number; NaN when not one, e.g. ``?``) and ``sex`` (as written) from header
    comments, for those the comments name."""
    text = " ".join(comments)
    found = {k: m.group(1) for k, rx in COMMENT_FIELDS.items() for m in [rx.search(text)] if m}
    if "age" in found:
        try:
            found["age"] = float(found["age"])
        except ValueError:
            found["age"] = math.nan
    return found


def read_header(path: str, root: str, wanted: Dict[str, Sequence[str]]):
    """A ``WfdbRecord``, or the reason the record is skipped (a missing channel)."""
    import wfdb

    try:
        head = wfdb.rdheader(path)
    except (OSError, ValueError, IndexError, KeyError) as err:
        raise UserError(f"--records: {path}.hea is not a readable WFDB header ({err})") from None
    if isinstance(head, wfdb.MultiRecord):
        return "multi_segment_record"  # its segments are single-segment records: list those
    keys = [channel_key(n) for n in head.sig_name]
    channels = {}
    for signal, names in wanted.items():
        hits = [keys.index(channel_key(n)) for n in names if channel_key(n) in keys]
        if hits:
            channels[signal] = hits[0]
        elif signal != "abp":
            return f"no_{signal}_channel"
    name = os.path.relpath(path, root).replace(os.sep, ".")
    return WfdbRecord(path, name, float(head.fs), int(head.sig_len), channels,
                      {s: head.sig_name[i].strip().rstrip(",") for s, i in channels.items()},
                      {s: head.units[i] for s, i in channels.items()},
                      header_covariates(head.comments or []))


@dataclass(frozen=True)
class Windows:
    length: int
    step: int

    @staticmethod
    def of(window_s: float, step_s: float, fs: float) -> "Windows":
        for flag, seconds in (("--window_s", window_s), ("--step_s", step_s)):
            n = seconds * fs
            if not (seconds > 0 and abs(n - round(n)) < 1e-6 and round(n) >= 1):
                raise UserError(f"{flag} {seconds:g} is not a whole number of samples at "
                                f"{fs:g} Hz")
        return Windows(int(round(window_s * fs)), int(round(step_s * fs)))

    def count(self, n_samples: int) -> int:
        return 0 if n_samples < self.length else (n_samples - self.length) // self.step + 1


def read_cuff(path: str) -> pd.DataFrame:
    """The cuff readings: ``record``, optional ``time_s``, numeric value columns."""
    try:
        cuff = pd.read_csv(path, dtype={"record": str})
    except (OSError, ValueError) as err:
        raise UserError(f"--cuff_csv {path} is unreadable ({err})") from None
    if "record" not in cuff.columns:
        raise UserError(f"--cuff_csv {path} needs a 'record' column (found: "
                        f"{', '.join(cuff.columns)})")
    values = [c for c in cuff.columns if c not in ("record", "time_s")]
    bad = [c for c in values + (["time_s"] if "time_s" in cuff else [])
           if not pd.api.types.is_numeric_dtype(cuff[c])]
    if not values or bad:
        raise UserError(f"--cuff_csv {path}: needs numeric value columns besides record and "
                        f"time_s (not numeric: {', '.join(bad) or 'none given'})")
    if "time_s" not in cuff:
        repeated = cuff["record"][cuff["record"].duplicated()].unique()
        if len(repeated):
            raise UserError(f"--cuff_csv {path}: record {repeated[0]} has several readings "
                            f"and there is no time_s column to tell which window each is for")
    return cuff


def read_subject_map(path: Optional[str], records: Sequence[WfdbRecord]) -> Dict[str, str]:
    """Record name -> subject: ``--subject_map`` (``record,subject``), else the record."""
    if path is None:
        return {r.name: r.name for r in records}
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--subject_map {path} is unreadable ({err})") from None
    if not {"record", "subject"} <= set(table.columns):
        raise UserError(f"--subject_map {path} needs columns record,subject")
    mapping = dict(zip(table["record"], table["subject"]))
    missing = [r.name for r in records if not mapping.get(r.name)]
    if missing:
        raise UserError(f"--subject_map {path} has no subject for {len(missing)} records, "
                        f"e.g. {missing[0]}")
    return {r.name: mapping[r.name] for r in records}


class WfdbSource:
    """Windows of a folder of WFDB records (module docstring), with the counts by reason."""

    def __init__(self, args):
        wanted = {s: getattr(args, s) for s in ("ecg", "ppg", "abp")
                  if [n for n in getattr(args, s) if n.lower() != NONE]}
        if not {"ecg", "ppg"} & set(wanted):
            raise UserError("--ecg and --ppg are both none: a window needs a signal")
        if args.cuff_csv:
            wanted.pop("abp", None)
        self.skipped: Counter = Counter()
        self.rejected: Counter = Counter()
        self.records = []
        for path in list_records(args.records):
            rec = read_header(path, args.records, wanted)
            if isinstance(rec, str):
                self.skipped[rec] += 1
            else:
                self.records.append(rec)
        if not self.records:
            raise UserError(f"--records {args.records}: no record has the channels asked for "
                            f"({', '.join(f'{k} {v}' for k, v in sorted(self.skipped.items()))})")
        rates = sorted({r.fs for r in self.records})
        if len(rates) > 1:
            listed = " and ".join(f"{r:g} Hz" for r in rates)
            raise UserError(f"--records {args.records}: records at {listed}; convert each rate "
                            f"into its own file")
        self.fs = rates[0]
        self.win = Windows.of(args.window_s, args.step_s, self.fs)
        self.signals = [s for s in SIGNALS if s in wanted]
        self.subjects = read_subject_map(args.subject_map, self.records)
        self.cuff = read_cuff(args.cuff_csv) if args.cuff_csv else None
        self.cuff_by_record = {} if self.cuff is None else dict(tuple(self.cuff.groupby("record")))
        self.cuff_max_gap_s = args.cuff_max_gap_s
        self.limits = BPLimits(tuple(args.sbp_range), tuple(args.dbp_range), args.min_pp)
        self.bp = ("cuff" if self.cuff is not None else
                   "arterial" if any("abp" in r.channels for r in self.records) else None)
        for r in self.records:
            unit = r.units.get("abp", "mmHg")
            if self.bp == "arterial" and unit.strip().lower() != "mmhg":
                raise UserError(f"--records: {r.name}'s arterial channel {r.names['abp']} is in "
                                f"{unit}, not mmHg")

    def specs(self) -> Dict[str, SignalSpec]:
        def units(s):
            return ",".join(sorted({r.units[s] for r in self.records}))

        return {s: SignalSpec(self.fs, self.win.length, "float32", units(s),
                              ",".join(sorted({r.names[s] for r in self.records})))
                for s in self.signals}

    def fields(self) -> Dict[str, str]:
        fields = {"record": TEXT, "start_s": "float64"}
        if self.bp == "arterial":
            fields.update(sbp="float32", dbp="float32", abp_beats="int32")
        elif self.bp == "cuff":
            fields.update({c: "float32" for c in self.cuff.columns
                           if c not in ("record", "time_s")})
        if any("age" in r.covariates for r in self.records):
            fields["age"] = "float32"
        if any("sex" in r.covariates for r in self.records):
            fields["sex"] = TEXT
        return fields

    def total(self) -> int:
        return sum(self.win.count(r.n_samples) for r in self.records)

    def blocks(self) -> Iterator[Tuple[Dict[str, np.ndarray], Dict[str, list]]]:
        fields = self.fields()
        bar = progress(total=self.total(), desc="windows", unit="win")
        for rec in self.records:
            n = self.win.count(rec.n_samples)
            if n == 0:
                self.skipped["shorter_than_window"] += 1
            for k0 in range(0, n, BLOCK):
                yield self._block(rec, k0, min(n, k0 + BLOCK), fields)
                bar.update(min(n, k0 + BLOCK) - k0)
        bar.close()

    def _block(self, rec: WfdbRecord, k0: int, k1: int, fields: Dict[str, str]):
        import wfdb

        used = [s for s in (*self.signals, "abp") if s in rec.channels and
                (s != "abp" or self.bp == "arterial")]
        a, b = k0 * self.win.step, (k1 - 1) * self.win.step + self.win.length
        try:
            data = wfdb.rdrecord(rec.path, sampfrom=a, sampto=b,
                                 channels=[rec.channels[s] for s in used]).p_signal
        except (OSError, ValueError, IndexError) as err:
            raise UserError(f"--records: {rec.path} cannot be read ({err})") from None
        sig = {s: [] for s in self.signals}
        meta = {k: [] for k in ("new_id", "subject", *fields)}
        for k in range(k0, k1):
            start = k * self.win.step - a
            rows = {s: data[start:start + self.win.length, i] for i, s in enumerate(used)}
            values = self._window(rec, k, rows)
            if isinstance(values, str):
                self.rejected[values] += 1
                continue
            for s in self.signals:
                sig[s].append(rows[s].astype(np.float32))
            values.update(new_id=f"{rec.name}_w{k:05d}", subject=self.subjects[rec.name],
                          record=rec.name, start_s=k * self.win.step / self.fs)
            for key in meta:
                meta[key].append(values.get(key, rec.covariates.get(key, self._missing(key))))
        return {s: np.asarray(v, np.float32).reshape(-1, self.win.length)
                for s, v in sig.items()}, meta

    @staticmethod
    def _missing(key: str):
        return "" if key == "sex" else math.nan

    def _window(self, rec: WfdbRecord, k: int, rows: Dict[str, np.ndarray]):
        """The BP fields of one window, or the reason it is rejected."""
        for s, row in rows.items():
            reason = window_problem(row, s, self.fs)
            if reason:
                return reason
        if self.bp == "arterial" and "abp" in rows:
            sbp, dbp, n = arterial_bp(rows["abp"], self.fs)
            if n == 0:
                return "no_abp_beats"
            if not self.limits.plausible(sbp, dbp):
                return "implausible_bp"
            return {"sbp": sbp, "dbp": dbp, "abp_beats": n}
        if self.bp == "cuff":
            return self._cuff_values(rec, (k * self.win.step + self.win.length / 2) / self.fs)
        return {"abp_beats": 0}

    def _cuff_values(self, rec: WfdbRecord, centre_s: float):
        rows = self.cuff_by_record.get(rec.name, self.cuff.iloc[:0])
        if "time_s" in rows:
            rows = rows[(rows["time_s"] - centre_s).abs() <= self.cuff_max_gap_s]
            rows = rows.iloc[(rows["time_s"] - centre_s).abs().argsort()[:1]]
        if rows.empty:
            return "no_cuff_reading"
        return {c: float(rows.iloc[0][c]) for c in rows.columns if c not in ("record", "time_s")}

    def attrs(self, args) -> Dict[str, object]:
        return {"source_format": "wfdb", "source": os.path.abspath(args.records),
                "window_s": args.window_s, "step_s": args.step_s,
                "bp_source": self.bp or "none"}

    def summary(self) -> List[str]:
        bp = {"arterial": "median systolic peak / diastolic trough of the arterial channel",
              "cuff": "the --cuff_csv readings", None: "none: the windows have no BP fields"}
        lines = [f"  records: {len(self.records)} used at {self.fs:g} Hz, "
                 f"{sum(self.skipped.values())} skipped", f"  BP: {bp[self.bp]}"]
        if self.bp == "arterial":
            lines.append(f"  records without an arterial channel (their windows have no BP): "
                         f"{sum('abp' not in r.channels for r in self.records)}")
        lines += [f"  skipped {k}: {v}" for k, v in sorted(self.skipped.items())]
        lines += [f"  rejected {k}: {v}" for k, v in sorted(self.rejected.items())]
        return lines


# ----------------------------------------------------------------------------- pulsedb
def _matlab_class(obj) -> str:
    value = obj.attrs.get("MATLAB_class", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(path: str) -> str:
    """Every group and dataset of an HDF5 file (``#refs#`` summarised): name, shape, dtype
    and MATLAB class, for a report of a layout difference."""
    lines = []

    def visit(name, obj):
        if name.startswith("#refs#/"):
            return
        kind = (f"dataset shape {obj.shape} dtype {obj.dtype}" if isinstance(obj, h5py.Dataset)
                else "group")
        lines.append(f"{name}: {kind} MATLAB_class {_matlab_class(obj) or '-'}")

    with open_hdf5(path, "--subset") as f:
        f.visititems(visit)
        refs = f.get("#refs#")
        if isinstance(refs, h5py.Group):
            lines.append(f"#refs#: group of {len(refs)} objects")
    return "\n".join(lines)


def open_hdf5(path: str, flag: str) -> h5py.File:
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError:
        with open(path, "rb") as fh:
            head = fh.read(20)
        if head.startswith(b"MATLAB 5.0"):
            raise UserError(f"{flag} {path} is a MATLAB v5 file, not v7.3 (HDF5): PulseDB "
                            f"subsets are saved with -v7.3; re-save it so") from None
        raise UserError(f"{flag} {path} is not an HDF5 (MATLAB v7.3) file") from None


@dataclass(frozen=True)
class PulseDBLayout:
    n: int
    length: int
    numbers: Tuple[str, ...]
    texts: Tuple[str, ...]


def check_pulsedb(f: h5py.File, path: str) -> PulseDBLayout:
    """The subset's size and fields, after checking each field against the layout of the
    module docstring; one ``UserError`` naming the first difference."""
    where = f"--subset {path}"
    subset = f.get("Subset")
    if not isinstance(subset, h5py.Group):
        raise UserError(f"{where}: no group Subset at the top (found: {', '.join(f) or 'nothing'}"
                        f"); a PulseDB subset file holds one MATLAB struct named Subset; {REPORT}")
    for name in PULSEDB_REQUIRED:
        if not isinstance(subset.get(name), h5py.Dataset):
            raise UserError(f"{where}: Subset/{name} is missing (found: {', '.join(subset)}); "
                            f"{REPORT}")
    n, length = _check_signals(subset["Signals"], where)
    numbers = tuple(k for k in PULSEDB_NUMBERS if k in subset)
    texts = tuple(k for k in PULSEDB_TEXT if k in subset)
    for name in numbers + texts:
        ds = subset[name]
        if ds.shape != (1, n):
            hint = " (a column, not MATLAB's (1, N) row)" if ds.shape == (n, 1) else ""
            raise UserError(f"{where}: Subset/{name} has shape {ds.shape}{hint}; expected "
                            f"(1, {n}), one value per segment of Subset/Signals; {REPORT}")
        if name in numbers and (ds.dtype.kind != "f" or _matlab_class(ds) not in ("", "double")):
            raise UserError(f"{where}: Subset/{name} holds {ds.dtype} (MATLAB_class "
                            f"{_matlab_class(ds) or 'none'}); expected double; {REPORT}")
        if name in texts and (h5py.check_ref_dtype(ds.dtype) is not h5py.Reference
                              or _matlab_class(ds) not in ("", "cell")):
            raise UserError(f"{where}: Subset/{name} holds {ds.dtype} (MATLAB_class "
                            f"{_matlab_class(ds) or 'none'}); expected a cell array of "
                            f"references to char arrays; {REPORT}")
    return PulseDBLayout(n, length, numbers, texts)


def _check_signals(ds: h5py.Dataset, where: str) -> Tuple[int, int]:
    shape = ds.shape
    if len(shape) != 3 or shape[1] != 3:
        raise UserError(f"{where}: Subset/Signals has shape {shape}; expected (samples, 3, "
                        f"segments): h5py reads MATLAB's (N, 3, 1250) as (1250, 3, N); {REPORT}")
    if shape[2] == 1250 and shape[0] != 1250:
        raise UserError(f"{where}: Subset/Signals has shape {shape}: segments first, samples "
                        f"last, i.e. transposed against the MATLAB v7.3 layout (1250, 3, N); "
                        f"{REPORT}")
    if ds.dtype.kind != "f":
        raise UserError(f"{where}: Subset/Signals holds {ds.dtype}; expected double; {REPORT}")
    if shape[0] < 2 or shape[2] < 1:
        raise UserError(f"{where}: Subset/Signals has shape {shape}: no segments to read")
    return shape[2], shape[0]


def matlab_text(f: h5py.File, ref, where: str) -> str:
    """The text of one cell element: a uint16 char array (MATLAB_empty: ''). Read through
    h5py's low-level API: the high-level one costs 0.7 ms an element (0.16 ms here), too slow
    for hundreds of thousands of segments of two texts each."""
    try:
        oid = h5py.h5r.dereference(ref, f.id)
    except (ValueError, KeyError) as err:
        raise UserError(f"{where} is not a valid reference ({err}); {REPORT}") from None
    if isinstance(oid, h5py.h5d.DatasetID) and oid.dtype == np.uint16:
        chars = np.empty(oid.shape, np.uint16)
        oid.read(h5py.h5s.ALL, h5py.h5s.ALL, chars)
        return chars.astype("<u2").tobytes().decode("utf-16-le")
    obj = f[ref]
    if isinstance(obj, h5py.Dataset) and obj.attrs.get("MATLAB_empty", 0):
        return ""
    what = f"{obj.dtype}" if isinstance(obj, h5py.Dataset) else "a group"
    raise UserError(f"{where} points to {what} (MATLAB_class {_matlab_class(obj) or 'none'}); "
                    f"expected a uint16 char array; {REPORT}")


class PulseDBSource:
    """The segments of one PulseDB subset file, read ``chunk`` at a time."""

    def __init__(self, args):
        self.path, self.chunk = args.subset, args.chunk
        with open_hdf5(self.path, "--subset") as f:
            self.layout = check_pulsedb(f, self.path)
        self.fs = args.fs
        self.rejected: Counter = Counter()

    def specs(self) -> Dict[str, SignalSpec]:
        return {s: SignalSpec(self.fs, self.layout.length, "float32", "", c)
                for s, c in zip(SIGNALS, PULSEDB_CHANNELS)}

    def fields(self) -> Dict[str, str]:
        fields = {PULSEDB_NUMBERS[k]: "float64" for k in self.layout.numbers}
        fields.update({PULSEDB_TEXT[k]: TEXT for k in self.layout.texts if k != "Subject"})
        return {**fields, "source": TEXT, "source_index": "int64"}

    def blocks(self):
        bar = progress(total=self.layout.n, desc="segments", unit="seg")
        for a in range(0, self.layout.n, self.chunk):
            b = min(a + self.chunk, self.layout.n)
            # opened per chunk: an open file keeps the metadata of every object dereferenced
            # in it (HDF5 2.0: about 3.8 KB a cell text, 3.5 GB over a 465,480-segment subset)
            with open_hdf5(self.path, "--subset") as f:
                yield self._block(f, f["Subset"], a, b)
            bar.update(b - a)
        bar.close()

    def _block(self, f, subset, a: int, b: int):
        rows = np.transpose(subset["Signals"][:, :, a:b], (2, 1, 0))  # (n, channel, sample)
        meta = {PULSEDB_NUMBERS[k]: subset[k][0, a:b] for k in self.layout.numbers}
        for k in self.layout.texts:
            meta[PULSEDB_TEXT[k]] = [matlab_text(f, ref, f"--subset {self.path}: Subset/{k} "
                                                          f"segment {a + j}")
                                     for j, ref in enumerate(subset[k][0, a:b])]
        subjects = meta["subject"]
        meta["source"] = [PULSEDB_SOURCES.get(s[-1:], "") for s in subjects]
        meta["source_index"] = np.arange(a, b)
        meta["new_id"] = [f"{s}-{i:07d}" for s, i in zip(subjects, range(a, b))]
        return {"ecg": rows[:, 0].astype(np.float32), "ppg": rows[:, 1].astype(np.float32)}, meta

    def attrs(self, args) -> Dict[str, object]:
        return {"source_format": "pulsedb", "source": os.path.abspath(self.path),
                "bp_source": "PulseDB SBP/DBP (from ABP_Raw)"}

    def summary(self) -> List[str]:
        missing = [k for k in (*PULSEDB_NUMBERS, *PULSEDB_TEXT)
                   if k not in self.layout.numbers + self.layout.texts]
        lines = [f"  segments: {self.layout.n} of {self.layout.length} samples at {self.fs:g} Hz"]
        if missing:
            lines.append(f"  fields not in the file (not written): {', '.join(missing)}")
        return lines


# ----------------------------------------------------------------------------- arrays
def npz_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npz")))
        if not files:
            raise UserError(f"--npz {path}: no .npz file in this folder")
        return files
    if not os.path.isfile(path):
        raise UserError(f"--npz {path}: no such file or folder")
    return [path]


def load_npz(path: str) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise UserError(f"--npz {path} holds an object array: save text as a str array "
                            f"(np.array(values, dtype=str))") from None
        raise UserError(f"--npz {path} is not a readable .npz ({err})") from None
    except OSError as err:
        raise UserError(f"--npz {path} is not a readable .npz ({err})") from None


def _array_rates(arrays: Dict[str, np.ndarray], present: Sequence[str], path: str):
    rates = {}
    for s in present:
        key = f"fs_{s}" if f"fs_{s}" in arrays else "fs"
        if key not in arrays or arrays[key].shape != ():
            raise UserError(f"--npz {path}: needs fs (the sampling rate in Hz, a scalar) or "
                            f"fs_{s}")
        rates[s] = float(arrays[key])
        if not rates[s] > 0:
            raise UserError(f"--npz {path}: {key} must be a positive rate, got {rates[s]:g}")
    return rates


def array_layout(arrays: Dict[str, np.ndarray], path: str):
    """(signal specs, field kinds, N) of one npz, after checking it."""
    present = [s for s in SIGNALS if s in arrays]
    if not present:
        raise UserError(f"--npz {path}: needs ecg and/or ppg (N, L) arrays (found: "
                        f"{', '.join(arrays)})")
    n = arrays[present[0]].shape[0] if arrays[present[0]].ndim == 2 else -1
    for s in present:
        a = arrays[s]
        if a.ndim != 2 or a.shape[0] != n or a.dtype.kind != "f":
            raise UserError(f"--npz {path}: {s} has shape {a.shape} dtype {a.dtype}; expected "
                            f"a float (N, L) array with the same N for ecg and ppg")
    rates = _array_rates(arrays, present, path)
    if "id" in arrays and (arrays["id"].shape != (n,) or arrays["id"].dtype.kind not in "iuUS"):
        raise UserError(f"--npz {path}: id has shape {arrays['id'].shape} dtype "
                        f"{arrays['id'].dtype}; expected (N,) = ({n},) text or integers")
    if "subject" not in arrays:
        raise UserError(f"--npz {path}: needs subject (N,): the person of each row (one row "
                        f"per person: subject = np.arange(N))")
    fields = {}
    for k, a in arrays.items():
        if k in SIGNALS or k in ("fs", "fs_ecg", "fs_ppg", "id"):
            continue
        if a.shape != (n,):
            raise UserError(f"--npz {path}: {k} has shape {a.shape}; metadata arrays must be "
                            f"(N,) = ({n},)")
        if a.dtype.kind not in "fiubUS":
            raise UserError(f"--npz {path}: {k} holds {a.dtype}; expected numbers or text")
        fields[k] = TEXT if a.dtype.kind in "US" else a.dtype.str
    specs = {s: SignalSpec(rates[s], arrays[s].shape[1], arrays[s].dtype.str) for s in present}
    return specs, fields, n


class ArraysSource:
    """Rows of one .npz or a folder of them, each file checked against the first."""

    def __init__(self, args):
        self.files = npz_files(args.npz)
        self._specs, self._fields, _ = array_layout(load_npz(self.files[0]), self.files[0])
        self.rejected: Counter = Counter()
        self.n = 0

    def specs(self) -> Dict[str, SignalSpec]:
        return self._specs

    def fields(self) -> Dict[str, str]:
        return {**{k: v for k, v in self._fields.items() if k != "subject"},
                "source_file": TEXT, "source_index": "int64"}

    def blocks(self):
        for path in progress(self.files, desc="files", unit="file"):
            arrays = load_npz(path)
            specs, fields, n = array_layout(arrays, path)
            if (specs, fields) != (self._specs, self._fields):
                raise UserError(f"--npz {path}: its signals or fields "
                                f"({_layout_text(specs, fields)}) differ from {self.files[0]}'s "
                                f"({_layout_text(self._specs, self._fields)})")
            stem = os.path.splitext(os.path.basename(path))[0]
            ids = ([str(v) for v in arrays["id"]] if "id" in arrays
                   else [f"{stem}_{i:06d}" for i in range(n)])
            for a in range(0, n, BLOCK):
                b = min(a + BLOCK, n)
                meta = {k: arrays[k][a:b] for k in fields}
                meta["subject"] = [str(v) for v in arrays["subject"][a:b]]
                meta.update(new_id=ids[a:b], source_file=[os.path.basename(path)] * (b - a),
                            source_index=np.arange(a, b))
                yield {s: arrays[s][a:b] for s in specs}, meta
            self.n += n

    def attrs(self, args) -> Dict[str, object]:
        return {"source_format": "arrays", "source": os.path.abspath(args.npz)}

    def summary(self) -> List[str]:
        return [f"  files: {len(self.files)}"]


def _layout_text(specs, fields) -> str:
    sig = ", ".join(f"{s} {v.length} at {v.fs:g} Hz {v.dtype}" for s, v in specs.items())
    return f"{sig}; fields {', '.join(f'{k} {v}' for k, v in fields.items())}"


# ----------------------------------------------------------------------------- CLI
def _common(p: ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="cohort HDF5 to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="format", required=True, parser_class=ArgumentParser,
                           metavar="{wfdb,pulsedb,arrays}")
    w = sub.add_parser("wfdb", help="a folder of PhysioNet WFDB records")
    w.add_argument("--records", required=True,
                   help="folder of records (its RECORDS file, else every .hea below it)")
    for flag, default, what in (("--ecg", ["II"], "ECG"), ("--ppg", ["PLETH"], "PPG"),
                                ("--abp", ["ABP", "ART"], "arterial pressure (BP per window)")):
        w.add_argument(flag, nargs="+", default=default,
                       help=f"channel name(s) of the {what}, the first a record has; none: "
                            f"leave it out")
    w.add_argument("--window_s", type=float, default=10.0, help="window length, seconds")
    w.add_argument("--step_s", type=float, default=10.0,
                   help="seconds between window starts (less than --window_s: overlap)")
    w.add_argument("--cuff_csv", default=None,
                   help="BP from cuff readings instead of the arterial channel: record, "
                        "optional time_s (seconds into the record), value columns (sbp, dbp..)")
    w.add_argument("--cuff_max_gap_s", type=float, default=60.0,
                   help="with time_s: a window takes the reading nearest its centre within this")
    w.add_argument("--subject_map", default=None,
                   help="CSV record,subject (default: one subject per record)")
    w.add_argument("--sbp_range", type=float, nargs=2, default=[50.0, 250.0],
                   metavar=("LOW", "HIGH"), help="plausible window SBP, mmHg")
    w.add_argument("--dbp_range", type=float, nargs=2, default=[20.0, 150.0],
                   metavar=("LOW", "HIGH"), help="plausible window DBP, mmHg")
    w.add_argument("--min_pp", type=float, default=10.0, help="smallest plausible SBP - DBP")
    _common(w)
    d = sub.add_parser("pulsedb", help="a PulseDB subset file (MATLAB v7.3)")
    d.add_argument("--subset", required=True, help="e.g. CalFree_Test_Subset.mat")
    d.add_argument("--chunk", type=int, default=4096, help="segments read at once")
    d.add_argument("--fs", type=float, default=PULSEDB_FS, help="sampling rate of the segments")
    d.add_argument("--describe", action="store_true",
                   help="print the file's groups, shapes, types and MATLAB classes, and stop")
    d.add_argument("--out", default=None, help="cohort HDF5 to write")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = sub.add_parser("arrays", help="an .npz or a folder of them")
    a.add_argument("--npz", required=True, help="an .npz file or a folder of .npz files")
    _common(a)
    return p


def check_out(args) -> None:
    if not args.out:
        raise UserError("--out is required (except with --describe)")
    check_output_file("--out", args.out, args.overwrite)
    if getattr(args, "chunk", 1) < 1:
        raise UserError(f"--chunk must be >= 1, got {args.chunk}")


def next_command(out: str, specs: Dict[str, SignalSpec], fields: Dict[str, str]) -> str:
    """The prep command for the file just written (no --target_cols without BP fields:
    a labels CSV without targets)."""
    targets = [t for t in ("sbp", "dbp") if t in fields]
    length = next(iter(specs.values())).length
    flags = ([f"--target_cols {' '.join(targets)}"] if targets else []) \
        + [f"--target_seq_len {length}", "--output_npz DIR", "--output_csv labels.csv"] \
        + [f"--{s}_key none" for s in SIGNALS if s not in specs]
    return f"next: python prepare_kailuan_npz.py --h5_path {out} --subject_key subject " \
        + " ".join(flags)


SOURCES = {"wfdb": WfdbSource, "pulsedb": PulseDBSource, "arrays": ArraysSource}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    if getattr(args, "describe", False):
        print(describe(args.subset))
        return
    check_out(args)
    source = SOURCES[args.format](args)
    specs, fields = source.specs(), source.fields()
    n = write_cohort(args.out, specs, fields, source.attrs(args), source.blocks())
    print(f"wrote {args.out}: {n} rows of {next(iter(specs.values())).length} samples "
          f"({', '.join(f'{s} at {v.fs:g} Hz' for s, v in specs.items())})")
    print("\n".join(source.summary()))
    print(next_command(args.out, specs, fields))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
