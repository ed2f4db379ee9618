"""Apply a trained BP model to new records.

    python predict_bp.py --checkpoint OUT/bp_best.pth --npz_dir DIR --output preds.csv \
        [--labels_csv labels.csv]
    python predict_bp.py --checkpoint OUT/bp_best.pth --h5_path cohort.h5 --output preds.csv

The checkpoint alone decides the model: its arch, modality, fusion, z-scoring, record length,
target normalisation and output constraint. ``--npz_dir`` reads ``<ssoid>.npz`` files as
written by ``prepare_kailuan_npz.py``; ``--h5_path`` reads a Kailuan-layout HDF5 through the
same reader and resampler, without writing npz files (a model trained on records at a known
sampling rate needs the rows' time base: ``--record_seconds`` or ``--fs_ecg``/``--fs_ppg``, as
at prep; npz files at another rate are refused). The output CSV has ``ssoid``,
``<target>_pred`` per target and ``split``: the record's split in the checkpoint's run (by
ssoid, or by signal digest for a renamed copy), else ``<split>_subject`` for a new record of
a subject the run saw (the run's subject rule, see ``subject_candidates``), else ``new``;
with ``--labels_csv`` it has ``<target>_true`` beside each prediction (empty where the label
is missing) and ``<output stem>_metrics.json`` holds one block of
``metrics.split_metrics`` per split, over the records with every label, with the
cuffless-BP blocks of ``metrics.clinical_blocks``. Predictions are the run's reported ones:
recalibrated when it ran with ``--recalibrate affine``, and with its ``--interval`` the
``<target>_lo``/``<target>_hi`` columns after all others (both calibrations travel in the
checkpoint). Records that can't be used are listed in ``<output stem>_skipped.csv``.

A model trained with ``--covariates`` reads them, encoded as in training (the checkpoint
holds the encoding), from ``--labels_csv`` with ``--npz_dir`` and from the HDF5 metadata
with ``--h5_path``; without them it stops with an error. A record missing from the CSV is
skipped; a missing value or a category unseen in training is filled as in training.

A cohort without ECG (or without PPG): an npz folder prepared with ``--ecg_key none``, or
``--h5_path`` with ``--ecg_key none``; a model whose modality reads the missing signal is
refused with one line.
"""
from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

import backbones
import dataset
import engine
import metrics
import physio
import prepare_kailuan_npz as prep
import utils
from prepare_kailuan_npz import DIGEST_COLUMN
from utils import UserError

Batch = Tuple[List[str], torch.Tensor, torch.Tensor]  # ids, x, covariates


def get_args_parser() -> utils.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="bp_best.pth of a train_bp.py run")
    p.add_argument("--npz_dir", default=None, help="folder of <ssoid>.npz records")
    p.add_argument("--h5_path", default=None, help="cohort HDF5 in the Kailuan layout")
    p.add_argument("--output", required=True, help="predictions CSV to write")
    p.add_argument("--labels_csv", default=None, help="labels (ssoid + targets) to score against")
    p.add_argument("--id_key", default="new_id", help="with --h5_path: the id field")
    p.add_argument("--meta_group", default=prep.META_GROUP,
                   help="with --h5_path: HDF5 group of the metadata fields")
    p.add_argument("--ecg_key", default=prep.ECG_KEY,
                   help="with --h5_path: HDF5 dataset of the ECG rows")
    p.add_argument("--ppg_key", default=prep.PPG_KEY,
                   help="with --h5_path: HDF5 dataset of the PPG rows")
    add_time_base_flags(p)
    p.add_argument("--mains_hz", type=float, default=None,
                   help="with --h5_path and a model that takes physiological features: the "
                        "mains frequency notched before R-peak detection (default: the one "
                        "prepare_kailuan_npz.py used for the training records, kept in the "
                        "checkpoint; 50 when it is not known)")
    p.add_argument("--batch_size", type=int, default=64,
                   help="records per forward pass (memory grows with it)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow full unpickling of --checkpoint (only for a file you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def add_time_base_flags(p: utils.ArgumentParser) -> None:
    """prep's time-base flags (``prep.time_base_of`` reads them), saying what each does
    here: the HDF5 rows are prepared to the checkpoint's record length and rate."""
    g = p.add_argument_group("time base of --h5_path rows (as given to prep for the "
                             "training records; --npz_dir records carry their own)")
    g.add_argument("--record_seconds", type=float, default=None,
                   help="time span of every HDF5 row in seconds (rows of one duration): each "
                        "row is resampled to the checkpoint's record length, which must make "
                        "the checkpoint's sampling rate (record length / record_seconds)")
    g.add_argument("--fs_ecg", type=float, default=None,
                   help="native sampling rate of the ECG rows in Hz (with --fs_ppg; with "
                        "--ppg_key none, alone): each row is resampled to the checkpoint's "
                        "sampling rate and cut or padded to its record length, so rows of "
                        "any duration are timed as the training records were")
    g.add_argument("--fs_ppg", type=float, default=None,
                   help="native sampling rate of the PPG rows in Hz (with --fs_ecg; with "
                        "--ecg_key none, alone)")
    g.add_argument("--target_fs", type=float, default=None,
                   help="not needed: with --fs_ecg/--fs_ppg the rows are resampled to the "
                        "checkpoint's sampling rate; another value is refused")


def check_args(args) -> None:
    if (args.npz_dir is None) == (args.h5_path is None):
        raise UserError("give exactly one of --npz_dir and --h5_path")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    utils.check_output_file("--output", args.output, args.overwrite)


def load_model(args) -> Tuple[backbones.BPModel, dict]:
    ckpt = utils.load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "target_cols" not in ckpt:
        raise UserError(f"--checkpoint {args.checkpoint} is not a train_bp.py checkpoint "
                        f"(no model_config/target_cols)")
    model = backbones.build_bp_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    ckpt.setdefault("covariates", [])  # checkpoints from before covariates existed
    return model.eval(), ckpt


def read_labels(path: str, ckpt: dict) -> pd.DataFrame:
    """The labels CSV, with the column the run took subjects from and the signal digests
    kept as text (so they compare with the run's)."""
    text = [c for c in (ckpt["args"].get("subject_col"), DIGEST_COLUMN) if c]
    return dataset.read_labels(path, ckpt["target_cols"], text=text)


def check_time_base(args, ckpt: dict) -> prep.TimeBase:
    """Records must be at the rate the model was trained at (``sample_rate_hz`` of the
    checkpoint, None when unknown): the rate of --npz_dir's manifest, or the HDF5 rows
    prepared with the time-base flags (then at the checkpoint's rate)."""
    rate, length = ckpt.get("sample_rate_hz"), ckpt["seq_len"]
    trained = f"the model in {args.checkpoint} was trained on records at {rate:g} Hz" \
        if rate else ""
    if args.npz_dir:
        given = utils.npz_sample_rate(args.npz_dir)
        if rate and given and not math.isclose(rate, given, rel_tol=1e-9):
            raise UserError(f"--npz_dir {args.npz_dir} holds records at {given:g} Hz, but "
                            f"{trained}; prepare them with that rate")
        return prep.TimeBase()
    base = prep.time_base_of(args)
    if rate is None:
        if base.fs or base.record_seconds:
            raise UserError(f"the model in {args.checkpoint} records no sampling rate (its "
                            f"records were prepared without --record_seconds or "
                            f"--fs_ecg/--fs_ppg): leave those flags out")
        return base
    if base.fs:
        if args.target_fs is not None and not math.isclose(args.target_fs, rate,
                                                           rel_tol=1e-9):
            raise UserError(f"--target_fs {args.target_fs:g}: {trained}, and the rows are "
                            f"resampled to that rate; leave --target_fs out")
        return prep.TimeBase(fs=base.fs, target_fs=rate)
    own = base.sample_rate(length)
    if own is None:
        raise UserError(f"{trained}: with --h5_path give --record_seconds or "
                        f"--fs_ecg/--fs_ppg so the rows are prepared alike")
    if not math.isclose(own, rate, rel_tol=1e-9):
        raise UserError(f"--record_seconds {args.record_seconds:g} makes {length} samples "
                        f"{own:g} Hz, but {trained}")
    return base


def check_covariates(args, ckpt: dict, labels: Optional[pd.DataFrame]) -> None:
    """A model trained with covariates needs them: ``UserError`` naming what is missing."""
    names = [spec["name"] for spec in ckpt["covariates"]]
    if not names:
        return
    needs = f"the model in {args.checkpoint} takes the covariates {', '.join(names)}"
    if args.h5_path:
        with prep.open_h5(args.h5_path) as f:
            absent = [n for n in metadata_covariates(ckpt)
                      if f"{args.meta_group}/{n}" not in f]
        if absent:
            raise UserError(f"--h5_path {args.h5_path} has no {args.meta_group}/"
                            f"{', '.join(absent)}: {needs}")
    elif labels is None:
        raise UserError(f"{needs}: give --labels_csv with those columns")
    elif any(n not in labels.columns for n in names):
        absent = [n for n in names if n not in labels.columns]
        raise UserError(f"--labels_csv {args.labels_csv} has no column {', '.join(absent)}: "
                        f"{needs}")


# ----------------------------------------------------------------------------- record sources
def npz_batches(args, ckpt: dict, skipped: list, filled: Counter,
                labels: Optional[pd.DataFrame]) -> Tuple[int, Iterator[Batch]]:
    """Checked npz records in batches; bad ones are added to ``skipped``, and so are
    records without a labels row when the model takes covariates (``filled`` counts the
    covariate values filled as in training)."""
    if not os.path.isdir(args.npz_dir):
        raise UserError(f"--npz_dir {args.npz_dir}: no such directory")
    ids = sorted(f[:-4] for f in os.listdir(args.npz_dir) if f.endswith(".npz"))
    if not ids:
        raise UserError(f"--npz_dir {args.npz_dir} holds no .npz files")
    if labels is not None:
        check_labels_match(args, ckpt, labels, ids, f"--npz_dir {args.npz_dir}")
    channels = utils.npz_channels(args.npz_dir)
    check_channels(args, ckpt, channels, f"--npz_dir {args.npz_dir} holds")
    used = [utils.NPZ_CHANNELS[c] for c in backbones.MODALITY_CHANNELS[ckpt["modality"]]]
    good, length, bad = dataset.check_records(ids, args.npz_dir, channels=used)
    skipped += list(zip(bad["ssoid"], bad["reason"]))
    if good and length != ckpt["seq_len"]:
        raise UserError(f"--npz_dir {args.npz_dir}: records have {length} samples, the model "
                        f"was trained on {ckpt['seq_len']}; prepare them with "
                        f"--target_seq_len {ckpt['seq_len']}")
    cov = None
    if ckpt["covariates"]:
        known = set(labels["ssoid"])
        skipped += [(s, "not in --labels_csv, so its covariates are unknown")
                    for s in good if s not in known]
        good = [s for s in good if s in known]
        if not good:
            raise UserError(f"--npz_dir {args.npz_dir}: no usable record has a row in "
                            f"--labels_csv {args.labels_csv} (first skipped: "
                            f"{skipped[0][0]}: {skipped[0][1]})")
        cov = encode_covariates(labels.drop_duplicates("ssoid").set_index("ssoid").loc[good],
                                ckpt["covariates"], filled)
    ds = dataset.BPDataset(good, args.npz_dir, np.zeros((len(good), 0)),
                           backbones.MODALITY_CHANNELS[ckpt["modality"]], ckpt["zscore"],
                           conditioning=ckpt.get("conditioning"),
                           covariates=cov)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
    return len(good), ((list(ids_), x, c) for x, c, _, ids_ in loader)


def check_labels_match(args, ckpt: dict, labels: pd.DataFrame, ids: Sequence[str],
                       source: str) -> None:
    """``UserError`` when no labels row is a record of ``source`` (labels for other
    records); a warning with the counts when some records or rows have no partner."""
    rows = set(labels["ssoid"])
    unlabelled = sum(i not in rows for i in ids)
    if unlabelled == len(ids):
        raise UserError(f"--labels_csv {args.labels_csv}: none of its {len(rows)} ssoids is a "
                        f"record of {source} (e.g. {labels['ssoid'].iloc[0]!r} vs "
                        f"{ids[0]!r}); give the labels of these records")
    unmatched = len(rows - set(ids))
    fate = ("skipped: the model needs their covariates" if ckpt["covariates"] and args.npz_dir
            else "no truth, left out of the metrics")
    parts = ([f"{unlabelled} of the {len(ids)} records of {source} have no row ({fate})"]
             if unlabelled else [])
    parts += [f"{unmatched} of its {len(rows)} ssoids match no record"] if unmatched else []
    if parts:
        print(f"warning: --labels_csv {args.labels_csv}: " + "; ".join(parts))


def check_channels(args, ckpt: dict, present: Sequence[str], source: str) -> None:
    """``UserError`` when the model reads a signal that the records lack (a cohort
    prepared, or read, with --ecg_key none or --ppg_key none)."""
    missing = utils.missing_channels(backbones.MODALITY_CHANNELS[ckpt["modality"]], present)
    if missing:
        raise UserError(f"the model in {args.checkpoint} (modality {ckpt['modality']}) needs "
                        f"the {' and '.join(missing).upper()} signal, but {source} only "
                        f"{', '.join(present).upper()}")


def metadata_covariates(ckpt: dict) -> List[str]:
    """The model's covariates read from the HDF5 metadata: all but the physiological
    features, which are computed from the signals."""
    return [s["name"] for s in ckpt["covariates"] if s["name"] not in physio.FEATURE_COLUMNS]


def h5_batches(args, ckpt: dict, skipped: list, filled: Counter, time_base: prep.TimeBase,
               digests: Dict[str, str]) -> Tuple[Optional[int], Iterator[Batch]]:
    """Records of a cohort HDF5, prepared exactly as prepare_kailuan_npz.py does (with
    ``time_base``, and the physiological features that the model's covariates name computed
    by the same code from the same resampled rows); each record's signal digest, as prep
    computes it from the raw rows, is added to ``digests``."""
    channels = backbones.MODALITY_CHANNELS[ckpt["modality"]]
    check_channels(args, ckpt, prep.present_channels(args),
                   f"--h5_path {args.h5_path} with --ecg_key {args.ecg_key} --ppg_key "
                   f"{args.ppg_key} gives")
    features = len(metadata_covariates(ckpt)) < len(ckpt["covariates"])
    if features and not ckpt.get("sample_rate_hz"):
        raise UserError(f"the model in {args.checkpoint} takes physiological features but "
                        f"records no sampling rate to compute them at")
    mains_hz = next(m for m in (args.mains_hz, ckpt.get("features_mains_hz"), physio.MAINS_HZ)
                    if m is not None)
    records = prep.iter_records(args.h5_path, args.id_key,
                                meta_fields=metadata_covariates(ckpt),
                                meta_group=args.meta_group, ecg_key=args.ecg_key,
                                ppg_key=args.ppg_key)
    first = next(records, None)  # opens and checks the file before anything is written
    if first is None:
        raise UserError(f"--h5_path {args.h5_path} holds no records")

    def batch(recs: List[prep.Record], xs: List[np.ndarray]) -> Batch:
        meta = pd.DataFrame([rec.meta for rec in recs], index=range(len(recs)))
        return ([rec.id for rec in recs], torch.from_numpy(np.stack(xs)),
                torch.from_numpy(encode_covariates(meta, ckpt["covariates"], filled)))

    def batches() -> Iterator[Batch]:
        recs: List[prep.Record] = []
        xs: List[np.ndarray] = []
        seen = set()
        for rec in itertools.chain([first], records):
            if rec.id in seen:  # prepare's rule: the first row with an id is the record
                skipped.append((rec.id, "duplicate_id"))
                continue
            seen.add(rec.id)
            digests[rec.id] = prep.signal_digest(rec.ecg, rec.ppg)
            x, reason = prep.record_to_x(rec.ecg, rec.ppg, ckpt["seq_len"], time_base)
            if reason:
                skipped.append((rec.id, reason))
                continue
            if features:
                rate = ckpt["sample_rate_hz"]
                rec.meta.update(prep.x_features(x, rate, mains_hz))
            recs.append(rec)
            xs.append(dataset.model_input(x, channels, ckpt["zscore"], ckpt.get("conditioning")))
            if len(recs) == args.batch_size:
                yield batch(recs, xs)
                recs, xs = [], []
        if recs:
            yield batch(recs, xs)

    return None, batches()


def encode_covariates(frame: pd.DataFrame, specs, filled: Counter) -> np.ndarray:
    """``dataset.encode_covariates``, adding the counts of filled values to ``filled``."""
    cov, counts = dataset.encode_covariates(frame, specs)
    filled.update(counts)
    return cov



# ----------------------------------------------------------------------------- prediction
def predict(model, batches: Iterator[Batch], total: Optional[int], ckpt: dict,
            device: torch.device) -> Tuple[List[str], np.ndarray]:
    """Ids and predictions in mmHg, in the order of ``batches``."""
    model.to(device)
    ids: List[str] = []
    preds: List[np.ndarray] = []
    with utils.progress(total=total, desc="predict", unit="rec") as bar:
        for batch_ids, x, cov in batches:
            with engine.float32_inference(device):
                preds.append(model(x.to(device), cov.to(device)).float().cpu().numpy())
            ids += batch_ids
            bar.update(len(batch_ids))
    if not ids:
        raise UserError("no usable records to predict (see the skipped list above)")
    return ids, engine.to_mmhg(np.concatenate(preds), ckpt["target_mean"], ckpt["target_std"])


def truths(labels: pd.DataFrame, ids: Sequence[str]) -> pd.DataFrame:
    """Labels of ``ids`` in order (NaN where unknown), with each record's subject."""
    labels = labels.drop_duplicates("ssoid").set_index("ssoid").reindex(list(ids))
    if "subject_id" in labels.columns:
        subjects = labels["subject_id"].astype(object)
        labels["subject"] = subjects.where(subjects.notna(), [utils.subject_of(i) for i in ids])
    else:
        labels["subject"] = [utils.subject_of(i) for i in ids]
    return labels


# ----------------------------------------------------------------------------- seen or new
SPLIT_ORDER = ("new", "test_subject", "val_subject", "train_subject", "test", "val", "train",
               "unknown")
SPLIT_MEANING = {
    "new": "subjects the checkpoint's run never saw",
    "test_subject": "subject in the run's test split: more records of subjects already in "
                    "the run's test figures, not new subjects",
    "val_subject": "subject in the run's val split, which chose the epoch: not an "
                   "unseen-subject estimate",
    "train_subject": "subject in the run's train split: not an unseen-subject estimate",
    "test": "the run's test split", "val": "the run's validation split",
    "train": "records the model was trained on: not a measure of performance",
    "unknown": "the checkpoint does not say which records it was trained on"}
UNCHECKED_NEW = "records the checkpoint's run never saw; their subjects could not be checked"


class RunMembers(NamedTuple):
    """The checkpoint's run, each member mapped to its split: record ids, subjects (None
    when unknown) and signal digests; ``by_prefix``: its subjects are its ssoids' parts
    before the first ``_`` (so that rule finds a new record's subject)."""
    ids: Dict[str, str]
    subjects: Optional[Dict[str, str]]
    digests: Dict[str, str]
    by_prefix: bool


def run_members(checkpoint: str, ckpt: dict) -> Tuple[RunMembers, str]:
    """The run's members, and why its subjects are unknown ('' when known): from the
    checkpoint, else (an older checkpoint) from the run's split.csv beside it."""
    ids = {s: name for name, members in ckpt["split_ids"].items() for s in members}
    digests = {d: name for name, members in ckpt.get("split_digests", {}).items()
               for d in members if d}
    if "split_subjects" in ckpt:
        pairs = [(s, subject) for name, members in ckpt["split_ids"].items()
                 for s, subject in zip(members, ckpt["split_subjects"][name])]
    else:
        pairs, why = split_csv_subjects(checkpoint, ids)
        if pairs is None:
            return RunMembers(ids, None, digests, False), why
    subjects = {subject: ids[s] for s, subject in pairs}  # subject-wise: one split each
    by_prefix = all(subject == utils.subject_of(s) for s, subject in pairs)
    return RunMembers(ids, subjects, digests, by_prefix), ""


def split_csv_subjects(checkpoint: str,
                       ids: Dict[str, str]) -> Tuple[Optional[List[Tuple[str, str]]], str]:
    """(ssoid, subject) of the run's records from the split.csv beside ``checkpoint`` when
    it lists exactly the checkpoint's records, else None and why not."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "split.csv")
    if not os.path.isfile(path):
        return None, "the checkpoint predates the record of its subjects and no split.csv " \
                     "lies beside it"
    not_its_run = f"the checkpoint predates the record of its subjects and {path} is not " \
                  f"the split of its run"
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return None, not_its_run
    if not {"ssoid", "subject_id", "split"} <= set(table.columns) \
            or dict(zip(table["ssoid"], table["split"])) != ids:
        return None, not_its_run
    return list(zip(table["ssoid"], table["subject_id"])), ""


def subject_candidates(ckpt: dict, run: RunMembers, labels: Optional[pd.DataFrame],
                       ids: Sequence[str]) -> Tuple[List[List[str]], str]:
    """The subjects each record may have under the run's rule: its labels-CSV value in the
    column the run took subjects from (--subject_col, else subject_id), and its ssoid prefix
    when that was the run's rule; with none, why."""
    column = ckpt["args"].get("subject_col") or "subject_id"
    values = [None] * len(ids)
    if labels is not None and column in labels.columns:
        values = labels.drop_duplicates("ssoid").set_index("ssoid")[column] \
            .reindex(list(ids)).tolist()
    candidates = [[str(v)] if isinstance(v, str) and v.strip() else [] for v in values]
    if run.by_prefix:
        candidates = [c + [utils.subject_of(i)] for c, i in zip(candidates, ids)]
    source = "no --labels_csv" if labels is None else f"--labels_csv has no {column} value"
    return candidates, f"the run took its subjects from column {column}, and {source}"


def splits_of(args, ckpt: dict, ids: Sequence[str], labels: Optional[pd.DataFrame],
              digests: Dict[str, str]) -> Tuple[List[str], bool]:
    """Each record's split in the checkpoint's run: its own, found by ssoid or else by
    signal digest (a renamed copy); else ``<split>_subject`` when the run saw its subject;
    else ``new``. ``unknown`` for every record when the checkpoint predates the record of
    its split. Also whether every ``new`` record's subject was checked."""
    if "split_ids" not in ckpt:
        print("warning: this checkpoint does not record its run's split, so the metrics "
              "cannot tell training records from new ones (split 'unknown')")
        return ["unknown"] * len(ids), True
    run, why = run_members(args.checkpoint, ckpt)
    splits = [run.ids.get(i) or run.digests.get(digests.get(i, "")) for i in ids]
    copies = sum(s is not None and i not in run.ids for s, i in zip(splits, ids))
    if copies:
        print(f"note: {copies} records are renamed copies of the run's records (same "
              f"{DIGEST_COLUMN}, other ssoid): each is counted in that record's split")
    unchecked = 0
    if run.subjects is not None:
        candidates, why = subject_candidates(ckpt, run, labels, ids)
        for k, names in enumerate(candidates):
            seen = [run.subjects[n] for n in names if n in run.subjects]
            if splits[k] is None and seen:
                splits[k] = f"{seen[0]}_subject"
            unchecked += splits[k] is None and not names
    else:
        unchecked = sum(s is None for s in splits)
    if unchecked:
        print(f"warning: {unchecked} records new to the run cannot be checked for a subject "
              f"it saw ({why}): 'new' counts them unchecked")
    return [s or "new" for s in splits], not unchecked


def split_reports(ckpt: dict, y_true: np.ndarray, y_pred: np.ndarray, subjects: np.ndarray,
                  splits: np.ndarray, labels: Optional[pd.DataFrame] = None,
                  raw: Optional[np.ndarray] = None, intervals: Optional[tuple] = None) -> dict:
    """One ``metrics.split_metrics`` block per split present among the fully labelled
    records, in ``SPLIT_ORDER``; with ``labels`` (``truths``, row by row) also the
    cuffless-BP blocks of ``clinical_report``."""
    complete = ~np.isnan(y_true).any(axis=1)
    report = {}
    for name in SPLIT_ORDER:
        keep = complete & (splits == name)
        if keep.any():
            report[name] = metrics.split_metrics(y_true[keep], y_pred[keep], subjects[keep],
                                                 ckpt["target_cols"], ckpt["target_mean"])
            if labels is not None:
                report[name].update(clinical_report(ckpt, keep, y_true, y_pred, subjects,
                                                    labels, raw, intervals))
    return report


def clinical_report(ckpt: dict, keep: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                    subjects: np.ndarray, labels: pd.DataFrame, raw: Optional[np.ndarray],
                    intervals: Optional[tuple]) -> dict:
    """``metrics.clinical_blocks`` of the records ``keep``, with the run's band sets and
    sex, age and order columns (train_bp.py's flags, kept in the checkpoint's ``args``),
    the intervals' coverage, and the ``recalibration`` block when the checkpoint has one."""
    args, cols = ckpt["args"], list(ckpt["target_cols"])
    part = labels[keep]

    def column(name: Optional[str]) -> Optional[np.ndarray]:
        return part[name].to_numpy() if name and name in part.columns else None

    order = column(args.get("calibration_order"))
    conformal = ckpt.get("conformal")
    out = metrics.clinical_blocks(
        y_true[keep], y_pred[keep], subjects[keep], cols,
        metrics.target_band_sets(cols, args.get("bands")),
        part.index.to_numpy() if order is None else order,
        sex=column(args.get("sex_col", "sex")), age=column(args.get("age_col", "age")),
        intervals=None if intervals is None else (intervals[0][keep], intervals[1][keep],
                                                  conformal))
    recal = ckpt.get("recalibration")
    if recal is not None and raw is not None:
        out["recalibration"] = metrics.recalibration_block(
            y_true[keep], raw[keep], recal["map"], cols, recal["applied"], engine.MMHG_DECIMALS)
    return out


def record_digests(labels: Optional[pd.DataFrame], computed: Dict[str, str]) -> Dict[str, str]:
    """ssoid -> signal digest: those computed from the HDF5 rows, else the labels CSV's."""
    known = {}
    if labels is not None and DIGEST_COLUMN in labels.columns:
        rows = labels[labels[DIGEST_COLUMN].notna()]
        known = dict(zip(rows["ssoid"], rows[DIGEST_COLUMN].astype(str)))
    return {**known, **computed}


def write_outputs(args, ckpt: dict, ids: List[str], y_pred: np.ndarray, skipped: list,
                  labels: Optional[pd.DataFrame],
                  digests: Dict[str, str]) -> Tuple[dict, Dict[str, str]]:
    """The predictions CSV (with each record's ``split``), the skipped list and, with
    labels, ``<stem>_metrics.json``; returns the per-split metric blocks and what each
    split means."""
    stem = os.path.splitext(args.output)[0]
    target_cols = list(ckpt["target_cols"])
    splits, checked = splits_of(args, ckpt, ids, labels, record_digests(labels, digests))
    splits = np.array(splits)
    # as the run reported them: its recalibration when it applied one, its intervals
    raw = y_pred
    y_pred, intervals = engine.reported_predictions(raw, ckpt.get("recalibration"),
                                                    ckpt.get("conformal"), target_cols)
    report, y_true = {}, None
    if labels is not None:
        labels = truths(labels, ids)
        y_true = labels[target_cols].to_numpy(np.float64)
        report = split_reports(ckpt, y_true, y_pred, labels["subject"].to_numpy(), splits,
                               labels, raw, intervals)
    frame = engine.with_intervals(
        engine.predictions_frame(ids, y_true, y_pred, target_cols).assign(split=splits),
        intervals, target_cols)
    utils.write_csv_atomic(args.output, frame)
    utils.write_csv_atomic(stem + "_skipped.csv", pd.DataFrame(skipped, columns=["ssoid", "reason"]))
    if report:
        utils.write_json_atomic(stem + "_metrics.json", {"target_cols": target_cols, **report})
    return report, {**SPLIT_MEANING, **({} if checked else {"new": UNCHECKED_NEW})}


def summary(args, ids: List[str], skipped: list, report: dict, meaning: Dict[str, str],
            filled: Counter) -> str:
    """What the run did, then one line per split with labels, saying what the split
    means: never a mix of splits."""
    lines = [f"predicted {len(ids)} records, skipped {len(skipped)}; wrote {args.output}"]
    lines += [f"{name}: MAE mean {block['mean']['mae']:.2f} mmHg over {block['n_records']} "
              f"labelled records ({meaning[name]})" for name, block in report.items()]
    lines += [f"covariate {name}: {n} values missing or unseen in training, filled as in "
              f"training" for name, n in filled.items() if n]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    model, ckpt = load_model(args)
    labels = (read_labels(args.labels_csv, ckpt)  # fail before predicting
              if args.labels_csv else None)
    check_covariates(args, ckpt, labels)
    time_base = check_time_base(args, ckpt)
    device = engine.resolve_device(args.device)
    skipped: list = []
    filled: Counter = Counter()
    digests: Dict[str, str] = {}
    if args.npz_dir:
        total, batches = npz_batches(args, ckpt, skipped, filled, labels)
    else:
        total, batches = h5_batches(args, ckpt, skipped, filled, time_base, digests)
    ids, y_pred = predict(model, batches, total, ckpt, device)
    if args.h5_path and labels is not None:  # the HDF5's ids are known once it is read
        check_labels_match(args, ckpt, labels, ids, f"--h5_path {args.h5_path}")
    report, meaning = write_outputs(args, ckpt, ids, y_pred, skipped, labels, digests)
    print(summary(args, ids, skipped, report, meaning, filled))


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
