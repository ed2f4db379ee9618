"""Subject-wise K-fold cross-validation: train_bp.py once per fold, then the pooled
out-of-fold predictions and metrics.

    python crossval_bp.py --folds 5 --out_dir runs/cv1 \\
        --npz_dir data/npz --labels_csv data/labels.csv --target_cols right_arm_sbp right_arm_dbp \\
        --arch small --epochs 30 [any other train_bp.py flag]

Subjects are dealt into ``--folds`` folds from ``--seed`` (``utils.subject_folds``); fold i
is the test split of the run in ``OUT/fold_<i>/`` (a complete train_bp.py out_dir, trained
with ``--folds K --fold i``), its validation subjects drawn from the other folds by
``--val_ratio``. Every record is therefore predicted once, by the one model that never saw
its subject. Then rank 0 writes:

- ``OUT/cv_predictions.csv``: ``ssoid``, ``fold``, then ``<target>_true``, ``<target>_pred``
  per target; every used record once, fold by fold;
- ``OUT/cv_metrics.json``: ``per_fold`` (each fold's test block of final_metrics.json),
  ``across_folds`` (mean and SD over the folds of each target's MAE and of the mean MAE),
  and ``pooled``: the fields of a final_metrics.json split block over all out-of-fold
  predictions (subject-bootstrap intervals, MASE), with the train-mean baseline of each
  record's own fold, with ``--covariates`` the ridge baseline fitted on each fold's train
  split and the paired model-minus-ridge interval, and the one-point ``calibrated`` block;
- ``OUT/plots/out-of-fold_scatter.png`` and ``out-of-fold_bland_altman.png``.

Killed? Run the same command again: finished folds (with final_metrics.json) are kept,
a fold with bp_last.pth resumes, and the pooling runs at the end. A finished fold made with
other settings is refused. Under ``torchrun`` every fold trains with DDP like any run.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import dataset
import engine
import metrics
import plot_results
import train_bp
import utils
from utils import UserError

MANAGED = ("--folds", "--fold", "--out_dir", "--resume", "--overwrite")
# train_bp.py's flags that name a file or folder (besides --out_dir, set here): passed on
# absolute and compared resolved, so a re-run may spell a folder otherwise (prep/npz,
# ../real/prep/npz) or start from another working directory
PATH_FLAGS = ("npz_dir", "labels_csv", "pretrain", "cache_dir")


def get_args_parser() -> utils.ArgumentParser:
    # no abbreviations: --fold (train_bp.py's, refused here) must not read as --folds
    p = utils.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Every other flag is passed to train_bp.py (see python train_bp.py --help); "
               "--fold, --resume and --overwrite are set per fold by this script.")
    p.add_argument("--folds", type=int, required=True,
                   help="number of subject-wise folds (5 or 10 are usual)")
    p.add_argument("--out_dir", required=True,
                   help="folder of the fold runs (fold_<i>/) and the pooled results")
    return p


def refuse_managed(train_argv: Sequence[str], managed, who: str) -> None:
    """``UserError`` when the train_bp.py flags name one of ``managed``, which ``who`` (a
    script running train_bp.py several times) sets itself."""
    taken = [a for a in train_argv if a.split("=")[0] in managed]
    if taken:
        raise UserError(f"{taken[0].split('=')[0]} is set by {who}; leave it out")


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[object, List[str]]:
    args, train_argv = get_args_parser().parse_known_args(argv)
    refuse_managed(train_argv, MANAGED, "crossval_bp.py for each fold")
    if args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    return args, train_argv


# ----------------------------------------------------------------------------- folds
def fold_dir(out_dir: str, fold: int) -> str:
    return os.path.join(out_dir, f"fold_{fold}")


def fold_argv(train_argv: List[str], out_dir: str, folds: int, fold: int) -> List[str]:
    """train_bp.py's arguments for one fold: --resume after a kill, --overwrite when a
    kill came before the first checkpoint."""
    out = fold_dir(out_dir, fold)
    argv = [*train_argv, "--folds", str(folds), "--fold", str(fold),
            "--out_dir", os.path.abspath(out)]
    if os.path.isfile(os.path.join(out, "bp_last.pth")):
        return argv + ["--resume"]
    if os.path.isdir(out) and os.listdir(out):
        return argv + ["--overwrite"]
    return argv


def absolute_paths(train_argv: List[str], parsed) -> List[str]:
    """``train_argv`` with each path flag given again, absolute, at the end (argparse
    keeps the last value), so that every fold's args.json names the same files whatever
    the spelling and working directory of a re-run; ``parsed`` is a fold's parse of it."""
    extra = [[f"--{key}", os.path.abspath(getattr(parsed, key))] for key in PATH_FLAGS
             if getattr(parsed, key) is not None]
    return [*train_argv, *(a for pair in extra for a in pair)]


def same_setting(key: str, saved, now) -> bool:
    """Equal values; for a path flag, paths to the same file (a relative path saved by an
    older run is read from the working directory)."""
    if key in (*PATH_FLAGS, "out_dir") and isinstance(saved, str) and isinstance(now, str):
        return os.path.realpath(saved) == os.path.realpath(now)
    return saved == now


def check_finished_fold(argv: List[str], out: str) -> None:
    """A finished fold is kept only when it was trained with these settings."""
    with open(os.path.join(out, "args.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    args = train_bp.parse_args(argv)
    changed = [k for k, v in vars(args).items() if k not in train_bp.RESUMABLE_CHANGES
               and k in saved and not same_setting(k, saved[k], v)]
    if changed:
        raise UserError(f"{out} is a finished fold trained with other settings (--{changed[0]} "
                        f"{saved[changed[0]]!r}, now {getattr(args, changed[0])!r}); use a new "
                        f"--out_dir")


def run_folds(args, train_argv: List[str]) -> None:
    for fold in range(args.folds):
        argv = fold_argv(train_argv, args.out_dir, args.folds, fold)
        out = fold_dir(args.out_dir, fold)
        print(f"\n=== fold {fold + 1}/{args.folds}: {out}", flush=True)
        if os.path.isfile(os.path.join(out, "final_metrics.json")):
            check_finished_fold(argv, out)
            print("finished earlier: kept")
            continue
        train_bp.main(argv)


# ----------------------------------------------------------------------------- pooling
def fold_frame(out: str, fold: int, labels: pd.DataFrame, target_cols: Sequence[str],
               ckpt: dict) -> pd.DataFrame:
    """One fold's test predictions with their subject, fold, train-mean baseline and
    (with covariates) ridge and boosted-tree baseline predictions, each fold's own."""
    pred = pd.read_csv(os.path.join(out, "test_predictions.csv"), dtype={"ssoid": str})
    split = pd.read_csv(os.path.join(out, "split.csv"), dtype=str).set_index("ssoid")
    ridge, gbm = train_bp.ridge_of(ckpt), train_bp.gbm_of(ckpt)
    test = labels.drop_duplicates("ssoid").set_index("ssoid").loc[pred["ssoid"]]
    frame = pred.assign(fold=fold, subject=split.loc[pred["ssoid"], "subject_id"].to_numpy())
    for k, col in enumerate(target_cols):
        frame[f"{col}_base"] = ckpt["target_mean"][k]
    x = dataset.encode_covariates(test, ckpt["covariates"])[0] if ridge else None
    for name, fitted in (("ridge", ridge), ("gbm", gbm)):
        if fitted is not None:
            fitted_pred = fitted(x)
            for k, col in enumerate(target_cols):
                frame[f"{col}_{name}"] = fitted_pred[:, k]
    for k, col in enumerate(target_cols if gbm else ()):
        frame[f"{col}_gbm_trees"] = gbm.n_trees[k]
    recal = ckpt.get("recalibration")
    if recal is not None and not recal["applied"]:  # what this fold's own affine map gives
        mapped = metrics.apply_affine(pred[[f"{c}_pred" for c in target_cols]].to_numpy(),
                                      recal["map"], target_cols)
        for k, col in enumerate(target_cols):
            frame[f"{col}_affine"] = np.round(mapped[:, k], engine.MMHG_DECIMALS)
    return frame


def pooled_block(frame: pd.DataFrame, target_cols: Sequence[str],
                 calibration_order: Optional[str], labels: pd.DataFrame,
                 fold_args=None, conformal: Sequence[Optional[dict]] = ()) -> dict:
    """The final_metrics.json split block over every out-of-fold prediction; with
    ``fold_args`` (a fold's train_bp.py arguments) also its cuffless-BP blocks
    (``pooled_clinical``), ``conformal`` being each fold's calibration."""
    cols = list(target_cols)
    t = frame[[f"{c}_true" for c in cols]].to_numpy(np.float64)
    p = frame[[f"{c}_pred" for c in cols]].to_numpy(np.float64)
    subjects = frame["subject"].to_numpy()
    fitted = {}
    for name in ("ridge", "gbm"):  # the GBM only where every fold fitted one
        if f"{cols[0]}_{name}" in frame and frame[f"{cols[0]}_{name}"].notna().all():
            fitted[name] = frame[[f"{c}_{name}" for c in cols]].to_numpy(np.float64)
    block = metrics.split_metrics(t, p, subjects, cols,
                                  frame[[f"{c}_base" for c in cols]].to_numpy(np.float64),
                                  covariate_pred=fitted.get("ridge"), gbm_pred=fitted.get("gbm"))
    if "gbm" in fitted:
        block["gbm_baseline"].update(
            {"model": "lightgbm", "fitted_on": "train of each fold",
             "stopped_on": "val of each fold",
             "n_trees": {c: frame.groupby("fold")[f"{c}_gbm_trees"].first().tolist()
                         for c in cols}})
    order = record_order(frame, labels, calibration_order)
    calibrated = metrics.calibrated_block(t, p, subjects, order, cols)
    if calibrated is not None:
        block["calibrated"] = {"order": calibration_order or "ssoid", **calibrated}
    if fold_args is not None:
        block.update(pooled_clinical(frame, t, p, order, labels, fold_args, conformal))
    return block


def record_order(frame: pd.DataFrame, labels: pd.DataFrame,
                 calibration_order: Optional[str]) -> np.ndarray:
    """The order of each subject's out-of-fold records: its --calibration_order value,
    else its ssoid."""
    return (labels.set_index("ssoid").loc[frame["ssoid"], calibration_order].to_numpy()
            if calibration_order else frame["ssoid"].to_numpy())


def pooled_clinical(frame: pd.DataFrame, t: np.ndarray, p: np.ndarray, order: np.ndarray,
                    labels: pd.DataFrame, fold_args, conformal: Sequence[Optional[dict]]) -> dict:
    """``metrics.clinical_blocks`` over the out-of-fold predictions: each record's interval
    is its fold's (calibrated on that fold's validation subjects), and ``recalibration``
    holds each fold's affine map applied to its own test records."""
    cols = list(fold_args.target_cols)
    rows = labels.drop_duplicates("ssoid").set_index("ssoid").loc[frame["ssoid"]]
    intervals = None
    if f"{cols[0]}_lo" in frame and all(conformal):
        lo, hi = (frame[[f"{c}_{k}" for c in cols]].to_numpy(np.float64) for k in ("lo", "hi"))
        intervals = (lo, hi, {"level": conformal[0]["level"],
                              "n_subjects": sum(c["n_subjects"] for c in conformal)})
    out = metrics.clinical_blocks(t, p, frame["subject"].to_numpy(), cols,
                                  metrics.target_band_sets(cols, fold_args.bands), order,
                                  sex=train_bp.label_column(rows, fold_args.sex_col),
                                  age=train_bp.label_column(rows, fold_args.age_col),
                                  intervals=intervals)
    if f"{cols[0]}_affine" in frame:
        affine = frame[[f"{c}_affine" for c in cols]].to_numpy(np.float64)
        out["recalibration"] = {"fitted_on": "val of each fold", "applied": False,
                                "raw": metrics.regression_metrics(t, p, cols),
                                "affine": metrics.regression_metrics(t, affine, cols)}
    elif fold_args.recalibrate == "affine":
        out["recalibration"] = {"fitted_on": "val of each fold", "applied": True,
                                "note": "every fold applied its affine map: the pooled "
                                        "metrics are of the recalibrated predictions"}
    return out


def across_folds(per_fold: Dict[str, dict], target_cols: Sequence[str]) -> dict:
    """Mean and SD (ddof=1) over the folds of each target's test MAE and of the mean MAE."""
    def summary(values: List[float]) -> dict:
        return {"mae_mean": float(np.mean(values)), "mae_sd": float(np.std(values, ddof=1))}

    blocks = list(per_fold.values())
    return {"per_target": {c: summary([b["per_target"][c]["mae"] for b in blocks])
                           for c in target_cols},
            "mean": summary([b["mean"]["mae"] for b in blocks])}


def pool(args, train_argv: List[str]) -> dict:
    """cv_predictions.csv, cv_metrics.json and the pooled plots, from the fold runs."""
    fold_args = train_bp.parse_args(fold_argv(train_argv, args.out_dir, args.folds, 0))
    target_cols = list(fold_args.target_cols)
    labels = dataset.read_labels(fold_args.labels_csv, target_cols)
    frames, per_fold, conformal = [], {}, []
    for fold in range(args.folds):
        out = fold_dir(args.out_dir, fold)
        ckpt = utils.load_checkpoint(os.path.join(out, "bp_best.pth"))
        conformal.append(ckpt.get("conformal"))
        frames.append(fold_frame(out, fold, labels, target_cols, ckpt))
        with open(os.path.join(out, "final_metrics.json"), encoding="utf-8") as fh:
            per_fold[str(fold)] = json.load(fh)["test"]
    frame = pd.concat(frames, ignore_index=True)
    columns = ["ssoid", "fold"] + [f"{c}_{k}" for c in target_cols for k in ("true", "pred")]
    columns += [f"{c}_{k}" for c in target_cols for k in ("lo", "hi") if f"{c}_{k}" in frame]
    utils.write_csv_atomic(os.path.join(args.out_dir, "cv_predictions.csv"), frame[columns])
    report = {"target_cols": target_cols, "folds": args.folds, "seed": fold_args.seed,
              "per_fold": per_fold, "across_folds": across_folds(per_fold, target_cols),
              "pooled": pooled_block(frame, target_cols, fold_args.calibration_order, labels,
                                     fold_args, conformal)}
    utils.write_json_atomic(os.path.join(args.out_dir, "cv_metrics.json"), report)
    plot_dir = os.path.join(args.out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plot_results.plot_split(plot_dir, "out-of-fold", target_cols,
                            frame[[f"{c}_true" for c in target_cols]].to_numpy(np.float64),
                            frame[[f"{c}_pred" for c in target_cols]].to_numpy(np.float64),
                            report["pooled"], ["png"],
                            (frame["subject"].to_numpy(),
                             record_order(frame, labels, fold_args.calibration_order)))
    return report


def print_summary(report: dict, out_dir: str) -> None:
    pooled, across = report["pooled"], report["across_folds"]
    cov = pooled.get("covariate_baseline")
    print(f"\npooled out-of-fold test metrics over {report['folds']} folds "
          f"({pooled['n_records']} records of {pooled['n_subjects']} subjects), mmHg:")
    print(f"{'target':<16}{'MAE':>8}{'95% CI':>16}{'fold SD':>9}{'mean-MAE':>10}"
          + (f"{'ridge-MAE':>11}{'MAE - ridge [95% CI]':>28}" if cov else ""))
    for c in report["target_cols"]:
        m = pooled["per_target"][c]
        lo, hi = m["mae_ci95"]
        line = (f"{c:<16}{m['mae']:8.2f}{f'[{lo:.2f}, {hi:.2f}]':>16}"
                f"{across['per_target'][c]['mae_sd']:9.2f}"
                f"{pooled['baseline']['per_target'][c]['mae']:10.2f}")
        if cov:
            line += train_bp.fitted_cells(cov["per_target"][c])
        print(line)
    train_bp.print_gbm_table(pooled, report["target_cols"])
    train_bp.print_clinical_table(pooled, report["target_cols"], "pooled out-of-fold")
    print(f"outputs in {out_dir}: cv_predictions.csv, cv_metrics.json, plots/, fold_<i>/")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, train_argv = parse_args(argv)
    parsed = train_bp.parse_args(fold_argv(train_argv, args.out_dir, args.folds, 0))  # fail early
    train_argv = absolute_paths(train_argv, parsed)
    run_folds(args, train_argv)
    if utils.dist_env().is_main:
        print_summary(pool(args, train_argv), args.out_dir)


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
