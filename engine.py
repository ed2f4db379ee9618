"""Training and evaluation loops: AMP, gradient accumulation, gradient clipping, the
non-finite guard, and turning model outputs back into mmHg.

``train_one_epoch`` and ``evaluate`` take explicit values (model, loader, loss,
device, AMP dtype, ...), never the CLI namespace, and return plain dicts. Batches are
``(x, covariates, y, ids)`` (``dataset.BPDataset``); the model is called as
``model(x, covariates)``, with a (B, 0) covariates tensor when there are none.

Distributed runs: ``train_one_epoch`` takes the DistributedDataParallel-wrapped model
and skips the gradient all-reduce on every micro-batch but the last of an accumulation
group; its returned numbers are summed over the ranks. The non-finite guard looks at the
norm of the (all-reduced) gradient, which every rank sees alike, so all ranks skip the
same steps and never disagree about a collective. ``evaluate`` runs on each rank's
shard of a split; ``gather_evaluation`` joins the shards into the split's own order.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

import metrics
import utils
from utils import UserError, all_gather_object, all_reduce_sum, progress, write_csv_atomic

MMHG_DECIMALS = 4  # decimals of every predicted mmHg value (see to_mmhg)


# ----------------------------------------------------------------------------- devices and AMP
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is a ``UserError``.

    On CUDA the process uses GPU ``local_rank`` (its rank on this node under torchrun).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"--device cuda: local rank {local_rank} has no GPU of its own "
                        f"(this node has {torch.cuda.device_count()}); start at most that "
                        f"many processes per node (torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process(device_name: str, threads: int) -> Iterator[Tuple[utils.DistInfo, torch.device]]:
    """(torchrun's process info, the device) of one training process: the process group
    joined (NCCL on CUDA, gloo otherwise; nothing without torchrun) and torch's CPU threads
    set to ``threads`` (0: as they are). Both are put back on exit, for a caller in the
    same process (crossval_bp.py, tune_bp.py, tests)."""
    dist = utils.dist_env()
    device = resolve_device(device_name, dist.local_rank)
    utils.init_distributed(dist, "nccl" if device.type == "cuda" else "gloo")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield dist, device
        # on success every rank leaves together: a rank whose process group went down while
        # rank 0 still wrote its reports once ended with "terminate called" (SIGABRT)
        utils.barrier()
    finally:
        torch.set_num_threads(before)
        utils.destroy_distributed()


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; none on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise UserError(f"--amp {amp} needs --device cuda (mixed precision is for GPUs here)")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU does not support bfloat16 (use --amp fp16)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def make_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """A GradScaler for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=(amp_dtype == torch.float16
                                                 and device.type == "cuda"))


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# ----------------------------------------------------------------------------- loops
def _optimizer_step(model: torch.nn.Module, optimizer, scaler, grad_clip: float) -> bool:
    """Unscale, clip and step when the gradient norm is finite; True if the step was taken.

    ``grad_clip`` 0 measures the norm without clipping. A fp16 overflow is skipped the
    same way (and lowers the GradScaler's scale).
    """
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else math.inf)
    finite = bool(torch.isfinite(norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return finite


def train_one_epoch(model: torch.nn.Module, loader, loss_fn, optimizer, device: torch.device,
                    amp_dtype: Optional[torch.dtype], scaler, grad_clip: float,
                    epoch: int, scheduler=None, accum_steps: int = 1) -> Dict[str, float]:
    """One pass over ``loader`` of ``(x, covariates, y, ids)`` batches with
    ``loss_fn(model(x, covariates), y)``; see ``train_steps`` for the rest."""
    def batch_loss(batch):
        x, cov, y, _ = batch
        x, cov, y = (t.to(device, non_blocking=True) for t in (x, cov, y))
        with autocast(device, amp_dtype):
            pred = model(x, cov)
        return loss_fn(pred.float(), y), len(x), {}

    return train_steps(model, loader, batch_loss, optimizer, scaler, grad_clip, epoch,
                       scheduler, accum_steps)


def train_steps(model: torch.nn.Module, loader, batch_loss: Callable, optimizer, scaler,
                grad_clip: float, epoch: int, scheduler=None,
                accum_steps: int = 1) -> Dict[str, object]:
    """One pass over ``loader``, whatever its batches: ``batch_loss(batch)`` returns (the
    loss tensor, the batch's record count, a dict of further per-batch means to report,
    e.g. a pretext accuracy; the same keys every batch) and runs the forward pass itself,
    under ``autocast`` when it wants AMP. Optimiser steps with a non-finite gradient are
    skipped and counted (with ``accum_steps`` > 1, a step sums that many batches'
    gradients; ``model``, DDP-wrapped in a distributed run, syncs only on the last).

    ``scheduler`` (optional) advances once per optimiser step taken. Losses, ``extras``
    (record-weighted means over the steps taken) and counts are summed over the ranks of
    a distributed run. ``lr_first``/``lr_last`` map each parameter group's name to the
    learning rate its first and last step of the epoch used.

    Raises ``UserError`` when every step of the epoch was skipped.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, n_seen, n_steps, n_bad = 0.0, 0, 0, 0
    extras: Dict[str, float] = {}
    lr_first: Optional[Dict[str, float]] = None
    lr_last: Optional[Dict[str, float]] = None
    group_loss, group_n, group_extras = 0.0, 0, {}
    n_batches = len(loader)
    start = time.perf_counter()
    bar = progress(loader, desc=f"epoch {epoch} train", unit="batch", leave=False)
    for i, batch in enumerate(bar):
        group_start = i - i % accum_steps
        group = min(accum_steps, n_batches - group_start)  # the last group may be short
        last = i + 1 == group_start + group
        # DDP all-reduces the gradients only on the last micro-batch of a group
        sync = model.no_sync() if not last and hasattr(model, "no_sync") \
            else contextlib.nullcontext()
        with sync:
            loss, n, batch_extras = batch_loss(batch)
            value = loss.item()
            if not math.isfinite(value):
                # NaN gradients reach every rank through the all-reduce: all skip this step
                loss = loss * math.nan
            scaler.scale(loss / group).backward()
        group_loss += value * n
        group_n += n
        for key, v in batch_extras.items():
            group_extras[key] = group_extras.get(key, 0.0) + float(v) * n
        if not last:
            continue
        n_steps += 1
        lr_last = {g.get("name", "head"): g["lr"] for g in optimizer.param_groups}
        lr_first = lr_first or lr_last
        if _optimizer_step(model, optimizer, scaler, grad_clip):
            if scheduler is not None:
                scheduler.step()
            total, n_seen = total + group_loss, n_seen + group_n
            for key, v in group_extras.items():
                extras[key] = extras.get(key, 0.0) + v
            bar.set_postfix(loss=f"{total / n_seen:.4f}", refresh=False)
        else:
            n_bad += 1
        group_loss, group_n, group_extras = 0.0, 0, {}
    seconds = time.perf_counter() - start
    keys = sorted(extras)
    total, n_seen, n_steps, n_bad, *sums = all_reduce_sum(
        [total, n_seen, n_steps, n_bad, *(extras[k] for k in keys)])
    n_seen, n_steps, n_bad = int(n_seen), int(n_steps), int(n_bad)
    if n_steps and n_bad == n_steps:
        raise UserError(f"epoch {epoch}: all {n_steps} training steps had a non-finite loss "
                        f"or gradient; lower --lr_head/--lr_backbone, set --grad_clip, or "
                        f"check the inputs")
    return {"loss": total / n_seen if n_seen else math.nan, "n_records": n_seen,
            "skipped_steps": n_bad, "seconds": seconds,
            "records_per_s": n_seen / seconds if seconds > 0 else 0.0,
            "extras": {k: s / n_seen if n_seen else math.nan for k, s in zip(keys, sums)},
            "lr_first": lr_first or {}, "lr_last": lr_last or {}}


@contextlib.contextmanager
def float32_inference(device: torch.device):
    """Inference in IEEE float32 on every device: autocast off (even inside an autocast
    region) and, on CUDA, no TF32 in matrix products and convolutions.

    Evaluation during training and ``predict_bp.py`` both run here, so a checkpoint's
    reported metrics and its later predictions agree to float32 precision whatever AMP
    trained it. Inference is a small part of the cost, so nothing is lost that matters.
    """
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def evaluate(model: torch.nn.Module, loader, loss_fn, device: torch.device,
             target_mean: np.ndarray, target_std: np.ndarray,
             desc: str = "eval") -> Dict[str, object]:
    """Loss (normalised units) and ids, truths and predictions in mmHg, in loader order,
    computed in float32 (``float32_inference``).

    ``n`` is the number of records; in a distributed run each rank evaluates its own
    shard and ``gather_evaluation`` joins them.
    """
    model.eval()
    ids, truths, preds = [], [], []
    total, n = 0.0, 0
    for x, cov, y, batch_ids in progress(loader, desc=desc, unit="batch", leave=False):
        x, cov, y = (t.to(device, non_blocking=True) for t in (x, cov, y))
        with float32_inference(device):
            pred = model(x, cov).float()
        total += loss_fn(pred, y).item() * len(x)
        n += len(x)
        ids.extend(batch_ids)
        truths.append(y.cpu().numpy())
        preds.append(pred.cpu().numpy())
    n_targets = len(target_mean)
    return {"loss": total / n if n else math.nan, "n": n, "ids": ids,
            "y_true": _join(truths, n_targets) * np.asarray(target_std, dtype=np.float64)
            + np.asarray(target_mean, dtype=np.float64),
            "y_pred": to_mmhg(_join(preds, n_targets), target_mean, target_std)}


def to_mmhg(pred: np.ndarray, target_mean: Sequence[float],
            target_std: Sequence[float]) -> np.ndarray:
    """Normalised model outputs (N, T) as mmHg, rounded to ``MMHG_DECIMALS``.

    Every reported prediction passes here (evaluation and predict_bp.py), and the
    prediction CSVs hold exactly these values, so every metric can be recomputed from a
    CSV to the last bit. 1e-4 mmHg is far below clinical resolution and above float32
    noise (about 1e-6 mmHg), so the rounding hides nothing.
    """
    mean = np.asarray(target_mean, dtype=np.float64)
    std = np.asarray(target_std, dtype=np.float64)
    return np.round(np.asarray(pred, dtype=np.float64) * std + mean, MMHG_DECIMALS)


def _join(parts: List[np.ndarray], n_targets: int) -> np.ndarray:
    if not parts:  # a rank whose shard is empty (fewer records than ranks)
        return np.zeros((0, n_targets))
    return np.concatenate(parts).astype(np.float64)


def gather_evaluation(result: Dict[str, object], order: Sequence[str]) -> Dict[str, object]:
    """Every rank's ``evaluate`` result joined, rows in the order of ``order`` (the ids of
    the split). Single-process results come back unchanged; each id must occur once."""
    parts = all_gather_object(result)
    if len(parts) == 1:
        return result
    ids = [i for p in parts for i in p["ids"]]
    position = {s: k for k, s in enumerate(ids)}
    if len(position) != len(ids) or set(position) != set(order):
        raise RuntimeError("the evaluation shards do not cover the split exactly once")
    take = np.array([position[s] for s in order], dtype=np.int64)
    n = sum(p["n"] for p in parts)
    loss = sum(p["loss"] * p["n"] for p in parts if p["n"]) / n if n else math.nan
    return {"loss": loss, "n": n, "ids": list(order),
            "y_true": np.concatenate([p["y_true"] for p in parts])[take],
            "y_pred": np.concatenate([p["y_pred"] for p in parts])[take]}


# ----------------------------------------------------------------------------- predictions
def predictions_frame(ids: Sequence[str], y_true: Optional[np.ndarray], y_pred: np.ndarray,
                      target_cols: Sequence[str]) -> pd.DataFrame:
    """``ssoid`` then ``<t>_true``, ``<t>_pred`` per target (only ``_pred`` without truths)."""
    columns = {"ssoid": list(ids)}
    for k, col in enumerate(target_cols):
        if y_true is not None:
            columns[f"{col}_true"] = y_true[:, k]
        columns[f"{col}_pred"] = y_pred[:, k]
    return pd.DataFrame(columns)


def with_intervals(frame: pd.DataFrame, intervals: Optional[tuple],
                   target_cols: Sequence[str]) -> pd.DataFrame:
    """``frame`` with ``<t>_lo``, ``<t>_hi`` per target appended after every other column
    (``intervals`` = (lo, hi), each (N, T); empty cells where there is no interval);
    ``frame`` unchanged when ``intervals`` is None."""
    if intervals is None:
        return frame
    lo, hi = intervals
    extra = {}
    for k, col in enumerate(target_cols):
        extra[f"{col}_lo"], extra[f"{col}_hi"] = lo[:, k], hi[:, k]
    return frame.assign(**extra)


def write_predictions(path: str, ids: Sequence[str], y_true: Optional[np.ndarray],
                      y_pred: np.ndarray, target_cols: Sequence[str],
                      intervals: Optional[tuple] = None) -> None:
    write_csv_atomic(path, with_intervals(predictions_frame(ids, y_true, y_pred, target_cols),
                                          intervals, target_cols))


def reported_predictions(raw: np.ndarray, recalibration: Optional[dict],
                         conformal: Optional[dict], target_cols: Sequence[str]) -> tuple:
    """(predictions, (lo, hi) or None) as a run reports them, from the model's ``raw``
    mmHg outputs: the affine ``recalibration`` (``metrics.fit_affine``) when the run
    applied it, and the ``conformal`` interval (``metrics.fit_conformal``) around the
    result; rounded like every reported value (``MMHG_DECIMALS``). train_bp.py and
    predict_bp.py both report through here."""
    pred = raw
    if recalibration and recalibration["applied"]:
        pred = np.round(metrics.apply_affine(raw, recalibration["map"], target_cols),
                        MMHG_DECIMALS)
    if not conformal:
        return pred, None
    lo, hi = metrics.conformal_intervals(pred, conformal, target_cols)
    return pred, (np.round(lo, MMHG_DECIMALS), np.round(hi, MMHG_DECIMALS))
