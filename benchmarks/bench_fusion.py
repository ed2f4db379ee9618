"""Compare --fusion late|mid|early on the synthetic cohort over several seeds.

    python benchmarks/bench_fusion.py --out bench_out/fusion --seeds 1 2 3

Makes one synthetic cohort, prepares it once, then runs the real ``train_bp.py`` CLI for
every fusion and seed (the seed also changes the subject split) and prints, per fusion,
the test MAE (mean over targets; mean +/- SD over seeds), per-target means, and the ratio
to the train-mean predictor measured in the same runs. Prints; asserts nothing.
With the defaults it takes about 5-15 minutes on a 2-core CPU. ``prepare`` and ``train``
serve ``bench_covariates.py`` too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import ArgumentParser, write_text_atomic  # noqa: E402

TARGETS = ["right_arm_dbp", "left_arm_mbp", "right_arm_pp", "right_arm_sbp", "left_arm_sbp"]


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/fusion",
                   help="folder for the cohort, the runs and the table (replaced)")
    p.add_argument("--n_subjects", type=int, default=120, help="persons in the synthetic cohort")
    p.add_argument("--records_per_subject", type=int, default=4,
                   help="records (visits) per person")
    p.add_argument("--seq_len", type=int, default=2500, help="samples per record after prep")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per run")
    p.add_argument("--arch", default="small", help="Net1D size of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="one run per seed (the seed also draws the subject split)")
    p.add_argument("--fusions", nargs="+", default=["late", "mid", "early"],
                   help="models to compare")
    return p


def run(argv: List[str]) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def prepare(args) -> Dict[str, str]:
    h5 = os.path.join(args.out, "cohort.h5")
    data = {"npz": os.path.join(args.out, "npz"), "labels": os.path.join(args.out, "labels.csv")}
    if not os.path.isfile(data["labels"]):
        run(["make_synthetic_cohort.py", "--out", h5, "--n_subjects", str(args.n_subjects),
             "--records_per_subject", str(args.records_per_subject), "--seed", "0",
             "--overwrite"])
        run(["prepare_kailuan_npz.py", "--h5_path", h5, "--target_cols", *TARGETS,
             "--output_npz", data["npz"], "--output_csv", data["labels"],
             "--target_seq_len", str(args.seq_len), "--workers", "2",
             "--extra_cols", "age", "sex", "bmi", "--record_seconds", "15", "--features"])
    return data


def train(args, data: Dict[str, str], name: str, flags: List[str], seed: int) -> dict:
    """One ``train_bp.py`` run with ``flags``; its test block and wall time."""
    out = os.path.join(args.out, f"run_{name}_seed{seed}")
    tic = time.perf_counter()
    run(["train_bp.py", "--npz_dir", data["npz"], "--labels_csv", data["labels"],
         "--out_dir", out, "--overwrite", "--target_cols", *TARGETS, "--arch", args.arch,
         "--epochs", str(args.epochs), "--batch_size", "32", "--lr_backbone", "2e-3",
         "--lr_head", "2e-3", "--num_workers", "0", "--patience", "0", "--seed", str(seed),
         *flags])
    with open(os.path.join(out, "final_metrics.json")) as fh:
        test = json.load(fh)["test"]
    return {"seconds": time.perf_counter() - tic, "mae": test["mean"]["mae"],
            "baseline": test["baseline"]["mean"]["mae"],
            "per_target": {t: test["per_target"][t]["mae"] for t in TARGETS}, "test": test}


def table(results: Dict[str, List[dict]]) -> str:
    head = ("| fusion | test MAE (mean of targets) | " + " | ".join(TARGETS)
            + " | train-mean MAE | ratio | s/run |")
    lines = [head, "|" + "---|" * (len(TARGETS) + 5)]
    for fusion, runs in results.items():
        mae = np.array([r["mae"] for r in runs])
        base = np.mean([r["baseline"] for r in runs])
        per = " | ".join(f"{np.mean([r['per_target'][t] for r in runs]):.2f}" for t in TARGETS)
        lines.append(f"| {fusion} | {mae.mean():.2f} ± {mae.std(ddof=1) if len(mae) > 1 else 0:.2f}"
                     f" | {per} | {base:.2f} | {mae.mean() / base:.2f} | "
                     f"{np.mean([r['seconds'] for r in runs]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = get_args_parser().parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = prepare(args)
    results = {f: [] for f in args.fusions}
    for seed in args.seeds:
        for fusion in args.fusions:
            results[fusion].append(train(args, data, fusion,
                                         ["--modality", "both", "--fusion", fusion], seed))
            print(f"{fusion} seed {seed}: test MAE {results[fusion][-1]['mae']:.2f}", flush=True)
    text = (f"{len(args.seeds)} seeds, {args.n_subjects} subjects x {args.records_per_subject} "
            f"records, {args.seq_len} samples, --arch {args.arch}, {args.epochs} epochs\n\n"
            + table(results))
    write_text_atomic(os.path.join(args.out, "fusion_table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
