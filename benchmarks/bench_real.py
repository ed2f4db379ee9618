"""Real data: PPG-BP (217 subjects, one 2.1 s finger PPG each, cuff SBP/DBP) under 5-fold
subject-wise cross-validation, for the simple fits and the deep model side by side.

    python benchmarks/bench_real.py --out bench_out/real           # 10 min on 2 CPU cores
    python benchmarks/bench_real.py --out /tmp/smoke --subjects 30 --epochs 1 --seeds 1
    python benchmarks/bench_real.py --out bench_out/real_drop --train_args="--dropout 0.3"

Steps, all through the project's own scripts:
1. pack ``--data`` (``../shared/data/ppgbp/``, see its README) into a Kailuan-layout HDF5:
   ``metadata/new_id`` = ``<subject>_<segment>`` (so the subject is the id's part before
   ``_``), ``sbp``, ``dbp``, ``age``, ``sex``, ``bmi`` (kg / m^2 from height and weight) and
   ``signals/ppg``; no ECG;
2. ``prepare_kailuan_npz.py --ecg_key none --features --extra_cols age sex bmi`` with
   ``--record_seconds`` = the segment's duration and ``--target_seq_len`` = that duration
   at prep's default ``--target_fs`` (ECGFounder's 500 Hz);
3. ``crossval_bp.py --folds 5`` for each seed and setup: (a) the model on PPG alone,
   (b) PPG + age, sex, BMI, (c) PPG + age, sex, BMI + the PPG features. The features are
   chosen by a rule fixed before any result is seen: every ``physio.FEATURE_COLUMNS``
   column that is not a beat count (``physio.COUNT_COLUMNS``: bookkeeping, not physiology),
   has values for at least ``FEATURE_MIN_PRESENT`` of the records and is not constant.
   When no column passes, (c) is left out and its rows say so.

The table (printed, and written to ``OUT/bench_real.csv``; one row per seed and setup in
``OUT/bench_real_seeds.csv``) reads the pooled out-of-fold block of each run's
``cv_metrics.json``: the train mean (``baseline``, from run (b)), the ridge on age, sex and
BMI (run (b)'s ``covariate_baseline``), the ridge on those and the features (run (c)'s),
and the model of each run. Columns: SBP and DBP MAE (mmHg, mean and SD over seeds), MASE
(model MAE / train-mean MAE, mean of SBP and DBP and of the seeds) and, for a model with
covariates, its MAE minus the ridge's on the same covariates with the paired 95 %
subject-bootstrap interval of the first seed (an interval below 0: the waveform adds
something the ridge does not have).

Training settings are the project's other benchmarks' (``--arch small``, batch 32,
learning rate 2e-3 for both parameter groups: a random start, no ECGFounder weights here);
none was chosen on PPG-BP. ``--train_args`` passes any other train_bp.py flag to every run
(e.g. augmentation or filters), so alternatives can be compared without code changes.
Finished folds are kept (crossval_bp.py resumes), so a killed benchmark continues when run
again with the same flags. Prints and writes; asserts nothing.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

import h5py
import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import crossval_bp  # noqa: E402
import physio  # noqa: E402
import prepare_kailuan_npz as prep  # noqa: E402
from utils import ArgumentParser, UserError, atomic_path, run_cli, write_csv_atomic  # noqa: E402

DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "ppgbp",
                                     "ppgbp_liang2018_vejovis_processed_1kHz.npz"))
TARGETS = ["sbp", "dbp"]
COVARIATES = ["age", "sex", "bmi"]
FEATURE_MIN_PRESENT = 0.5  # share of records with a value, for a feature to be used
TRAIN_FLAGS = ["--batch_size", "32", "--lr_backbone", "2e-3", "--lr_head", "2e-3",
               "--num_workers", "0"]
ROWS = ["train mean", "ridge age/sex/BMI", "ridge age/sex/BMI + PPG features", "model PPG",
        "model PPG + age/sex/BMI", "model PPG + age/sex/BMI + PPG features"]
COLUMNS = ["row", "n_seeds", "sbp_mae", "sbp_mae_sd", "dbp_mae", "dbp_mae_sd", "mase",
           "sbp_minus_ridge", "sbp_minus_ridge_lo", "sbp_minus_ridge_hi", "dbp_minus_ridge",
           "dbp_minus_ridge_lo", "dbp_minus_ridge_hi"]


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/real",
                   help="folder for the cohort, the prepared records, every CV run and the "
                        "table; a re-run with the same flags keeps finished folds")
    p.add_argument("--data", default=DATA, help="the PPG-BP npz (see its README)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="CV seeds (each deals the subjects into other folds and starts the "
                        "model elsewhere); the table gives the mean and SD over them")
    p.add_argument("--folds", type=int, default=5, help="subject-wise CV folds")
    p.add_argument("--epochs", type=int, default=30,
                   help="training epochs per fold (the best validation epoch is kept)")
    p.add_argument("--arch", default="small", help="Net1D size (train_bp.py --arch)")
    p.add_argument("--batch_size", type=int, default=32, help="records per training step")
    p.add_argument("--subjects", type=int, default=None,
                   help="use only the first N subjects of the file (a quick smoke run, e.g. "
                        "--subjects 30 --epochs 1 --seeds 1); default: all")
    p.add_argument("--train_args", default="",
                   help="more train_bp.py flags for every run, as one quoted string with '=' "
                        "(--train_args=\"--dropout 0.3\"); they come last, so they override "
                        "the defaults")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="prepare_kailuan_npz.py --workers")
    p.add_argument("--threads", type=int, default=1,
                   help="train_bp.py --threads (0: torch's default). One thread "
                        "is about as fast for a small model and stays fast when another job "
                        "shares the cores, where two threads measured 10-25x slower")
    return p


# ----------------------------------------------------------------------------- cohort
def read_ppgbp(path: str, subjects: Optional[int]) -> Dict[str, np.ndarray]:
    """The arrays of the PPG-BP npz, the first ``subjects`` rows when given."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = {"fs", "ppg", "subject_id", "segment", "sbp", "dbp", "age", "sex", "height_cm",
               "weight_kg"} - set(arrays)
    if missing:
        raise UserError(f"--data {path} has no array {', '.join(sorted(missing))}")
    n = len(arrays["ppg"]) if subjects is None else subjects
    if not 2 <= n <= len(arrays["ppg"]):
        raise UserError(f"--subjects must be in [2, {len(arrays['ppg'])}], got {n}")
    return {k: (v if v.ndim == 0 else v[:n]) for k, v in arrays.items()}


def write_cohort(data: Dict[str, np.ndarray], path: str) -> float:
    """``data`` as a PPG-only Kailuan-layout HDF5 at ``path`` (atomically; kept when it is
    there, so that a re-run's prep finds the same input); returns the segment's duration
    in seconds."""
    seconds = data["ppg"].shape[1] / float(data["fs"])
    if os.path.isfile(path):
        return seconds
    ids = [f"{s}_{g}" for s, g in zip(data["subject_id"], data["segment"])]
    bmi = data["weight_kg"] / (data["height_cm"] / 100.0) ** 2
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("metadata/new_id", data=np.array(ids, dtype="S"))
        for name in ("sbp", "dbp", "age"):
            f.create_dataset(f"metadata/{name}", data=data[name].astype(np.float32))
        f.create_dataset("metadata/sex", data=np.char.encode(data["sex"].astype(str)))
        f.create_dataset("metadata/bmi", data=bmi.astype(np.float32))
        f.create_dataset("signals/ppg", data=data["ppg"].astype(np.float32))
    return seconds


def prepare(args, h5: str, seconds: float) -> Dict[str, str]:
    """prepare_kailuan_npz.py on the cohort (PPG only, with features); paths of the npz
    folder and the labels CSV."""
    target_fs = prep.get_args_parser().get_default("target_fs")
    npz, labels = os.path.join(args.out, "npz"), os.path.join(args.out, "labels.csv")
    prep.main(["--h5_path", h5, "--id_key", "new_id", "--target_cols", *TARGETS,
               "--output_npz", npz, "--output_csv", labels, "--ecg_key", "none",
               "--record_seconds", f"{seconds:g}",
               "--target_seq_len", str(int(round(seconds * target_fs))), "--features",
               "--extra_cols", *COVARIATES, "--workers", str(args.workers)])
    return {"npz": npz, "labels": labels}


def usable_features(labels_csv: str) -> List[str]:
    """The feature columns that pass the rule of the module docstring."""
    labels = pd.read_csv(labels_csv)
    return [c for c in physio.FEATURE_COLUMNS
            if c not in physio.COUNT_COLUMNS and c in labels
            and labels[c].notna().mean() >= FEATURE_MIN_PRESENT and labels[c].nunique() > 1]


# ----------------------------------------------------------------------------- runs
def setups(features: List[str]) -> Dict[str, List[str]]:
    """Each CV setup's train_bp.py flags."""
    out = {"ppg": ["--modality", "ppg"],
           "ppg_cov": ["--modality", "ppg", "--covariates", *COVARIATES]}
    if features:
        out["ppg_cov_feat"] = ["--modality", "ppg", "--covariates", *COVARIATES, *features]
    return out


def run_cv(args, paths: Dict[str, str], name: str, flags: List[str], seed: int) -> dict:
    """One crossval_bp.py run (in this process); its pooled block."""
    out = os.path.join(args.out, "cv", f"{name}_seed{seed}")
    crossval_bp.main(["--folds", str(args.folds), "--out_dir", out, "--npz_dir", paths["npz"],
                      "--labels_csv", paths["labels"], "--target_cols", *TARGETS,
                      "--arch", args.arch, "--epochs", str(args.epochs), "--seed", str(seed),
                      *TRAIN_FLAGS, "--batch_size", str(args.batch_size),
                      "--threads", str(args.threads), *flags,
                      *shlex.split(args.train_args)])
    with open(os.path.join(out, "cv_metrics.json"), encoding="utf-8") as fh:
        return json.load(fh)["pooled"]


# ----------------------------------------------------------------------------- table
def seed_rows(pooled: Dict[str, Dict[int, dict]]) -> pd.DataFrame:
    """One row per seed and table row: SBP/DBP MAE, MASE and the model-minus-ridge diff."""
    sources = {"train mean": ("ppg_cov", "baseline"),
               "ridge age/sex/BMI": ("ppg_cov", "covariate_baseline"),
               "ridge age/sex/BMI + PPG features": ("ppg_cov_feat", "covariate_baseline"),
               "model PPG": ("ppg", None), "model PPG + age/sex/BMI": ("ppg_cov", None),
               "model PPG + age/sex/BMI + PPG features": ("ppg_cov_feat", None)}
    out = []
    for row, (setup, part) in sources.items():
        for seed, block in pooled.get(setup, {}).items():
            one = block if part is None else block[part]
            rec = {"row": row, "seed": seed, "mase": 1.0 if part == "baseline"
                   else one["mean"]["mase"]}
            for t in TARGETS:
                rec[f"{t}_mae"] = one["per_target"][t]["mae"]
                ridge = block.get("covariate_baseline") if part is None else None
                if ridge is not None:
                    rec[f"{t}_minus_ridge"] = ridge["per_target"][t]["model_mae_diff"]
                    rec[f"{t}_minus_ridge_lo"], rec[f"{t}_minus_ridge_hi"] = \
                        ridge["per_target"][t]["model_mae_diff_ci95"]
            out.append(rec)
    return pd.DataFrame(out)


def table(per_seed: pd.DataFrame, first_seed: int) -> pd.DataFrame:
    """The benchmark table: mean and SD over seeds, the interval of ``first_seed``."""
    out = []
    for row in ROWS:
        runs = per_seed[per_seed["row"] == row] if len(per_seed) else per_seed
        rec = {"row": row, "n_seeds": len(runs)}
        if len(runs):
            for t in TARGETS:
                rec[f"{t}_mae"] = runs[f"{t}_mae"].mean()
                rec[f"{t}_mae_sd"] = runs[f"{t}_mae"].std(ddof=1) if len(runs) > 1 else np.nan
            rec["mase"] = runs["mase"].mean()
            first = runs[runs["seed"] == first_seed]
            for col in COLUMNS[7:]:
                if col in first and len(first):
                    rec[col] = first[col].iloc[0]
        out.append(rec)
    return pd.DataFrame(out, columns=COLUMNS)


def _cell(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f}" + (f" ± {sd:.2f}" if np.isfinite(sd) else "")


def _diff(frame_row, t: str) -> str:
    value = frame_row[f"{t}_minus_ridge"]
    if not np.isfinite(value):
        return ""
    return (f"{value:+.2f} [{frame_row[f'{t}_minus_ridge_lo']:+.2f}, "
            f"{frame_row[f'{t}_minus_ridge_hi']:+.2f}]")


def format_table(frame: pd.DataFrame, first_seed: int) -> str:
    lines = [f"{'':<40}{'SBP MAE':>15}{'DBP MAE':>15}{'MASE':>7}"
             f"{f'SBP model-ridge (seed {first_seed})':>31}{'DBP model-ridge':>24}"]
    for _, r in frame.astype({c: float for c in COLUMNS[2:]}).iterrows():
        lines.append(f"{r['row']:<40}{_cell(r['sbp_mae'], r['sbp_mae_sd']):>15}"
                     f"{_cell(r['dbp_mae'], r['dbp_mae_sd']):>15}"
                     f"{(f'{r.mase:.3f}' if np.isfinite(r.mase) else 'n/a'):>7}"
                     f"{_diff(r, 'sbp'):>31}{_diff(r, 'dbp'):>24}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    for flag, value, low in (("--folds", args.folds, 2), ("--epochs", args.epochs, 1),
                             ("--batch_size", args.batch_size, 1), ("--threads", args.threads, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    run(args)


def run(args) -> None:
    """Pack, prepare, cross-validate every setup and seed, then the table."""
    start = time.time()
    data = read_ppgbp(args.data, args.subjects)
    os.makedirs(args.out, exist_ok=True)
    h5 = os.path.join(args.out, f"ppgbp_{len(data['ppg'])}.h5")
    seconds = write_cohort(data, h5)
    paths = prepare(args, h5, seconds)
    features = usable_features(paths["labels"])
    print(f"\nPPG features with values for >= {FEATURE_MIN_PRESENT:.0%} of the records: "
          + (", ".join(features) if features else "none (setup (c) is left out)"), flush=True)
    pooled: Dict[str, Dict[int, dict]] = {}
    for seed in args.seeds:
        for name, flags in setups(features).items():
            print(f"\n##### {name}, seed {seed} ({time.time() - start:.0f} s so far)", flush=True)
            pooled.setdefault(name, {})[seed] = run_cv(args, paths, name, flags, seed)
    per_seed = seed_rows(pooled)
    frame = table(per_seed, args.seeds[0])
    write_csv_atomic(os.path.join(args.out, "bench_real_seeds.csv"), per_seed)
    write_csv_atomic(os.path.join(args.out, "bench_real.csv"), frame)
    print(f"\nPPG-BP, {len(data['ppg'])} subjects, {args.folds}-fold subject-wise CV, seeds "
          f"{' '.join(map(str, args.seeds))}, --arch {args.arch}, {args.epochs} epochs"
          + (f", {args.train_args}" if args.train_args else "")
          + f"; pooled out-of-fold MAE in mmHg (mean ± SD over seeds); "
            f"{time.time() - start:.0f} s\n")
    print(format_table(frame, args.seeds[0]))
    print(f"\nwritten: {os.path.join(args.out, 'bench_real.csv')}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
