"""Fine-tune ECG/PPG encoders to predict several blood-pressure targets at once.

    python train_bp.py --npz_dir data/npz --labels_csv data/labels.csv \
        --pretrain 1_lead_ECGFounder.pth --out_dir runs/bp_run1 \
        --target_cols right_arm_dbp left_arm_mbp right_arm_pp right_arm_sbp left_arm_sbp \
        --modality both --epochs 40 --batch_size 256 --lr_backbone 1e-5 --lr_head 3e-4

Splits subjects (not records) into train/val/test, trains with AMP on CUDA, keeps the
epoch with the lowest mean validation MAE, and writes the files of CONTRACT section 3
into --out_dir: bp_best.pth, bp_last.pth, args.json, split.csv, split_audit.json,
history.csv, skipped_records.csv, val/test_predictions.csv and final_metrics.json.
split_audit.json says how subjects were found (--subject_col) and checks that no recording
(prepare's signal_digest) sits in two splits; a run whose split would do that is refused.
A killed run continues with the same command plus --resume.

Several GPUs or nodes: the same command under torchrun trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs); --batch_size is per process:

    torchrun --nproc_per_node=8 train_bp.py ... --batch_size 32     # 256 per step

Rank 0 alone reads and writes --out_dir and checks the records; it hands the split, the
statistics and any checkpoint to the other ranks, so they need only --npz_dir (and
--cache_dir, which the first process of each node builds).
"""
from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import backbones
import dataset
import engine
import losses
import metrics
import physio
import plot_results
import utils
from prepare_kailuan_npz import DIGEST_COLUMN, settings_path
from utils import UserError

CONSTRAINS = ("none", "clip", "sigmoid", "tanh")
# Flags that may change between a killed run and its --resume; every other must match.
MIN_SPLIT_SUBJECTS = 5  # below this a split's metrics are anecdotes (a warning says so)
RESUMABLE_CHANGES = {"resume", "overwrite", "num_workers", "threads", "device", "cache_dir",
                     "trust_checkpoint", "compile"}


# ============================================================================= arguments
def get_args_parser() -> utils.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--npz_dir", required=True, help="folder of <ssoid>.npz from prepare_kailuan_npz.py")
    data.add_argument("--labels_csv", required=True, help="CSV with ssoid (+ subject_id) and the targets")
    data.add_argument("--out_dir", required=True, help="where every output file is written")
    data.add_argument("--target_cols", nargs="+", required=True,
                      help="BP columns to predict; their order is the output order")
    data.add_argument("--covariates", nargs="+", default=[],
                      help="labels-CSV columns (e.g. age sex bmi, from prepare's --extra_cols) "
                           "fed to the head beside the signals; numbers are standardised, "
                           "two-valued or few-valued columns become 0/1 inputs, missing "
                           "values get the train median/mode and a missing indicator; adds "
                           "a ridge-on-covariates baseline to final_metrics.json")
    data.add_argument("--gbm_baseline", default="on", choices=("on", "off"),
                      help="with --covariates: gradient-boosted trees (LightGBM) on the same "
                           "covariates, fitted on the train split with the number of trees "
                           "chosen on validation, reported beside the ridge (gbm_baseline). "
                           "Seconds for thousands of records; off skips the fit (e.g. in "
                           "tuning trials)")
    data.add_argument("--subject_col", default=None,
                      help="labels-CSV column that names each record's person for the "
                           "subject-wise split (e.g. uid, or subject_id from prepare's "
                           "--subject_key name age sex); default: subject_id when the CSV has "
                           "it, else the part of ssoid before the first '_'. Records of one "
                           "person under two subjects can land in train and test")
    data.add_argument("--no_ridge_offset", action="store_true",
                      help="with --covariates the model adds the ridge regression of the "
                           "targets on the covariates (fitted on the train split) to its "
                           "output and learns the residual, starting at zero: it starts as "
                           "that ridge, is evaluated before training (epoch 0) and keeps the "
                           "ridge when the signals add nothing on validation. This flag "
                           "turns that floor off (the head learns the whole mapping)")
    data.add_argument("--val_ratio", type=float, default=0.1, help="fraction of subjects for validation")
    data.add_argument("--test_ratio", type=float, default=0.2, help="fraction of subjects for test")
    data.add_argument("--seed", type=int, default=666, help="seed of the split, the init and the shuffling")
    data.add_argument("--folds", type=int, default=0,
                      help="K-fold cross-validation: deal the subjects into K folds from --seed "
                           "and use fold --fold as the test split (--test_ratio is then "
                           "unused; validation takes --val_ratio of the other subjects); "
                           "0: one --val_ratio/--test_ratio split. crossval_bp.py runs every "
                           "fold and pools them")
    data.add_argument("--fold", type=int, default=0,
                      help="with --folds K: the fold (0 to K-1) that is the test split")
    data.add_argument("--calibration_order", default=None,
                      help="labels-CSV column (e.g. a visit date or number) whose first value "
                           "per subject picks the record that calibrates the others in the "
                           "one-point 'calibrated' metrics (default: ssoid order)")
    data.add_argument("--no_zscore", action="store_true",
                      help="feed raw signals instead of per-record, per-channel z-scored ones")
    data.add_argument("--filter", default="auto", choices=("auto",) + dataset.FILTERS,
                      help="band-pass each record before z-scoring: ecgfounder = ECGFounder's "
                           "pre-training preprocessing of the ECG (0.67-40 Hz, mains notch) "
                           "and 0.5-8 Hz for the PPG; needs the records' sampling rate "
                           "(prep's --record_seconds or --fs_ecg/--fs_ppg). auto: ecgfounder "
                           "with --pretrain when the rate is known (the encoder then sees "
                           "inputs like its pre-training's), else none (from a random start "
                           "the two measured alike). Stored in the checkpoint; predict_bp.py "
                           "filters alike")
    data.add_argument("--mains_hz", type=float, default=None,
                      help="mains frequency notched out of the ECG by --filter ecgfounder; "
                           f"default: prep's --mains_hz (its <labels stem>_prepare.json, when "
                           f"it computed --features), else {physio.MAINS_HZ:g}")
    data.add_argument("--augment", nargs="+", default=["all"],
                      choices=(*dataset.AUGMENTATIONS, "all", "none"), metavar="PART",
                      help="training-time augmentation (evaluation and prediction see the "
                           "whole record), each part sized relative to the record, so alike "
                           "with --no_zscore: shift (drop up to 10%% of the record's start "
                           "from both channels alike, so the ECG-to-PPG delay survives, and "
                           "repeat the last value), gain (x0.8-1.25 per channel), noise (SD "
                           "0.05 of the channel's), wander (a 0.05-0.5 Hz sine of up to 0.2 "
                           "of the channel's SD: drift and breathing, slower than any pulse; "
                           "left out, with a note, when the records' sampling rate is "
                           "unknown); 'all' for every part (the default: "
                           "it helped a little on the synthetic cohort and on PPG-BP), 'none' "
                           "for none. Draws depend on --seed, the epoch and the record only, "
                           "so resume stays exact")
    data.add_argument("--cache_dir", default=None,
                      help="pack the checked records, ready for the model, into one float32 "
                           "memory-mapped file here (built once, reused by later runs): "
                           "batches are then read in the training process with no "
                           "decompression; costs N*L*2*4 bytes of disk")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="DataLoader worker processes per training process for reading "
                           "npz files (unused with --cache_dir) (default: min(4, CPU cores), "
                           "%(default)s here)")
    model = p.add_argument_group("model")
    model.add_argument("--arch", default="ecgfounder", choices=sorted(backbones.ARCHS),
                       help="Net1D size; ecgfounder is the published one that --pretrain loads into")
    model.add_argument("--modality", default="both", choices=tuple(backbones.MODALITY_CHANNELS),
                       help="signals the model reads; none: covariates only (the same head "
                            "on --covariates alone, to compare with the signal models)")
    model.add_argument("--fusion", default=backbones.DEFAULT_FUSION, choices=("late", "mid", "early"),
                       help="how ECG and PPG meet with --modality both: late pools each encoder "
                            "(loses pulse-arrival timing), mid fuses time-resolved feature maps, "
                            "early reads both channels with one encoder")
    model.add_argument("--pretrain", default=None, help="1_lead_ECGFounder.pth or a bp_best.pth")
    model.add_argument("--trust_checkpoint", action="store_true",
                       help="allow full unpickling of --pretrain (only for a file you trust)")
    model.add_argument("--freeze_backbone", action="store_true", help="train the head only (linear probe)")
    model.add_argument("--constrain", default="none", choices=CONSTRAINS,
                       help="bound every prediction to [train min - y_margin, train max + y_margin]")
    model.add_argument("--y_margin", type=float, default=5.0, help="mmHg added to the train range for --constrain")
    model.add_argument("--head_hidden", type=int, default=256, help="width of the MLP head")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout in the head")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=40,
                       help="passes over the train split (fewer with --patience)")
    optim.add_argument("--batch_size", type=int, default=256,
                       help="records per forward pass in each process (per GPU)")
    optim.add_argument("--accum_steps", type=int, default=1,
                       help="batches whose gradients are summed before each optimiser step: "
                            "records per step = batch_size x accum_steps x processes")
    optim.add_argument("--lr_backbone", type=float, default=1e-5, help="AdamW lr of the encoders")
    optim.add_argument("--lr_head", type=float, default=3e-4, help="AdamW lr of everything else")
    optim.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW weight decay (never on biases and normalisation weights)")
    optim.add_argument("--warmup_epochs", type=float, default=1.0,
                       help="linear warm-up before the cosine decay, in epochs")
    optim.add_argument("--loss", default="huber", choices=losses.LOSSES,
                       help="loss on normalised targets (each target weighs the same)")
    optim.add_argument("--huber_delta", type=float, default=1.0, help="huber transition, in target SDs")
    optim.add_argument("--alpha", type=float, default=1.0, help="mae_pearson: weight of 1 - r")
    optim.add_argument("--beta", type=float, default=1.0, help="mae_pearson: weight of MAE")
    optim.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 turns it off")
    optim.add_argument("--patience", type=int, default=10,
                       help="stop after this many epochs without a better val MAE; 0 never stops")
    report = p.add_argument_group("evaluation (final_metrics.json; docs/metrics.md)")
    report.add_argument("--interval", type=float, default=0.9,
                        help="split-conformal prediction intervals at this level, calibrated on "
                             "the validation subjects (each subject's largest error is one "
                             "score, so a new person's readings all lie inside with at least "
                             "this probability): <target>_lo/_hi columns in the prediction "
                             "CSVs and predict_bp.py's output, coverage in the metrics; needs "
                             "at least level/(1-level) validation subjects (9 for 0.9); 0: off")
    report.add_argument("--interval_mondrian", action="store_true",
                        help="one interval quantile per band of the predicted value (wider "
                             "where errors are larger, e.g. at high BP) instead of one per "
                             "target; a band with too few validation subjects uses the overall")
    report.add_argument("--recalibrate", default="none", choices=("none", "affine"),
                        help="affine: report (and let predict_bp.py apply) the least-squares "
                             "map truth ~ a x prediction + b per target fitted on the validation "
                             "split, which undoes part of the regression to the mean; none (the "
                             "default) reports the raw predictions. Both are always in the "
                             "'recalibration' block")
    report.add_argument("--bands", nargs="+", default=None, metavar="SET",
                        help="BP band set of each target for the by-range metrics, in "
                             "--target_cols order: sbp, dbp, mbp, pp or auto (from the name: "
                             "sbp/dbp/mbp/pp anywhere in it; the default for every target)")
    report.add_argument("--sex_col", default="sex",
                        help="labels-CSV column of the subjects' sex: subgroup MAE and the ISO "
                             "81060-2 population audit (skipped, with a note, when absent)")
    report.add_argument("--age_col", default="age",
                        help="labels-CSV column of the age in years: subgroup MAE by age band")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="auto: CUDA when available, else CPU")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads of each training process; 0: torch's default (one "
                          "per core). Give the cores the job was allotted (SLURM: "
                          "$SLURM_CPUS_PER_TASK): threads beyond them wait for busy cores, "
                          "measured 10-25x slower for a small model on 2 shared cores")
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                     help="mixed precision on CUDA: auto = bf16 where supported, else fp16")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out_dir from its bp_last.pth")
    run.add_argument("--overwrite", action="store_true",
                     help="write into an --out_dir that already holds another run")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model: faster steps on GPU after a compile of "
                          "a minute or more; needs Triton (GPU) or a C++ compiler (CPU)")
    return p


def parse_args(argv: Optional[Sequence[str]]):
    args = get_args_parser().parse_args(argv)
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch_size must be at least 1"),
        (args.accum_steps >= 1, "--accum_steps must be at least 1"),
        (args.num_workers >= 0, "--num_workers must be 0 or more"),
        (args.threads >= 0, "--threads must be 0 or more"),
        (args.lr_backbone >= 0 and args.lr_head > 0, "--lr_head must be > 0 and --lr_backbone >= 0"),
        (args.weight_decay >= 0, "--weight_decay must be 0 or more"),
        (args.grad_clip >= 0, "--grad_clip must be 0 or more"),
        (args.patience >= 0, "--patience must be 0 or more"),
        (args.y_margin >= 0, "--y_margin must be 0 or more"),
        (args.mains_hz is None or args.mains_hz > 0, "--mains_hz must be a positive frequency"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.warmup_epochs >= 0, "--warmup_epochs must be 0 or more"),
        (len(set(args.target_cols)) == len(args.target_cols), "--target_cols names a column twice"),
        (args.val_ratio > 0, "--val_ratio must be above 0: the best epoch is chosen on the "
                             "validation split"),
        (args.test_ratio > 0, "--test_ratio must be above 0: final_metrics.json reports the "
                              "test split"),
        (args.folds == 0 or args.folds >= 2, "--folds must be 0 (no cross-validation) or at "
                                             "least 2"),
        (args.folds > 0 or args.fold == 0, "--fold needs --folds"),
        (args.interval == 0 or 0 < args.interval < 1,
         "--interval must be 0 (off) or a level between 0 and 1, e.g. 0.9"),
        (args.bands is None or len(args.bands) == len(args.target_cols),
         "--bands needs one band set per --target_cols entry"),
        (args.bands is None or set(args.bands) <= {"auto", *metrics.BAND_EDGES},
         f"--bands takes auto or {', '.join(metrics.BAND_EDGES)}"),
        (len(set(args.covariates)) == len(args.covariates), "--covariates names a column twice"),
        (args.modality != "none" or args.covariates,
         "--modality none is a covariates-only model: give --covariates"),
        (args.modality != "none" or not args.pretrain,
         "--pretrain needs an encoder: not with --modality none"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    clash = set(args.covariates) & {"ssoid", "subject_id", args.subject_col, *args.target_cols}
    if clash:
        raise UserError(f"--covariates: {', '.join(sorted(clash))} is an id or a target, "
                        f"not a covariate")
    if args.subject_col in args.target_cols:
        raise UserError(f"--subject_col: {args.subject_col} is a target, not a subject")
    if "none" in args.augment and len(args.augment) > 1:
        raise UserError(f"--augment none cannot be combined with other parts, got "
                        f"{' '.join(args.augment)}")
    if "all" in args.augment:
        args.augment = list(dataset.AUGMENTATIONS)
    elif "none" in args.augment:
        args.augment = []
    if args.modality != "both":
        args.fusion = "none"
    return args


# ============================================================================= out_dir
def check_resume(args, saved: dict, world_size: int) -> None:
    """A resume must repeat the killed run's settings and number of processes."""
    for key, value in vars(args).items():
        if key in RESUMABLE_CHANGES or key not in saved["args"]:
            continue
        if saved["args"][key] != value:
            raise UserError(f"--resume: --{key} is {value!r} but the run in {args.out_dir} "
                            f"used {saved['args'][key]!r}; resume with the same settings")
    if saved.get("world_size", 1) != world_size:
        raise UserError(f"--resume: the run in {args.out_dir} trained with "
                        f"{saved.get('world_size', 1)} process(es), this one has {world_size}; "
                        f"resume with the same number (torchrun --nnodes/--nproc_per_node)")


# ============================================================================= data
def load_table(args) -> Tuple[pd.DataFrame, str]:
    """Usable label rows with their subject (CONTRACT section 3), and the rule in words
    that gave the subjects."""
    labels = dataset.read_labels(args.labels_csv, args.target_cols,
                                 text=[args.subject_col] if args.subject_col else [])
    columns = f"(columns: {', '.join(map(str, labels.columns))})"
    missing = [c for c in args.covariates if c not in labels.columns]
    if missing:
        raise UserError(f"--covariates: labels CSV {args.labels_csv} has no column "
                        f"{', '.join(missing)} {columns}")
    if args.calibration_order and args.calibration_order not in labels.columns:
        raise UserError(f"--calibration_order: labels CSV {args.labels_csv} has no column "
                        f"{args.calibration_order} {columns}")
    if args.subject_col and args.subject_col not in labels.columns:
        raise UserError(f"--subject_col: labels CSV {args.labels_csv} has no column "
                        f"{args.subject_col} {columns}")
    rows, dropped = dataset.usable_rows(labels, args.npz_dir, args.target_cols)
    print(f"labels: {len(labels)} rows, {len(rows)} usable"
          + "".join(f"; dropped {n} ({why})" for why, n in dropped.items()))
    if args.calibration_order:
        rows[args.calibration_order] = calibration_order(rows, args.calibration_order,
                                                         args.labels_csv)
    rows["subject_id"], rule = record_subjects(rows, args.subject_col, args.labels_csv)
    print(f"subjects: {rule}")
    return rows, rule


def calibration_order(rows: pd.DataFrame, col: str, source: str) -> pd.Series:
    """The --calibration_order column of the usable rows, checked before training: every
    row needs a value (a blank cell cannot say which record came first), and text is
    compared as text (e.g. ISO dates)."""
    values = rows[col]
    empty = values.isna() | (values.astype(str).str.strip() == "")
    if empty.any():
        raise UserError(f"--calibration_order: column {col} of labels CSV {source} is empty "
                        f"in {int(empty.sum())} usable rows (ssoid "
                        f"{', '.join(rows.loc[empty, 'ssoid'].astype(str).head(5))}); every "
                        f"record needs a value to tell which record of a subject came first")
    return values if pd.api.types.is_numeric_dtype(values) else values.astype(str)


def record_subjects(rows: pd.DataFrame, subject_col: Optional[str],
                    source: str) -> Tuple[pd.Series, str]:
    """Each row's subject as text and the rule that gave it, in words: the ``subject_col``
    column, else ``subject_id``, else the part of ``ssoid`` before the first ``_``."""
    col = subject_col or ("subject_id" if "subject_id" in rows.columns else None)
    if col is None:
        return rows["ssoid"].map(utils.subject_of), (
            "the part of ssoid before the first '_' (the labels CSV has no subject_id column; "
            "set one with prepare's --subject_key, or name a column with --subject_col)")
    values = rows[col].astype(object)
    empty = values.isna() | (values.astype(str).str.strip() == "")
    if empty.any():
        raise UserError(f"labels CSV {source}: {int(empty.sum())} usable rows have an empty "
                        f"{col}" + (" (--subject_col)" if subject_col else ""))
    how = "--subject_col" if subject_col else "default; --subject_col names another"
    return values.astype(str), f"column {col} of the labels CSV ({how})"


def folder_channels(args) -> List[str]:
    """The signals of --npz_dir (its manifest's ``channels``); ``UserError`` when --modality
    needs one that the cohort lacks (prepared with --ecg_key none or --ppg_key none)."""
    channels = utils.npz_channels(args.npz_dir)
    missing = utils.missing_channels(backbones.MODALITY_CHANNELS[args.modality], channels)
    if missing:
        raise UserError(f"--modality {args.modality} needs the {' and '.join(missing).upper()} "
                        f"signal, but --npz_dir {args.npz_dir} holds only "
                        f"{', '.join(channels).upper()} (its manifest's channels); use "
                        f"--modality {channels[0]}")
    return channels


def check_files(args, rows: pd.DataFrame) -> Tuple[pd.DataFrame, int, pd.DataFrame]:
    """Rows whose npz passed the check, the common length, and the skipped table."""
    folder_channels(args)  # refuses a --modality whose signal the manifest says is absent
    used = [utils.NPZ_CHANNELS[c] for c in backbones.MODALITY_CHANNELS[args.modality]]
    good, length, skipped = dataset.check_records(list(rows["ssoid"]), args.npz_dir,
                                                  channels=used)
    if len(skipped):
        print(f"npz check: skipping {len(skipped)} bad records (listed in skipped_records.csv)")
    if not good:
        raise UserError(f"--npz_dir {args.npz_dir}: none of the {len(rows)} listed npz files "
                        f"is usable (first problem: {skipped['ssoid'].iloc[0]}: "
                        f"{skipped['reason'].iloc[0]})")
    return rows[rows["ssoid"].isin(set(good))].reset_index(drop=True), length, skipped


def assign_split(args, rows: pd.DataFrame, rule: str) -> Tuple[pd.DataFrame, dict]:
    """Rows with their ``split`` (and with --folds their subject's ``fold``), and the
    split audit; a split that separates two copies of one recording is refused."""
    if args.folds:
        split = utils.split_by_fold(rows["subject_id"], args.folds, args.fold, args.val_ratio,
                                    args.seed)
        fold_of = utils.subject_folds(rows["subject_id"], args.folds, args.seed)
        rows = rows.assign(split=rows["subject_id"].map(split),
                           fold=rows["subject_id"].map(fold_of))
    else:
        split = utils.split_subjects(rows["subject_id"], args.val_ratio, args.test_ratio,
                                     args.seed)
        rows = rows.assign(split=rows["subject_id"].map(split))
    counts = {s: (int((rows["split"] == s).sum()),
                  rows.loc[rows["split"] == s, "subject_id"].nunique())
              for s in ("train", "val", "test")}
    print("split: " + ", ".join(f"{s} {n} records / {k} subjects" for s, (n, k) in counts.items()))
    few = [f"{s} {k}" for s, (_, k) in counts.items() if k < MIN_SPLIT_SUBJECTS]
    if few:
        print(f"warning: few subjects in a split ({', '.join(few)}; fewer than "
              f"{MIN_SPLIT_SUBJECTS}): its metrics rest on so few people that they mean little, "
              f"and a val split that small picks the kept epoch by chance; use more subjects "
              f"or larger --val_ratio/--test_ratio")
    audit = split_audit(rows["ssoid"], rows["subject_id"], rows["split"], rule,
                        rows[DIGEST_COLUMN] if DIGEST_COLUMN in rows.columns else None)
    if audit["digest_check"] == "failed":
        raise UserError(digest_error(audit["digest_conflicts"], args.labels_csv))
    if audit["one_record_subjects_only"]:
        print(f"warning: every subject has exactly one record ({audit['records']} records / "
              f"{audit['subjects']} subjects; subject = {audit['subject_rule']}): if a person "
              f"has several records, they may sit in train and test. Name the person with "
              f"--subject_key at prep (e.g. --subject_key name age sex) or --subject_col here; "
              f"ignore this only if the cohort truly has one record per person")
    return rows, audit


def _per_subject(subjects: pd.Series) -> dict:
    counts = subjects.value_counts()
    spread = ({"min": int(counts.min()), "median": float(counts.median()),
               "max": int(counts.max())} if len(counts) else None)
    return {"records": int(len(subjects)), "subjects": int(len(counts)),
            "records_per_subject": spread, "one_record_subjects": int((counts == 1).sum())}


def split_audit(ids: Sequence[str], subjects: Sequence[str], splits: Sequence[str], rule: str,
                digests: Optional[Sequence[object]] = None) -> dict:
    """What split_audit.json holds: records, subjects and records per subject overall and
    per split, the subject ``rule``, ``one_record_subjects_only``, the subjects found in more
    than one split (0 for a subject-wise split), and the digest check: two records with one
    signal digest (the same recording) in different splits make it ``failed``, with the pairs
    in ``digest_conflicts``. Missing digests are not compared."""
    frame = pd.DataFrame({"ssoid": list(ids), "subject": list(subjects), "split": list(splits)})
    audit = {"subject_rule": rule, **_per_subject(frame["subject"])}
    audit["one_record_subjects_only"] = bool(
        audit["subjects"] and audit["one_record_subjects"] == audit["subjects"])
    audit["subjects_in_several_splits"] = int(
        (frame.groupby("subject")["split"].nunique() > 1).sum())
    audit["splits"] = {s: _per_subject(frame.loc[frame["split"] == s, "subject"])
                       for s in ("train", "val", "test")}
    if digests is None:
        audit["digest_check"] = f"no {DIGEST_COLUMN} column"
        return audit
    frame["digest"] = list(digests)
    frame = frame[frame["digest"].notna() & (frame["digest"].astype(str).str.strip() != "")]
    shared = frame[frame["digest"].duplicated(keep=False)]
    conflicts = []
    for digest, part in shared.groupby("digest", sort=False):
        first = part.iloc[0]
        for _, other in part[part["split"] != first["split"]].iterrows():
            conflicts.append({"digest": str(digest), "ids": [first["ssoid"], other["ssoid"]],
                              "splits": [first["split"], other["split"]]})
    audit["records_sharing_a_digest"] = int(len(shared))
    audit["digest_check"] = "failed" if conflicts else "passed"
    if conflicts:
        audit["digest_conflicts"] = conflicts
    return audit


def digest_error(conflicts: List[dict], source: str) -> str:
    """The one-line refusal of a split that separates copies of one recording."""
    first = conflicts[0]
    (a, b), (sa, sb) = first["ids"], first["splits"]
    more = f" ({len(conflicts) - 1} more such pairs)" if len(conflicts) > 1 else ""
    return (f"labels CSV {source}: records {a} ({sa}) and {b} ({sb}) hold the same recording "
            f"({DIGEST_COLUMN} {first['digest']}) but fall in different splits{more}; give "
            f"them one subject (prepare's --subject_key, or --subject_col) or drop the copy")


def write_run_files(args, rows: pd.DataFrame, skipped: pd.DataFrame, audit: dict) -> None:
    """The files known before training: args.json, split.csv (with ``fold`` under
    --folds), split_audit.json, skipped_records.csv."""
    os.makedirs(args.out_dir, exist_ok=True)
    utils.write_json_atomic(os.path.join(args.out_dir, "split_audit.json"), audit)
    utils.write_json_atomic(os.path.join(args.out_dir, "args.json"), vars(args))
    utils.write_csv_atomic(os.path.join(args.out_dir, "split.csv"),
                           rows[["ssoid", "subject_id", "split"] + (["fold"] if args.folds else [])])
    utils.write_csv_atomic(os.path.join(args.out_dir, "skipped_records.csv"), skipped)


def target_stats(train: pd.DataFrame, target_cols: Sequence[str], margin: float) -> Dict[str, list]:
    y = train[list(target_cols)].to_numpy(np.float64)
    std = y.std(axis=0)
    return {"target_mean": y.mean(axis=0).tolist(),
            "target_std": np.where(std > 0, std, 1.0).tolist(),
            "y_min": (y.min(axis=0) - margin).tolist(),
            "y_max": (y.max(axis=0) + margin).tolist()}


def make_loader(args, part: pd.DataFrame, rows_in_cache: np.ndarray, stats: dict, cache,
                device: torch.device, dist: utils.DistInfo, train: bool) -> DataLoader:
    """The DataLoader of one split: from the cache when given, else from the npz files.

    Training shards with ``DistributedSampler`` (reshuffled by ``set_epoch``, its indices
    tagged with the epoch for --augment); evaluation with ``ShardSampler``, so every record
    is evaluated exactly once over the ranks.
    """
    y = (part[args.target_cols].to_numpy(np.float64) - stats["target_mean"]) / stats["target_std"]
    cov = dataset.encode_covariates(part, stats["covariates"])[0]
    channels = backbones.MODALITY_CHANNELS[args.modality]
    augmenter = (dataset.Augmenter(args.augment, args.seed, stats["sample_rate_hz"])
                 if train and args.augment else None)
    if cache is not None:
        ds = dataset.CachedBPDataset(list(part["ssoid"]), cache, rows_in_cache, y, channels,
                                     covariates=cov, augmenter=augmenter)
        workers, collate = 0, dataset.CachedBPDataset.collate
    else:
        ds = dataset.BPDataset(list(part["ssoid"]), args.npz_dir, y, channels,
                               normalize=not args.no_zscore, covariates=cov,
                               conditioning=stats["conditioning"], augmenter=augmenter)
        workers, collate = args.num_workers, None
    if train:
        sampler = dataset.EpochSampler(DistributedSampler(
            ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=args.seed))
    else:
        sampler = dataset.ShardSampler(len(ds), dist.rank, dist.world_size)
    return DataLoader(ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=train and len(sampler) > args.batch_size,
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda",
                      generator=utils.loader_generator(args.seed, dist.rank, int(train)))


# ============================================================================= model
def build_model(args, stats: dict, pretrain: Optional[str],
                dist: utils.DistInfo) -> Tuple[backbones.BPModel, Optional[str]]:
    """The BP model with its output bounds, and what it already predicts before training
    (``start_of``); ``pretrain`` is loaded by rank 0 (DDP hands its weights to the other
    ranks)."""
    cfg = backbones.BPModelConfig(arch=args.arch, modality=args.modality, fusion=args.fusion,
                                  n_targets=len(args.target_cols), constrain=args.constrain,
                                  head_hidden=args.head_hidden, dropout=args.dropout,
                                  n_covariates=len(dataset.covariate_names(stats["covariates"])),
                                  covariate_offset=stats["ridge"] is not None
                                  and not args.no_ridge_offset)
    model = backbones.build_bp_model(cfg)
    mean, std = np.array(stats["target_mean"]), np.array(stats["target_std"])
    model.set_bounds((np.array(stats["y_min"]) - mean) / std, (np.array(stats["y_max"]) - mean) / std)
    if cfg.covariate_offset:  # the ridge in normalised target units
        ridge = ridge_of(stats)
        model.set_covariate_offset((ridge.coef / std).T, (ridge.intercept - mean) / std)
    head_loaded = False
    if pretrain:
        report = utils.run_on_rank0(lambda: backbones.load_pretrained(
            model, pretrain, trust=args.trust_checkpoint, target_cols=args.target_cols,
            stats=stats), dist)
        head_loaded = report["head"]["loaded"] > 0
    elif args.pretrain is None and model.encoders:
        print("warning: no --pretrain given: the encoders start from random weights")
    if args.freeze_backbone:
        model.freeze_backbone()
    return model, start_of(cfg.covariate_offset, head_loaded, pretrain)


def start_of(covariate_offset: bool, head_loaded: bool, pretrain: Optional[str]) -> Optional[str]:
    """What the model predicts before training, in words, when that is worth evaluating as
    epoch 0 (None when it is an untrained head): a loaded project head (with the ridge
    offset, its ridge refitted on this run's train split), or with a fresh head the ridge
    on the covariates alone (the fresh head's output starts at zero)."""
    if head_loaded:
        return (f"the model loaded from --pretrain {pretrain}"
                + (" with its ridge refitted on this run's train split" if covariate_offset
                   else ""))
    return "the ridge on the covariates" if covariate_offset else None


def build_optimizer(args, model, steps_per_epoch: int):
    groups = backbones.param_groups(model, args.lr_backbone, args.lr_head, args.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ============================================================================= checkpoints
def checkpoint_payload(args, model, stats: dict, epoch: int, seq_len: int,
                       split_ids: Dict[str, List[str]]) -> dict:
    """What bp_best.pth holds; ``model`` is the bare BPModel (no DDP or compile prefixes).
    ``split_ids`` (the ssoids of each split) lets predict_bp.py report each split apart."""
    return {"model": model.state_dict(), "model_config": asdict(model.config), "epoch": epoch,
            "target_cols": list(args.target_cols), "modality": args.modality, "arch": args.arch,
            "fusion": args.fusion, "constrain": args.constrain, "zscore": not args.no_zscore,
            "seq_len": seq_len, **stats, "split_ids": split_ids, "args": vars(args)}


def training_state(optimizer, scheduler, scaler, history: List[dict], best: dict,
                   rng_states: List[dict]) -> dict:
    """What bp_last.pth adds for --resume; ``rng_states`` holds each rank's
    ``utils.rng_state`` (CPU and CUDA generators)."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "history": history, "best": best,
            "rng_states": rng_states, "world_size": len(rng_states)}


# ============================================================================= reporting
def _group_lr(lrs: Dict[str, float], part: str) -> float:
    """The learning rate of ``part`` (``backbone`` or ``head``); 0.0 when it has no group
    (a frozen backbone, a covariates-only model)."""
    return lrs.get(part, lrs.get(f"{part}_no_decay", 0.0))


def history_row(epoch: int, train: dict, val: dict, val_metrics: dict, target_cols,
                seconds: float) -> dict:
    """One history.csv row. ``lr_backbone``/``lr_head``: the rates of the epoch's first
    optimiser step; ``lr_backbone_last``/``lr_head_last``: of its last step (the schedule
    moves every step, so an epoch spans that range)."""
    first, last = train["lr_first"], train["lr_last"]
    row = {"epoch": epoch, "train_loss": train["loss"], "val_loss": val["loss"],
           "val_mae_mean": val_metrics["mean"]["mae"]}
    row.update({f"val_mae_{c}": val_metrics["per_target"][c]["mae"] for c in target_cols})
    row.update({"lr_backbone": _group_lr(first, "backbone"), "lr_head": _group_lr(first, "head"),
                "seconds": seconds, "train_records_per_s": train["records_per_s"],
                "skipped_steps": train["skipped_steps"],
                "lr_backbone_last": _group_lr(last, "backbone"),
                "lr_head_last": _group_lr(last, "head")})
    return row


def split_report(result: dict, part: pd.DataFrame, target_cols: Sequence[str],
                 stats: dict, calibration_order: Optional[str]) -> dict:
    """The ``val``/``test`` block of final_metrics.json (model, train-mean baseline, CIs,
    with covariates the ridge and boosted-tree baselines that ``stats`` holds, and with
    subjects of two or more records the one-point ``calibrated`` block, each subject's
    first record in ``calibration_order`` (a column; ``ssoid`` when None) calibrating)."""
    part = part.set_index("ssoid").loc[result["ids"]]
    ridge, gbm = ridge_of(stats), gbm_of(stats)
    x = dataset.encode_covariates(part, stats["covariates"])[0] if ridge else None
    block = {"loss": result["loss"],
             **metrics.split_metrics(result["y_true"], result["y_pred"],
                                     part["subject_id"].to_numpy(), target_cols,
                                     stats["target_mean"],
                                     covariate_pred=ridge(x) if ridge else None,
                                     gbm_pred=gbm(x) if gbm else None)}
    inputs = dataset.covariate_names(stats["covariates"])
    if ridge is not None:
        block["covariate_baseline"].update(
            {"model": "ridge", "alpha": metrics.RIDGE_ALPHA, "inputs": inputs})
    if gbm is not None:
        block["gbm_baseline"].update(gbm_settings(gbm, target_cols, inputs))
    order = part[calibration_order] if calibration_order else part.index
    calibrated = metrics.calibrated_block(result["y_true"], result["y_pred"],
                                          part["subject_id"].to_numpy(), order.to_numpy(),
                                          target_cols)
    if calibrated is not None:
        block["calibrated"] = {"order": calibration_order or "ssoid", **calibrated}
    return block


def output_calibration(args, val: dict, rows: pd.DataFrame) -> dict:
    """What bp_best.pth gains at the end, fitted on the validation split alone: the affine
    ``recalibration`` (``applied`` with --recalibrate affine) and, with --interval, the
    ``conformal`` calibration of the reported predictions on the validation subjects."""
    cols = list(args.target_cols)
    recalibration = {"map": metrics.fit_affine(val["y_true"], val["y_pred"], cols),
                     "applied": args.recalibrate == "affine", "fitted_on": "val"}
    conformal = None
    if args.interval:
        pred, _ = engine.reported_predictions(val["y_pred"], recalibration, None, cols)
        subjects = rows.set_index("ssoid").loc[val["ids"], "subject_id"].to_numpy()
        bands = metrics.target_band_sets(cols, args.bands)
        conformal = metrics.fit_conformal(val["y_true"], pred, subjects, cols, args.interval,
                                          bands if args.interval_mondrian else None)
    return {"recalibration": recalibration, "conformal": conformal}


def label_column(part: pd.DataFrame, name: Optional[str]) -> Optional[np.ndarray]:
    """A labels-CSV column of ``part`` as an array, None when the CSV has no such column."""
    return part[name].to_numpy() if name and name in part.columns else None


def clinical_report(args, result: dict, part: pd.DataFrame, outputs: dict) -> dict:
    """The cuffless-BP blocks of one split (``metrics.clinical_blocks``) and its
    ``recalibration`` block (raw beside affine, the map fitted on validation)."""
    part = part.set_index("ssoid").loc[result["ids"]]
    cols = list(args.target_cols)
    order = part[args.calibration_order] if args.calibration_order else part.index
    intervals = (None if result["intervals"] is None
                 else (*result["intervals"], outputs["conformal"]))
    out = metrics.clinical_blocks(result["y_true"], result["y_pred"],
                                  part["subject_id"].to_numpy(), cols,
                                  metrics.target_band_sets(cols, args.bands), order.to_numpy(),
                                  sex=label_column(part, args.sex_col),
                                  age=label_column(part, args.age_col), intervals=intervals)
    recal = outputs["recalibration"]
    out["recalibration"] = metrics.recalibration_block(result["y_true"], result["raw"],
                                                       recal["map"], cols, recal["applied"],
                                                       engine.MMHG_DECIMALS)
    return out


def covariate_ridge(rows: pd.DataFrame, target_cols: Sequence[str],
                    covariates: Sequence[dict]) -> Optional[dict]:
    """The ridge regression of the targets on the encoded covariates, fitted on the train
    split, as plain data for the checkpoint (None without covariates): the baseline of
    every report and, unless --no_ridge_offset, the model's fixed offset."""
    if not covariates:
        return None
    train = rows[rows["split"] == "train"]
    ridge = metrics.fit_ridge(dataset.encode_covariates(train, covariates)[0],
                              train[list(target_cols)].to_numpy(np.float64))
    return {"coef": ridge.coef.tolist(), "intercept": ridge.intercept.tolist()}


def covariate_gbm(rows: pd.DataFrame, target_cols: Sequence[str], covariates: Sequence[dict],
                  seed: int, threads: int) -> Optional[dict]:
    """Boosted trees of the targets on the encoded covariates, fitted on the train split,
    stopped on the validation split (the test labels never reach it), as plain data for the
    checkpoint; None without covariates."""
    if not covariates:
        return None
    x, y = {}, {}
    for split in ("train", "val"):
        part = rows[rows["split"] == split]
        x[split] = dataset.encode_covariates(part, covariates)[0]
        y[split] = part[list(target_cols)].to_numpy(np.float64)
    return metrics.fit_gbm(x["train"], y["train"], x["val"], y["val"], seed, threads)._asdict()


def gbm_of(stats: dict) -> Optional[metrics.GBM]:
    """The ``covariate_gbm`` that ``stats`` (or a checkpoint) holds, ready to predict."""
    gbm = stats.get("gbm")
    return None if gbm is None else metrics.GBM(**gbm)


def gbm_settings(gbm: metrics.GBM, target_cols: Sequence[str], inputs: List[str]) -> dict:
    """What a ``gbm_baseline`` block says of its model: the trees kept per target."""
    return {"model": "lightgbm", "n_trees": dict(zip(target_cols, gbm.n_trees)),
            "params": {k: v for k, v in metrics.GBM_PARAMS.items() if k != "verbosity"},
            "stopped_on": "val", "inputs": inputs}


def ridge_of(stats: dict) -> Optional[metrics.Ridge]:
    """The ``covariate_ridge`` that ``stats`` (or a checkpoint) holds, ready to predict."""
    ridge = stats.get("ridge")
    return None if ridge is None else metrics.Ridge(np.asarray(ridge["coef"]),
                                                    np.asarray(ridge["intercept"]))


def epoch_line(epoch: int, epochs: int, row: dict, target_cols, best: bool) -> str:
    maes = " ".join(f"{c} {row[f'val_mae_{c}']:.2f}" for c in target_cols)
    return (f"epoch {epoch}/{epochs}  train_loss {row['train_loss']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val MAE mean {row['val_mae_mean']:.2f} "
            f"[{maes}]  {row['train_records_per_s']:.0f} rec/s  {row['seconds']:.0f} s"
            + ("  *best*" if best else ""))


def fitted_cells(fitted: dict) -> str:
    """A table's columns for one target of a fitted baseline's block (``covariate_baseline``,
    ``gbm_baseline``): its MAE and the model-minus-baseline MAE with its 95 % interval."""
    lo, hi = fitted["model_mae_diff_ci95"]
    return (table_cells([fitted["mae"]], 11, ".2f")
            + table_cells([fitted["model_mae_diff"]], 12, "+.2f") + f" [{lo:+.2f}, {hi:+.2f}]")


def print_gbm_table(block: dict, target_cols: Sequence[str]) -> None:
    """Beside the ridge: the boosted trees on the same covariates, per target their MAE,
    the model-minus-GBM MAE with its 95 % interval and the trees kept (per fold, pooled)."""
    gbm = block.get("gbm_baseline")
    if not gbm:
        return
    print("gradient-boosted trees (LightGBM) on the same covariates, stopped on validation:")
    name = max(16, 2 + max(len(c) for c in target_cols))
    print(f"{'target':<{name}}{'GBM-MAE':>11}{'MAE - GBM [95% CI]':>28}  trees")
    for c in target_cols:
        trees = "/".join(str(n) for n in np.atleast_1d(gbm["n_trees"][c]))
        print(f"{c:<{name}}" + fitted_cells(gbm["per_target"][c]) + f"  {trees}")


def print_test_table(block: dict, target_cols: Sequence[str]) -> None:
    """Test metrics beside the train-mean predictor and, with covariates, the ridge
    baseline and the model-minus-ridge MAE with its 95 % subject-bootstrap interval."""
    cov = block.get("covariate_baseline")
    print("\ntest metrics (mmHg) beside the train-mean predictor"
          + (" and a ridge regression on the covariates:" if cov else ":"))
    name = max(16, 2 + max(len(c) for c in target_cols))
    print(f"{'target':<{name}}{'MAE':>8}{'RMSE':>8}{'ME':>8}{'SD':>8}{'r':>8}{'R2':>8}"
          f"{'mean-MAE':>10}" + (f"{'ridge-MAE':>11}{'MAE - ridge [95% CI]':>28}" if cov else ""))
    for c in target_cols:
        m, b = block["per_target"][c], block["baseline"]["per_target"][c]
        line = (f"{c:<{name}}" + table_cells([m["mae"], m["rmse"], m["me"], m["sd"]], 8, ".2f")
                + table_cells([m["pearson"], m["r2"]], 8, ".3f") + table_cells([b["mae"]], 10, ".2f"))
        if cov:
            line += fitted_cells(cov["per_target"][c])
        print(line)
    m, b = block["mean"], block["baseline"]["mean"]
    print(f"{'mean':<{name}}" + table_cells([m["mae"], m["rmse"]], 8, ".2f") + " " * 16
          + table_cells([m["pearson"], m["r2"]], 8, ".3f") + table_cells([b["mae"]], 10, ".2f")
          + (table_cells([cov["mean"]["mae"]], 11, ".2f")
             + table_cells([cov["mean"]["model_mae_diff"]], 12, "+.2f") if cov else ""))


def clinical_cells(block: dict, target: str) -> str:
    """One target's cells of ``print_clinical_table``: the worst true-BP band with its N
    and MAE, slope and SD ratio of prediction on truth, interval coverage and width, and
    ISO 81060-2 criteria 1 and 2 (``-`` where the block has no such number)."""
    rng = block["by_range"][target]
    worst = metrics.worst_band(rng)
    band = f"{worst['band']} (N {worst['n']})" if worst else "-"
    cells = f" {band:>16}" + (table_cells([worst["mae"]], 8, ".2f") if worst else f"{'-':>8}")
    cells += "".join(f"{'-':>9}" if v is None else table_cells([v], 9, ".2f")
                     for v in (rng.get("pred_slope"), rng.get("sd_ratio")))
    interval = block.get("intervals", {}).get("per_target", {}).get(target, {})
    cells += ("".join(table_cells([interval[k]], 9, ".2f") for k in ("coverage", "mean_width"))
              if "coverage" in interval else f"{'-':>9}{'-':>9}")
    iso = block["iso81060_2"]["per_target"].get(target)
    verdict = (lambda c: "pass" if c["pass"] else "fail")
    return cells + (f"{verdict(iso['criterion_1']):>7}{verdict(iso['criterion_2']):>7}"
                    if iso else f"{'-':>7}{'-':>7}")


def print_clinical_table(block: dict, target_cols: Sequence[str], label: str = "test") -> None:
    """Per target the worst BP band, the regression to the mean, the interval's coverage
    and ISO 81060-2's criteria; then whether the population meets the standard's minimums."""
    level = block.get("intervals", {}).get("level")
    name = max(16, 2 + max(len(c) for c in target_cols))
    print(f"\n{label} by true BP band, {f'{level:.0%} interval' if level else 'no interval'} and "
          f"ISO 81060-2 (docs/metrics.md):")
    print(f"{'target':<{name}}{'worst band':>17}{'its MAE':>8}{'slope':>9}{'SD ratio':>9}"
          f"{'covered':>9}{'width':>9}{'ISO c1':>7}{'ISO c2':>7}")
    for c in target_cols:
        print(f"{c:<{name}}" + clinical_cells(block, c))
    notes = {v["note"] for v in block.get("intervals", {}).get("per_target", {}).values()
             if "note" in v}
    for note in sorted(notes):
        print(f"note: interval: {note} (use more subjects or a larger --val_ratio)")
    audit = block["iso81060_2"]["population"]
    if not audit["pass"]:
        failed = [f"{k} {audit_shortfall(v)}" for k, v in audit["checks"].items()
                  if not v["pass"]]
        print(f"note: the {label} population does not meet ISO 81060-2's minimums ("
              + ", ".join(failed + audit["not_assessed"]) + "): its criteria are no validation")


def audit_shortfall(check: dict) -> str:
    """A failed population check against its minimum: ``32 < 85``, ``3.1% < 5%`` or the
    sex shares (``0 28%, 1 72%; each >= 30%``)."""
    if "shares" in check:
        return (", ".join(f"{k} {v:.0%}" for k, v in check["shares"].items())
                + f"; each >= {check['minimum_share']:.0%}")
    if "share" in check:
        return f"{check['share']:.1%} < {check['minimum_share']:.0%}"
    return f"{check['n']} < {check['minimum']}"


def table_cells(values: Sequence[float], width: int, fmt: str) -> str:
    """Right-aligned table cells of ``width``, each led by a space, so that a number wider
    than its column (an R2 of -21.047) still stands apart from its neighbour."""
    return "".join(" " + format(v, fmt).rjust(width - 1) for v in values)


def run_line(args) -> str:
    """The start-of-run line: versions and the settings that shape the run (every
    argument goes to args.json once the inputs are checked)."""
    model = f"{args.arch} {args.modality}" + (f"/{args.fusion}" if args.fusion != "none" else "")
    return (f"git {git_revision()}  torch {torch.__version__}  model {model}  "
            f"targets {' '.join(args.target_cols)}"
            + (f"  covariates {' '.join(args.covariates)}" if args.covariates else "")
            + f"  augment {' '.join(args.augment) or 'none'}"
            + f"  epochs {args.epochs}  seed {args.seed}  out_dir {args.out_dir}")


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ============================================================================= phases
def load_data(args):
    """Checked rows with their split, the common record length, the skipped table, the
    train-split statistics (targets, and the covariate encoding) and the split audit."""
    rows, rule = load_table(args)
    rows, seq_len, skipped = check_files(args, rows)
    rows, audit = assign_split(args, rows, rule)
    train = rows[rows["split"] == "train"]
    stats = target_stats(train, args.target_cols, args.y_margin)
    stats["covariates"] = dataset.fit_covariates(train, args.covariates,
                                                 f"labels CSV {args.labels_csv}")
    stats["ridge"] = covariate_ridge(rows, args.target_cols, stats["covariates"])
    stats["gbm"] = (covariate_gbm(rows, args.target_cols, stats["covariates"], args.seed,
                                  torch.get_num_threads())
                    if args.gbm_baseline == "on" else None)
    # not statistics, but like them saved in every checkpoint: what one sample means and
    # how the records are filtered before z-scoring
    stats["sample_rate_hz"] = utils.npz_sample_rate(args.npz_dir)
    stats["features_mains_hz"] = features_mains_hz(args.labels_csv)
    stats["conditioning"] = conditioning_of(args, stats["sample_rate_hz"],
                                            stats["features_mains_hz"])
    if args.covariates:
        filled = dataset.encode_covariates(rows, stats["covariates"])[1]
        print("covariates (encoded from the train split):\n"
              + dataset.describe_covariates(stats["covariates"])
              + "".join(f"\n  {name}: {n} of {len(rows)} values missing or unseen in training"
                        for name, n in filled.items() if n))
    return rows, seq_len, skipped, stats, audit


def features_mains_hz(labels_csv: str) -> Optional[float]:
    """The --mains_hz with which prep computed the labels CSV's physiological features (from
    its ``<stem>_prepare.json``; predict_bp.py --h5_path computes them alike), None when it
    computed none or that file is absent."""
    settings = utils.read_json(settings_path(labels_csv), "prep's settings for --labels_csv")
    return settings.get("mains_hz") if settings.get("features") else None


def checkpoint_filter(args) -> Optional[str]:
    """The --filter a --pretrain project checkpoint was trained with (``none`` or
    ``ecgfounder``); None for ECGFounder's file or a checkpoint that does not record it.
    (Rank 0 reads the file here and again when it loads the weights: a second or two for
    the full-size encoder, once per run.)"""
    if not args.pretrain or args.resume:
        return None
    ckpt = utils.load_checkpoint(args.pretrain, trust=args.trust_checkpoint)
    if not (isinstance(ckpt, dict) and "model_config" in ckpt and "conditioning" in ckpt):
        return None
    return ckpt["conditioning"]["filter"] if ckpt["conditioning"] else "none"


def conditioning_of(args, sample_rate: Optional[float],
                    prep_mains_hz: Optional[float]) -> Optional[dict]:
    """``dataset.model_input``'s conditioning for --filter (None for ``none``). ``auto``:
    with a --pretrain project checkpoint, the filter it was trained with (its head and
    encoders learnt those inputs); with ECGFounder's file, ``ecgfounder`` when the sampling
    rate is known; else ``none``. The mains notch: --mains_hz, else prep's, else
    ``physio.MAINS_HZ``."""
    mains_hz = next(m for m in (args.mains_hz, prep_mains_hz, physio.MAINS_HZ) if m)
    if args.filter == "auto":
        followed = checkpoint_filter(args)
        if followed is not None:
            print(f"--filter auto: {followed}, as --pretrain {args.pretrain} was trained "
                  f"(--filter sets another)")
            return None if followed == "none" else ecgfounder_conditioning(
                args, sample_rate, mains_hz, f"--filter auto (ecgfounder, as --pretrain was "
                                             f"trained)")
        if args.pretrain and not sample_rate:
            print(f"warning: --filter auto stays none: {args.npz_dir} records no sampling "
                  f"rate, so the pre-trained encoder sees unfiltered records (prepare them "
                  f"with --record_seconds or --fs_ecg/--fs_ppg)")
        if not (args.pretrain and sample_rate):
            return None
        print("--filter auto: ecgfounder (ECGFounder's pre-training band-pass, as --pretrain "
              "is given; --filter none to skip it)")
    elif args.filter == "none":
        return None
    return ecgfounder_conditioning(args, sample_rate, mains_hz, "--filter ecgfounder")


def ecgfounder_conditioning(args, sample_rate: Optional[float], mains_hz: float,
                            flag: str) -> dict:
    if not sample_rate:
        raise UserError(f"{flag} needs the records' sampling rate, which "
                        f"{args.npz_dir} does not record: prepare them with --record_seconds "
                        f"or --fs_ecg/--fs_ppg")
    return {"filter": "ecgfounder", "fs": sample_rate, "mains_hz": mains_hz}


def start_on_rank0(args, dist: utils.DistInfo):
    """Rank 0 checks --out_dir, reads bp_last.pth (--resume) and the data, and hands them
    to every rank, so all ranks train on one split whatever their file systems show.

    Returns (bp_last.pth contents or None, rows, seq_len, skipped, stats, audit).
    """
    def start():
        utils.check_run_dir(args.out_dir, args.resume, args.overwrite, "bp_last.pth")
        saved = utils.load_checkpoint(os.path.join(args.out_dir, "bp_last.pth")) \
            if args.resume else None
        if saved is not None:
            check_resume(args, saved, dist.world_size)
        return (saved, *load_data(args))

    return utils.run_on_rank0(start, dist)


def open_cache_per_node(args, rows: pd.DataFrame, seq_len: int, conditioning: Optional[dict],
                        dist: utils.DistInfo):
    """The memory-mapped cache, built by the first process of each node."""
    paths = [dataset.npz_path(args.npz_dir, s) for s in rows["ssoid"]]
    if dist.local_rank == 0:
        dataset.open_cache(args.cache_dir, paths, seq_len, not args.no_zscore, conditioning)
    utils.barrier()
    return dataset.open_cache(args.cache_dir, paths, seq_len, not args.no_zscore, conditioning)


def make_loaders(args, rows: pd.DataFrame, stats: dict, seq_len: int, device: torch.device,
                 dist: utils.DistInfo) -> Dict[str, DataLoader]:
    cache = (open_cache_per_node(args, rows, seq_len, stats["conditioning"], dist)
             if args.cache_dir else None)
    loaders = {}
    for split in ("train", "val", "test"):
        index = np.flatnonzero(rows["split"] == split)
        loaders[split] = make_loader(args, rows.iloc[index].reset_index(drop=True), index,
                                     stats, cache, device, dist, train=(split == "train"))
    return loaders


def wrap_model(args, model: backbones.BPModel, device: torch.device, dist: utils.DistInfo):
    """(the module to train, the module to evaluate): DDP across ranks, then compiled.

    Evaluation uses the bare model (compiled with --compile): each rank evaluates its own
    shard, which needs no gradient synchronisation. The parameters without a gradient
    (ECGFounder's unused BatchNorms, a frozen backbone) have ``requires_grad=False``, so
    DDP neither registers them nor needs ``find_unused_parameters``.
    """
    train_model = model
    if dist.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    if not args.compile:
        return train_model, model
    compiled = torch.compile(train_model)
    return compiled, (compiled if train_model is model else torch.compile(model))


def evaluate_start(args, model, eval_model, loaders, loss_fn, device, stats: dict,
                   rows: pd.DataFrame, seq_len: int, dist: utils.DistInfo, start: str) -> dict:
    """Epoch 0 of a model that predicts before training (``start``, from ``start_of``).
    Its validation MAE starts the race for bp_best.pth, so the run keeps that starting
    model unless training beats it; the best-epoch record keeps ``start`` for the note at
    the end (also after --resume)."""
    val = evaluate_split(eval_model, loaders, "val", loss_fn, device, stats)
    mae = metrics.regression_metrics(val["y_true"], val["y_pred"], args.target_cols)["mean"]["mae"]
    if dist.is_main:
        save_epoch(args, model, stats, 0, rows, seq_len, True, None, [])
        print(f"epoch 0/{args.epochs}  {start}, before training: val MAE mean {mae:.2f}  *best*")
    return {"epoch": 0, "val_mae_mean": mae, "start": start}


def restore(saved: dict, model, optimizer, scheduler, scaler, dist: utils.DistInfo,
            device: torch.device) -> Tuple[List[dict], dict]:
    """Put a killed run's state back; returns its history and best-epoch record."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    utils.set_rng_state(saved.get("rng_states", [saved.get("torch_rng")])[dist.rank], device)
    print(f"resuming after epoch {saved['epoch']} (best so far: epoch {saved['best']['epoch']})")
    return list(saved["history"]), dict(saved["best"])


def evaluate_split(model, loaders, split: str, loss_fn, device, stats: dict) -> dict:
    """``engine.evaluate`` over every rank's shard, joined in the split's order."""
    loader = loaders[split]
    result = engine.evaluate(model, loader, loss_fn, device, stats["target_mean"],
                             stats["target_std"], desc=split)
    return engine.gather_evaluation(result, loader.dataset.ids)


def final_report(args, model, eval_model, loaders, loss_fn, device,
                 rows: pd.DataFrame, stats: dict, dist: utils.DistInfo,
                 splits: Sequence[str] = ("val", "test")) -> Optional[dict]:
    """Evaluate the best checkpoint on ``splits``; rank 0 writes the predictions and
    metrics and returns the report (other ranks return None). Every prediction CSV is
    written before any metric is computed, so a report step that fails loses no run."""
    best = ckpt = None
    if dist.is_main:
        ckpt = utils.load_checkpoint(os.path.join(args.out_dir, "bp_best.pth"))
        best = {"model": ckpt["model"], "epoch": int(ckpt["epoch"])}
    best = utils.broadcast_object(best)
    model.load_state_dict(best["model"])
    report = {"target_cols": list(args.target_cols), "best_epoch": best["epoch"]}
    results = {split: evaluate_split(eval_model, loaders, split, loss_fn, device, stats)
               for split in splits}
    if not dist.is_main:
        return None
    for split, result in results.items():
        # the truths as the labels CSV holds them, not round-tripped through float32
        result["y_true"] = rows.set_index("ssoid").loc[result["ids"], list(args.target_cols)]\
            .to_numpy(np.float64)
    outputs = output_calibration(args, results["val"], rows)
    for split, result in results.items():
        result["raw"] = result["y_pred"]
        result["y_pred"], result["intervals"] = engine.reported_predictions(
            result["raw"], outputs["recalibration"], outputs["conformal"], args.target_cols)
        engine.write_predictions(os.path.join(args.out_dir, f"{split}_predictions.csv"),
                                 result["ids"], result["y_true"], result["y_pred"],
                                 args.target_cols, result["intervals"])
    # predict_bp.py applies what the run reported: bp_best.pth carries both calibrations
    utils.save_checkpoint(os.path.join(args.out_dir, "bp_best.pth"), {**ckpt, **outputs})
    for split, result in results.items():
        part = rows[rows["split"] == split]
        report[split] = split_report(result, part, args.target_cols, stats,
                                     args.calibration_order)
        report[split].update(clinical_report(args, result, part, outputs))
    utils.write_json_atomic(os.path.join(args.out_dir, "final_metrics.json"), report)
    return report


def save_epoch(args, model, stats: dict, epoch: int, rows: pd.DataFrame, seq_len: int,
               improved: bool, state: Optional[dict], history: List[dict]) -> None:
    """bp_best.pth (when improved), bp_last.pth and history.csv; rank 0 only. Epoch 0
    (``state`` None: nothing trained yet) writes bp_best.pth alone."""
    parts = rows.groupby("split")
    split_ids = {name: part["ssoid"].tolist() for name, part in parts}
    # each record's subject and the recordings' digests let predict_bp.py tell a new record
    # of a subject the run saw, or a renamed copy of one of its records, from a new subject
    payload = {**checkpoint_payload(args, model, stats, epoch, seq_len, split_ids),
               "split_subjects": {name: part["subject_id"].tolist() for name, part in parts}}
    if DIGEST_COLUMN in rows.columns:
        payload["split_digests"] = {name: part[DIGEST_COLUMN].dropna().astype(str).tolist()
                                    for name, part in parts}
    if improved:
        utils.save_checkpoint(os.path.join(args.out_dir, "bp_best.pth"), payload)
    if state is None:
        return
    utils.save_checkpoint(os.path.join(args.out_dir, "bp_last.pth"), {**payload, **state})
    utils.write_csv_atomic(os.path.join(args.out_dir, "history.csv"), pd.DataFrame(history))


# ============================================================================= main
def main(argv: Optional[Sequence[str]] = None, on_epoch: Optional[Callable] = None,
         evaluate_test: bool = True) -> None:
    """Train as the command line says. For tune_bp.py's trials: ``on_epoch(epoch, row)``
    is called on every rank after each epoch's files are written (``row`` is its
    history.csv row; an exception it raises ends the run there, like a kill), and
    ``evaluate_test=False`` leaves the test split unevaluated (final_metrics.json holds
    ``val`` alone; --resume later adds the test)."""
    args = parse_args(argv)
    with engine.process(args.device, args.threads) as (dist, device):
        train(args, dist, device, on_epoch, evaluate_test)


def train(args, dist: utils.DistInfo, device: torch.device,
          on_epoch: Optional[Callable] = None, evaluate_test: bool = True) -> None:
    print(run_line(args))
    amp_dtype = engine.resolve_amp(args.amp, device)
    utils.seed_everything(args.seed + dist.rank)  # own dropout masks per rank

    # ---------------------------------------------------------------- data and model
    saved, rows, seq_len, skipped, stats, audit = start_on_rank0(args, dist)
    # a resumed run's weights replace any pre-trained start
    model, start = build_model(args, stats, None if saved else args.pretrain, dist)
    model = model.to(device)
    loaders = make_loaders(args, rows, stats, seq_len, device, dist)
    optimizer, scheduler = build_optimizer(
        args, model, math.ceil(len(loaders["train"]) / args.accum_steps))
    scaler = engine.make_scaler(device, amp_dtype)
    loss_fn = losses.build_loss(args.loss, alpha=args.alpha, beta=args.beta,
                                delta=args.huber_delta)
    history: List[dict] = []
    best = {"epoch": 0, "val_mae_mean": math.inf}
    if saved is not None:
        history, best = restore(saved, model, optimizer, scheduler, scaler, dist, device)
    train_model, eval_model = wrap_model(args, model, device, dist)
    if dist.is_main:
        write_run_files(args, rows, skipped, audit)
        print(f"every argument: {os.path.join(args.out_dir, 'args.json')}")
    backend = f" ({torch.distributed.get_backend()})" if dist.enabled else ""
    print(f"device {device}  amp {amp_dtype}  processes {dist.world_size}{backend}  "
          f"records per step {args.batch_size} x {args.accum_steps} x {dist.world_size} = "
          f"{args.batch_size * args.accum_steps * dist.world_size}  "
          f"lr backbone {args.lr_backbone:g} head {args.lr_head:g}  "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters  "
          f"{len(loaders['train'].dataset)} training records of length {seq_len}"
          + (f" at {stats['sample_rate_hz']:g} Hz" if stats["sample_rate_hz"] else ""))

    if saved is None and start:
        best = evaluate_start(args, model, eval_model, loaders, loss_fn, device, stats, rows,
                              seq_len, dist, start)

    # ---------------------------------------------------------------- epochs
    for epoch in range(saved["epoch"] + 1 if saved else 1, args.epochs + 1):
        if args.patience and history and epoch - 1 - best["epoch"] >= args.patience:
            print(f"early stop: no better val MAE for {args.patience} epochs")
            break
        tic = time.perf_counter()
        loaders["train"].sampler.set_epoch(epoch)
        train_stats = engine.train_one_epoch(train_model, loaders["train"], loss_fn, optimizer,
                                             device, amp_dtype, scaler, args.grad_clip, epoch,
                                             scheduler, args.accum_steps)
        val = evaluate_split(eval_model, loaders, "val", loss_fn, device, stats)
        val_metrics = metrics.regression_metrics(val["y_true"], val["y_pred"], args.target_cols)
        row = history_row(epoch, train_stats, val, val_metrics, args.target_cols,
                          time.perf_counter() - tic)
        history.append(row)
        improved = row["val_mae_mean"] < best["val_mae_mean"]
        if improved:
            best = {"epoch": epoch, "val_mae_mean": row["val_mae_mean"]}
        rng_states = utils.all_gather_object(utils.rng_state(device))
        if dist.is_main:
            save_epoch(args, model, stats, epoch, rows, seq_len, improved, training_state(
                optimizer, scheduler, scaler, history, best, rng_states), history)
            print(epoch_line(epoch, args.epochs, row, args.target_cols, improved))
        if on_epoch is not None:
            on_epoch(epoch, row)

    # ---------------------------------------------------------------- results
    report = final_report(args, model, eval_model, loaders, loss_fn, device, rows,
                          stats, dist, ("val", "test") if evaluate_test else ("val",))
    if report is None:
        return
    if not evaluate_test:
        print(f"best epoch {report['best_epoch']} (val MAE mean "
              f"{report['val']['mean']['mae']:.2f}); test split not evaluated")
        return
    plot_results.plot_run(args.out_dir)
    print_test_table(report["test"], args.target_cols)
    print_gbm_table(report["test"], args.target_cols)
    print_clinical_table(report["test"], args.target_cols)
    if report["test"].get("calibrated", {}).get("informative") is False:
        print(f"note: test 'calibrated' block: {report['test']['calibrated']['note']}")
    print(f"\nbest epoch {report['best_epoch']} (val MAE mean "
          f"{report['val']['mean']['mae']:.2f}); outputs in {args.out_dir}: bp_best.pth, "
          f"final_metrics.json, val_predictions.csv, test_predictions.csv, history.csv, split.csv")
    if report["best_epoch"] == 0:
        print(f"note: epoch 0, {best['start']}, before training, stayed ahead: on the "
              f"validation split no training epoch beat it, so the model reported is that "
              f"starting model")


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
