"""The numbers the benchmark scripts compute (not their timings)."""
import math
import os
import sys

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
