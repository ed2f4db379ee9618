"""The numbers the benchmark scripts compute (not their timings)."""
import json
import math
import os
import sys

import pandas as pd
import pytest
import torch

from backbones import ARCHS, Net1D
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_model import flops_per_record  # noqa: E402


def test_benchmark_flops_are_three_forwards_of_the_analytic_count():
    # benchmarks/bench_model.py reports TFLOP/s from this count; torch's own count of a
    # grouped convolution's backward ignores the groups
    cfg = ARCHS["tiny"]
    net = Net1D(cfg)
    length, forward = 400, 0
    steps = math.ceil(length / 2)
    forward += 2 * steps * cfg.in_channels * cfg.base_filters * cfg.kernel_size
    c_in = cfg.base_filters
    for c_out, blocks in zip(cfg.filter_list, cfg.m_blocks_list):
        for b in range(blocks):
            out = math.ceil(steps / cfg.stride) if b == 0 else steps
            width = c_in if b == 0 else c_out
            forward += (2 * steps * width * c_out + 2 * out * c_out * cfg.groups_width
                        * cfg.kernel_size + 2 * out * c_out * c_out
                        + 2 * (c_out * (c_out // 2)) * 2)  # SE: two small linears
            steps = out
        c_in = c_out
    assert flops_per_record(net, 1, length, torch.device("cpu")) == 3 * forward


def test_bench_loader_times_every_loader_on_the_same_records(tmp_path):
    import bench_loader
    args = bench_loader.get_args_parser().parse_args(
        ["--n_records", "8", "--seq_len", "100", "--batch_size", "4", "--passes", "1",
         "--workers", "0", "1"])
    rates = bench_loader.measure(args, str(tmp_path))
    assert list(rates) == ["bare np.load loop", "npz files, --num_workers 0",
                           "npz files, --num_workers 1", bench_loader.CACHE]
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    lines = bench_loader.report(rates, 8, args)
    assert lines[-1].startswith("cache / best npz loader: ")


def test_bench_train_prints_a_row_per_model_and_per_loader(capsys):
    import bench_train
    bench_train.main(["--arch", "tiny", "--batch_size", "2", "--length", "200", "--steps", "1",
                      "--warmup", "1", "--loader_records", "8", "--num_workers", "0"])
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out[2:4]] == ["both/early", "both/late"]
    params = [int(ln.split()[1].replace(",", "")) for ln in out[2:4]]
    assert params[1] > 1.8 * params[0]  # late fusion: two encoders
    assert [ln.split(":")[0] for ln in out[4:]] == ["loader"] * 3


def test_bench_real_tiny_run_writes_one_row_per_fit_read_from_the_cv_reports(tmp_path):
    import bench_real
    if not os.path.isfile(bench_real.DATA):
        pytest.skip(f"PPG-BP is not at {bench_real.DATA}")
    out = tmp_path / "real"
    threads = torch.get_num_threads()
    bench_real.main(["--out", str(out), "--subjects", "12", "--folds", "2", "--epochs", "1",
                     "--seeds", "1", "--arch", "tiny", "--workers", "1"])
    table = pd.read_csv(out / "bench_real.csv")
    assert list(table.columns) == bench_real.COLUMNS and table["row"].tolist() == bench_real.ROWS
    rows = table.set_index("row")
    pooled = json.loads((out / "cv" / "ppg_cov_seed1" / "cv_metrics.json").read_text())["pooled"]
    assert rows.loc["train mean", "sbp_mae"] == pytest.approx(
        pooled["baseline"]["per_target"]["sbp"]["mae"])
    assert rows.loc["train mean", "mase"] == 1.0
    ridge, model = rows.loc["ridge age/sex/BMI"], rows.loc["model PPG + age/sex/BMI"]
    assert ridge["dbp_mae"] == pytest.approx(
        pooled["covariate_baseline"]["per_target"]["dbp"]["mae"])
    for t in ("sbp", "dbp"):
        assert model[f"{t}_minus_ridge"] == pytest.approx(model[f"{t}_mae"] - ridge[f"{t}_mae"])
        assert model[f"{t}_minus_ridge_lo"] <= model[f"{t}_minus_ridge_hi"]
    assert rows.loc["model PPG", "n_seeds"] == 1 and math.isnan(rows.loc["model PPG",
                                                                         "sbp_minus_ridge"])
    n_feature_runs = int(rows.loc["model PPG + age/sex/BMI + PPG features", "n_seeds"])
    assert n_feature_runs == (1 if bench_real.usable_features(str(out / "labels.csv")) else 0)
    assert torch.get_num_threads() == threads  # --threads 1 is undone for the caller
