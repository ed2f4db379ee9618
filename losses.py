"""Training losses on normalised targets.

Every loss takes ``(pred, target)`` of shape (B, T) in normalised units
(z = (y - train mean) / train std, per target) and returns a scalar that averages over
targets, so each target weighs the same whatever its spread in mmHg. Metrics in mmHg
live in ``utils.regression_metrics``, not here.

    loss = build_loss("mae_pearson", alpha=1.0, beta=1.0)
    loss(pred, target).backward()
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

LOSSES = ("mse", "huber", "l1", "mae_pearson")


def _as_pair(pred: torch.Tensor, target: torch.Tensor):
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be (B, T); got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    # float32 even under bf16 autocast: the sums below lose too much in bf16
    return pred.float(), target.float()


class PointwiseLoss(nn.Module):
    """Mean over batch and targets of an elementwise loss (``F.mse_loss`` and kin)."""

    def __init__(self, fn: Callable[..., torch.Tensor], **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(*_as_pair(pred, target), **self.kwargs)


class MAEPearsonLoss(nn.Module):
    """Mean over targets k of ``alpha * (1 - r_k) + beta * MAE_k``.

    ``r_k`` is the Pearson correlation over the batch with ``eps`` added to both variances
    (normalised units): a constant prediction (the zero-initialised head's first step, or a
    batch of one) gives r = 0 and a bounded gradient instead of 0/0.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, eps: float = 1e-3):
        super().__init__()
        self.alpha, self.beta, self.eps = alpha, beta, eps

    def pearson(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(T,) per-target correlation over the batch."""
        pc = pred - pred.mean(0)
        tc = target - target.mean(0)
        var = (pc.square().mean(0) + self.eps) * (tc.square().mean(0) + self.eps)
        return (pc * tc).mean(0) / var.sqrt()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = _as_pair(pred, target)
        mae = (pred - target).abs().mean(0)
        return (self.alpha * (1 - self.pearson(pred, target)) + self.beta * mae).mean()


def _check_arg(name: str, value: float, positive: bool) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number > 0 if positive else number >= 0)):
        raise UserError(f"{name} must be a finite number "
                        f"{'> 0' if positive else '>= 0'}, got {value!r}")


def build_loss(name: str, alpha: float = 1.0, beta: float = 1.0, delta: float = 1.0) -> nn.Module:
    """The loss called ``name`` (one of ``LOSSES``); ``alpha``/``beta`` weigh mae_pearson's
    correlation and MAE terms, ``delta`` is huber's switch from squared to linear."""
    if name not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}; got {name!r}")
    _check_arg("--alpha", alpha, positive=False)
    _check_arg("--beta", beta, positive=False)
    _check_arg("--huber_delta", delta, positive=True)
    if alpha + beta <= 0:
        raise UserError("--alpha and --beta cannot both be 0")
    if name == "mse":
        return PointwiseLoss(F.mse_loss)
    if name == "huber":
        return PointwiseLoss(F.huber_loss, delta=float(delta))
    if name == "l1":
        return PointwiseLoss(F.l1_loss)
    return MAEPearsonLoss(alpha=float(alpha), beta=float(beta))
