"""Losses against hand-computed values, their zero-variance behaviour and validation."""
import math

import numpy as np
import pytest
import torch

from losses import LOSSES, MAEPearsonLoss, build_loss
from utils import UserError

# errors pred - target: column 0 is (0, -1, -2), column 1 is (1, -1, 0)
PRED = torch.tensor([[0.0, 2.0], [1.0, 0.0], [2.0, 1.0]])
TARGET = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])


@pytest.mark.parametrize("name, kwargs, expected", [
    ("mse", {}, (0 + 1 + 4 + 1 + 1 + 0) / 6),
    ("l1", {}, (0 + 1 + 2 + 1 + 1 + 0) / 6),
    # delta 1: |e| = 2 is in the linear part, 1 * (2 - 0.5) = 1.5; |e| = 1 gives 0.5
    ("huber", {"delta": 1.0}, (0 + 0.5 + 1.5 + 0.5 + 0.5 + 0) / 6),
    ("huber", {"delta": 2.0}, 0.5 * 7 / 6),
])
def test_pointwise_losses_equal_hand_values(name, kwargs, expected):
    assert build_loss(name, **kwargs)(PRED, TARGET).item() == pytest.approx(expected, abs=1e-6)


def test_mae_pearson_equals_hand_value_with_constant_target_column():
    eps = 1e-3
    # column 0: pred (0,1,2), target (0,2,4): var 2/3 and 8/3, cov 4/3, MAE 1
    r0 = (4 / 3) / math.sqrt((2 / 3 + eps) * (8 / 3 + eps))
    # column 1: constant target, so r = 0; MAE 2/3
    alpha, beta = 2.0, 0.5
    expected = ((alpha * (1 - r0) + beta * 1.0) + (alpha * 1.0 + beta * 2 / 3)) / 2
    loss = build_loss("mae_pearson", alpha=alpha, beta=beta)
    assert loss(PRED, TARGET).item() == pytest.approx(expected, abs=1e-6)


def test_pearson_term_matches_numpy_for_spread_data():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(256, 3))
    pred = 0.6 * target + rng.normal(scale=0.8, size=(256, 3))
    r = MAEPearsonLoss().pearson(torch.tensor(pred), torch.tensor(target)).numpy()
    expected = [np.corrcoef(pred[:, k], target[:, k])[0, 1] for k in range(3)]
    np.testing.assert_allclose(r, expected, rtol=2e-3)


@pytest.mark.parametrize("name", LOSSES)
def test_losses_finite_with_gradient_when_batch_has_zero_variance(name):
    pred = torch.zeros(4, 2, requires_grad=True)  # a zero-initialised head's first batch
    target = torch.ones(4, 2)
    loss = build_loss(name)(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


def test_mae_pearson_perfect_and_inverted_predictions():
    target = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]) * 10
    loss = build_loss("mae_pearson", alpha=1.0, beta=1.0)
    assert loss(target, target).item() == pytest.approx(0.0, abs=1e-5)
    # pred = -target: r = -1, MAE = mean |2 * target| = 30
    assert loss(-target, target).item() == pytest.approx(2.0 + 30.0, abs=1e-4)


def test_losses_return_float32_for_bf16_predictions():
    loss = build_loss("mae_pearson")(PRED.bfloat16(), TARGET)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "rmse"}, "--loss"),
    ({"name": "mae_pearson", "alpha": -1.0}, "alpha"),
    ({"name": "mae_pearson", "beta": float("nan")}, "beta"),
    ({"name": "huber", "delta": 0.0}, "delta"),
    ({"name": "mse", "delta": "x"}, "delta"),
    ({"name": "mae_pearson", "alpha": 0.0, "beta": 0.0}, "both be 0"),
])
def test_build_loss_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        build_loss(**kwargs)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="pred and target"):
        build_loss("mse")(PRED, TARGET[:, :1])
