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
        return self.x[i], torch.zeros(0), self.y[i], f"r{i}"


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, cov):
        assert cov.shape == (len(x), 0)
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


def _one_epoch(batches, accum_steps, n=12):
    """Params after one SGD epoch over ``batches`` (lists of record indices) and the
    number of scheduler steps taken."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 3, generator=g)
    y = torch.randn(n, 2, generator=g)
    loader = DataLoader(_Records(x, y), batch_sampler=batches)
    torch.manual_seed(0)
    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    engine.train_one_epoch(model, loader, torch.nn.MSELoss(), opt, torch.device("cpu"), None,
                           engine.make_scaler(torch.device("cpu"), None), grad_clip=0.0,
                           epoch=1, scheduler=sched, accum_steps=accum_steps)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), sched.last_epoch


def test_accumulated_batches_equal_one_big_batch_and_short_last_group():
    fours = [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]
    accumulated, steps = _one_epoch(fours, accum_steps=2)
    big, big_steps = _one_epoch([list(range(0, 8)), list(range(8, 12))], accum_steps=1)
    assert steps == big_steps == 2  # groups (b0, b1) and (b2): the last one is short
    torch.testing.assert_close(accumulated, big, rtol=1e-6, atol=1e-7)
    plain, plain_steps = _one_epoch(fours, accum_steps=1)
    assert plain_steps == 3 and not torch.allclose(plain, big)


def test_a_non_finite_batch_skips_its_whole_accumulation_group():
    model, out = _fit(_loader(nan_rows=(0,)), epochs=1)
    assert out["skipped_steps"] == 1 and out["n_records"] == 12
    torch.manual_seed(0)
    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = engine.train_one_epoch(model, _loader(nan_rows=(0,)), torch.nn.MSELoss(), opt,
                                 torch.device("cpu"), None,
                                 engine.make_scaler(torch.device("cpu"), None), grad_clip=1.0,
                                 epoch=1, accum_steps=2)
    # batches (0, 1) form one step and (2, 3) another: the NaN in batch 0 costs 8 records
    assert out["skipped_steps"] == 1 and out["n_records"] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluate_returns_mmhg_in_loader_order():
    model = _Linear()
    loader = _loader(n=6)
    mean, std = np.array([120.0, 80.0]), np.array([15.0, 10.0])
    out = engine.evaluate(model, loader, torch.nn.MSELoss(), torch.device("cpu"), mean, std)
    x = loader.dataset.x
    with torch.no_grad():
        raw = model(x, torch.zeros(len(x), 0))
    assert out["ids"] == [f"r{i}" for i in range(6)]
    np.testing.assert_allclose(out["y_pred"], raw.numpy().astype(np.float64) * std + mean,
                               rtol=1e-6)
    np.testing.assert_allclose(out["y_true"], loader.dataset.y.numpy() * std + mean, rtol=1e-6)
    expected = torch.nn.functional.mse_loss(raw, loader.dataset.y).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluation_runs_in_float32_even_inside_an_autocast_region():
    # training may run under bf16 autocast; evaluation and predict_bp.py never do, so the
    # reported metrics and later predictions agree whatever AMP trained the checkpoint
    torch.manual_seed(0)
    model = _Linear()
    loader = _loader(n=8)
    mean, std = np.array([120.0, 80.0]), np.array([15.0, 10.0])
    plain = engine.evaluate(model, loader, torch.nn.MSELoss(), torch.device("cpu"), mean, std)
    x = loader.dataset.x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = engine.evaluate(model, loader, torch.nn.MSELoss(), torch.device("cpu"), mean,
                                 std)
        with torch.no_grad():
            bf16 = model(x, torch.zeros(len(x), 0))
    assert bf16.dtype == torch.bfloat16  # what autocast alone would have given
    np.testing.assert_array_equal(inside["y_pred"], plain["y_pred"])
    assert np.abs(engine.to_mmhg(bf16.float().numpy(), mean, std) - plain["y_pred"]).max() > 1e-3


def test_to_mmhg_rounds_to_what_a_csv_reads_back():
    out = engine.to_mmhg(np.array([[0.123456789, -1.0]]), [120.0, 80.0], [15.0, 10.0])
    assert out.tolist() == [[float("121.8519"), 70.0]]


def test_gather_evaluation_joins_shards_in_split_order(monkeypatch):
    shard = lambda ids, loss: {"loss": loss, "n": len(ids), "ids": ids,  # noqa: E731
                               "y_true": np.array([[float(i[1:])] for i in ids]),
                               "y_pred": np.array([[10.0 * float(i[1:])] for i in ids])}
    parts = [shard(["r0", "r2", "r4"], 1.0), shard(["r1", "r3"], 2.0)]
    monkeypatch.setattr(engine, "all_gather_object", lambda result: parts)
    out = engine.gather_evaluation(parts[0], ["r0", "r1", "r2", "r3", "r4"])
    assert out["ids"] == ["r0", "r1", "r2", "r3", "r4"] and out["n"] == 5
    np.testing.assert_array_equal(out["y_true"][:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(out["y_pred"][:, 0], [0, 10, 20, 30, 40])
    assert out["loss"] == pytest.approx((3 * 1.0 + 2 * 2.0) / 5)
    parts[1] = shard(["r1", "r2"], 2.0)  # r2 twice and r3 never: a sampler that pads
    with pytest.raises(RuntimeError, match="exactly once"):
        engine.gather_evaluation(parts[0], ["r0", "r1", "r2", "r3", "r4"])


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
