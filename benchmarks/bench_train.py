"""Training-step throughput of the full ECGFounder-size model on ECG+PPG, its achieved
TFLOP/s, and whether the data loader keeps up with it.

    python benchmarks/bench_train.py                       # GPU: batch 256, bf16 autocast
    python benchmarks/bench_train.py --compile             # also time torch.compile
    python benchmarks/bench_train.py --batch_size 4 --steps 2 --loader_records 200   # CPU

Each step is ``engine.train_one_epoch``'s own (autocast forward, loss, backward, gradient
clipping, AdamW step, the non-finite guard) on one batch of ``--length`` samples already
on the device, so the data path is not in it. FLOPs per record (forward + backward,
convolutions and matmuls) come from ``torch.utils.flop_counter``; TFLOP/s = FLOPs per
record x records/s. Then the training DataLoader is timed (``bench_loader.measure``) on a
synthetic cohort of ``--loader_records`` records at the same batch size and length, from
npz files with ``--num_workers`` and from the cache, in the same run: ``/ slowest step``
is its rate over the slowest step rate measured. Aim: at least 2, so data never limits.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbones  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
import bench_loader  # noqa: E402
from bench_model import flops_per_record  # noqa: E402
from utils import ArgumentParser, run_cli  # noqa: E402


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ecgfounder", choices=sorted(backbones.ARCHS),
                   help="Net1D size of both encoders")
    p.add_argument("--fusions", nargs="+", default=["early", "late"],
                   choices=backbones.FUSIONS, help="ECG+PPG models to time")
    p.add_argument("--batch_size", type=int, default=256, help="records per training step")
    p.add_argument("--length", type=int, default=7500, help="samples per record")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--n_targets", type=int, default=5, help="outputs of the head")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast on CUDA: auto = bf16 where supported, else fp16")
    p.add_argument("--compile", action="store_true", help="also time the torch.compiled model")
    p.add_argument("--loader_records", type=int, default=2000,
                   help="synthetic records for the loader timing (0: skip it)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="workers of the npz loader (default: min(8, CPU cores), "
                        "%(default)s here)")
    return p


class _SameBatch:
    """A loader that yields one device batch ``n`` times (no data path in the timing)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int):
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        no_covariates = self.x.new_zeros((len(self.x), 0))
        return iter([(self.x, no_covariates, self.y, None)] * self.n)


def step_rate(model, args, device: torch.device, amp_dtype) -> float:
    """Records/s of ``--steps`` training steps after ``--warmup`` untimed ones."""
    x = torch.randn(args.batch_size, 2, args.length, device=device)
    y = torch.randn(args.batch_size, args.n_targets, device=device)
    optimizer = torch.optim.AdamW(backbones.param_groups(model, 1e-5, 3e-4, 0.01))
    scaler = engine.make_scaler(device, amp_dtype)
    loss_fn = losses.build_loss("huber")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    engine.train_one_epoch(model, _SameBatch(x, y, args.warmup), loss_fn, optimizer, device,
                           amp_dtype, scaler, 1.0, epoch=0)
    sync()
    tic = time.perf_counter()
    engine.train_one_epoch(model, _SameBatch(x, y, args.steps), loss_fn, optimizer, device,
                           amp_dtype, scaler, 1.0, epoch=1)
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - tic)


def bench_fusion(fusion: str, args, device: torch.device, amp_dtype) -> List[dict]:
    torch.manual_seed(0)
    model = backbones.build_bp_model(dict(arch=args.arch, modality="both", fusion=fusion,
                                          n_targets=args.n_targets)).to(device)
    flops = flops_per_record(model, 2, args.length, device)
    rows = [{"model": f"both/{fusion}", "params": backbones.count_parameters(model)[1],
             "rec_s": step_rate(model, args, device, amp_dtype), "gflop": flops / 1e9}]
    if args.compile:
        rows.append({**rows[0], "model": f"both/{fusion} compiled",
                     "rec_s": step_rate(torch.compile(model), args, device, amp_dtype)})
    return rows


def loader_lines(args, slowest_step: float) -> List[str]:
    """The training loader's rates at this batch size and length, over the step rate."""
    loader_args = bench_loader.get_args_parser().parse_args([
        "--n_records", str(args.loader_records), "--seq_len", str(args.length),
        "--batch_size", str(args.batch_size), "--workers", str(args.num_workers)])
    with tempfile.TemporaryDirectory() as scratch:
        rates = bench_loader.measure(loader_args, scratch)
    return [f"loader: {name:44s} {rate:9.0f} rec/s  / slowest step {rate / slowest_step:7.1f}"
            for name, rate in rates.items()]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    device = engine.resolve_device(args.device)
    amp_dtype = engine.resolve_amp(args.amp, device)
    print(f"# torch {torch.__version__} on {device_name(device)}; arch {args.arch}, batch "
          f"{args.batch_size}, length {args.length}, autocast {amp_dtype}, {args.steps} timed "
          f"steps after {args.warmup}")
    print(f"{'model':<24}{'params':>12}{'rec/s':>10}{'GFLOP/rec':>11}{'TFLOP/s':>9}"
          f"{'/ first':>9}")
    rows: List[Dict] = []
    for fusion in args.fusions:
        for row in bench_fusion(fusion, args, device, amp_dtype):
            rows.append(row)
            print(f"{row['model']:<24}{row['params']:>12,}{row['rec_s']:>10.1f}"
                  f"{row['gflop']:>11.2f}{row['gflop'] * row['rec_s'] / 1e3:>9.2f}"
                  f"{row['rec_s'] / rows[0]['rec_s']:>9.2f}", flush=True)
    if args.loader_records:
        print("\n".join(loader_lines(args, min(r["rec_s"] for r in rows))))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
