"""Self-supervised pre-training of the ECG/PPG encoders on unlabelled records; writes
ssl_encoders.pth, which ``train_bp.py --pretrain`` fine-tunes.

    python pretrain_ssl.py --npz_dir data/npz --out_dir runs/ssl --arch small \
        --modality both --fusion late --objectives contrastive crossmodal timing \
        --epochs 50 --batch_size 128 --exclude runs/bp/split.csv
    python train_bp.py ... --arch small --modality both --fusion late \
        --pretrain runs/ssl/ssl_encoders.pth

Objectives (``--objectives NAME[=WEIGHT] ...``, summed with their weights):
- ``contrastive``: two augmented crops of a record are positives, and so are records of one
  subject where the subject is known (supervised-contrastive, Khosla et al. 2020; SimCLR's
  NT-Xent, Chen et al. 2020, when every record is its own subject); the rest of the global
  batch are negatives.
- ``crossmodal``: CLIP's symmetric InfoNCE (Radford et al. 2021) between the ECG and the PPG
  encoder of one window (separate encoders: ``--fusion late`` or ``mid``).
- ``timing``: tell a record's ECG with its own PPG in true timing from the same PPG moved
  40-300 ms later or earlier (``--delay_ms``), half of each; the ECG-to-PPG delay (pulse
  arrival time) is the classic BP cue, so solving it needs that delay. Early fusion reads
  both channels in one encoder; separate encoders meet in a mid-fusion block
  (``backbones.TemporalFusion``) that sees their time-resolved maps.

Views: crops of ``--crop`` of the record (both channels cut alike, so their timing stays
as recorded, except in the timing objective's moved PPG), then ``dataset.Augmenter``'s
gain, noise and wander (the crop is the shift). Every draw is a function of (--seed,
epoch, record), and the global batch of each step is the same for any number of processes,
so a run resumes exactly and DDP equals one process on the same global batch.

Outputs in --out_dir: ssl_encoders.pth (every encoder, layout ``<encoder>.<Net1D key>``
with ``encoder_settings``), ssl_last.pth (--resume), ssl_history.csv (loss and pretext
accuracy per objective, on the pre-training records and on the held-out subjects, and the
ridge monitor), ssl_history.png, ssl_records.csv (each record's subject and role:
pretrain, heldout or excluded), skipped_records.csv, args.json.

Several GPUs: ``torchrun --nproc_per_node=8 pretrain_ssl.py ... --batch_size 64``; the
contrastive negatives are gathered over every rank, with their gradients.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Sampler

import backbones
import dataset
import engine
import losses
import metrics
import physio
import train_bp
import utils
from utils import UserError

OBJECTIVES = ("contrastive", "crossmodal", "timing")
SSL_AUGMENT = ("gain", "noise", "wander")  # the crop is the shift
ROLES = ("pretrain", "heldout", "excluded")
FORMAT = "ssl-encoders-v1"
VIEW_STREAMS = {"a": 0, "b": 1, "timing": 2}
HELDOUT_EPOCH = 0  # the held-out views are drawn as "epoch 0": the same every epoch
# held-out records scored at once (a seeded sample of them beyond): the similarity matrix
# of 2 x 2048 views is 64 MB
HELDOUT_MAX = 2048


# ============================================================================= arguments
def get_args_parser() -> utils.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--npz_dir", nargs="+", required=True,
                      help="folders of <ssoid>.npz from prepare_kailuan_npz.py, labelled or not "
                           "(one record length and sampling rate; ids unique over them)")
    data.add_argument("--labels_csv", default=None,
                      help="CSV with ssoid and subject_id (or --subject_col): the subjects for "
                           "the subject positives and the held-out split; with --target_cols "
                           "also the ridge monitor's targets. Without it the subject is the part "
                           "of ssoid before the first '_'")
    data.add_argument("--subject_col", default=None, help="labels-CSV column naming the person")
    data.add_argument("--target_cols", nargs="+", default=[],
                      help="labels-CSV BP columns for the monitor: a ridge regression on frozen "
                           "embeddings of the pre-training subjects, scored on the held-out "
                           "subjects, in ssl_history.csv (a feeling for whether the encoders "
                           "learn anything useful before anyone fine-tunes)")
    data.add_argument("--exclude", default=None,
                      help="CSV of records (ssoid column) or subjects (subject_id column) never "
                           "to use, e.g. a later fine-tune's split.csv: pre-training on its test "
                           "subjects' waveforms would be transductive. With a split column only "
                           "the rows of --exclude_splits count")
    data.add_argument("--exclude_splits", nargs="+", default=["test"],
                      help="with a split column in --exclude: the splits to exclude")
    data.add_argument("--out_dir", required=True, help="where every output file is written")
    data.add_argument("--val_ratio", type=float, default=0.1,
                      help="share of subjects held out of pre-training, to score the pretext "
                           "tasks (and the monitor) on people the encoders never saw; 0: none")
    data.add_argument("--seed", type=int, default=666,
                      help="seed of the split, init, batches and views")
    data.add_argument("--no_zscore", action="store_true",
                      help="feed raw signals instead of per-record, per-channel z-scored ones")
    data.add_argument("--filter", default="auto", choices=("auto",) + dataset.FILTERS,
                      help="band-pass before z-scoring, as train_bp.py --filter (auto: "
                           "ecgfounder with an ECGFounder --pretrain when the rate is known); "
                           "stored in ssl_encoders.pth, which train_bp.py --filter auto follows")
    data.add_argument("--mains_hz", type=float, default=None,
                      help=f"mains frequency for --filter ecgfounder (default: prep's, else "
                           f"{physio.MAINS_HZ:g})")
    data.add_argument("--augment", nargs="+", default=["all"],
                      choices=(*SSL_AUGMENT, "all", "none"), metavar="PART",
                      help="augmentation of each crop (dataset.Augmenter): gain, noise, wander "
                           "(needs the sampling rate); none of them moves one channel against "
                           "the other")
    data.add_argument("--cache_dir", default=None,
                      help="memory-mapped cache of the model inputs, as train_bp.py --cache_dir")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="DataLoader workers reading npz files (unused with --cache_dir)")
    model = p.add_argument_group("model (as train_bp.py; fine-tune with the same)")
    model.add_argument("--arch", default="ecgfounder", choices=sorted(backbones.ARCHS))
    model.add_argument("--modality", default="both", choices=("ecg", "ppg", "both"))
    model.add_argument("--fusion", default=backbones.DEFAULT_FUSION, choices=backbones.FUSIONS,
                       help="with --modality both: early = one two-channel encoder; late or "
                            "mid = an ECG and a PPG encoder (the same pair for both)")
    model.add_argument("--pretrain", default=None,
                       help="start from 1_lead_ECGFounder.pth, a bp_best.pth or an "
                            "ssl_encoders.pth (continued, domain-adaptive pre-training)")
    model.add_argument("--trust_checkpoint", action="store_true",
                       help="allow full unpickling of --pretrain (only for a file you trust)")
    ssl = p.add_argument_group("objectives")
    ssl.add_argument("--objectives", nargs="+", default=None, metavar="NAME[=WEIGHT]",
                     help="contrastive, crossmodal (separate encoders only), timing (both "
                          "signals), each with an optional weight (timing=0.5); default: all "
                          "that the model allows, weight 1")
    ssl.add_argument("--temperature", type=float, default=0.1,
                     help="softmax temperature of the contrastive and cross-modal losses")
    ssl.add_argument("--proj_dim", type=int, default=128, help="width of the projection heads")
    ssl.add_argument("--crop", type=float, default=0.5,
                     help="share of the record in each view: shorter crops make harder "
                          "positives and cheaper steps")
    ssl.add_argument("--delay_ms", type=float, nargs=2, default=[40.0, 300.0],
                     metavar=("MIN", "MAX"),
                     help="range of the timing pretext's PPG move (later or earlier)")
    ssl.add_argument("--no_subject_positives", action="store_true",
                     help="contrastive positives are the two views of a record only")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=50,
                       help="passes over the pre-training records")
    optim.add_argument("--batch_size", type=int, default=128,
                       help="records per step in each process; negatives come from all processes")
    optim.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    optim.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW weight decay (never on biases and normalisation weights)")
    optim.add_argument("--warmup_epochs", type=float, default=1.0,
                       help="linear warm-up before the cosine decay, in epochs")
    optim.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0: off")
    optim.add_argument("--monitor_every", type=int, default=1,
                       help="epochs between held-out evaluations and ridge monitors")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                     help="mixed precision on CUDA: auto = bf16 where supported, else fp16")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out_dir from its ssl_last.pth")
    run.add_argument("--overwrite", action="store_true",
                     help="write into an --out_dir that already holds another run")
    return p


def parse_objectives(items: Optional[Sequence[str]], modality: str,
                     fusion: str) -> Dict[str, float]:
    """{objective: weight} from ``NAME[=WEIGHT]`` items; the default is every objective
    the model allows. ``UserError`` for an unknown name, a bad weight or an objective the
    model cannot do."""
    allowed = [o for o in OBJECTIVES if not (
        (o == "crossmodal" and (modality != "both" or fusion == "early"))
        or (o == "timing" and modality != "both"))]
    if items is None:
        return dict.fromkeys(allowed, 1.0)
    weights: Dict[str, float] = {}
    for item in items:
        name, _, weight = item.partition("=")
        if name not in OBJECTIVES:
            raise UserError(f"--objectives: unknown objective {name!r} (choose from "
                            f"{', '.join(OBJECTIVES)})")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--objectives: the weight of {name} must be a number > 0, got "
                            f"{weight!r}")
        if name in weights:
            raise UserError(f"--objectives names {name} twice")
        if name not in allowed:
            why = ("needs --modality both" if modality != "both"
                   else "needs separate ECG and PPG encoders (--fusion late or mid)")
            raise UserError(f"--objectives {name} {why}")
        weights[name] = value
    return weights


def parse_args(argv: Optional[Sequence[str]]):
    args = get_args_parser().parse_args(argv)
    lo, hi = args.delay_ms
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 2, "--batch_size must be at least 2 (a contrastive batch needs "
                               "negatives)"),
        (args.num_workers >= 0, "--num_workers must be 0 or more"),
        (args.threads >= 0, "--threads must be 0 or more"),
        (args.lr > 0, "--lr must be > 0"),
        (args.weight_decay >= 0, "--weight_decay must be 0 or more"),
        (args.warmup_epochs >= 0, "--warmup_epochs must be 0 or more"),
        (args.grad_clip >= 0, "--grad_clip must be 0 or more"),
        (args.monitor_every >= 1, "--monitor_every must be at least 1"),
        (args.proj_dim >= 1, "--proj_dim must be at least 1"),
        (0 < args.crop <= 1, "--crop must be in (0, 1]"),
        (0 < lo <= hi, "--delay_ms needs 0 < MIN <= MAX"),
        (0 <= args.val_ratio < 1, "--val_ratio must be in [0, 1)"),
        (args.mains_hz is None or args.mains_hz > 0, "--mains_hz must be a positive frequency"),
        (args.target_cols == [] or args.labels_csv, "--target_cols needs --labels_csv"),
        (not args.target_cols or args.val_ratio > 0,
         "--target_cols (the monitor) scores on the held-out subjects: give --val_ratio > 0"),
        (len(set(args.npz_dir)) == len(args.npz_dir), "--npz_dir names a folder twice"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if "none" in args.augment and len(args.augment) > 1:
        raise UserError("--augment none cannot be combined with other parts")
    args.augment = (list(SSL_AUGMENT) if "all" in args.augment
                    else [] if "none" in args.augment else list(args.augment))
    if args.modality != "both":
        args.fusion = "none"
    args.objectives = parse_objectives(args.objectives, args.modality, args.fusion)
    return args


# ============================================================================= records
def folder_records(args) -> Tuple[pd.DataFrame, Optional[float]]:
    """(ssoid, npz_dir) of every npz in the folders, and their common sampling rate."""
    channels = backbones.MODALITY_CHANNELS[args.modality]
    frames, rates = [], {}
    for folder in args.npz_dir:
        if not os.path.isdir(folder):
            raise UserError(f"--npz_dir {folder}: no such directory")
        missing = utils.missing_channels(channels, utils.npz_channels(folder))
        if missing:
            raise UserError(f"--modality {args.modality} needs the "
                            f"{' and '.join(missing).upper()} signal, which --npz_dir {folder} "
                            f"does not hold (its manifest's channels)")
        rates[folder] = utils.npz_sample_rate(folder)
        ids = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npz"))
        frames.append(pd.DataFrame({"ssoid": ids, "npz_dir": folder}))
    if len(set(rates.values())) > 1:
        raise UserError(f"--npz_dir folders differ in sampling rate ("
                        + ", ".join(f"{d}: {r} Hz" for d, r in rates.items())
                        + "); prepare them to one rate")
    table = pd.concat(frames, ignore_index=True)
    twice = table["ssoid"].duplicated(keep=False)
    if twice.any():
        first = table.loc[twice, "ssoid"].iloc[0]
        where = table.loc[table["ssoid"] == first, "npz_dir"].tolist()
        raise UserError(f"--npz_dir: record id {first} is in {' and '.join(where)} "
                        f"({int(twice.sum())} such files); ids must be unique over the folders")
    if table.empty:
        raise UserError(f"--npz_dir {' '.join(args.npz_dir)}: no .npz files")
    return table, next(iter(rates.values()))


def attach_subjects(args, table: pd.DataFrame) -> Tuple[pd.DataFrame, str]:
    """``table`` with ``subject_id`` (and the monitor's targets from the labels CSV, NaN
    where a record has none) and the subject rule in words."""
    if args.labels_csv is None:
        return table.assign(subject_id=table["ssoid"].map(utils.subject_of)), \
            "the part of ssoid before the first '_' (no --labels_csv)"
    labels = dataset.read_labels(args.labels_csv, args.target_cols,
                                 text=[args.subject_col] if args.subject_col else [])
    labels = labels.drop_duplicates("ssoid")
    listed = table["ssoid"].isin(set(labels["ssoid"]))
    merged = table.merge(labels.drop(columns=["npz_dir"], errors="ignore"), on="ssoid",
                         how="left")
    if args.subject_col and args.subject_col not in labels.columns:
        raise UserError(f"--subject_col: labels CSV {args.labels_csv} has no column "
                        f"{args.subject_col}")
    subjects, rule = train_bp.record_subjects(merged[listed.to_numpy()], args.subject_col,
                                              args.labels_csv)
    merged["subject_id"] = merged["ssoid"].map(utils.subject_of)
    merged.loc[listed.to_numpy(), "subject_id"] = subjects.to_numpy()
    if not listed.all():
        rule += (f"; {int((~listed).sum())} records not in the CSV: the part of ssoid before "
                 f"the first '_'")
    return merged[["ssoid", "npz_dir", "subject_id", *args.target_cols]], rule


def read_exclude(path: str, splits: Sequence[str]) -> Tuple[set, set, str]:
    """(subjects, ssoids) that --exclude names, and what it said, in words."""
    if not os.path.isfile(path):
        raise UserError(f"--exclude {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"--exclude {path} is not a readable CSV ({type(exc).__name__})") from None
    if not {"subject_id", "ssoid"} & set(frame.columns):
        raise UserError(f"--exclude {path} has neither a subject_id nor an ssoid column "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    how = "subject_id" if "subject_id" in frame.columns else "ssoid"
    if "split" in frame.columns:
        frame = frame[frame["split"].isin(set(splits))]
        how += f" of its rows of split {' '.join(splits)}"
    subjects = set(frame["subject_id"].dropna()) if "subject_id" in frame.columns else set()
    ids = set(frame["ssoid"].dropna()) if "ssoid" in frame.columns and not subjects else set()
    return subjects, ids, how


def assign_roles(args, table: pd.DataFrame) -> Tuple[pd.DataFrame, dict]:
    """Each record's role (pretrain / heldout / excluded) and the exclusion summary."""
    excluded = np.zeros(len(table), dtype=bool)
    summary = {"file": None, "records": 0, "subjects": 0}
    if args.exclude:
        subjects, ids, how = read_exclude(args.exclude, args.exclude_splits)
        excluded = (table["subject_id"].isin(subjects) | table["ssoid"].isin(ids)).to_numpy()
        summary = {"file": os.path.abspath(args.exclude), "by": how,
                   "records": int(excluded.sum()),
                   "subjects": int(table.loc[excluded, "subject_id"].nunique())}
        print(f"exclude: {summary['records']} records of {summary['subjects']} subjects "
              f"never used (listed in {args.exclude} by {how})")
    role = np.where(excluded, "excluded", "pretrain").astype(object)
    pool = table.loc[~excluded, "subject_id"]
    if args.val_ratio > 0:
        split = utils.split_subjects(pool, args.val_ratio, 0.0, args.seed)
        held = (~excluded) & table["subject_id"].map(split).eq("val").to_numpy()
        role[held] = "heldout"
    if not (role == "pretrain").any():
        raise UserError("no record is left for pre-training (all excluded or held out)")
    return table.assign(role=role), summary


def check_files(args, table: pd.DataFrame) -> Tuple[pd.DataFrame, int, pd.DataFrame]:
    """The records that pass dataset.check_records (excluded ones are not opened), their
    common length, and the skipped table."""
    used = [utils.NPZ_CHANNELS[c] for c in backbones.MODALITY_CHANNELS[args.modality]]
    good, lengths, skipped = [], {}, []
    for folder, part in table[table["role"] != "excluded"].groupby("npz_dir", sort=False):
        ok, length, bad = dataset.check_records(list(part["ssoid"]), folder, channels=used)
        good += ok
        lengths[folder] = length
        skipped.append(bad)
    lengths = {d: n for d, n in lengths.items() if n}
    if len(set(lengths.values())) > 1:
        raise UserError("--npz_dir folders differ in record length ("
                        + ", ".join(f"{d}: {n}" for d, n in lengths.items())
                        + "); prepare them with one --target_seq_len")
    skipped = pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(
        columns=dataset.SKIPPED_COLUMNS)
    if len(skipped):
        print(f"npz check: skipping {len(skipped)} bad records (listed in skipped_records.csv)")
    keep = table["ssoid"].isin(set(good)) | (table["role"] == "excluded")
    if not good:
        raise UserError(f"--npz_dir {' '.join(args.npz_dir)}: no usable record")
    return table[keep].reset_index(drop=True), next(iter(lengths.values())), skipped


def load_data(args) -> dict:
    """Every input checked (rank 0): records with roles, length, rate, conditioning."""
    table, rate = folder_records(args)
    table, rule = attach_subjects(args, table)
    print(f"subjects: {rule}")
    table, exclude = assign_roles(args, table)
    table, seq_len, skipped = check_files(args, table)
    counts = {r: (int((table["role"] == r).sum()),
                  table.loc[table["role"] == r, "subject_id"].nunique()) for r in ROLES}
    print("records: " + ", ".join(f"{r} {n} / {k} subjects" for r, (n, k) in counts.items()))
    mains = train_bp.features_mains_hz(args.labels_csv) if args.labels_csv else None
    named = argparse.Namespace(**{**vars(args), "npz_dir": " ".join(args.npz_dir)})
    conditioning = train_bp.conditioning_of(named, rate, mains)
    if "timing" in args.objectives and not rate:
        raise UserError(f"--objectives timing moves the PPG by --delay_ms, which needs the "
                        f"records' sampling rate; {' '.join(args.npz_dir)} does not record it "
                        f"(prepare with --record_seconds or --fs_ecg/--fs_ppg)")
    return {"table": table, "seq_len": seq_len, "skipped": skipped, "rate": rate,
            "conditioning": conditioning, "exclude": exclude}


# ============================================================================= views
class GlobalBatches(Sampler):
    """Batch sampler: step k's global batch is records ``perm[k*G : (k+1)*G]`` of a
    permutation drawn from (seed, epoch), G = batch_size x world_size, and rank r reads
    its r-th slice, so the global batch is the same for any number of processes (the
    tail short of a global batch waits for the next epoch's permutation)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // (self.b * self.world)

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        step = self.b * self.world
        for k in range(len(self)):
            start = k * step + self.rank * self.b
            yield perm[start:start + self.b].tolist()


class ViewMaker:
    """The views of a batch of model inputs (B, C, L), each record's draws a function of
    (seed, epoch, record index, view) alone."""

    def __init__(self, seed: int, crop: float, length: int, fs: Optional[float],
                 delay_ms: Sequence[float], augment: Sequence[str]):
        self.seed, self.length = seed, length
        self.width = max(2, int(round(crop * length)))
        self.delay = (None if fs is None else
                      (max(1, int(round(delay_ms[0] * fs / 1000))),
                       max(1, int(round(delay_ms[1] * fs / 1000)))))
        self.augmenter = dataset.Augmenter(augment, seed, fs) if augment else None

    def check_timing(self) -> None:
        """``UserError`` when a crop cannot move by the largest delay inside the record."""
        if self.length - self.width - 2 * self.delay[1] < 0:
            raise UserError(f"--crop: a crop of {self.width} of {self.length} samples leaves "
                            f"no room to move the PPG by up to {self.delay[1]} samples each "
                            f"way (--delay_ms); use a smaller --crop")

    def _augment(self, x: np.ndarray, index: int, epoch: int, stream: int) -> np.ndarray:
        if self.augmenter is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        return self.augmenter(x, index * len(VIEW_STREAMS) + stream, epoch)

    def crop(self, x: np.ndarray, index: int, epoch: int, view: str) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, index, VIEW_STREAMS[view]])
        start = int(rng.integers(0, self.length - self.width + 1))
        return self._augment(x[:, start:start + self.width], index, epoch, VIEW_STREAMS[view])

    def timing(self, x: np.ndarray, index: int, epoch: int) -> Tuple[np.ndarray, float]:
        """(the ECG crop with its own PPG, or the PPG moved by a random delay, label 1/0)."""
        stream = VIEW_STREAMS["timing"]
        rng = np.random.default_rng([self.seed, epoch, index, stream])
        lo, hi = self.delay
        start = int(rng.integers(hi, self.length - self.width - hi + 1))
        aligned = bool(rng.integers(0, 2))
        move = 0 if aligned else int(rng.integers(lo, hi + 1)) * (1 if rng.integers(0, 2) else -1)
        ecg = x[0, start:start + self.width]
        ppg = x[1, start + move:start + move + self.width]
        return self._augment(np.stack([ecg, ppg]), index, epoch, stream), float(aligned)

    def make(self, x: torch.Tensor, indices: Sequence[int], epoch: int,
             objectives: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The views the objectives need: ``a``, ``b`` (contrastive; ``a`` alone for
        cross-modal), ``timing`` with its labels ``aligned``."""
        x = x.numpy()
        out: Dict[str, torch.Tensor] = {}
        names = (["a", "b"] if "contrastive" in objectives
                 else ["a"] if "crossmodal" in objectives else [])
        for name in names:
            out[name] = torch.from_numpy(np.stack([self.crop(r, i, epoch, name)
                                                   for r, i in zip(x, indices)]))
        if "timing" in objectives:
            pairs = [self.timing(r, i, epoch) for r, i in zip(x, indices)]
            out["timing"] = torch.from_numpy(np.stack([p[0] for p in pairs]))
            out["aligned"] = torch.tensor([p[1] for p in pairs])
        return out


# ============================================================================= model
def gather(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(this tensor from every rank, concatenated in rank order; the offset of this rank's
    rows). The gather keeps gradients: each rank's loss reaches every rank's encoders."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return t, 0
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t.contiguous())), torch_dist.get_rank() * len(t)


def projector(width: int, out: int) -> nn.Sequential:
    """SimCLR's projection head: the loss is computed on its output, the encoder keeps
    the more general features before it."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))


class SSLModel(nn.Module):
    """The encoders of a ``backbones.BPModel`` and the heads of the objectives.

    forward(views, index, subject) -> {objective: (loss, accuracy)} for one batch; ``index``
    (B,) the records' global indices (their identity), ``subject`` (B,) integer subject
    codes (-1: unknown).
    """

    def __init__(self, encoders: nn.ModuleDict, objectives: Dict[str, float],
                 temperature: float, proj_dim: int, subject_positives: bool):
        super().__init__()
        self.encoders = encoders
        self.objectives, self.temperature = dict(objectives), temperature
        self.subject_positives = subject_positives
        self.early = tuple(encoders) == ("both",)
        width = next(iter(encoders.values())).out_channels
        if "contrastive" in objectives:
            self.project = projector(width * len(encoders), proj_dim)
        if "crossmodal" in objectives:
            self.project_ecg = projector(width, proj_dim)
            self.project_ppg = projector(width, proj_dim)
        if "timing" in objectives:
            channels = width if self.early else min(256, width)
            if not self.early:
                self.timing_fusion = backbones.TemporalFusion(2 * width, channels)
            self.timing_head = nn.Linear(channels, 1)

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Each encoder's (B, F, L') map of its channel(s) of x (B, C, L)."""
        if self.early:
            return [self.encoders["both"].feature_map(x)]
        return [enc.feature_map(x[:, i:i + 1]) for i, enc in enumerate(self.encoders.values())]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """What a fine-tuned late/early model's head would read: the pooled features."""
        return torch.cat([m.mean(-1) for m in self.feature_maps(x)], dim=1)

    def embed(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Unit-length embeddings of one view: ``z`` (contrastive), ``ecg``/``ppg``."""
        pooled = [m.mean(-1).float() for m in self.feature_maps(x)]
        out = {}
        if "contrastive" in self.objectives:
            out["z"] = F.normalize(self.project(torch.cat(pooled, 1)).float(), dim=1)
        if "crossmodal" in self.objectives:
            out["ecg"] = F.normalize(self.project_ecg(pooled[0]).float(), dim=1)
            out["ppg"] = F.normalize(self.project_ppg(pooled[1]).float(), dim=1)
        return out

    def timing_logits(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.feature_maps(x)
        joint = maps[0] if self.early else self.timing_fusion(torch.cat(maps, dim=1))
        return self.timing_head(joint.mean(-1)).squeeze(1)

    def contrastive(self, za: torch.Tensor, zb: torch.Tensor, index: torch.Tensor,
                    subject: torch.Tensor):
        """SupCon over both views of the global batch; this rank's views are the anchors."""
        z = torch.cat([za, zb])
        keys, offset = gather(z)
        ids = torch.cat([index, index])
        subj = torch.cat([subject, subject]) if self.subject_positives else -torch.ones_like(ids)
        key_ids, key_subj = gather(ids)[0], gather(subj)[0]
        positive = losses.contrastive_positives(ids, key_ids, subj, key_subj)
        own = offset + torch.arange(len(z), device=z.device)
        return losses.supcon_loss(z, keys, own, positive, self.temperature)

    def crossmodal(self, ecg: torch.Tensor, ppg: torch.Tensor):
        ecg_keys, offset = gather(ecg)
        ppg_keys = gather(ppg)[0]
        index = offset + torch.arange(len(ecg), device=ecg.device)
        return losses.clip_loss(ecg, ppg, ecg_keys, ppg_keys, index, self.temperature)

    def forward(self, views: Dict[str, torch.Tensor], index: torch.Tensor,
                subject: torch.Tensor) -> Dict[str, tuple]:
        out = {}
        a = self.embed(views["a"]) if "a" in views else {}
        if "contrastive" in self.objectives:
            b = self.embed(views["b"])
            out["contrastive"] = self.contrastive(a["z"], b["z"], index, subject)
        if "crossmodal" in self.objectives:
            out["crossmodal"] = self.crossmodal(a["ecg"], a["ppg"])
        if "timing" in self.objectives:
            out["timing"] = losses.timing_loss(self.timing_logits(views["timing"]),
                                               views["aligned"])
        return out

    def is_pretrained(self, name: str) -> bool:
        """For ``backbones.param_groups``: the encoders vs the objectives' heads."""
        return name.startswith("encoders.")


def bp_config(args) -> backbones.BPModelConfig:
    """The BPModel whose encoders are pre-trained (its head is never used here)."""
    return backbones.normalise_config(backbones.BPModelConfig(
        arch=args.arch, modality=args.modality,
        fusion=args.fusion if args.modality == "both" else "late", n_targets=1))


def build_model(args, pretrain: Optional[str], dist: utils.DistInfo) -> SSLModel:
    bp = backbones.build_bp_model(bp_config(args))
    if pretrain:
        utils.run_on_rank0(lambda: backbones.load_pretrained(
            bp, pretrain, trust=args.trust_checkpoint), dist)
    return SSLModel(bp.encoders, args.objectives, args.temperature, args.proj_dim,
                    not args.no_subject_positives)


# ============================================================================= data
def make_dataset(args, part: pd.DataFrame, cache: Optional[np.ndarray],
                 rows_in_cache: np.ndarray, conditioning):
    channels = backbones.MODALITY_CHANNELS[args.modality]
    none = np.zeros((len(part), 0), dtype=np.float32)
    if part.empty:
        return None
    if cache is not None:
        return dataset.CachedBPDataset(list(part["ssoid"]), cache, rows_in_cache, none, channels)
    return ConcatDataset([
        dataset.BPDataset(list(p["ssoid"]), folder, np.zeros((len(p), 0), dtype=np.float32),
                          channels, normalize=not args.no_zscore, conditioning=conditioning)
        for folder, p in part.groupby("npz_dir", sort=False)])


def ordered(part: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by folder, as ``make_dataset``'s ConcatDataset holds them."""
    return pd.concat([p for _, p in part.groupby("npz_dir", sort=False)]) if len(part) else part


def open_cache(args, table: pd.DataFrame, seq_len: int, conditioning, dist: utils.DistInfo):
    """The memory-mapped cache of every used record, built by the first process per node."""
    paths = [dataset.npz_path(d, s) for s, d in zip(table["ssoid"], table["npz_dir"])]
    if dist.local_rank == 0:
        dataset.open_cache(args.cache_dir, paths, seq_len, not args.no_zscore, conditioning)
    utils.barrier()
    return dataset.open_cache(args.cache_dir, paths, seq_len, not args.no_zscore, conditioning)


def make_parts(args, data: dict, device: torch.device, dist: utils.DistInfo) -> dict:
    """The training loader and the held-out and monitor sets (their datasets and rows)."""
    table = ordered(data["table"][data["table"]["role"] != "excluded"]).reset_index(drop=True)
    cache = (open_cache(args, table, data["seq_len"], data["conditioning"], dist)
             if args.cache_dir else None)
    codes = {s: k for k, s in enumerate(sorted(set(table["subject_id"])))}
    parts = {}
    for role in ("pretrain", "heldout"):
        index = np.flatnonzero(table["role"] == role)
        rows = table.iloc[index].reset_index(drop=True)
        parts[role] = {"rows": rows, "index": index,
                       "subject": rows["subject_id"].map(codes).to_numpy(np.int64),
                       "data": make_dataset(args, rows, cache, index, data["conditioning"])}
    n = len(parts["pretrain"]["rows"])
    sampler = GlobalBatches(n, args.batch_size, dist.rank, dist.world_size, args.seed)
    if not len(sampler):
        raise UserError(f"{n} pre-training records do not fill one global batch of "
                        f"{args.batch_size} x {dist.world_size}: lower --batch_size")
    train = parts["pretrain"]
    train["loader"] = DataLoader(
        train["data"], batch_sampler=sampler,
        collate_fn=dataset.CachedBPDataset.collate if cache is not None else None,
        num_workers=0 if cache is not None else args.num_workers,
        persistent_workers=cache is None and args.num_workers > 0,
        pin_memory=device.type == "cuda")
    return parts


def batches(part: dict, batch_size: int, rows: Optional[Sequence[int]] = None):
    """(x, row positions) of a set (or of its ``rows``) in order, batch by batch."""
    data = part["data"]
    rows = list(range(len(part["rows"]))) if rows is None else list(rows)
    for start in range(0, len(rows), batch_size):
        keys = rows[start:start + batch_size]
        if isinstance(data, dataset.CachedBPDataset):
            x = data.__getitems__(keys)[0]
        else:
            x = torch.stack([data[k][0] for k in keys])
        yield x, keys


# ============================================================================= evaluation
@torch.no_grad()
def evaluate_heldout(model: SSLModel, part: dict, views: ViewMaker, objectives, device,
                     batch_size: int) -> Dict[str, float]:
    """Each objective's loss and accuracy over the whole held-out set at once (fixed
    views), and the cross-modal top-1 retrieval of a window of the same subject."""
    model.eval()
    collected: Dict[str, list] = {}
    rows = np.arange(len(part["rows"]))
    if len(rows) > HELDOUT_MAX:
        rows = np.sort(np.random.default_rng(views.seed).choice(rows, HELDOUT_MAX, replace=False))
    index = torch.as_tensor(part["index"][rows])
    with engine.float32_inference(device):
        for x, keys in batches(part, batch_size, rows):
            made = views.make(x, part["index"][keys].tolist(), HELDOUT_EPOCH, objectives)
            made = {k: v.to(device) for k, v in made.items()}
            for name in ("a", "b"):
                if name in made:
                    for key, value in model.embed(made[name]).items():
                        collected.setdefault(f"{name}_{key}", []).append(value.cpu())
            if "timing" in made:
                collected.setdefault("logits", []).append(model.timing_logits(made["timing"]).cpu())
                collected.setdefault("aligned", []).append(made["aligned"].cpu())
    got = {k: torch.cat(v) for k, v in collected.items()}
    subject = torch.as_tensor(part["subject"][rows])
    n = len(index)
    out = {}
    if "contrastive" in objectives:
        z = torch.cat([got["a_z"], got["b_z"]])
        ids, subj = torch.cat([index, index]), torch.cat([subject, subject])
        positive = losses.contrastive_positives(ids, ids, subj, subj)
        out["contrastive"] = losses.supcon_loss(z, z, torch.arange(2 * n), positive,
                                                model.temperature)
    if "crossmodal" in objectives:
        out["crossmodal"] = losses.clip_loss(got["a_ecg"], got["a_ppg"], got["a_ecg"],
                                             got["a_ppg"], torch.arange(n), model.temperature)
        best = (got["a_ecg"] @ got["a_ppg"].T).argmax(1)
        out["crossmodal_subject"] = (None, (subject[best] == subject).float().mean())
    if "timing" in objectives:
        out["timing"] = losses.timing_loss(got["logits"], got["aligned"])
    row = {}
    for name, (loss, acc) in out.items():
        if loss is not None:
            row[f"heldout_loss_{name}"] = float(loss)
        row[f"heldout_acc_{name}"] = float(acc)
    row["heldout_records"] = n
    return row


@torch.no_grad()
def embeddings(model: SSLModel, part: dict, device, batch_size: int) -> np.ndarray:
    """Pooled encoder features of the whole records of a set, float32 inference."""
    model.eval()
    out = []
    with engine.float32_inference(device):
        for x, _ in batches(part, batch_size):
            out.append(model.pooled(x.to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def ridge_monitor(model: SSLModel, parts: dict, target_cols: Sequence[str], device,
                  batch_size: int) -> Dict[str, float]:
    """Held-out MAE of a ridge regression on frozen, standardised embeddings (fitted on
    the labelled pre-training records, alpha = the number of features so that shrinkage
    grows with the width), beside the train-mean predictor's."""
    fit, score = (_labelled(parts[r], target_cols) for r in ("pretrain", "heldout"))
    if fit is None or score is None:
        return {}
    x_fit, x_score = (embeddings(model, p, device, batch_size) for p in (fit, score))
    mean, sd = x_fit.mean(0), x_fit.std(0) + 1e-8
    y_fit, y_true = fit["y"], score["y"]
    ridge = metrics.fit_ridge((x_fit - mean) / sd, y_fit, alpha=float(x_fit.shape[1]))
    pred = (x_score - mean) / sd @ ridge.coef + ridge.intercept
    mae = metrics.regression_metrics(y_true, pred, list(target_cols))["mean"]["mae"]
    base = metrics.regression_metrics(y_true, np.broadcast_to(y_fit.mean(0), y_true.shape),
                                      list(target_cols))["mean"]["mae"]
    return {"monitor_ridge_mae": mae, "monitor_mean_mae": base,
            "monitor_ratio": mae / base if base > 0 else math.nan}


def _labelled(part: dict, target_cols: Sequence[str]) -> Optional[dict]:
    """The records of ``part`` with every target, as a sub-part (None if under 2)."""
    rows = part["rows"]
    keep = np.flatnonzero(rows[list(target_cols)].notna().all(axis=1).to_numpy())
    if len(keep) < 2:
        return None
    sub = dict(part, rows=rows.iloc[keep].reset_index(drop=True),
               y=rows.iloc[keep][list(target_cols)].to_numpy(np.float64))
    data = part["data"]
    sub["data"] = (dataset.CachedBPDataset(list(sub["rows"]["ssoid"]), data.cache,
                                           data.rows[keep], np.zeros((len(keep), 0)),
                                           data.channels)
                   if isinstance(data, dataset.CachedBPDataset)
                   else torch.utils.data.Subset(data, keep.tolist()))
    return sub


def monitor_row(args, model: SSLModel, parts: dict, views: ViewMaker, device) -> dict:
    """The held-out pretext scores and the ridge monitor (rank 0)."""
    row = {}
    if len(parts["heldout"]["rows"]) >= 2:
        row.update(evaluate_heldout(model, parts["heldout"], views, list(args.objectives),
                                    device, args.batch_size))
    if args.target_cols:
        row.update(ridge_monitor(model, parts, args.target_cols, device, args.batch_size))
    return row


# ============================================================================= files
def encoder_file(args, model: SSLModel, data: dict, epoch: int) -> dict:
    """ssl_encoders.pth: every encoder tensor as ``<encoder>.<Net1D key>`` (the joint
    layout of ``backbones.load_pretrained``) and the settings it was trained with."""
    cfg = bp_config(args)
    state = {f"{name}.{key}": value for name, enc in model.encoders.items()
             for key, value in enc.state_dict().items()}
    return {"state_dict": state, "format": FORMAT, "epoch": epoch,
            "encoder_settings": {"arch": args.arch, "modality": args.modality,
                                 "fusion": args.fusion, "net1d": cfg.net1d},
            "model_config": asdict(cfg), "conditioning": data["conditioning"],
            "zscore": not args.no_zscore, "sample_rate_hz": data["rate"],
            "seq_len": data["seq_len"], "objectives": dict(args.objectives),
            "exclude": data["exclude"], "args": vars(args)}


def write_run_files(args, data: dict) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    utils.write_json_atomic(os.path.join(args.out_dir, "args.json"), vars(args))
    utils.write_csv_atomic(os.path.join(args.out_dir, "ssl_records.csv"),
                           data["table"][["ssoid", "subject_id", "npz_dir", "role"]])
    utils.write_csv_atomic(os.path.join(args.out_dir, "skipped_records.csv"), data["skipped"])


def save_epoch(args, model: SSLModel, data: dict, epoch: int, state: dict,
               history: List[dict]) -> None:
    """ssl_encoders.pth, ssl_last.pth, ssl_history.csv and its plot; rank 0 only."""
    out = args.out_dir
    utils.save_checkpoint(os.path.join(out, "ssl_encoders.pth"),
                          encoder_file(args, model, data, epoch))
    utils.save_checkpoint(os.path.join(out, "ssl_last.pth"),
                          {"model": model.state_dict(), "epoch": epoch, "args": vars(args),
                           "history": history, **state})
    frame = history_frame(history, list(args.objectives))
    utils.write_csv_atomic(os.path.join(out, "ssl_history.csv"), frame)
    plot_history(frame, os.path.join(out, "ssl_history.png"), list(args.objectives))


def history_frame(history: List[dict], objectives: Sequence[str]) -> pd.DataFrame:
    """ssl_history.csv: epoch, the training loss, per objective its loss and accuracy on
    the pre-training batches, then on the held-out subjects, the monitor, the rest."""
    frame = pd.DataFrame(history)
    first = ["epoch", "loss", *(f"{w}_{k}" for k in objectives for w in ("loss", "acc"))]
    first += [c for c in frame.columns if c.startswith("heldout_")]
    first += [c for c in frame.columns if c.startswith("monitor_")]
    first = [c for c in first if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def plot_history(history: pd.DataFrame, path: str, objectives: Sequence[str]) -> None:
    """Loss and pretext accuracy per objective (pre-training records solid, held-out
    subjects dashed) and the ridge monitor against the train-mean predictor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    monitor = "monitor_ridge_mae" in history.columns
    fig, axes = plt.subplots(1, 3 if monitor else 2, figsize=(13 if monitor else 9, 3.6))
    trained = history[history["epoch"] > 0]
    for k, obj in enumerate(objectives):
        color = f"C{k}"
        for ax, what in zip(axes, ("loss", "acc")):
            ax.plot(trained["epoch"], trained[f"{what}_{obj}"], color=color, label=obj)
            column = f"heldout_{what}_{obj}"
            if column in history.columns:  # every --monitor_every epochs
                held = history[["epoch", column]].dropna()
                ax.plot(held["epoch"], held[column], "--o", markersize=3, color=color,
                        label=f"{obj}, held out")
    axes[0].set(title="loss (held out: over the whole held-out set)", xlabel="epoch")
    axes[1].set(title="pretext accuracy", xlabel="epoch", ylim=(0, 1.02))
    axes[1].legend(fontsize=7, loc="best")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if monitor:
        rows = history[["epoch", "monitor_ridge_mae", "monitor_mean_mae"]].dropna()
        axes[2].plot(rows["epoch"], rows["monitor_ridge_mae"], "o-",
                     label="ridge on frozen embeddings")
        axes[2].plot(rows["epoch"], rows["monitor_mean_mae"], ":", color="gray",
                     label="train mean")
        axes[2].set(title="monitor: held-out MAE (mmHg)", xlabel="epoch")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ============================================================================= training
def restore(saved: dict, model, optimizer, scheduler, scaler, dist: utils.DistInfo,
            device: torch.device) -> List[dict]:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    utils.set_rng_state(saved["rng_states"][dist.rank], device)
    print(f"resuming after epoch {saved['epoch']}")
    return list(saved["history"])


def batch_loss_fn(train_model, views: ViewMaker, objectives: Dict[str, float], parts: dict,
                  device: torch.device, amp_dtype, epoch_box: list):
    """``engine.train_steps``'s batch function: views, forward, weighted sum of losses."""
    position = {s: k for k, s in enumerate(parts["pretrain"]["rows"]["ssoid"])}
    index = parts["pretrain"]["index"]
    subject = parts["pretrain"]["subject"]

    def batch_loss(batch):
        x, _, _, ids = batch
        rows = [position[s] for s in ids]
        made = views.make(x, index[rows].tolist(), epoch_box[0], list(objectives))
        made = {k: v.to(device, non_blocking=True) for k, v in made.items()}
        with engine.autocast(device, amp_dtype):
            out = train_model(made, torch.as_tensor(index[rows], device=device),
                              torch.as_tensor(subject[rows], device=device))
        total = sum(objectives[k] * out[k][0].float() for k in objectives)
        extras = {}
        for k in objectives:
            extras[f"loss_{k}"] = out[k][0].item()
            extras[f"acc_{k}"] = out[k][1].item()
        return total, len(ids), extras

    return batch_loss


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    with engine.process(args.device, args.threads) as (dist, device):
        pretrain(args, dist, device)


def start_on_rank0(args, dist: utils.DistInfo):
    def start():
        utils.check_run_dir(args.out_dir, args.resume, args.overwrite, "ssl_last.pth")
        saved = (utils.load_checkpoint(os.path.join(args.out_dir, "ssl_last.pth"))
                 if args.resume else None)
        if saved is not None:
            train_bp.check_resume(args, saved, dist.world_size)
        return saved, load_data(args)

    return utils.run_on_rank0(start, dist)


def pretrain(args, dist: utils.DistInfo, device: torch.device) -> None:
    print(f"git {train_bp.git_revision()}  torch {torch.__version__}  model {args.arch} "
          f"{args.modality}" + (f"/{args.fusion}" if args.fusion != "none" else "")
          + "  objectives " + " ".join(f"{k}={w:g}" for k, w in args.objectives.items())
          + f"  epochs {args.epochs}  seed {args.seed}  out_dir {args.out_dir}")
    amp_dtype = engine.resolve_amp(args.amp, device)
    utils.seed_everything(args.seed)  # one init on every rank

    # ---------------------------------------------------------------- data and model
    saved, data = start_on_rank0(args, dist)
    views = ViewMaker(args.seed, args.crop, data["seq_len"], data["rate"], args.delay_ms,
                      args.augment)
    if "timing" in args.objectives:
        views.check_timing()
    model = build_model(args, None if saved else args.pretrain, dist).to(device)
    parts = make_parts(args, data, device, dist)
    loader = parts["pretrain"]["loader"]
    opt_args = SimpleNamespace(lr_backbone=args.lr, lr_head=args.lr,
                               weight_decay=args.weight_decay, epochs=args.epochs,
                               warmup_epochs=args.warmup_epochs)
    optimizer, scheduler = train_bp.build_optimizer(opt_args, model, len(loader))
    scaler = engine.make_scaler(device, amp_dtype)
    history: List[dict] = []
    if saved is not None:
        history = restore(saved, model, optimizer, scheduler, scaler, dist, device)
    train_model = (DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
        if dist.enabled else model)
    if dist.is_main:
        write_run_files(args, data)
    print(f"device {device}  amp {amp_dtype}  processes {dist.world_size}  records per step "
          f"{args.batch_size} x {dist.world_size} = {args.batch_size * dist.world_size}  "
          f"lr {args.lr:g}  {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters  {len(parts['pretrain']['rows'])} pre-training records of length "
          f"{data['seq_len']}, crops of {views.width}")
    if saved is None and dist.is_main:  # epoch 0: the starting encoders, for reference
        row = {"epoch": 0, **monitor_row(args, model, parts, views, device)}
        history.append(row)
        print(epoch_line(row, args))
    utils.barrier()

    # ---------------------------------------------------------------- epochs
    epoch_box = [0]
    batch_loss = batch_loss_fn(train_model, views, args.objectives, parts, device,
                               amp_dtype, epoch_box)
    for epoch in range(saved["epoch"] + 1 if saved else 1, args.epochs + 1):
        tic = time.perf_counter()
        epoch_box[0] = epoch
        loader.batch_sampler.set_epoch(epoch)
        stats = engine.train_steps(train_model, loader, batch_loss, optimizer, scaler,
                                   args.grad_clip, epoch, scheduler)
        row = {"epoch": epoch, "loss": stats["loss"], **stats["extras"],
               "lr": stats["lr_first"].get("backbone", args.lr),
               "records_per_s": stats["records_per_s"], "skipped_steps": stats["skipped_steps"]}
        if dist.is_main and (epoch % args.monitor_every == 0 or epoch == args.epochs):
            row.update(monitor_row(args, model, parts, views, device))
        row["seconds"] = time.perf_counter() - tic
        history.append(row)
        rng_states = utils.all_gather_object(utils.rng_state(device))
        if dist.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng_states": rng_states,
                     "world_size": len(rng_states)}
            save_epoch(args, model, data, epoch, state, history)
            print(epoch_line(row, args))
    if dist.is_main:
        print(f"encoders: {os.path.join(args.out_dir, 'ssl_encoders.pth')}; fine-tune with "
              f"train_bp.py --pretrain {os.path.join(args.out_dir, 'ssl_encoders.pth')} "
              f"--arch {args.arch} --modality {args.modality}"
              + (f" --fusion {args.fusion}" if args.modality == "both" else ""))


def epoch_line(row: dict, args) -> str:
    parts = [f"epoch {row['epoch']}/{args.epochs}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    for k in args.objectives:
        text = f"{k} {row[f'loss_{k}']:.3f} acc {row[f'acc_{k}']:.3f}" if f"loss_{k}" in row \
            else k
        if f"heldout_acc_{k}" in row:
            text += f" (held out {row[f'heldout_acc_{k}']:.3f})"
        parts.append(text)
    if "monitor_ridge_mae" in row:
        parts.append(f"monitor ridge MAE {row['monitor_ridge_mae']:.2f} "
                     f"(train mean {row['monitor_mean_mae']:.2f})")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.0f} s")
    return "  ".join(parts)


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
