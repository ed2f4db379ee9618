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

Samplers for distributed runs: training uses ``torch``'s ``DistributedSampler``
(reshuffled per epoch); evaluation uses ``ShardSampler``, which gives every record to
exactly one rank, with no padding duplicates.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from utils import UserError, atomic_path, progress, write_json_atomic

SKIPPED_COLUMNS = ["ssoid", "path", "reason"]


# ----------------------------------------------------------------------------- labels
def read_labels(path: str, required: Sequence[str]) -> pd.DataFrame:
    """The labels CSV with ``ssoid`` as text; ``UserError`` if unreadable or a column is missing."""
    if not os.path.isfile(path):
        raise UserError(f"labels CSV {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype={"ssoid": str, "subject_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"labels CSV {path} is not a readable CSV "
                        f"({type(exc).__name__}: {exc})") from None
    missing = [c for c in ["ssoid", *required] if c not in frame.columns]
    if missing:
        raise UserError(f"labels CSV {path} has no column {', '.join(missing)} "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    for col in required:
        if not pd.api.types.is_numeric_dtype(frame[col]):
            raise UserError(f"labels CSV {path}: column {col} is not numeric")
    if frame["ssoid"].isna().any():
        raise UserError(f"labels CSV {path}: {int(frame['ssoid'].isna().sum())} rows have "
                        f"an empty ssoid")
    return frame


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


# ----------------------------------------------------------------------------- npz checks
def npz_path(npz_dir: str, ssoid: str) -> str:
    return os.path.join(npz_dir, f"{ssoid}.npz")


def load_x(path: str) -> np.ndarray:
    """The ``x`` array of one npz record."""
    with np.load(path, allow_pickle=False) as data:
        return data["x"]


def _inspect(path: str) -> Tuple[Optional[int], str]:
    """(length, "") for a good record, (None, reason) for a bad one."""
    try:
        x = load_x(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 2:
        return None, f"shape {tuple(x.shape)} is not (L, 2)"
    if not np.isfinite(x).all():
        return None, "non-finite values"
    return int(x.shape[0]), ""


def check_records(ids: Sequence[str], npz_dir: str,
                  workers: int = 4) -> Tuple[List[str], int, pd.DataFrame]:
    """Open every record once: (good ids, their common length L, skipped table).

    Records whose length differs from the most common one are skipped as well,
    since a batch needs one length.
    """
    paths = [npz_path(npz_dir, s) for s in ids]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # zlib and file reads release the GIL
        results = list(progress(pool.map(_inspect, paths), total=len(paths),
                                desc="checking npz", unit="rec", leave=False))
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


def model_input(x: np.ndarray, channels: Sequence[int], normalize: bool) -> np.ndarray:
    """One (L, 2) record as the model reads it: (C, L) float32 of the chosen channels,
    each z-scored unless ``normalize`` is off."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32)[:, list(channels)].T)
    return zscore(x) if normalize else x


# ----------------------------------------------------------------------------- cache
CACHE_FORMAT = "model-input-v2"  # (N, 2, L) float32 of model_input(x, (0, 1), normalize)


def _cache_key(paths: Sequence[str], normalize: bool) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|zscore={normalize}\n".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def open_cache(cache_dir: str, paths: Sequence[str], length: int,
               normalize: bool = True) -> np.memmap:
    """A read-only (N, 2, L) float32 memmap of ``model_input`` of ``paths``, in order,
    built on first use.

    The file name carries a hash of the format, ``normalize``, the paths, sizes and
    modification times, so a changed record set gets a new cache instead of stale data.
    """
    os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(paths, normalize)
    data_path = os.path.join(cache_dir, f"records_{key}.npy")
    meta_path = os.path.join(cache_dir, f"records_{key}.json")
    shape = (len(paths), 2, length)
    if not (os.path.isfile(data_path) and os.path.isfile(meta_path)):
        with atomic_path(data_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for i, p in enumerate(progress(paths, desc="building cache", unit="rec",
                                           leave=False)):
                out[i] = model_input(load_x(p), (0, 1), normalize)
            out.flush()
            del out
        write_json_atomic(meta_path, {"format": CACHE_FORMAT, "zscore": normalize,
                                      "n": len(paths), "length": length,
                                      "paths": [os.path.abspath(p) for p in paths]})
    cache = np.load(data_path, mmap_mode="r")
    if cache.shape != shape:
        raise UserError(f"--cache_dir {cache_dir}: {data_path} has shape {cache.shape}, "
                        f"expected {shape}; delete it to rebuild")
    return cache


# ----------------------------------------------------------------------------- datasets
class BPDataset(Dataset):
    """(x (C, L) float32, y (T,) float32 normalised targets, ssoid) per record, read
    from ``<npz_dir>/<ssoid>.npz``.

    ``channels`` picks the npz columns the model reads (0 = ECG, 1 = PPG), in order.
    """

    def __init__(self, ids: Sequence[str], npz_dir: str, targets: np.ndarray,
                 channels: Sequence[int], normalize: bool = True):
        if len(targets) != len(ids):
            raise ValueError("ids and targets must have the same length")
        self.ids = [str(s) for s in ids]
        self.npz_dir = npz_dir
        self.targets = np.asarray(targets, dtype=np.float32)
        self.channels = list(channels)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        x = load_x(npz_path(self.npz_dir, self.ids[index]))
        return (torch.from_numpy(model_input(x, self.channels, self.normalize)),
                torch.from_numpy(self.targets[index]), self.ids[index])


class CachedBPDataset(Dataset):
    """``BPDataset``'s samples read from rows ``rows`` of an ``open_cache`` array.

    ``__getitems__`` returns a whole batch ``(x (B, C, L), y (B, T), ids)``; a DataLoader
    over it needs ``collate_fn=CachedBPDataset.collate`` (which passes the batch through).
    """

    def __init__(self, ids: Sequence[str], cache: np.ndarray, rows: np.ndarray,
                 targets: np.ndarray, channels: Sequence[int]):
        if not len(ids) == len(rows) == len(targets):
            raise ValueError("ids, rows and targets must have the same length")
        self.ids = [str(s) for s in ids]
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        self.channels = list(channels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        x, y, ids = self.__getitems__([index])
        return x[0], y[0], ids[0]

    def __getitems__(self, indices: Sequence[int]):
        indices = np.asarray(indices, dtype=np.int64)
        # one advanced index picks rows and channels in a single copy (B, C, L)
        x = self.cache[self.rows[indices][:, None], self.channels]
        return (torch.from_numpy(x), self.targets[indices],
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
