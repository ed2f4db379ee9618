"""Records/s that train_bp.py's training DataLoader delivers, from npz files and from the
--cache_dir memory-mapped array, beside a bare np.load loop over the same files.

    python benchmarks/bench_loader.py                              # 1,200 synthetic records
    python benchmarks/bench_loader.py --npz_dir DIR --labels_csv F --target_cols ...

The loaders are built by ``train_bp.make_loader`` from ``train_bp``'s own argument parser,
so they are exactly what training iterates over (shuffled sampler, batches of
``--batch_size``, per-record z-scoring, ``--num_workers`` processes for npz files; batched
reads in the training process for the cache). The baseline, measured in the same run, is a
bare ``np.load(path)["x"]`` loop over the same files: the decompression that an npz
loader cannot avoid. Each loader is timed over ``--passes`` epochs after one untimed epoch
(which starts the workers and, for the cache, builds it), with the files in the page cache.
Aim: the cache at least 10 times the npz rate.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import make_synthetic_cohort  # noqa: E402
import prepare_kailuan_npz as prep  # noqa: E402
import train_bp  # noqa: E402
import utils  # noqa: E402
from utils import ArgumentParser, DistInfo, run_cli  # noqa: E402

TARGETS = ["right_arm_sbp", "right_arm_dbp"]
CACHE = "--cache_dir (read in the training process)"


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz_dir", default=None, help="prepared records (default: make a cohort)")
    p.add_argument("--labels_csv", default=None, help="with --npz_dir: its labels CSV")
    p.add_argument("--target_cols", nargs="+", default=TARGETS, help="label columns of the cohort")
    p.add_argument("--n_records", type=int, default=1200, help="size of the synthetic cohort")
    p.add_argument("--seq_len", type=int, default=7500, help="samples per record")
    p.add_argument("--batch_size", type=int, default=64, help="records per batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="--num_workers values to time the npz loader with")
    p.add_argument("--passes", type=int, default=3, help="timed epochs per loader")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    return p


def synthetic_cohort(args, scratch: str) -> None:
    """A prepared synthetic cohort of ``--n_records`` records in ``scratch``."""
    h5 = os.path.join(scratch, "cohort.h5")
    make_synthetic_cohort.make_cohort(h5, n_subjects=-(-args.n_records // 4),
                                      records_per_subject=4, seed=0)
    args.npz_dir, args.labels_csv = os.path.join(scratch, "npz"), os.path.join(scratch, "labels.csv")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prep.main(["--h5_path", h5, "--target_cols", *args.target_cols,
                   "--output_npz", args.npz_dir, "--output_csv", args.labels_csv,
                   "--target_seq_len", str(args.seq_len), "--workers", "2",
                   "--record_seconds", "15"])  # make_cohort's default duration_s


def train_args(args, num_workers: int, cache_dir: Optional[str]):
    argv = ["--npz_dir", args.npz_dir, "--labels_csv", args.labels_csv, "--out_dir", "unused",
            "--target_cols", *args.target_cols, "--batch_size", str(args.batch_size),
            "--num_workers", str(num_workers)]
    return train_bp.parse_args(argv + (["--cache_dir", cache_dir] if cache_dir else []))


def loader_rate(args, table: pd.DataFrame, stats: dict, num_workers: int,
                cache_dir: Optional[str]) -> float:
    """Records/s of the training loader over ``--passes`` epochs after one warm-up epoch."""
    targs = train_args(args, num_workers, cache_dir)
    cache = None
    if cache_dir:
        paths = [dataset.npz_path(args.npz_dir, s) for s in table["ssoid"]]
        cache = dataset.open_cache(cache_dir, paths, args.seq_len)
    loader = train_bp.make_loader(targs, table, np.arange(len(table)), stats, cache,
                                  torch.device("cpu"), DistInfo(), train=True)
    seen, seconds = 0, 0.0
    for epoch in range(args.passes + 1):
        loader.sampler.set_epoch(epoch)
        tic = time.perf_counter()
        n = sum(len(batch[0]) for batch in loader)
        if epoch:  # the first pass starts the workers
            seen, seconds = seen + n, seconds + time.perf_counter() - tic
    return seen / seconds


def bare_rate(paths: Sequence[str], passes: int) -> float:
    tic = time.perf_counter()
    for _ in range(passes):
        for path in paths:
            dataset.load_x(path)
    return passes * len(paths) / (time.perf_counter() - tic)


def measure(args, scratch: str) -> Dict[str, float]:
    """Records/s of the bare loop and of each loader (a synthetic cohort is made in
    ``scratch`` unless ``args.npz_dir`` is given)."""
    if args.npz_dir is None:
        synthetic_cohort(args, scratch)
    table = pd.read_csv(args.labels_csv, dtype={"ssoid": str})
    table = table[table[args.target_cols].notna().all(axis=1)].reset_index(drop=True)
    stats = {**train_bp.target_stats(table, args.target_cols, 0.0), "covariates": [],
             "conditioning": None, "sample_rate_hz": utils.npz_sample_rate(args.npz_dir)}
    paths = [dataset.npz_path(args.npz_dir, s) for s in table["ssoid"]]
    bare_rate(paths, 1)  # the files into the page cache, as for every loader below
    rates = {"bare np.load loop": bare_rate(paths, args.passes)}
    for workers in args.workers:
        rates[f"npz files, --num_workers {workers}"] = loader_rate(args, table, stats, workers,
                                                                   None)
    rates[CACHE] = loader_rate(args, table, stats, 0, os.path.join(scratch, "cache"))
    return rates


def report(rates: Dict[str, float], n: int, args) -> List[str]:
    bare = rates["bare np.load loop"]
    best_npz = max(v for k, v in rates.items() if k.startswith("npz files"))
    lines = [f"{n} records of {args.seq_len} x 2, batch {args.batch_size}, {args.passes} timed "
             f"epochs, {os.cpu_count()} CPUs, torch {torch.__version__}",
             f"{'loader':46s} {'records/s':>10s} {'/ bare':>7s} {'/ best npz':>11s}"]
    lines += [f"{name:46s} {rate:10.0f} {rate / bare:7.2f} {rate / best_npz:11.2f}"
              for name, rate in rates.items()]
    cache = rates[CACHE]
    lines.append(f"cache / best npz loader: {cache / best_npz:.1f}x (aim: at least 10x)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        rates = measure(args, scratch)
        n = len(pd.read_csv(args.labels_csv, usecols=["ssoid"]))
    print("\n".join(report(rates, n, args)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
