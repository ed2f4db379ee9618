"""Training losses on normalised targets, and the self-supervised objectives' losses
(``supcon_loss``, ``clip_loss``, ``timing_loss``, used by pretrain_ssl.py).

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


# ----------------------------------------------------------------------------- self-supervised
# pretrain_ssl.py's objectives. Embeddings arrive L2-normalised; ``keys`` are those of the
# whole global batch (gathered over the ranks with gradients), ``anchors`` this rank's rows.
# Each returns (loss, accuracy): the accuracy is the objective's pretext score (top-1
# retrieval of a positive, or the share of timing labels told right).
def _check_temperature(temperature: float) -> None:
    _check_arg("--temperature", temperature, positive=True)


def contrastive_positives(anchor_instance: torch.Tensor, key_instance: torch.Tensor,
                          anchor_subject: torch.Tensor, key_subject: torch.Tensor) -> torch.Tensor:
    """(n, N) bool: key j is a positive of anchor i when both are views of one record or,
    where the subject is known (>= 0), records of one subject (SupCon's label positives)."""
    same_record = anchor_instance[:, None] == key_instance[None, :]
    known = (anchor_subject[:, None] >= 0) & (key_subject[None, :] >= 0)
    return same_record | (known & (anchor_subject[:, None] == key_subject[None, :]))


def supcon_loss(anchors: torch.Tensor, keys: torch.Tensor, self_index: torch.Tensor,
                positive: torch.Tensor, temperature: float = 0.1):
    """Supervised-contrastive loss (Khosla et al. 2020, L_out; SimCLR's NT-Xent, Chen et
    al. 2020, when each anchor's one positive is its other view): per anchor i,
    ``-mean_{p in P(i)} log softmax_{a != i}(s_ia / t)_p`` with s the cosine similarity,
    averaged over the anchors. ``self_index`` (n,) is each anchor's own column in ``keys``,
    left out of its softmax and of its positives. With one positive at similarity 1 and
    M others at 0 the loss is log(1 + M exp(-1/t)); with random embeddings about log(N-1)."""
    _check_temperature(temperature)
    anchors, keys = anchors.float(), keys.float()
    logits = anchors @ keys.T / temperature
    own = torch.zeros_like(positive)
    own[torch.arange(len(anchors)), self_index] = True
    logits = logits.masked_fill(own, -math.inf)
    positive = positive & ~own
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = positive.sum(1)
    if bool((n_pos == 0).any()):
        raise ValueError("every anchor needs a positive (its other view) among the keys")
    loss = -(log_prob.masked_fill(~positive, 0.0).sum(1) / n_pos).mean()
    accuracy = positive.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return loss, accuracy


def clip_loss(a: torch.Tensor, b: torch.Tensor, a_keys: torch.Tensor, b_keys: torch.Tensor,
              index: torch.Tensor, temperature: float = 0.1):
    """CLIP's symmetric InfoNCE (Radford et al. 2021) between two modalities of the same
    windows: the rows ``a``, ``b`` (n, d) of this rank, ``a_keys``, ``b_keys`` (N, d) of
    the global batch, ``index`` (n,) each row's position there. Loss = mean of the
    cross-entropies a -> b_keys and b -> a_keys (a perfect alignment of unit vectors with
    orthogonal negatives: log(1 + (N-1) exp(-1/t)); shuffled pairs: about log N);
    accuracy = the mean top-1 retrieval of the true partner, both ways."""
    _check_temperature(temperature)
    a, b, a_keys, b_keys = (t.float() for t in (a, b, a_keys, b_keys))
    to_b, to_a = a @ b_keys.T / temperature, b @ a_keys.T / temperature
    loss = 0.5 * (F.cross_entropy(to_b, index) + F.cross_entropy(to_a, index))
    accuracy = 0.5 * ((to_b.argmax(1) == index).float().mean()
                      + (to_a.argmax(1) == index).float().mean())
    return loss, accuracy


def timing_loss(logits: torch.Tensor, aligned: torch.Tensor):
    """The timing pretext's binary cross-entropy: ``logits`` (n,) say "the PPG is the ECG's
    own, in its true timing" for ``aligned`` (n,) 1, "the PPG was moved in time" for 0;
    accuracy = the share told right (chance 0.5)."""
    logits, target = logits.float().reshape(-1), aligned.float().reshape(-1)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    return loss, ((logits > 0).float() == target).float().mean()
