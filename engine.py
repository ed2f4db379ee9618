"""Training and evaluation loops: AMP, gradient clipping, the non-finite-loss guard,
and turning model outputs back into mmHg.

``train_one_epoch`` and ``evaluate`` take explicit values (model, loader, loss,
device, AMP dtype, ...), never the CLI namespace, and return plain dicts.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from utils import UserError, write_csv_atomic


# ----------------------------------------------------------------------------- devices and AMP
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is a ``UserError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


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
def train_one_epoch(model: torch.nn.Module, loader, loss_fn, optimizer, device: torch.device,
                    amp_dtype: Optional[torch.dtype], scaler, grad_clip: float,
                    epoch: int, scheduler=None) -> Dict[str, float]:
    """One pass over ``loader``; steps with a non-finite loss are skipped and counted.

    ``scheduler`` (optional) advances once per optimiser step taken.

    Raises ``UserError`` when every step of the epoch had a non-finite loss.
    """
    model.train()
    total, n_seen, n_steps, n_bad = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False)
    for x, y, _ in bar:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            pred = model(x)
        loss = loss_fn(pred.float(), y)
        n_steps += 1
        if not torch.isfinite(loss):
            n_bad += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(x)
        n_seen += len(x)
        bar.set_postfix(loss=f"{total / n_seen:.4f}")
    if n_steps and n_bad == n_steps:
        raise UserError(f"epoch {epoch}: all {n_steps} training steps had a non-finite loss; "
                        f"lower --lr_head/--lr_backbone, set --grad_clip, or check the inputs")
    seconds = time.perf_counter() - start
    return {"loss": total / n_seen if n_seen else math.nan, "n_records": n_seen,
            "skipped_steps": n_bad, "seconds": seconds,
            "records_per_s": n_seen / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, loss_fn, device: torch.device,
             amp_dtype: Optional[torch.dtype], target_mean: np.ndarray,
             target_std: np.ndarray, desc: str = "eval") -> Dict[str, object]:
    """Loss (normalised units) and ids, truths and predictions in mmHg, in loader order."""
    model.eval()
    ids, truths, preds = [], [], []
    total, n = 0.0, 0
    for x, y, batch_ids in tqdm(loader, desc=desc, unit="batch", leave=False):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            pred = model(x)
        pred = pred.float()
        total += loss_fn(pred, y).item() * len(x)
        n += len(x)
        ids.extend(batch_ids)
        truths.append(y.cpu().numpy())
        preds.append(pred.cpu().numpy())
    mean = np.asarray(target_mean, dtype=np.float64)
    std = np.asarray(target_std, dtype=np.float64)
    return {"loss": total / n if n else math.nan, "ids": ids,
            "y_true": np.concatenate(truths).astype(np.float64) * std + mean,
            "y_pred": np.concatenate(preds).astype(np.float64) * std + mean}


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


def write_predictions(path: str, ids: Sequence[str], y_true: Optional[np.ndarray],
                      y_pred: np.ndarray, target_cols: Sequence[str]) -> None:
    write_csv_atomic(path, predictions_frame(ids, y_true, y_pred, target_cols))
