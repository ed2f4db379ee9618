"""tune_bp.py against the project's defaults and against a random search of the same budget,
on the synthetic cohort, over seeds.

    python benchmarks/bench_tune.py --out bench_out/tune                      # the issue's
    python benchmarks/bench_tune.py --out bench_out/tune_small --n_trials 12 --epochs 4 \\
        --n_subjects 60 --records_per_subject 2 --seq_len 1000 --arch tiny   # 2 CPU cores

Makes and prepares one synthetic cohort (``bench_fusion.prepare``), then for every seed (which
also draws the subject split): one train_bp.py run with the project's default settings, one
with the other benchmarks' hand settings (batch 32, learning rates 2e-3), and two tune_bp.py
searches of ``--n_trials`` trials over the default space, TPE and random, each ending in the
single test evaluation of its best trial. Reports validation and test MAE (mean over the five
targets), the wall time of each search, and the number of trials TPE needed to reach the best
validation MAE of the random search (``-`` when it never did). Prints; asserts nothing.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bp  # noqa: E402
import tune_bp  # noqa: E402
from bench_fusion import TARGETS, get_args_parser as fusion_parser, prepare  # noqa: E402
from utils import run_cli, write_text_atomic  # noqa: E402

HAND = ["--batch_size", "32", "--lr_backbone", "2e-3", "--lr_head", "2e-3"]


def get_args_parser():
    p = fusion_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(out="bench_out/tune", epochs=10)
    p.add_argument("--n_trials", type=int, default=20, help="trials of each search")
    return p


def fixed_flags(args, data: Dict[str, str], seed: int) -> List[str]:
    return ["--npz_dir", data["npz"], "--labels_csv", data["labels"], "--target_cols", *TARGETS,
            "--arch", args.arch, "--epochs", str(args.epochs), "--num_workers", "0",
            "--threads", "1", "--seed", str(seed)]


def single_run(args, data, name: str, seed: int, flags: List[str]) -> dict:
    out = os.path.join(args.out, f"{name}_seed{seed}")
    tic = time.perf_counter()
    train_bp.main([*fixed_flags(args, data, seed), *flags, "--out_dir", out, "--overwrite"])
    with open(os.path.join(out, "final_metrics.json")) as fh:
        report = json.load(fh)
    return {"val": report["val"]["mean"]["mae"], "test": report["test"]["mean"]["mae"],
            "seconds": time.perf_counter() - tic}


def search(args, data, sampler: str, seed: int) -> dict:
    """One tune_bp.py study (continued if its folder holds one); best val/test, time, and
    the validation MAE of every trial in order (NaN where not complete)."""
    out = os.path.join(args.out, f"{sampler}_seed{seed}")
    tic = time.perf_counter()
    tune_bp.main(["--out_dir", out, "--n_trials", str(args.n_trials), "--sampler", sampler,
                  *fixed_flags(args, data, seed)])
    with open(os.path.join(out, "best.json")) as fh:
        best = json.load(fh)
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    values = trials["value"].where(trials["state"] == "COMPLETE").to_numpy(np.float64)
    return {"val": best["val"]["mean"]["mae"], "test": best["test"]["mean"]["mae"],
            "seconds": time.perf_counter() - tic, "values": values,
            "pruned": int((trials["state"] == "PRUNED").sum())}


def trials_to_reach(values: np.ndarray, target: float) -> str:
    """1-based count of trials after which the best so far is at or below ``target``."""
    best = np.fmin.accumulate(np.where(np.isnan(values), np.inf, values))
    hit = np.flatnonzero(best <= target + 1e-12)
    return str(hit[0] + 1) if len(hit) else "-"


def report(rows: List[dict], args) -> str:
    lines = [f"{len(rows)} seeds, {args.n_subjects} subjects x {args.records_per_subject} records, "
             f"{args.seq_len} samples, --arch {args.arch}, {args.epochs} epochs, "
             f"{args.n_trials} trials per search; MAE in mmHg, mean of the five targets", "",
             "| seed | defaults val / test | hand val / test | random val / test (s) "
             "| TPE val / test (s) | TPE trials to random's best | TPE test < defaults |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d, h, rnd, tpe = r["defaults"], r["hand"], r["random"], r["tpe"]
        lines.append(f"| {r['seed']} | {d['val']:.2f} / {d['test']:.2f} | {h['val']:.2f} / "
                     f"{h['test']:.2f} | {rnd['val']:.2f} / {rnd['test']:.2f} "
                     f"({rnd['seconds']:.0f}) | {tpe['val']:.2f} / {tpe['test']:.2f} "
                     f"({tpe['seconds']:.0f}) | {trials_to_reach(tpe['values'], rnd['val'])} | "
                     f"{'yes' if tpe['test'] < d['test'] else 'no'} |")
    mean = {k: {m: np.mean([r[k][m] for r in rows]) for m in ("val", "test", "seconds")}
            for k in ("defaults", "hand", "random", "tpe")}
    lines.append(f"| mean | {mean['defaults']['val']:.2f} / {mean['defaults']['test']:.2f} | "
                 f"{mean['hand']['val']:.2f} / {mean['hand']['test']:.2f} | "
                 f"{mean['random']['val']:.2f} / {mean['random']['test']:.2f} "
                 f"({mean['random']['seconds']:.0f}) | {mean['tpe']['val']:.2f} / "
                 f"{mean['tpe']['test']:.2f} ({mean['tpe']['seconds']:.0f}) | | |")
    lines.append("")
    lines.append("pruned trials per search (random, TPE): " + "; ".join(
        f"seed {r['seed']}: {r['random']['pruned']}, {r['tpe']['pruned']}" for r in rows))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = prepare(args)
    rows = []
    for seed in args.seeds:
        row = {"seed": seed, "defaults": single_run(args, data, "defaults", seed, []),
               "hand": single_run(args, data, "hand", seed, HAND)}
        for sampler in ("random", "tpe"):
            row[sampler] = search(args, data, sampler, seed)
        print(f"seed {seed}: defaults test {row['defaults']['test']:.2f}, random test "
              f"{row['random']['test']:.2f}, TPE test {row['tpe']['test']:.2f}", flush=True)
        rows.append(row)
    text = report(rows, args)
    write_text_atomic(os.path.join(args.out, "tune_table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
