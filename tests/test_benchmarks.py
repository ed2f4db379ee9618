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
