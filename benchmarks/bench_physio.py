"""Accuracy and speed of physio.record_features on the synthetic cohort.

    python benchmarks/bench_physio.py                      # 200 records at noise x1, x2, x4
    python benchmarks/bench_physio.py --n_records 1000 --noise_scales 1 4 8

Accuracy, per noise scale (``make_synthetic_cohort.py --noise_scale``: the record-level noise,
baseline wander and mains amplitudes times the scale; the same seed gives the same beats, PAT and
waveforms): Pearson r and median absolute error of ``hr_bpm`` against the generating heart rate;
r, median absolute error and mean offset (measured - truth) of ``pat_foot_ms`` against the
generating PAT (R peak to pulse onset; the intersecting-tangent foot lies a near-constant
~15 ms after that onset); the median ``pat_beats`` per record; the median SQIs; the share of
records whose ECG and PPG beats were accepted.

Speed, on the x1 cohort: ms per record of ``record_features`` on the rows as stored (3630 and
4230 samples per 15 s) and on the rows resampled to ``--target_seq_len`` as prepare writes them,
against ``np.savez_compressed`` of that (target_seq_len, 2) float32 array to a file, measured in
the same run (best of ``--repeats``). The last column is the rate prepare would keep if it ran
the features inline next to compressing (one worker, savez-bound): savez / (savez + features).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import make_synthetic_cohort  # noqa: E402
import physio  # noqa: E402
import prepare_kailuan_npz as prep  # noqa: E402
from utils import ArgumentParser, run_cli  # noqa: E402


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_records", type=int, default=200,
                   help="records per cohort (4 per subject); more = tighter r and errors")
    p.add_argument("--noise_scales", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="make_synthetic_cohort --noise_scale values, one cohort each")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (the same for every scale)")
    p.add_argument("--target_seq_len", type=int, default=7500,
                   help="samples per signal of the resampled rows (prepare's --target_seq_len)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes over the records (the best is reported)")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    return p


def read_cohort(path: str) -> Dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {"ecg": f["signals/ecg"][:], "ppg": f["signals/ppg"][:],
                "pat": f["truth/pat_ms"][:], "hr": f["truth/hr_bpm"][:],
                "seconds": f["truth/duration_s"][:]}


def features(cohort: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """FEATURE_COLUMNS -> values over the cohort's records."""
    rows = [physio.record_features(e, p, len(e) / s, len(p) / s)
            for e, p, s in zip(cohort["ecg"], cohort["ppg"], cohort["seconds"])]
    return {c: np.array([r[c] for r in rows]) for c in physio.FEATURE_COLUMNS}


def accuracy(feats: Dict[str, np.ndarray], cohort: Dict[str, np.ndarray]) -> Dict[str, float]:
    hr_ok, pat_ok = np.isfinite(feats["hr_bpm"]), np.isfinite(feats["pat_foot_ms"])
    hr_err = feats["hr_bpm"][hr_ok] - cohort["hr"][hr_ok]
    pat_err = feats["pat_foot_ms"][pat_ok] - cohort["pat"][pat_ok]
    return {
        "hr r": np.corrcoef(feats["hr_bpm"][hr_ok], cohort["hr"][hr_ok])[0, 1],
        "hr |err|": np.median(np.abs(hr_err)),
        "pat r": np.corrcoef(feats["pat_foot_ms"][pat_ok], cohort["pat"][pat_ok])[0, 1],
        "pat |err|": np.median(np.abs(pat_err)),
        "pat offset": np.mean(pat_err),
        "pat_beats": np.median(feats["pat_beats"]),
        "sqi_ecg": np.nanmedian(feats["sqi_ecg"]),
        "sqi_ppg": np.nanmedian(feats["sqi_ppg"]),
        "ecg ok": np.mean(feats["n_beats_ecg"] > 0),
        "ppg ok": np.mean(feats["n_beats_ppg"] > 0),
    }


def best_ms_per_record(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times) / n * 1000.0


def speed(cohort: Dict[str, np.ndarray], target_len: int, repeats: int,
          scratch: str) -> Dict[str, float]:
    ecg, ppg, seconds = cohort["ecg"], cohort["ppg"], cohort["seconds"]
    xs = [prep.record_to_x(e, p, target_len)[0] for e, p in zip(ecg, ppg)]
    n = len(xs)
    out = os.path.join(scratch, "npz")
    os.makedirs(out, exist_ok=True)
    return {
        "savez": best_ms_per_record(
            lambda: [np.savez_compressed(os.path.join(out, f"{i}.npz"), x=x)
                     for i, x in enumerate(xs)], n, repeats),
        "stored rows": best_ms_per_record(
            lambda: [physio.record_features(e, p, len(e) / s, len(p) / s)
                     for e, p, s in zip(ecg, ppg, seconds)], n, repeats),
        f"{target_len} samples": best_ms_per_record(
            lambda: [physio.record_features(x[:, 0], x[:, 1], target_len / s, target_len / s)
                     for x, s in zip(xs, seconds)], n, repeats),
    }


def report(acc: Dict[float, Dict[str, float]], ms: Dict[str, float], n: int) -> List[str]:
    names = list(next(iter(acc.values())))
    lines = [f"{n} records per cohort; accuracy against make_synthetic_cohort's truth",
             f"{'noise':>6s}" + "".join(f"{k:>11s}" for k in names)]
    for scale, values in acc.items():
        lines.append(f"{scale:>5.1f}x" + "".join(
            f"{values[k]:11.4f}" if k.endswith(" r") else f"{values[k]:11.3f}" for k in names))
    lines += ["", f"speed, noise x1 ({os.cpu_count()} CPUs): ms per record",
              f"{'':28s}{'ms':>8s}{'/ savez':>9s}{'prep rate / bare':>18s}"]
    savez = ms["savez"]
    lines.append(f"{'np.savez_compressed':28s}{savez:8.2f}{1.0:9.2f}{1.0:18.2f}")
    for name, value in ms.items():
        if name != "savez":
            lines.append(f"{'record_features, ' + name:28s}{value:8.2f}{value / savez:9.2f}"
                         f"{savez / (savez + value):18.2f}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    scratch = args.work_dir or tempfile.mkdtemp(prefix="bench_physio_")
    os.makedirs(scratch, exist_ok=True)
    try:
        acc, ms = {}, {}
        for scale in args.noise_scales:
            path = os.path.join(scratch, f"cohort_{scale:g}.h5")
            make_synthetic_cohort.make_cohort(path, n_subjects=-(-args.n_records // 4),
                                              records_per_subject=4, seed=args.seed,
                                              noise_scale=scale)
            cohort = read_cohort(path)
            acc[scale] = accuracy(features(cohort), cohort)
            if not ms:
                ms = speed(cohort, args.target_seq_len, args.repeats, scratch)
        print("\n".join(report(acc, ms, -(-args.n_records // 4) * 4)))
    finally:
        if not args.work_dir:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
