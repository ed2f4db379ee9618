"""tune_bp.py against the project's defaults and against a random search of the same budget,
on the synthetic cohort, over seeds; with ``--ppgbp``, inside the training folds of a
cross-validation on PPG-BP, beside the defaults and the ridge.

    python benchmarks/bench_tune.py --out bench_out/tune                      # the issue's
    python benchmarks/bench_tune.py --out bench_out/tune_small --n_trials 12 --epochs 4 \\
        --n_subjects 60 --records_per_subject 2 --seq_len 1000 --arch tiny   # 2 CPU cores
    python benchmarks/bench_tune.py --out bench_out/tune_ppgbp --ppgbp --n_trials 20 \\
        --epochs 30 --seeds 1               # PPG-BP (bench_real.py's file), 5 folds

Makes and prepares one synthetic cohort (``bench_fusion.prepare``), then for every seed (which
also draws the subject split): one train_bp.py run with the project's default settings, one
with the other benchmarks' hand settings (batch 32, learning rates 2e-3), and two tune_bp.py
searches of ``--n_trials`` trials over the default space, TPE and random, each ending in the
single test evaluation of its best trial. Reports validation and test MAE (mean over the five
targets), the wall time of each search, and the number of trials TPE needed to reach the best
validation MAE of the random search (``-`` when it never did).

With ``--ppgbp FILE``, PPG-BP is packed and prepared as ``bench_real.py`` does (its functions,
into ``--out``), and for every seed: ``bench_real.py``'s run of the model on PPG + age, sex,
BMI (``crossval_bp.py --folds K``, batch 32, learning rates 2e-3: "defaults" below), and for
each fold i one TPE study of ``--n_trials`` trials with the same fixed flags less the
searched ones and ``--folds K --fold i`` (trials scored on validation subjects drawn from
the training folds; fold i is evaluated once, for the best trial). The best trial of each
fold predicts that fold; those out-of-fold predictions are pooled by crossval_bp.py's own
pooling, with the ridge (and boosted trees) on age, sex and BMI fitted on each fold's train
split. Reports pooled out-of-fold SBP and DBP MAE of the defaults, the tuned models and the
ridge, each model's MAE minus the ridge's with its paired 95 % subject-bootstrap interval,
each fold's best trial beside the defaults' run of that fold, and the wall time of this
invocation (a re-run keeps finished folds and trials, so it then counts only what was left).
Prints and writes ``OUT/tune_ppgbp_table.md``; asserts nothing.
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
import bench_real  # noqa: E402
import crossval_bp  # noqa: E402
import dataset  # noqa: E402
import train_bp  # noqa: E402
import tune_bp  # noqa: E402
import utils  # noqa: E402
from bench_fusion import TARGETS, get_args_parser as fusion_parser, prepare  # noqa: E402
from utils import UserError, run_cli, write_text_atomic  # noqa: E402

HAND = ["--batch_size", "32", "--lr_backbone", "2e-3", "--lr_head", "2e-3"]


def get_args_parser():
    p = fusion_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(out="bench_out/tune", epochs=None)
    p.add_argument("--n_trials", type=int, default=20, help="trials of each search")
    p.add_argument("--ppgbp", nargs="?", const=bench_real.DATA, default=None, metavar="FILE",
                   help="the PPG-BP npz (bench_real.py --data; alone: ../shared/data/ppgbp/'s): "
                        "tune inside the training folds of a --folds cross-validation on it "
                        "instead of the synthetic cohort")
    p.add_argument("--folds", type=int, default=5, help="(--ppgbp) subject-wise CV folds")
    p.add_argument("--subjects", type=int, default=None,
                   help="(--ppgbp) only the first N subjects (a smoke run); default: all")
    return p


def check_args(args) -> None:
    """Epochs default to 10 (synthetic) or bench_real.py's 30 (PPG-BP)."""
    if args.epochs is None:
        args.epochs = bench_real.get_args_parser().get_default("epochs") if args.ppgbp else 10
    for flag, value, low in (("--epochs", args.epochs, 1), ("--n_trials", args.n_trials, 1),
                             ("--folds", args.folds, 2)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")


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


# ============================================================================= PPG-BP
def real_args(args, seed: int):
    """bench_real.py's arguments for one seed: its own defaults (batch, threads, workers)."""
    return bench_real.get_args_parser().parse_args(
        ["--out", args.out, "--data", args.ppgbp, "--folds", str(args.folds),
         "--epochs", str(args.epochs), "--arch", args.arch, "--seeds", str(seed)]
        + (["--subjects", str(args.subjects)] if args.subjects else []))


def prepare_ppgbp(args) -> Dict[str, str]:
    """PPG-BP packed and prepared into ``--out`` by bench_real.py's steps 1-2."""
    real = real_args(args, args.seeds[0])
    data = bench_real.read_ppgbp(real.data, real.subjects)
    os.makedirs(args.out, exist_ok=True)
    h5 = os.path.join(args.out, f"ppgbp_{len(data['ppg'])}.h5")
    return bench_real.prepare(real, h5, bench_real.write_cohort(data, h5))


def fold_search(args, paths: Dict[str, str], seed: int, fold: int) -> dict:
    """One TPE study inside the training folds of ``fold``; its best.json."""
    real = real_args(args, seed)
    out = os.path.join(args.out, f"tune_seed{seed}", f"fold_{fold}")
    tune_bp.main(["--out_dir", out, "--n_trials", str(args.n_trials), "--sampler", "tpe",
                  "--npz_dir", paths["npz"], "--labels_csv", paths["labels"],
                  "--target_cols", *bench_real.TARGETS, "--arch", real.arch,
                  "--epochs", str(real.epochs), "--seed", str(seed), "--num_workers", "0",
                  "--threads", str(real.threads), *bench_real.setups([])["ppg_cov"],
                  "--folds", str(args.folds), "--fold", str(fold)])
    with open(os.path.join(out, "best.json"), encoding="utf-8") as fh:
        return json.load(fh)


def pooled_best(bests: List[dict], labels_csv: str) -> dict:
    """crossval_bp.py's pooled block over each fold's best trial's test predictions."""
    labels = dataset.read_labels(labels_csv, bench_real.TARGETS)
    frames = []
    for fold, best in enumerate(bests):
        ckpt = utils.load_checkpoint(os.path.join(best["out_dir"], "bp_best.pth"))
        frames.append(crossval_bp.fold_frame(best["out_dir"], fold, labels, bench_real.TARGETS,
                                             ckpt))
    return crossval_bp.pooled_block(pd.concat(frames, ignore_index=True), bench_real.TARGETS,
                                    None, labels)


def ppgbp_seed(args, paths: Dict[str, str], seed: int) -> dict:
    """Defaults under crossval, the tuned folds pooled, and their wall times."""
    tic = time.perf_counter()
    defaults = bench_real.run_cv(real_args(args, seed), paths, "ppg_cov",
                                 bench_real.setups([])["ppg_cov"], seed)
    mid = time.perf_counter()
    bests = [fold_search(args, paths, seed, fold) for fold in range(args.folds)]
    return {"seed": seed, "defaults": defaults, "tuned": pooled_best(bests, paths["labels"]),
            "bests": bests, "default_folds": default_folds(args, seed),
            "defaults_s": mid - tic, "tuned_s": time.perf_counter() - mid}


def default_folds(args, seed: int) -> List[dict]:
    """final_metrics.json of each fold of bench_real.run_cv's run (its folder naming)."""
    out = os.path.join(args.out, "cv", f"ppg_cov_seed{seed}")
    reports = []
    for fold in range(args.folds):
        path = os.path.join(crossval_bp.fold_dir(out, fold), "final_metrics.json")
        with open(path, encoding="utf-8") as fh:
            reports.append(json.load(fh))
    return reports


def _vs_ridge(block: dict, t: str) -> str:
    ridge = block["covariate_baseline"]["per_target"][t]
    lo, hi = ridge["model_mae_diff_ci95"]
    return f"{ridge['model_mae_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def ppgbp_report(rows: List[dict], args) -> str:
    sbp, dbp = bench_real.TARGETS
    n = rows[0]["tuned"]["n_subjects"]
    lines = [f"PPG-BP, {n} subjects, {args.folds}-fold subject-wise CV, --arch {args.arch}, "
             f"{args.epochs} epochs, {args.n_trials} TPE trials per fold; pooled out-of-fold "
             f"MAE in mmHg; model - ridge: paired 95 % subject-bootstrap interval", "",
             "| seed | fit | SBP MAE | DBP MAE | SBP model - ridge | DBP model - ridge "
             "| wall time (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, block, seconds in (
                ("defaults (bench_real: batch 32, lr 2e-3)", r["defaults"], r["defaults_s"]),
                ("tuned (best trial per fold)", r["tuned"], r["tuned_s"])):
            lines.append(f"| {r['seed']} | {name} | {block['per_target'][sbp]['mae']:.2f} | "
                         f"{block['per_target'][dbp]['mae']:.2f} | {_vs_ridge(block, sbp)} | "
                         f"{_vs_ridge(block, dbp)} | {seconds:.0f} |")
        for name, key in (("ridge age/sex/BMI", "covariate_baseline"),
                          ("GBM age/sex/BMI", "gbm_baseline"), ("train mean", "baseline")):
            if key in r["tuned"]:
                fit = r["tuned"][key]["per_target"]
                lines.append(f"| {r['seed']} | {name} | {fit[sbp]['mae']:.2f} | "
                             f"{fit[dbp]['mae']:.2f} | | | |")
    lines += ["", "Per fold, MAE mean of SBP and DBP: the best trial's validation score "
              "(what the search chose on) and its test fold, beside the defaults' run of "
              "that fold", "", "| seed | fold | best trial | val tuned / defaults "
              "| test tuned / defaults | settings |", "|---|---|---|---|---|---|"]
    for r in rows:
        for fold, (best, base) in enumerate(zip(r["bests"], r["default_folds"])):
            lines.append(f"| {r['seed']} | {fold} | {best['best_trial']} | "
                         f"{best['val']['mean']['mae']:.2f} / {base['val']['mean']['mae']:.2f} | "
                         f"{best['test']['mean']['mae']:.2f} / "
                         f"{base['test']['mean']['mae']:.2f} | "
                         f"{tune_bp.settings_text(best['params'])} |")
    return "\n".join(lines)


def run_ppgbp(args) -> None:
    paths = prepare_ppgbp(args)
    rows = []
    for seed in args.seeds:
        rows.append(ppgbp_seed(args, paths, seed))
        print(f"seed {seed}: defaults {rows[-1]['defaults']['mean']['mae']:.2f}, tuned "
              f"{rows[-1]['tuned']['mean']['mae']:.2f} mmHg (mean of SBP and DBP)", flush=True)
    text = ppgbp_report(rows, args)
    write_text_atomic(os.path.join(args.out, "tune_ppgbp_table.md"), text + "\n")
    print(text)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    if args.ppgbp:
        run_ppgbp(args)
        return
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
