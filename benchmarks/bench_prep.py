"""Speed and memory of prepare_kailuan_npz.py on a synthetic cohort (Linux).

    python benchmarks/bench_prep.py                          # speed table, 600 records
    python benchmarks/bench_prep.py --peak_rss 20000         # peak memory, 20,000 records

Speed: records/s of bare ``np.savez_compressed`` of the very ``x`` arrays the script writes
(the unavoidable work per record: compressing 7500 x 2 float32), then of the whole script
(``main``: checks, chunked reading, resampling, compression, atomic writes, CSVs) with 1 and
2 workers, and with 1 worker and ``--features --record_seconds 15`` (physio.py's beat
analysis of every record), each as a ratio to the bare rate measured in the same run. Aims:
1 worker >= 0.7 of bare, 2 workers near twice 1 worker, 1 worker with features >= 0.5 of
bare. Best of ``--repeats`` runs.

Memory: the script runs as a child process on an N-record cohort; printed are the peak RSS of
its largest process (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, read by a small wrapper process)
and the peak of the RSS summed over the script and its workers, sampled every 0.1 s (pages the
forked workers share are counted once per process, so the sum is an upper bound). Aim: under
1 GB, and the same for 2,000 and 20,000 records (memory must not grow with the cohort).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import make_synthetic_cohort  # noqa: E402
import prepare_kailuan_npz as prep  # noqa: E402
from utils import ArgumentParser, run_cli  # noqa: E402

SCRIPT = os.path.abspath(prep.__file__)
PAGE = os.sysconf("SC_PAGE_SIZE")
# A small parent for the measured run: a child's ru_maxrss also counts the memory of the
# process it was forked from, so the benchmark's own (large) process must not be that parent.
WRAPPER = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, status)")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_records", type=int, default=600, help="cohort size for the speed table")
    p.add_argument("--target_seq_len", type=int, default=7500,
                   help="samples per signal after resampling")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each configuration (the best is reported)")
    p.add_argument("--peak_rss", type=int, default=0, metavar="N",
                   help="instead of the speed table, measure memory on an N-record cohort")
    p.add_argument("--workers", type=int, default=2, help="workers for --peak_rss")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    return p


def make(path: str, n_records: int) -> None:
    make_synthetic_cohort.make_cohort(path, n_subjects=-(-n_records // 4), records_per_subject=4,
                                      seed=0)


FEATURES = ("--features", "--record_seconds", "15")  # the synthetic rows span 15 s


def prep_argv(h5: str, out: str, seq: int, workers: int, extra: Sequence[str] = ()) -> List[str]:
    return ["--h5_path", h5, "--target_cols", "right_arm_sbp", "left_arm_dbp",
            "--output_npz", os.path.join(out, "npz"),
            "--output_csv", os.path.join(out, "labels.csv"),
            "--target_seq_len", str(seq), "--workers", str(workers), *extra]


def best_seconds(fn, repeats: int, scratch: str) -> float:
    """Shortest wall time of ``fn(folder)`` over ``repeats`` runs, each into a fresh folder."""
    times = []
    for i in range(repeats):
        folder = os.path.join(scratch, f"run{i}")
        os.makedirs(folder)
        tic = time.perf_counter()
        fn(folder)
        times.append(time.perf_counter() - tic)
        shutil.rmtree(folder)
    return min(times)


def bare_savez(xs: Sequence[np.ndarray], folder: str) -> None:
    for i, x in enumerate(xs):
        np.savez_compressed(os.path.join(folder, f"{i}.npz"), x=x)


def run_prep(h5: str, seq: int, workers: int, folder: str, extra: Sequence[str] = ()) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prep.main(prep_argv(h5, folder, seq, workers, extra))


def speed_table(args, scratch: str) -> None:
    h5 = os.path.join(scratch, "cohort.h5")
    make(h5, args.n_records)
    with h5py.File(h5) as f:
        ecg, ppg = f["signals/ecg"][:], f["signals/ppg"][:]
    xs = [prep.record_to_x(e, p, args.target_seq_len)[0] for e, p in zip(ecg, ppg)]
    n = len(xs)
    bare_s = best_seconds(lambda d: bare_savez(xs, d), args.repeats, scratch)
    rates: Dict[str, float] = {"bare np.savez_compressed": n / bare_s}
    for workers, extra in ((1, ()), (2, ()), (1, FEATURES)):
        seconds = best_seconds(lambda d: run_prep(h5, args.target_seq_len, workers, d, extra),
                               args.repeats, scratch)
        rates[f"prepare_kailuan_npz --workers {workers}" + " --features" * bool(extra)] = \
            n / seconds
    bare = rates["bare np.savez_compressed"]
    print(f"{n} records, target_seq_len {args.target_seq_len}, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':47s} {'records/s':>10s} {'/ bare':>8s}")
    for name, rate in rates.items():
        print(f"{name:47s} {rate:10.1f} {rate / bare:8.2f}")
    two, one = (rates[f"prepare_kailuan_npz --workers {w}"] for w in (2, 1))
    print(f"2 workers / 1 worker: {two / one:.2f}")


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        stack += children.get(pid, [])
    return total


def peak_memory(args, scratch: str) -> None:
    h5 = os.path.join(scratch, "cohort.h5")
    tic = time.perf_counter()
    make(h5, args.peak_rss)
    print(f"cohort: {args.peak_rss} records, {os.path.getsize(h5) / 1e9:.2f} GB, made in "
          f"{time.perf_counter() - tic:.0f} s")
    out = os.path.join(scratch, "out")
    os.makedirs(out)
    argv = [sys.executable, SCRIPT, *prep_argv(h5, out, args.target_seq_len, args.workers)]
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    peak_tree = 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - tic
    lines = proc.stdout.read().splitlines()
    largest_kb, status = lines[-1].split()
    print(lines[0] if status == "0" else f"prepare failed with status {status}")
    print(f"prepare --workers {args.workers}: {seconds:.0f} s ({args.peak_rss / seconds:.0f} "
          f"records/s); peak RSS of its largest process {int(largest_kb) / 1e3:.0f} MB, "
          f"of all its processes together {peak_tree / 1e6:.0f} MB")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    scratch = args.work_dir or tempfile.mkdtemp(prefix="bench_prep_")
    os.makedirs(scratch, exist_ok=True)
    try:
        (peak_memory if args.peak_rss else speed_table)(args, scratch)
    finally:
        if not args.work_dir:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
