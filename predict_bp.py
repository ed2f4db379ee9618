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
``<target>_pred`` per target and ``split`` (the record's split in the checkpoint's run, or
``new``); with ``--labels_csv`` it has ``<target>_true`` beside each prediction (empty where
the label is missing) and ``<output stem>_metrics.json`` holds one block of
``metrics.split_metrics`` per split, over the records with every label. Records that can't be
used are listed in ``<output stem>_skipped.csv``.

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
from typing import Iterator, List, Optional, Sequence, Tuple

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
    prep.add_time_base_flags(p)
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


def check_args(args) -> None:
    if (args.npz_dir is None) == (args.h5_path is None):
        raise UserError("give exactly one of --npz_dir and --h5_path")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UserError(f"--output {args.output}: folder {folder} does not exist")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"--output {args.output} already exists; add --overwrite to replace it")


def load_model(args) -> Tuple[backbones.BPModel, dict]:
    ckpt = utils.load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "target_cols" not in ckpt:
        raise UserError(f"--checkpoint {args.checkpoint} is not a train_bp.py checkpoint "
                        f"(no model_config/target_cols)")
    model = backbones.build_bp_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    ckpt.setdefault("covariates", [])  # checkpoints from before covariates existed
    return model.eval(), ckpt


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
    own = base.sample_rate(length)
    if rate is None:
        if own is not None:
            raise UserError(f"the model in {args.checkpoint} records no sampling rate (its "
                            f"records were prepared without --record_seconds or "
                            f"--fs_ecg/--fs_ppg): leave those flags out")
        return base
    if own is None:
        raise UserError(f"{trained}: with --h5_path give --record_seconds or "
                        f"--fs_ecg/--fs_ppg so the rows are prepared alike")
    if base.fs:
        return prep.TimeBase(fs=base.fs, target_fs=rate)
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
    channels = utils.npz_channels(args.npz_dir)
    check_channels(args, ckpt, channels, f"--npz_dir {args.npz_dir} holds")
    good, length, bad = dataset.check_records(ids, args.npz_dir, channels=channels)
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
        cov = encode_covariates(labels.drop_duplicates("ssoid").set_index("ssoid").loc[good],
                                ckpt["covariates"], filled)
    ds = dataset.BPDataset(good, args.npz_dir, np.zeros((len(good), 0)),
                           backbones.MODALITY_CHANNELS[ckpt["modality"]], ckpt["zscore"],
                           conditioning=ckpt.get("conditioning"),
                           covariates=cov)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
    return len(good), ((list(ids_), x, c) for x, c, _, ids_ in loader)


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


def h5_batches(args, ckpt: dict, skipped: list, filled: Counter,
               time_base: prep.TimeBase) -> Tuple[Optional[int], Iterator[Batch]]:
    """Records of a cohort HDF5, prepared exactly as prepare_kailuan_npz.py does (with
    ``time_base``, and the physiological features that the model's covariates name computed
    by the same code from the same resampled rows)."""
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


SPLIT_ORDER = ("new", "test", "val", "train", "unknown")
SPLIT_MEANING = {"new": "records the checkpoint's run never saw",
                 "test": "the run's test split", "val": "the run's validation split",
                 "train": "records the model was trained on: not a measure of performance",
                 "unknown": "the checkpoint does not say which records it was trained on"}


def splits_of(ckpt: dict, ids: Sequence[str]) -> List[str]:
    """Each record's split in the checkpoint's own run (``new`` if the run never saw it;
    ``unknown`` for every record when the checkpoint predates the record of its split)."""
    if "split_ids" not in ckpt:
        print(f"warning: this checkpoint does not record its run's split, so the metrics "
              f"cannot tell training records from new ones (split 'unknown')")
        return ["unknown"] * len(ids)
    where = {s: name for name, members in ckpt["split_ids"].items() for s in members}
    return [where.get(i, "new") for i in ids]


def split_reports(ckpt: dict, y_true: np.ndarray, y_pred: np.ndarray, subjects: np.ndarray,
                  splits: np.ndarray) -> dict:
    """One ``metrics.split_metrics`` block per split present among the fully labelled
    records, in ``SPLIT_ORDER``."""
    complete = ~np.isnan(y_true).any(axis=1)
    report = {}
    for name in SPLIT_ORDER:
        keep = complete & (splits == name)
        if keep.any():
            report[name] = metrics.split_metrics(y_true[keep], y_pred[keep], subjects[keep],
                                                 ckpt["target_cols"], ckpt["target_mean"])
    return report


def write_outputs(args, ckpt: dict, ids: List[str], y_pred: np.ndarray, skipped: list,
                  labels: Optional[pd.DataFrame]) -> dict:
    """The predictions CSV (with each record's ``split``), the skipped list and, with
    labels, ``<stem>_metrics.json``; returns the per-split metric blocks."""
    stem = os.path.splitext(args.output)[0]
    target_cols = list(ckpt["target_cols"])
    splits = np.array(splits_of(ckpt, ids))
    report, y_true = {}, None
    if labels is not None:
        labels = truths(labels, ids)
        y_true = labels[target_cols].to_numpy(np.float64)
        report = split_reports(ckpt, y_true, y_pred, labels["subject"].to_numpy(), splits)
    frame = engine.predictions_frame(ids, y_true, y_pred, target_cols).assign(split=splits)
    utils.write_csv_atomic(args.output, frame)
    utils.write_csv_atomic(stem + "_skipped.csv", pd.DataFrame(skipped, columns=["ssoid", "reason"]))
    if report:
        utils.write_json_atomic(stem + "_metrics.json", {"target_cols": target_cols, **report})
    return report


def summary(args, ids: List[str], skipped: list, report: dict, filled: Counter) -> str:
    """What the run did, then one line per split with labels: never a mix of splits."""
    lines = [f"predicted {len(ids)} records, skipped {len(skipped)}; wrote {args.output}"]
    lines += [f"{name}: MAE mean {block['mean']['mae']:.2f} mmHg over {block['n_records']} "
              f"labelled records ({SPLIT_MEANING[name]})" for name, block in report.items()]
    lines += [f"covariate {name}: {n} values missing or unseen in training, filled as in "
              f"training" for name, n in filled.items() if n]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    model, ckpt = load_model(args)
    labels = (dataset.read_labels(args.labels_csv, ckpt["target_cols"])  # fail before predicting
              if args.labels_csv else None)
    check_covariates(args, ckpt, labels)
    time_base = check_time_base(args, ckpt)
    device = engine.resolve_device(args.device)
    skipped: list = []
    filled: Counter = Counter()
    if args.npz_dir:
        total, batches = npz_batches(args, ckpt, skipped, filled, labels)
    else:
        total, batches = h5_batches(args, ckpt, skipped, filled, time_base)
    ids, y_pred = predict(model, batches, total, ckpt, device)
    report = write_outputs(args, ckpt, ids, y_pred, skipped, labels)
    print(summary(args, ids, skipped, report, filled))


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
