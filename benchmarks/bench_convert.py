"""Speed and peak memory of make_cohort_h5.py, per format, against a bare read of the same
input measured in the same run (Linux).

    python benchmarks/bench_convert.py                            # speed table
    python benchmarks/bench_convert.py --peak_rss 10000 100000    # PulseDB memory at two sizes

Speed (best of ``--repeats``; MB/s of the input's signal bytes):
- pulsedb: a file in the PulseDB subset layout (``--n_segments``, float64 (1250, 3, N), Subject
  and Gender as references to char arrays, written here as MATLAB -v7.3 does), converted with
  ``--chunk 4096``; baseline: bare h5py reads of ``Subset/Signals`` in the same chunks.
- wfdb: the BIDMC records of ``--bidmc`` (ECG II + PLETH, no arterial channel) when the folder
  exists, and ``--n_records`` constructed 8-minute records with an arterial channel (BP per
  window: beat detection in every window); baseline: bare ``wfdb.rdrecord`` of the same
  records and channels.
- arrays: ``--n_rows`` rows of ECG + PPG in 8 .npz files; baseline: bare ``np.load`` of them.

Memory (``--peak_rss N ...``): the converter runs as a child process on an N-segment PulseDB
file; printed is its peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a small wrapper
process). Aim: the same for every N (reading in chunks keeps memory flat).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import make_cohort_h5 as mc  # noqa: E402
from utils import ArgumentParser, run_cli  # noqa: E402

SCRIPT = os.path.abspath(mc.__file__)
BIDMC = os.path.join(os.path.dirname(SCRIPT), "..", "shared", "data", "bidmc_unlabeled")
WRAPPER = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[1:], "
           "stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, status)")
FS, WRITE_BLOCK = 125, 4096


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_segments", type=int, default=20000, help="PulseDB segments (speed)")
    p.add_argument("--n_records", type=int, default=20,
                   help="constructed 8-minute WFDB records with an arterial channel")
    p.add_argument("--n_rows", type=int, default=20000, help="rows of the arrays benchmark")
    p.add_argument("--bidmc", default=BIDMC, help="folder of the BIDMC records (skipped if absent)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (the best is reported)")
    p.add_argument("--peak_rss", type=int, nargs="+", default=None, metavar="N",
                   help="instead of the speed table, peak memory on N-segment PulseDB files")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    return p


# ----------------------------------------------------------------------------- inputs
def _char(f: h5py.File, name: str, text: str):
    ds = f.create_dataset(f"#refs#/{name}", data=np.array([[ord(c)] for c in text], np.uint16))
    ds.attrs["MATLAB_class"] = np.bytes_("char")
    return ds.ref


def write_pulsedb(path: str, n: int) -> None:
    """A subset file in PulseDB's layout, written block by block (memory stays flat)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        subset = f.create_group("Subset")
        subset.attrs["MATLAB_class"] = np.bytes_("struct")
        sig = subset.create_dataset("Signals", (1250, 3, n), dtype=np.float64)
        for a in range(0, n, WRITE_BLOCK):
            b = min(a + WRITE_BLOCK, n)
            sig[:, :, a:b] = rng.standard_normal((1250, 3, b - a))
        for k in ("SBP", "DBP", "Age", "Height", "Weight", "BMI"):
            subset.create_dataset(k, data=rng.uniform(50, 150, (1, n)))
        for k in ("Subject", "Gender"):
            refs = [_char(f, f"{k}{j}", f"p{j // 400:06d}_1" if k == "Subject" else "MF"[j % 2])
                    for j in range(n)]
            subset.create_dataset(k, data=np.array([refs], dtype=h5py.ref_dtype))


def write_wfdb(folder: str, n_records: int) -> None:
    """8-minute records at 125 Hz: ECG II, PLETH and an arterial channel (ABP)."""
    import wfdb

    rng = np.random.default_rng(1)
    n = 8 * 60 * FS
    phase = (np.arange(n) % 100) / 100.0  # 75 bpm
    for r in range(n_records):
        abp = 80 + 40 * np.exp(-((phase - 0.2) / 0.08) ** 2) + rng.normal(0, 0.3, n)
        ecg = np.exp(-((phase - 0.05) / 0.012) ** 2) + rng.normal(0, 0.02, n)
        ppg = np.exp(-((phase - 0.4) / 0.1) ** 2) + rng.normal(0, 0.01, n)
        wfdb.wrsamp(f"rec{r:03d}", fs=FS, units=["mV", "NU", "mmHg"],
                    sig_name=["II", "PLETH", "ABP"], p_signal=np.column_stack([ecg, ppg, abp]),
                    fmt=["16"] * 3, write_dir=folder)


def write_arrays(folder: str, n_rows: int) -> None:
    rng = np.random.default_rng(2)
    for i, rows in enumerate(np.array_split(np.arange(n_rows), 8)):
        np.savez(os.path.join(folder, f"part{i}.npz"),
                 ecg=rng.standard_normal((len(rows), 1250)).astype(np.float32),
                 ppg=rng.standard_normal((len(rows), 1250)).astype(np.float32), fs=125.0,
                 subject=rows // 10, sbp=rng.uniform(90, 180, len(rows)))


# ----------------------------------------------------------------------------- baselines
def bare_pulsedb(path: str) -> None:
    with h5py.File(path, "r") as f:
        sig = f["Subset/Signals"]
        for a in range(0, sig.shape[2], WRITE_BLOCK):
            sig[:, :, a:a + WRITE_BLOCK]


def bare_wfdb(folder: str, channels: Sequence[str]) -> None:
    import wfdb

    for path in mc.list_records(folder):
        names = [mc.channel_key(c) for c in wfdb.rdheader(path).sig_name]
        wfdb.rdrecord(path, channels=[names.index(c) for c in channels])


def bare_arrays(folder: str) -> None:
    for path in mc.npz_files(folder):
        with np.load(path) as z:
            z["ecg"], z["ppg"]


# ----------------------------------------------------------------------------- timing
def best_seconds(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def convert(argv: Sequence[str], out: str) -> Callable[[], None]:
    def run():
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                mc.main([*argv, "--out", out, "--overwrite"])
            finally:
                sys.stdout = stdout
    return run


def row(name: str, mb: float, bare_s: float, ours_s: float, unit: str, n: int) -> str:
    return (f"| {name} | {n} {unit} | {mb / bare_s:.0f} | {mb / ours_s:.0f} | "
            f"{n / ours_s:.0f} {unit}/s | {bare_s / ours_s:.2f} |")


def speed_table(args, scratch: str) -> None:
    out = os.path.join(scratch, "out.h5")
    lines = ["| input | size | bare read MB/s | converter MB/s | converter rate | ratio |",
             "|---|---|---|---|---|---|"]
    pulsedb = os.path.join(scratch, "subset.mat")
    write_pulsedb(pulsedb, args.n_segments)
    mb = args.n_segments * 1250 * 3 * 8 / 1e6
    lines.append(row("pulsedb (float64, 3 channels read)", mb,
                     best_seconds(lambda: bare_pulsedb(pulsedb), args.repeats),
                     best_seconds(convert(["pulsedb", "--subset", pulsedb], out), args.repeats),
                     "segments", args.n_segments))
    os.remove(pulsedb)
    folders = {}
    if os.path.isdir(args.bidmc):
        folders["wfdb BIDMC (II + PLETH, no BP)"] = (args.bidmc, ("II", "PLETH"))
    synthetic = os.path.join(scratch, "wfdb")
    os.makedirs(synthetic)
    write_wfdb(synthetic, args.n_records)
    folders["wfdb with ABP (BP per window)"] = (synthetic, ("II", "PLETH", "ABP"))
    for name, (folder, channels) in folders.items():
        heads = [mc.read_header(p, folder, {"ecg": ["II"]}) for p in mc.list_records(folder)]
        n_samples = sum(h.n_samples for h in heads)
        windows = sum((h.n_samples - 1250) // 1250 + 1 for h in heads)
        lines.append(row(name, n_samples * len(channels) * 2 / 1e6,
                         best_seconds(lambda: bare_wfdb(folder, channels), args.repeats),
                         best_seconds(convert(["wfdb", "--records", folder], out), args.repeats),
                         "windows", windows))
    arrays = os.path.join(scratch, "arrays")
    os.makedirs(arrays)
    write_arrays(arrays, args.n_rows)
    lines.append(row("arrays (float32 ECG + PPG)", args.n_rows * 1250 * 2 * 4 / 1e6,
                     best_seconds(lambda: bare_arrays(arrays), args.repeats),
                     best_seconds(convert(["arrays", "--npz", arrays], out), args.repeats),
                     "rows", args.n_rows))
    print("\n".join(lines))
    print("(MB of input signal samples: float64 for PulseDB, the 16-bit samples of the .dat "
          "files for WFDB, float32 for arrays; ratio = bare seconds / converter seconds)")


def peak_memory(sizes: Sequence[int], scratch: str) -> None:
    for n in sizes:
        path = os.path.join(scratch, f"subset_{n}.mat")
        write_pulsedb(path, n)
        out = os.path.join(scratch, f"out_{n}.h5")
        argv = [sys.executable, SCRIPT, "pulsedb", "--subset", path, "--out", out]
        tic = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True,
                                text=True, check=True)
        seconds = time.perf_counter() - tic
        kb, status = result.stdout.split()
        print(f"pulsedb {n} segments ({os.path.getsize(path) / 1e9:.2f} GB in, "
              f"{os.path.getsize(out) / 1e9:.2f} GB out): {seconds:.0f} s, peak RSS "
              f"{int(kb) / 1e3:.0f} MB, status {status}")
        os.remove(path)
        os.remove(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    scratch = args.work_dir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(scratch, exist_ok=True)
    try:
        if args.peak_rss:
            peak_memory(args.peak_rss, scratch)
        else:
            speed_table(args, scratch)
    finally:
        if not args.work_dir:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
