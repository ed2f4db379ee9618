"""Records for training and prediction: the labels table, the checked npz files, and
the ``BPDataset`` that feeds the model.

Each ``<npz_dir>/<ssoid>.npz`` holds ``x`` (L, 2) float32, column 0 ECG, column 1 PPG
(written by ``prepare_kailuan_npz.py``). Every listed file is opened and checked once
at start (``check_records``), so a broken file is reported in ``skipped_records.csv``
instead of ending a run in epoch 30.

The fast path: ``--cache_dir`` packs the checked records, already in model-input form
(``model_input``: (2, L) float32, z-scored unless ``--no_zscore``), into one
memory-mapped array that later epochs and runs read directly. ``CachedBPDataset`` reads
a whole batch with one sorted fancy index (``__getitems__``): a copy from the page
cache, with no decompression and no per-record Python work, so it runs in the training
process itself (worker processes would only add inter-process copies).

Covariates (``--covariates``): columns of the labels CSV (or the cohort's metadata) that
the head reads beside the signals. ``fit_covariates`` learns an encoding from the train
split only and ``encode_covariates`` applies it (see ``fit_covariates`` for the rules);
the encoding is plain data stored in the checkpoint, so prediction encodes alike.

Samplers for distributed runs: training uses ``torch``'s ``DistributedSampler``
(reshuffled per epoch); evaluation uses ``ShardSampler``, which gives every record to
exactly one rank, with no padding duplicates.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections import Counter
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

import physio
from utils import NPZ_CHANNELS, NPZ_MANIFEST, UserError, atomic_path, progress, write_json_atomic

SKIPPED_COLUMNS = ["ssoid", "path", "reason"]


# ----------------------------------------------------------------------------- labels
def read_labels(path: str, required: Sequence[str], text: Sequence[str] = ()) -> pd.DataFrame:
    """The labels CSV with ``ssoid``, ``subject_id`` and the ``text`` columns as text (an id
    such as ``007`` or a float-looking hash stays as written); ``UserError`` if unreadable,
    without rows, or a ``required`` column is missing, not numeric or holds an infinity (an
    empty cell is a missing value; ``inf`` is a broken export)."""
    if not os.path.isfile(path):
        raise UserError(f"labels CSV {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype={"ssoid": str, "subject_id": str,
                                         **dict.fromkeys(text, str)})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"labels CSV {path} is not a readable CSV "
                        f"({type(exc).__name__}: {exc})") from None
    missing = [c for c in ["ssoid", *required] if c not in frame.columns]
    if missing:
        raise UserError(f"labels CSV {path} has no column {', '.join(missing)} "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise UserError(f"labels CSV {path} has no rows (only the header "
                        f"{', '.join(map(str, frame.columns))})")
    for col in required:
        if not pd.api.types.is_numeric_dtype(frame[col]):
            raise UserError(f"labels CSV {path}: column {col} is not numeric")
        infinite = np.isinf(frame[col].to_numpy(np.float64))
        if infinite.any():
            raise UserError(f"labels CSV {path}: column {col} has {int(infinite.sum())} "
                            f"infinite values (ssoid {', '.join(_first_ids(frame, infinite))}); "
                            f"leave a missing value empty")
    if frame["ssoid"].isna().any():
        raise UserError(f"labels CSV {path}: {int(frame['ssoid'].isna().sum())} rows have "
                        f"an empty ssoid")
    return frame


def _first_ids(frame: pd.DataFrame, mask: np.ndarray, n: int = 5) -> List[str]:
    """The ssoids of the first ``n`` rows under ``mask``, and "..." when there are more."""
    ids = frame.loc[mask, "ssoid"].astype(str).tolist()
    return ids[:n] + (["..."] if len(ids) > n else [])


def usable_rows(labels: pd.DataFrame, npz_dir: str,
                target_cols: Sequence[str]) -> Tuple[pd.DataFrame, Dict[str, int]]:
    """Rows whose npz exists and whose targets are all present, and the drop counts."""
    if not os.path.isdir(npz_dir):
        raise UserError(f"--npz_dir {npz_dir}: no such directory")
    on_disk = {f[:-4] for f in os.listdir(npz_dir) if f.endswith(".npz")}
    dropped: Dict[str, int] = {}
    duplicated = labels["ssoid"].duplicated(keep="first")
    dropped["duplicate ssoid in labels CSV"] = int(duplicated.sum())
    rows = labels[~duplicated]
    has_npz = rows["ssoid"].isin(on_disk)
    dropped["no npz file"] = int((~has_npz).sum())
    rows = rows[has_npz]
    complete = rows[list(target_cols)].notna().all(axis=1)
    dropped["missing target value"] = int((~complete).sum())
    rows = rows[complete].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"no usable rows: none of the {len(labels)} ssoids of the labels CSV "
                        f"has both an npz file in {npz_dir} and all of "
                        f"{', '.join(target_cols)}")
    return rows, {k: v for k, v in dropped.items() if v}


# ----------------------------------------------------------------------------- covariates
MAX_LEVELS = 10  # more distinct text values than this is an identifier, not a category


def _level(value) -> Optional[str]:
    """A categorical value as text (``None`` when missing): numbers without a trailing
    ``.0``, text stripped and lower-cased, so ``1``/``1.0`` and ``M``/``m `` agree."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, float, np.integer, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip().lower()
    return text or None


def _sorted_levels(levels) -> List[str]:
    """Numbers in numeric order, else text in alphabetical order."""
    try:
        return sorted(levels, key=float)
    except ValueError:
        return sorted(levels)


def fit_covariates(train: pd.DataFrame, columns: Sequence[str], source: str) -> List[dict]:
    """One encoding spec per column, from the train-split rows ``train`` alone.

    - numeric with more than two distinct values: standardised with the train mean and SD;
      a missing value becomes the train median;
    - two-valued (numbers such as 0/1 or 1/2, text such as M/F or male/female, any case) or
      text with at most ``MAX_LEVELS`` values: one 0/1 input per level but the first (levels
      sorted, so ``sex=m`` for M/F); a missing value becomes the most frequent train level;
    - a ``<col>_missing`` 0/1 input when the train split has a missing value in the column
      (an input that never varies in training would keep its random weight);
    - a level never seen in training is treated as missing.
    ``UserError`` (naming ``source`` and the column) for a column with no train values, a
    constant one, or text with too many values (an identifier such as ``name``).
    """
    specs = []
    for col in columns:
        values = train[col]
        text = values.map(_level)
        present = text.notna()
        where = f"{source}: covariate {col}"
        if not present.any():
            raise UserError(f"{where} has no value in the train split")
        numeric = (pd.api.types.is_numeric_dtype(values)
                   and not pd.api.types.is_bool_dtype(values))
        levels = _sorted_levels(set(text[present]))
        if len(levels) < 2:
            raise UserError(f"{where} is constant in the train split ({levels[0]}): it cannot "
                            f"inform the model")
        missing = bool((~present).any())
        if numeric and len(levels) > 2:
            observed = values[present].to_numpy(np.float64)
            specs.append({"name": col, "kind": "numeric", "mean": float(observed.mean()),
                          "std": float(observed.std()), "fill": float(np.median(observed)),
                          "missing_indicator": missing})
            continue
        if len(levels) > MAX_LEVELS:
            raise UserError(f"{where} has {len(levels)} distinct text values in the train "
                            f"split; a covariate must be numeric or have at most {MAX_LEVELS} "
                            f"categories (an identifier such as a name is not usable)")
        counts = text[present].value_counts()
        fill = min(counts.index[counts == counts.max()], key=levels.index)
        specs.append({"name": col, "kind": "categorical", "levels": levels, "fill": fill,
                      "missing_indicator": missing})
    return specs


def covariate_names(specs: Sequence[dict]) -> List[str]:
    """The model's covariate inputs, in order (``age``, ``sex=1``, ``age_missing``, ...)."""
    names = []
    for spec in specs:
        if spec["kind"] == "numeric":
            names.append(spec["name"])
        else:
            names += [f"{spec['name']}={level}" for level in spec["levels"][1:]]
        if spec["missing_indicator"]:
            names.append(f"{spec['name']}_missing")
    return names


def encode_covariates(frame: pd.DataFrame, specs: Sequence[dict]) -> Tuple[np.ndarray, Dict[str, int]]:
    """(N, len(covariate_names(specs))) float32 inputs of the rows of ``frame``, and per
    column the number of values that were missing or of a level unseen in training."""
    blocks, filled = [], {}
    for spec in specs:
        values = frame[spec["name"]]
        text = [_level(v) for v in values]
        if spec["kind"] == "numeric":
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
            absent = np.isnan(numbers) | np.array([t is None for t in text])
            numbers = np.where(absent, spec["fill"], numbers)
            block = ((numbers - spec["mean"]) / spec["std"])[:, None]
        else:
            absent = np.array([t not in spec["levels"] for t in text])
            chosen = [spec["fill"] if a else t for t, a in zip(text, absent)]
            block = np.array([[c == level for level in spec["levels"][1:]] for c in chosen],
                             dtype=np.float64).reshape(len(frame), -1)
        if spec["missing_indicator"]:
            block = np.concatenate([block, absent[:, None].astype(np.float64)], axis=1)
        blocks.append(block)
        filled[spec["name"]] = int(absent.sum())
    out = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
    return out.astype(np.float32), filled


def describe_covariates(specs: Sequence[dict]) -> str:
    """One line per column: how it is encoded (printed at the start of training)."""
    lines = []
    for spec in specs:
        if spec["kind"] == "numeric":
            how = (f"numeric, train mean {spec['mean']:.4g} SD {spec['std']:.4g}, "
                   f"missing -> median {spec['fill']:.4g}")
        else:
            how = (f"categorical {'/'.join(spec['levels'])} (reference {spec['levels'][0]}), "
                   f"missing -> {spec['fill']}")
        indicator = ", with a missing-indicator input" if spec["missing_indicator"] else ""
        lines.append(f"  {spec['name']}: {how}{indicator}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- npz checks
def npz_path(npz_dir: str, ssoid: str) -> str:
    return os.path.join(npz_dir, f"{ssoid}.npz")


def load_x(path: str) -> np.ndarray:
    """The ``x`` array of one npz record."""
    with np.load(path, allow_pickle=False) as data:
        return data["x"]


ZIP_MAGIC, NPY_MAGIC = b"PK", b"\x93NUMPY"


def _read_x(path: str) -> Tuple[Optional[np.ndarray], str]:
    """(x, "") of one npz record, or (None, what is missing or wrong with the file)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
        if not magic.startswith(ZIP_MAGIC):
            return None, ("empty file" if not magic else "a bare .npy array, not an npz file"
                          if magic == NPY_MAGIC else "not an npz/zip file")
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                return None, f"no array 'x' (holds: {', '.join(data.files) or 'nothing'})"
            return data["x"], ""
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        return None, f"damaged npz/zip file ({type(exc).__name__}: {exc})"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    except ValueError as exc:
        # with pickles refused, np.load's ValueError for a zip member is an object array
        # ("Object arrays cannot be loaded ..." or "... contains pickled (object) data")
        if "object" in str(exc).lower():
            return None, "array 'x' is a pickled object array (refused)"
        return None, f"array 'x' is unreadable ({exc})"


def _inspect(path: str, columns: Sequence[int] = (0, 1)) -> Tuple[Optional[int], str]:
    """(length, "") for a good record, (None, reason) for a bad one; only ``columns`` (the
    signals the model reads) must be finite. A column with no finite value at all is a
    missing signal (prep leaves a signal the cohort lacks all NaN), and its reason says so:
    ``check_records`` looks for that reason."""
    x, reason = _read_x(path)
    if x is None:
        return None, reason
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 2:
        return None, f"shape {tuple(x.shape)} is not (L, 2)"
    for c in columns:
        finite = np.isfinite(x[:, c])
        if not finite.any():
            return None, _missing_reason(c)
        if not finite.all():
            return None, (f"non-finite values in the {NPZ_CHANNELS[c].upper()} column "
                          f"({int((~finite).sum())} of {len(finite)} samples)")
    return int(x.shape[0]), ""


def _missing_reason(column: int) -> str:
    name = NPZ_CHANNELS[column].upper()
    return f"the {name} column is all NaN (no {name} signal)"


def _refuse_a_missing_signal(npz_dir: str, columns: Sequence[int],
                             reasons: Sequence[str]) -> None:
    """``UserError`` when a checked column is missing (all NaN) in every file: the folder
    lacks that signal, which is a choice of modality, not a set of bad files."""
    for c in columns:
        if reasons and all(r == _missing_reason(c) for r in reasons):
            name, other = NPZ_CHANNELS[c], NPZ_CHANNELS[1 - c]
            raise UserError(f"--npz_dir {npz_dir}: the {name.upper()} column is all NaN in "
                            f"every file (a {other.upper()}-only folder copied without its "
                            f"manifest {NPZ_MANIFEST}?): use --modality {other}")


def check_records(ids: Sequence[str], npz_dir: str,
                  channels: Sequence[str] = NPZ_CHANNELS) -> Tuple[List[str], int, pd.DataFrame]:
    """Open every record once: (good ids, their common length L, skipped table).

    Records whose length differs from the most common one are skipped as well,
    since a batch needs one length. ``channels``: the signals that must be finite (those
    the model reads); the other column is not checked (prep leaves a signal the cohort lacks
    all NaN). A signal missing from every file is a ``UserError`` that names the modality to
    use. One thread: ``np.load`` parses each header with ``ast``, which
    CPython 3.11 can fail on when threads parse at once ("AST constructor recursion depth
    mismatch"), and one thread reads about 4,000 records/s.
    """
    paths = [npz_path(npz_dir, s) for s in ids]
    columns = [NPZ_CHANNELS.index(c) for c in channels]
    results = [_inspect(p, columns) for p in progress(paths, desc="checking npz", unit="rec",
                                                      leave=False)]
    _refuse_a_missing_signal(npz_dir, columns, [reason for _, reason in results])
    lengths = Counter(n for n, _ in results if n is not None)
    length = lengths.most_common(1)[0][0] if lengths else 0
    good, skipped = [], []
    for ssoid, path, (n, reason) in zip(ids, paths, results):
        if n is not None and n != length:
            reason = f"length {n} differs from the common length {length}"
        if reason:
            skipped.append((ssoid, path, reason))
        else:
            good.append(ssoid)
    return good, length, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


# ----------------------------------------------------------------------------- model input
def zscore(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Z-score each channel (row) of a (C, L) float32 record; a flat channel becomes zeros.

    Mean and SD are summed in float64 along the contiguous rows (a float32 sum drifts),
    then applied in float32: within 1e-6 of a float64 z-score, at float32 speed.
    """
    mean = x.mean(axis=1, keepdims=True, dtype=np.float64)
    std = x.std(axis=1, keepdims=True, dtype=np.float64)
    scale = (1.0 / np.maximum(std, eps)).astype(np.float32)
    return (x - mean.astype(np.float32)) * scale


FILTERS = ("none", "ecgfounder")


def model_input(x: np.ndarray, channels: Sequence[int], normalize: bool,
                conditioning: Optional[Mapping] = None) -> np.ndarray:
    """One (L, 2) record as the model reads it: (C, L) float32 of the chosen channels,
    band-passed as ``conditioning`` says (``filter``, ``fs``, ``mains_hz``; None or filter
    ``none``: not at all), then each z-scored unless ``normalize`` is off.

    ``ecgfounder`` conditioning is ECGFounder's pre-training preprocessing for the ECG
    (0.67-40 Hz and a mains notch) and a 0.5-8 Hz band for the PPG (``physio.condition``).
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32)[:, list(channels)].T)
    if conditioning and conditioning["filter"] != "none":
        x = np.stack([physio.condition(row, conditioning["fs"], ("ecg", "ppg")[c],
                                       conditioning["mains_hz"])
                      for row, c in zip(x, channels)]).astype(np.float32)
    return zscore(x) if normalize else x


# ----------------------------------------------------------------------------- augmentation
AUGMENTATIONS = ("shift", "gain", "noise", "wander")
MAX_SHIFT = 0.1        # share of the record a shift may drop from its start
GAIN = (0.8, 1.25)     # per-channel amplitude factor, log-uniform
NOISE_SD = 0.05        # white noise, times the channel's SD in the record
WANDER_SD = 0.2        # baseline wander: max amplitude, times the channel's SD in the record
WANDER_HZ = (0.05, 0.5)  # its frequency in real time: drift and breathing, below any pulse


class Augmenter:
    """Training-time augmentation of model inputs (C, L), the parts in ``AUGMENTATIONS``,
    each sized relative to the record itself, so that z-scored and raw (``--no_zscore``)
    inputs get the same relative perturbation:

    - ``shift``: drop the first k samples, k uniform in [0, MAX_SHIFT x L], from every
      channel alike and repeat each channel's last value over the k freed samples (no step;
      a mirrored tail would invent beats whose PPG precedes their ECG): the ECG-to-PPG
      delay, which carries BP, is untouched;
    - ``gain``: scale each channel about its mean by its own log-uniform factor in GAIN;
    - ``wander``: add to each channel a sine of WANDER_HZ Hz (uniform; ``fs``, the
      records' sampling rate, gives the time base) with a random phase and an amplitude of
      up to WANDER_SD x the channel's SD: baseline drift and breathing. 0.5 Hz is 30 per
      minute, below a plausible pulse, which the model must read and wander must not
      imitate. With ``fs`` unknown (None) the part is left out, with a note: a frequency
      per record (the former 0.5-3 cycles) would put a 2.1 s record's "wander" at 40-100 bpm;
    - ``noise``: add white noise of SD NOISE_SD x the channel's SD.

    A channel's SD is that of the record as given (1 after z-scoring; a flat channel gets
    no noise or wander). The draws of a record are a function of (seed, epoch, index)
    alone, so a killed and resumed run, or another number of loader workers, augments
    identically.
    """

    def __init__(self, parts: Sequence[str], seed: int, fs: Optional[float] = None):
        unknown = set(parts) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}")
        if fs is not None and not fs > 0:
            raise ValueError(f"fs must be > 0, got {fs}")
        self.parts, self.seed, self.fs = set(parts), seed, fs
        if "wander" in self.parts and fs is None:
            self.parts.discard("wander")
            print("augment: wander left out: the records' sampling rate is unknown (prep's "
                  "--record_seconds or --fs_ecg/--fs_ppg records it), so a drift slower "
                  "than the pulse cannot be told in Hz")

    def __call__(self, x: np.ndarray, index: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, index])
        c, n = x.shape
        mean = x.mean(axis=1, keepdims=True, dtype=np.float64)
        sd = x.std(axis=1, keepdims=True, dtype=np.float64)
        if "shift" in self.parts:
            k = int(rng.integers(0, int(MAX_SHIFT * n) + 1))
            x = np.pad(x[:, k:], ((0, 0), (0, k)), mode="edge")
        if "gain" in self.parts:
            gain = np.exp(rng.uniform(np.log(GAIN[0]), np.log(GAIN[1]), (c, 1)))
            x = mean + gain * (x - mean)  # about the mean: a raw record's offset is no amplitude
        if "wander" in self.parts:
            cycles = rng.uniform(*WANDER_HZ, (c, 1)) * np.arange(n) / self.fs
            x = x + sd * rng.uniform(0, WANDER_SD, (c, 1)) * np.sin(
                2 * np.pi * (cycles + rng.uniform(0, 1, (c, 1))))
        if "noise" in self.parts:
            x = x + sd * rng.normal(0.0, NOISE_SD, x.shape)
        return np.ascontiguousarray(x, dtype=np.float32)


class EpochSampler(Sampler):
    """A training sampler's indices tagged with the epoch, ``(index, epoch)``, so that the
    dataset (also a copy in a persistent worker) knows the epoch of each draw."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return ((i, self.epoch) for i in self.sampler)


def _key(key) -> Tuple[int, Optional[int]]:
    """A sampler key as (index, epoch); a plain index (evaluation) has no epoch."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


# ----------------------------------------------------------------------------- cache
# (N, 2, L) float32 of model_input(x, (0, 1), ...); v3: the filters pad by mirror images
CACHE_FORMAT = "model-input-v3"


def _cache_key(paths: Sequence[str], normalize: bool, conditioning: Optional[Mapping]) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|zscore={normalize}|"
                            f"{sorted((conditioning or {}).items())}\n".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def open_cache(cache_dir: str, paths: Sequence[str], length: int,
               normalize: bool = True, conditioning: Optional[Mapping] = None) -> np.memmap:
    """A read-only (N, 2, L) float32 memmap of ``model_input`` of ``paths``, in order,
    built on first use.

    The file name carries a hash of the format, ``normalize``, ``conditioning``, the paths,
    sizes and modification times, so a changed record set gets a new cache instead of stale
    data.
    """
    os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(paths, normalize, conditioning)
    data_path = os.path.join(cache_dir, f"records_{key}.npy")
    meta_path = os.path.join(cache_dir, f"records_{key}.json")
    shape = (len(paths), 2, length)
    if not (os.path.isfile(data_path) and os.path.isfile(meta_path)):
        with atomic_path(data_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for i, p in enumerate(progress(paths, desc="building cache", unit="rec",
                                           leave=False)):
                out[i] = model_input(load_x(p), (0, 1), normalize, conditioning)
            out.flush()
            del out
        write_json_atomic(meta_path, {"format": CACHE_FORMAT, "zscore": normalize,
                                      "conditioning": conditioning,
                                      "n": len(paths), "length": length,
                                      "paths": [os.path.abspath(p) for p in paths]})
    cache = np.load(data_path, mmap_mode="r")
    if cache.shape != shape:
        raise UserError(f"--cache_dir {cache_dir}: {data_path} has shape {cache.shape}, "
                        f"expected {shape}; delete it to rebuild")
    return cache


# ----------------------------------------------------------------------------- datasets
def _no_covariates(n: int) -> np.ndarray:
    return np.zeros((n, 0), dtype=np.float32)


class BPDataset(Dataset):
    """(x (C, L) float32, covariates (K,) float32, y (T,) float32 normalised targets, ssoid)
    per record, read from ``<npz_dir>/<ssoid>.npz``.

    ``channels`` picks the npz columns the model reads (0 = ECG, 1 = PPG), in order; with
    none (a covariates-only model) no file is read and x is an empty (0, 0) placeholder.
    ``covariates`` (N, K) are the encoded inputs (``encode_covariates``); none gives K = 0.
    """

    def __init__(self, ids: Sequence[str], npz_dir: str, targets: np.ndarray,
                 channels: Sequence[int], normalize: bool = True,
                 covariates: Optional[np.ndarray] = None,
                 conditioning: Optional[Mapping] = None,
                 augmenter: Optional[Augmenter] = None):
        covariates = _no_covariates(len(ids)) if covariates is None else covariates
        if not len(targets) == len(ids) == len(covariates):
            raise ValueError("ids, targets and covariates must have the same length")
        self.ids = [str(s) for s in ids]
        self.npz_dir = npz_dir
        self.targets = np.asarray(targets, dtype=np.float32)
        self.covariates = np.asarray(covariates, dtype=np.float32)
        self.channels = list(channels)
        self.normalize = normalize
        self.conditioning = conditioning
        self.augmenter = augmenter

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        index, epoch = _key(key)
        if self.channels:
            x = load_x(npz_path(self.npz_dir, self.ids[index]))
            x = model_input(x, self.channels, self.normalize, self.conditioning)
            if self.augmenter is not None and epoch is not None:
                x = self.augmenter(x, index, epoch)
            x = torch.from_numpy(x)
        else:
            x = torch.zeros((0, 0))
        return (x, torch.from_numpy(self.covariates[index]),
                torch.from_numpy(self.targets[index]), self.ids[index])


class CachedBPDataset(Dataset):
    """``BPDataset``'s samples read from rows ``rows`` of an ``open_cache`` array.

    ``__getitems__`` returns a whole batch ``(x (B, C, L), covariates (B, K), y (B, T),
    ids)``; a DataLoader over it needs ``collate_fn=CachedBPDataset.collate`` (which passes
    the batch through).
    """

    def __init__(self, ids: Sequence[str], cache: np.ndarray, rows: np.ndarray,
                 targets: np.ndarray, channels: Sequence[int],
                 covariates: Optional[np.ndarray] = None,
                 augmenter: Optional[Augmenter] = None):
        covariates = _no_covariates(len(ids)) if covariates is None else covariates
        if not len(ids) == len(rows) == len(targets) == len(covariates):
            raise ValueError("ids, rows, targets and covariates must have the same length")
        self.ids = [str(s) for s in ids]
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        self.covariates = torch.from_numpy(np.asarray(covariates, dtype=np.float32))
        self.channels = list(channels)
        self.augmenter = augmenter

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        return tuple(part[0] for part in self.__getitems__([key]))

    def __getitems__(self, keys: Sequence):
        keys = [_key(k) for k in keys]
        indices = np.array([i for i, _ in keys], dtype=np.int64)
        # one advanced index picks rows and channels in a single copy (B, C, L)
        x = self.cache[self.rows[indices][:, None], self.channels]
        if self.augmenter is not None and keys and keys[0][1] is not None:
            x = np.stack([self.augmenter(r, i, e) for r, (i, e) in zip(x, keys)])
        return (torch.from_numpy(x), self.covariates[indices], self.targets[indices],
                [self.ids[i] for i in indices])

    @staticmethod
    def collate(batch):
        return batch


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` of ``range(n)``: each record on exactly
    one rank, none repeated (unlike ``DistributedSampler``, which pads)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
