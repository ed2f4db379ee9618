"""Tests for engine.py: the training step, the non-finite guard, mmHg evaluation, devices."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import engine
from utils import UserError


class _Records(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], f"r{i}"


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x[:, 0, :])


def _loader(n=16, nan_rows=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 3, generator=g)
    y = torch.stack([x[:, 0, 0] * 2.0, x[:, 0, 1] - x[:, 0, 2]], dim=1)
    for i in nan_rows:
        x[i] = float("nan")
    return DataLoader(_Records(x, y), batch_size=4)


def _fit(loader, epochs=1):
    torch.manual_seed(0)
    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = engine.make_scaler(torch.device("cpu"), None)
    out = None
    for epoch in range(epochs):
        out = engine.train_one_epoch(model, loader, torch.nn.MSELoss(), opt, torch.device("cpu"),
                                     None, scaler, grad_clip=1.0, epoch=epoch)
    return model, out


def test_training_reduces_the_loss_and_counts_records():
    loader = _loader()
    _, first = _fit(loader, epochs=1)
    _, later = _fit(loader, epochs=20)
    assert first["n_records"] == 16 and first["skipped_steps"] == 0
    assert later["loss"] < 0.1 * first["loss"]


def test_non_finite_batches_are_skipped_and_counted():
    model, out = _fit(_loader(nan_rows=(0, 5)))
    assert out["skipped_steps"] == 2 and out["n_records"] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_all_non_finite_epoch_is_a_clear_error():
    with pytest.raises(UserError, match="all 4 training steps had a non-finite loss"):
        _fit(_loader(nan_rows=(0, 4, 8, 12)))


def test_evaluate_returns_mmhg_in_loader_order():
    model = _Linear()
    loader = _loader(n=6)
    mean, std = np.array([120.0, 80.0]), np.array([15.0, 10.0])
    out = engine.evaluate(model, loader, torch.nn.MSELoss(), torch.device("cpu"), None, mean, std)
    x = loader.dataset.x
    with torch.no_grad():
        raw = model(x).numpy().astype(np.float64)
    assert out["ids"] == [f"r{i}" for i in range(6)]
    np.testing.assert_allclose(out["y_pred"], raw * std + mean, rtol=1e-6)
    np.testing.assert_allclose(out["y_true"], loader.dataset.y.numpy() * std + mean, rtol=1e-6)
    assert out["loss"] == pytest.approx(torch.nn.functional.mse_loss(model(x), loader.dataset.y).item(),
                                        rel=1e-5)


def test_predictions_frame_has_contract_columns(tmp_path):
    y = np.array([[120.0, 80.0], [130.0, 85.0]])
    frame = engine.predictions_frame(["a_1", "b_1"], y, y + 1, ["sbp", "dbp"])
    assert list(frame.columns) == ["ssoid", "sbp_true", "sbp_pred", "dbp_true", "dbp_pred"]
    path = tmp_path / "p.csv"
    engine.write_predictions(str(path), ["a_1", "b_1"], y, y + 1, ["sbp", "dbp"])
    back = pd.read_csv(path)
    assert back["dbp_pred"].tolist() == [81.0, 86.0]
    assert list(engine.predictions_frame(["a"], None, y[:1], ["sbp", "dbp"]).columns) == \
        ["ssoid", "sbp_pred", "dbp_pred"]


def test_device_and_amp_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert engine.resolve_device("cpu") == cpu
    assert engine.resolve_amp("auto", cpu) is None and engine.resolve_amp("off", cpu) is None
    with pytest.raises(UserError, match="--amp bf16 needs --device cuda"):
        engine.resolve_amp("bf16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device"):
            engine.resolve_device("cuda")
