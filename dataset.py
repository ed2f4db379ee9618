"""Records for training and prediction: the labels table, the checked npz files, and
the ``BPDataset`` that feeds the model.

Each ``<npz_dir>/<ssoid>.npz`` holds ``x`` (L, 2) float32, column 0 ECG, column 1 PPG
(written by ``prepare_kailuan_npz.py``). Every listed file is opened and checked once
at start (``check_records``), so a broken file is reported in ``skipped_records.csv``
instead of ending a run in epoch 30. ``--cache_dir`` packs the checked, decompressed
records into one float32 memory-mapped array that later epochs and runs read directly.
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
from torch.utils.data import Dataset
from tqdm import tqdm

from utils import UserError, atomic_path, write_json_atomic

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
        results = list(tqdm(pool.map(_inspect, paths), total=len(paths),
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


# ----------------------------------------------------------------------------- cache
def _cache_key(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def open_cache(cache_dir: str, paths: Sequence[str], length: int) -> np.memmap:
    """A read-only (N, L, 2) float32 memmap of ``paths`` in order, built on first use.

    The file name carries a hash of the paths, sizes and modification times, so a
    changed record set gets a new cache instead of stale data.
    """
    os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(paths)
    data_path = os.path.join(cache_dir, f"records_{key}.npy")
    meta_path = os.path.join(cache_dir, f"records_{key}.json")
    shape = (len(paths), length, 2)
    if not (os.path.isfile(data_path) and os.path.isfile(meta_path)):
        with atomic_path(data_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for i, p in enumerate(tqdm(paths, desc="building cache", unit="rec", leave=False)):
                out[i] = load_x(p)
            out.flush()
            del out
        write_json_atomic(meta_path, {"n": len(paths), "length": length,
                                      "paths": [os.path.abspath(p) for p in paths]})
    cache = np.load(data_path, mmap_mode="r")
    if cache.shape != shape:
        raise UserError(f"--cache_dir {cache_dir}: {data_path} has shape {cache.shape}, "
                        f"expected {shape}; delete it to rebuild")
    return cache


# ----------------------------------------------------------------------------- dataset
def zscore(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-channel z-scoring of one (L, C) record; a flat channel becomes zeros."""
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True)
    return (x - mean) / np.maximum(std, eps)


def model_input(x: np.ndarray, channels: Sequence[int], normalize: bool) -> np.ndarray:
    """One (L, 2) record as the model reads it: the chosen channels, z-scored, (C, L) float32."""
    x = np.asarray(x, dtype=np.float32)[:, list(channels)]
    if normalize:
        x = zscore(x)
    return np.ascontiguousarray(x.T, dtype=np.float32)


class BPDataset(Dataset):
    """(x (C, L) float32, y (T,) float32 normalised targets, ssoid) per record.

    ``channels`` picks the npz columns the model reads (0 = ECG, 1 = PPG), in order.
    ``cache`` (from ``open_cache``) replaces reading the npz files.
    """

    def __init__(self, ids: Sequence[str], npz_dir: str, targets: np.ndarray,
                 channels: Sequence[int], normalize: bool = True,
                 cache: Optional[np.ndarray] = None):
        if len(targets) != len(ids) or (cache is not None and len(cache) != len(ids)):
            raise ValueError("ids, targets and cache must have the same length")
        self.ids = [str(s) for s in ids]
        self.npz_dir = npz_dir
        self.targets = np.asarray(targets, dtype=np.float32)
        self.channels = list(channels)
        self.normalize = normalize
        self.cache = cache

    def __len__(self) -> int:
        return len(self.ids)

    def signal(self, index: int) -> np.ndarray:
        """The model input of one record as (C, L) float32."""
        if self.cache is not None:
            x = np.asarray(self.cache[index], dtype=np.float32)
        else:
            x = load_x(npz_path(self.npz_dir, self.ids[index])).astype(np.float32)
        return model_input(x, self.channels, self.normalize)

    def __getitem__(self, index: int):
        return (torch.from_numpy(self.signal(index)), torch.from_numpy(self.targets[index]),
                self.ids[index])

