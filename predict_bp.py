"""Apply a trained BP model to new records.

    python predict_bp.py --checkpoint OUT/bp_best.pth --npz_dir DIR --output preds.csv \
        [--labels_csv labels.csv]
    python predict_bp.py --checkpoint OUT/bp_best.pth --h5_path cohort.h5 --output preds.csv

The checkpoint alone decides the model: its arch, modality, fusion, z-scoring, record length,
target normalisation and output constraint. ``--npz_dir`` reads ``<ssoid>.npz`` files as
written by ``prepare_kailuan_npz.py``; ``--h5_path`` reads a Kailuan-layout HDF5 through the
same reader and resampler, without writing npz files. The output CSV has ``ssoid`` and
``<target>_pred`` per target; with ``--labels_csv`` it has ``<target>_true`` beside each
(empty where the label is missing) and ``<output stem>_metrics.json`` holds the metrics of
``metrics.split_metrics`` over the records with every label. Records that can't be used are
listed in ``<output stem>_skipped.csv``.
"""
from __future__ import annotations

import itertools
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import backbones
import dataset
import engine
import metrics
import prepare_kailuan_npz as prep
import utils
from utils import UserError

Batch = Tuple[List[str], torch.Tensor]


def get_args_parser() -> utils.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="bp_best.pth of a train_bp.py run")
    p.add_argument("--npz_dir", default=None, help="folder of <ssoid>.npz records")
    p.add_argument("--h5_path", default=None, help="cohort HDF5 in the Kailuan layout")
    p.add_argument("--output", required=True, help="predictions CSV to write")
    p.add_argument("--labels_csv", default=None, help="labels (ssoid + targets) to score against")
    p.add_argument("--id_key", default="new_id", help="with --h5_path: the id field")
    p.add_argument("--meta_group", default=prep.META_GROUP)
    p.add_argument("--ecg_key", default=prep.ECG_KEY)
    p.add_argument("--ppg_key", default=prep.PPG_KEY)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
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
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- record sources
def npz_batches(args, ckpt: dict, skipped: list) -> Tuple[int, Iterator[Batch]]:
    """Checked npz records in batches; bad ones are added to ``skipped``."""
    if not os.path.isdir(args.npz_dir):
        raise UserError(f"--npz_dir {args.npz_dir}: no such directory")
    ids = sorted(f[:-4] for f in os.listdir(args.npz_dir) if f.endswith(".npz"))
    if not ids:
        raise UserError(f"--npz_dir {args.npz_dir} holds no .npz files")
    good, length, bad = dataset.check_records(ids, args.npz_dir)
    skipped += list(zip(bad["ssoid"], bad["reason"]))
    if good and length != ckpt["seq_len"]:
        raise UserError(f"--npz_dir {args.npz_dir}: records have {length} samples, the model "
                        f"was trained on {ckpt['seq_len']}; prepare them with "
                        f"--target_seq_len {ckpt['seq_len']}")
    ds = dataset.BPDataset(good, args.npz_dir, np.zeros((len(good), 0)),
                           backbones.MODALITY_CHANNELS[ckpt["modality"]], ckpt["zscore"])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
    return len(good), ((list(ids_), x) for x, _, ids_ in loader)


def h5_batches(args, ckpt: dict, skipped: list) -> Tuple[Optional[int], Iterator[Batch]]:
    """Records of a cohort HDF5, prepared exactly as prepare_kailuan_npz.py does."""
    channels = backbones.MODALITY_CHANNELS[ckpt["modality"]]
    records = prep.iter_records(args.h5_path, args.id_key, meta_group=args.meta_group,
                                ecg_key=args.ecg_key, ppg_key=args.ppg_key)
    first = next(records, None)  # opens and checks the file before anything is written
    if first is None:
        raise UserError(f"--h5_path {args.h5_path} holds no records")

    def batches() -> Iterator[Batch]:
        ids: List[str] = []
        xs: List[np.ndarray] = []
        for rec in itertools.chain([first], records):
            x, reason = prep.record_to_x(rec.ecg, rec.ppg, ckpt["seq_len"])
            if reason:
                skipped.append((rec.id, reason))
                continue
            ids.append(rec.id)
            xs.append(dataset.model_input(x, channels, ckpt["zscore"]))
            if len(ids) == args.batch_size:
                yield ids, torch.from_numpy(np.stack(xs))
                ids, xs = [], []
        if ids:
            yield ids, torch.from_numpy(np.stack(xs))

    return None, batches()



# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(model, batches: Iterator[Batch], total: Optional[int], ckpt: dict,
            device: torch.device) -> Tuple[List[str], np.ndarray]:
    """Ids and predictions in mmHg, in the order of ``batches``."""
    model.to(device)
    ids: List[str] = []
    preds: List[np.ndarray] = []
    with tqdm(total=total, desc="predict", unit="rec") as bar:
        for batch_ids, x in batches:
            preds.append(model(x.to(device)).float().cpu().numpy())
            ids += batch_ids
            bar.update(len(batch_ids))
    if not ids:
        raise UserError("no usable records to predict (see the skipped list above)")
    mean = np.asarray(ckpt["target_mean"], dtype=np.float64)
    std = np.asarray(ckpt["target_std"], dtype=np.float64)
    return ids, np.concatenate(preds).astype(np.float64) * std + mean


def truths(labels_csv: str, target_cols: Sequence[str], ids: Sequence[str]) -> pd.DataFrame:
    """Labels of ``ids`` in order (NaN where unknown), with each record's subject."""
    labels = dataset.read_labels(labels_csv, target_cols).drop_duplicates("ssoid")
    labels = labels.set_index("ssoid").reindex(list(ids))
    if "subject_id" in labels.columns:
        subjects = labels["subject_id"].astype(object)
        labels["subject"] = subjects.where(subjects.notna(), [utils.subject_of(i) for i in ids])
    else:
        labels["subject"] = [utils.subject_of(i) for i in ids]
    return labels


def write_outputs(args, ckpt: dict, ids: List[str], y_pred: np.ndarray,
                  skipped: list) -> Optional[dict]:
    stem = os.path.splitext(args.output)[0]
    target_cols = list(ckpt["target_cols"])
    report = None
    y_true = None
    if args.labels_csv:
        labels = truths(args.labels_csv, target_cols, ids)
        y_true = labels[target_cols].to_numpy(np.float64)
        complete = ~np.isnan(y_true).any(axis=1)
        if complete.any():
            report = metrics.split_metrics(y_true[complete], y_pred[complete],
                                           labels["subject"].to_numpy()[complete], target_cols,
                                           ckpt["target_mean"])
    engine.write_predictions(args.output, ids, y_true, y_pred, target_cols)
    utils.write_csv_atomic(stem + "_skipped.csv", pd.DataFrame(skipped, columns=["ssoid", "reason"]))
    if report is not None:
        utils.write_json_atomic(stem + "_metrics.json", report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    model, ckpt = load_model(args)
    if args.labels_csv:
        dataset.read_labels(args.labels_csv, ckpt["target_cols"])  # fail before predicting
    device = engine.resolve_device(args.device)
    skipped: list = []
    source = npz_batches if args.npz_dir else h5_batches
    total, batches = source(args, ckpt, skipped)
    ids, y_pred = predict(model, batches, total, ckpt, device)
    report = write_outputs(args, ckpt, ids, y_pred, skipped)
    print(f"predicted {len(ids)} records, skipped {len(skipped)}; wrote {args.output}"
          + (f"; MAE mean {report['mean']['mae']:.2f} mmHg over {report['n_records']} "
             f"labelled records" if report else ""))


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
