"""Forward+backward throughput and FLOPs of the BP model, per arch, modality and fusion.

    .venv/bin/python benchmarks/bench_model.py                     # CPU: short run
    python benchmarks/bench_model.py --batch_size 64 --iters 20    # GPU (bf16 autocast)

For each arch it times the ECG-only model and then the PPG-only and ECG+PPG (late, mid,
early) models, one training step being forward + backward of a mean-squared loss (no
optimiser step), on random input of ``--length`` samples. FLOPs per record (forward +
backward, convolutions and matmuls) are 3 x the forward FLOPs that
``torch.utils.flop_counter.FlopCounterMode`` counts (a backward runs two products of a
forward's size: the input and the weight gradients), so ``TFLOP/s`` = FLOPs/record x
records/s is the achieved rate. The counter is not asked for the backward itself: it
ignores ``groups`` in ``convolution_backward`` (torch 2.13: 65x too many for a 64-group
conv), which would triple Net1D's total. ``vs ecg`` is the throughput relative to the
same arch's ECG-only model, measured in the same run.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backbones import ARCHS, MODALITY_CHANNELS, build_bp_model, count_parameters  # noqa: E402
from utils import ArgumentParser, run_cli  # noqa: E402

CONFIGS = (("ecg", "none"), ("ppg", "none"), ("both", "late"), ("both", "mid"),
           ("both", "early"))


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS),
                        help="Net1D sizes to time")
    parser.add_argument("--length", type=int, default=7500, help="samples per record")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="records per step (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 2 on CPU, 5 on CUDA)")
    parser.add_argument("--n_targets", type=int, default=5, help="outputs of the head")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when available, else cpu (here %(default)s)")
    return parser


def train_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> None:
    """One forward + backward, under bf16 autocast on CUDA as in training."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = model(x).square().mean()
    loss.backward()


def flops_per_record(model: torch.nn.Module, n_channels: int, length: int,
                     device: torch.device) -> float:
    """Forward + backward FLOPs of one record: 3 x the counted forward (see above)."""
    x = torch.randn(1, n_channels, length, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3.0 * float(counter.get_total_flops())


def records_per_second(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                       warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        train_step(model, x, device)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        train_step(model, x, device)
    sync()
    return iters * x.shape[0] / (time.perf_counter() - start)


def bench_one(arch: str, modality: str, fusion: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    fusion_arg = fusion if modality == "both" else "late"
    model = build_bp_model(dict(arch=arch, modality=modality, fusion=fusion_arg,
                                n_targets=args.n_targets)).to(device).train()
    n_channels = len(MODALITY_CHANNELS[modality])
    x = torch.randn(args.batch_size, n_channels, args.length, device=device)
    flops = flops_per_record(model, n_channels, args.length, device)
    rate = records_per_second(model, x, device, args.warmup, args.iters)
    return {"arch": arch, "modality": modality, "fusion": fusion,
            "params": count_parameters(model)[1], "rec_s": rate, "gflop": flops / 1e9,
            "tflop_s": flops * rate / 1e12}


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if on_gpu else 8)
    args.iters = args.iters or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    name = (torch.cuda.get_device_name(device) if on_gpu
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"# torch {torch.__version__} on {name}; length {args.length}, batch "
          f"{args.batch_size}, {args.iters} timed steps after {args.warmup}; "
          f"{'bf16 autocast' if on_gpu else 'float32'}")
    print(f"{'arch':<11}{'modality':<9}{'fusion':<7}{'params':>12}{'rec/s':>10}"
          f"{'vs ecg':>8}{'GFLOP/rec':>11}{'TFLOP/s':>9}")
    for arch in args.archs:
        baseline = None
        for modality, fusion in CONFIGS:
            row = bench_one(arch, modality, fusion, args, device)
            baseline = baseline or row["rec_s"]
            print(f"{arch:<11}{modality:<9}{fusion:<7}{row['params']:>12,}{row['rec_s']:>10.1f}"
                  f"{row['rec_s'] / baseline:>8.2f}{row['gflop']:>11.3f}{row['tflop_s']:>9.4f}",
                  flush=True)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
