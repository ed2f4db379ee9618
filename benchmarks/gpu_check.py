"""One-command check of every CUDA path of the project: training steps in bf16, fp16 with
a GradScaler and float32, DistributedDataParallel on NCCL, torch.compile, train_bp.py
under torchrun, predict_bp.py against training's own test predictions, and whether the
data loader keeps up with the GPU.

    python benchmarks/gpu_check.py                  # on the GPU machine (one H100/H200: < 8 min)
    python benchmarks/gpu_check.py --skip compile   # without the minute or two of compiling
    .venv/bin/python benchmarks/gpu_check.py --dry_run   # the same logic on CPU, tiny, < 1 min

Checks, in this order (each in its own try/except, so one failure hides no other):

- ``train_<fusion>_<amp>``: ``bench_train.step_rate`` (``engine.train_one_epoch``'s own
  step on one batch already on the device) of the ``--arch`` ECG+PPG model with early and
  late fusion, under bf16 autocast, fp16 autocast with a GradScaler, and float32 (AMP
  off): records/s, FLOPs per record (``bench_model.flops_per_record``: 3 x the counted
  forward), achieved TFLOP/s, that over the GPU's dense bf16 peak (``BF16_PEAK_TFLOPS``),
  and the peak memory allocated.
- ``synthetic_cohort``: ``make_synthetic_cohort.make_cohort`` + ``prepare_kailuan_npz.main``.
- ``end_to_end``: ``torchrun --nproc_per_node=1 train_bp.py --epochs 2 --cache_dir ...
  --device cuda`` on that cohort: an NCCL process group and DistributedDataParallel (a
  torchrun launch of one process runs them too), bf16 autocast, pinned memory and the
  cache feeding the GPU; the log must say it trained on CUDA with NCCL, and
  final_metrics.json must hold finite val and test mean MAEs; then ``predict_bp.py
  --device cuda`` on the same npz files must reproduce test_predictions.csv within 0.01
  mmHg (both run inference in float32 without TF32, ``engine.float32_inference``; other
  batch sizes may pick other kernels) -- 1e-3 mmHg in a dry run (gloo, CPU).
- ``loader``: ``bench_loader.measure`` on that cohort at the training batch size: records/s
  of the cache and of npz files with train_bp.py's default ``--num_workers``, each over
  the fastest bf16 step rate measured above (aim: at least 2).
- ``compile_early_bf16``: ``torch.compile`` of the early-fusion model, bf16; its rate after
  the warm-up steps (which include the compile) over the eager rate.

The report (``--out``, JSON, rewritten after every check so a killed run keeps what it
measured) holds the device, torch and CUDA versions, the settings and a ``checks`` list of
``{name, ok, seconds, figures}`` (plus ``error`` and a traceback or log tail on failure, or
``skipped`` with the reason). A table with one line per check is printed as they finish.
Exit status 0 when every check passed, 1 when any failed, 2 (one ``error:`` line) for a
bad invocation or a machine without CUDA.

``--dry_run`` runs every check on the CPU at tiny size (arch tiny, batch 2, length 200,
1 warm-up + 1 timed step; a 12-subject cohort, gloo instead of NCCL; bf16 via CPU
autocast). Two things cannot run there and are reported as ``skipped`` (ok): the fp16 rows
(``engine.make_scaler`` enables the GradScaler on CUDA only, so fp16 on the CPU would test
neither the scaler nor the GPU) and the compile (Inductor would build C++ for minutes);
the compile check instead runs ``torch.compile(backend="eager")`` -- graph capture only,
no code generation -- so its wiring is tested, and its speed-up means nothing.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import backbones  # noqa: E402
import bench_loader  # noqa: E402
import bench_train  # noqa: E402
import engine  # noqa: E402
import make_synthetic_cohort  # noqa: E402
import prepare_kailuan_npz  # noqa: E402
import train_bp  # noqa: E402
import utils  # noqa: E402
from bench_model import flops_per_record  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data
# sheets; the first entry whose key occurs in torch.cuda.get_device_name() applies (so the
# PCIe and NVL H100s come before the SXM one). Unknown devices get a null fraction.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
)
AMPS = ("bf16", "fp16", "fp32")
FUSIONS = ("early", "late")
TARGETS = ["right_arm_sbp", "right_arm_dbp"]
N_TARGETS = 5  # outputs of the timed models, as in bench_train
FP16_EXTRA_WARMUP = 5
GROUPS = ("train", "end_to_end", "loader", "compile")
# --dry_run: the size flags still at their defaults take these values
DRY = {"arch": "tiny", "batch_size": 2, "length": 200, "warmup": 1, "steps": 1,
       "cohort_subjects": 12, "records_per_subject": 2, "e2e_batch_size": 8,
       "num_workers": 0, "loader_passes": 1}
PREDICT_TOLERANCE = {"cuda": 0.01, "cpu": 1e-3}  # mmHg, see the module docstring
LOADER_AIM = 2.0


def get_args_parser() -> utils.ArgumentParser:
    # utils.ArgumentParser's help formatter is an ArgumentDefaultsHelpFormatter
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json",
                   help="JSON report, written atomically after every check")
    p.add_argument("--dry_run", action="store_true",
                   help="run every check on the CPU at tiny size to test this script's logic: "
                        "the size flags left at their defaults become "
                        + ", ".join(f"{k} {v}" for k, v in DRY.items()))
    p.add_argument("--work_dir", default=None,
                   help="folder in which to make (and keep) a scratch folder for the cohort, "
                        "the training run and the caches (default: a temporary folder, removed "
                        "afterwards)")
    p.add_argument("--skip", nargs="+", default=[], choices=GROUPS,
                   help="checks not to run (reported as skipped)")
    p.add_argument("--arch", default="ecgfounder", choices=sorted(backbones.ARCHS),
                   help="Net1D size of the timed models and of the end-to-end run")
    p.add_argument("--batch_size", type=int, default=256, help="records per timed training step")
    p.add_argument("--length", type=int, default=7500,
                   help="samples per record, in the timed steps and the synthetic cohort")
    p.add_argument("--warmup", type=int, default=3,
                   help=f"untimed steps before each timing (fp16: {FP16_EXTRA_WARMUP} more, as "
                        f"the GradScaler skips steps while it lowers its scale)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--cohort_subjects", type=int, default=256,
                   help="subjects of the synthetic cohort for the end-to-end and loader checks")
    p.add_argument("--records_per_subject", type=int, default=4,
                   help="records per subject of the synthetic cohort")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the end-to-end training run")
    p.add_argument("--e2e_batch_size", type=int, default=256,
                   help="--batch_size of the end-to-end training run")
    p.add_argument("--num_workers", type=int,
                   default=train_bp.get_args_parser().get_default("num_workers"),
                   help="npz loader workers of the loader check and the end-to-end run, as "
                        "train_bp.py's --num_workers "
                        "(default: min(4, CPU cores), %(default)s here)")
    p.add_argument("--loader_passes", type=int, default=3, help="timed epochs per loader")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds allowed to each subprocess (training, prediction)")
    return p


def parse_args(argv: Optional[Sequence[str]]):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.dry_run:
        for key, value in DRY.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    for key in ("batch_size", "length", "steps", "cohort_subjects", "records_per_subject",
                "epochs", "e2e_batch_size", "loader_passes"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if args.warmup < 0 or args.num_workers < 0:
        raise UserError("--warmup and --num_workers must be 0 or more")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {args.out}: folder {folder} does not exist")
    if args.work_dir is not None and not os.path.isdir(args.work_dir):
        raise UserError(f"--work_dir {args.work_dir}: no such directory")
    return args


# ----------------------------------------------------------------------------- check runner
class Skip(Exception):
    """The check does not apply here: reported as ``skipped`` with ok true."""


class CheckFailed(Exception):
    """The check ran and its result is wrong; ``figures`` are reported with the error."""

    def __init__(self, message: str, figures: Optional[dict] = None, log_tail: str = ""):
        super().__init__(message)
        self.figures = figures or {}
        self.log_tail = log_tail


def run_check(name: str, fn: Callable[[], dict]) -> dict:
    """``fn()``'s figures as a check entry; any exception becomes ok false and its text."""
    entry: Dict[str, object] = {"name": name, "ok": False}
    tic = time.perf_counter()
    print(f"gpu_check: running {name}", file=sys.stderr, flush=True)
    try:
        entry["figures"] = fn()
        entry["ok"] = True
    except Skip as exc:
        entry.update(ok=True, skipped=str(exc), figures={})
    except CheckFailed as exc:
        entry.update(error=str(exc), figures=exc.figures)
        if exc.log_tail:
            entry["log_tail"] = exc.log_tail
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
        entry.update(error=f"{type(exc).__name__}: {exc}", figures={},
                     traceback=traceback.format_exc()[-4000:])
    entry["seconds"] = round(time.perf_counter() - tic, 3)
    free_memory()
    return entry


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- context
class Context:
    """What the checks share: the device, the sizes, the scratch folder, earlier results."""

    def __init__(self, args, scratch: str):
        self.args = args
        self.scratch = scratch
        self.env = dict(os.environ)  # of the subprocesses
        if args.dry_run:
            self.device = torch.device("cpu")
            # tiny sizes gain nothing from more threads, and on a busy CPU OpenMP threads
            # that wait for each other cost seconds per step
            torch.set_num_threads(1)
            self.env["OMP_NUM_THREADS"] = "1"
        else:
            self.device = engine.resolve_device("cuda")
        self.on_gpu = self.device.type == "cuda"
        self.device_name = bench_train.device_name(self.device)
        self.peak_tflops = bf16_peak(self.device_name) if self.on_gpu else None
        # what bench_train.step_rate reads from its args
        self.step_args = SimpleNamespace(batch_size=args.batch_size, length=args.length,
                                         n_targets=N_TARGETS, warmup=args.warmup,
                                         steps=args.steps)
        self.flops: Dict[str, float] = {}  # per fusion
        self.rates: Dict[str, float] = {}  # records/s per train check name
        self.cohort: Optional[dict] = None

    def amp_dtype(self, amp: str) -> Optional[torch.dtype]:
        if amp == "fp32":
            return None
        if self.on_gpu:  # raises UserError when this GPU lacks bf16
            return engine.resolve_amp(amp, self.device)
        if amp == "fp16":
            raise Skip("needs CUDA: engine.make_scaler enables the GradScaler on CUDA only")
        return torch.bfloat16  # CPU autocast

    def build(self, fusion: str) -> backbones.BPModel:
        torch.manual_seed(0)
        model = backbones.build_bp_model(dict(arch=self.args.arch, modality="both",
                                              fusion=fusion, n_targets=N_TARGETS))
        return model.to(self.device)

    def flops_of(self, fusion: str, model: torch.nn.Module) -> float:
        if fusion not in self.flops:
            self.flops[fusion] = flops_per_record(model, 2, self.args.length, self.device)
        return self.flops[fusion]

    def timed(self, model: torch.nn.Module, amp_dtype, warmup: Optional[int] = None) -> dict:
        """``bench_train.step_rate`` with the peak memory of its steps."""
        step_args = self.step_args
        if warmup is not None:
            step_args = SimpleNamespace(**{**vars(step_args), "warmup": warmup})
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        rate = bench_train.step_rate(model, step_args, self.device, amp_dtype)
        memory = (torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.on_gpu
                  else None)
        if not finite_positive(rate):
            raise CheckFailed(f"step rate {rate} is not a finite positive number")
        return {"rec_s": rate, "peak_memory_gib": memory}

    def throughput(self, rate: float, flops: float) -> dict:
        tflop_s = flops * rate / 1e12
        return {"gflop_per_record": flops / 1e9, "tflop_s": tflop_s,
                "bf16_peak_tflops": self.peak_tflops,
                "fraction_of_bf16_peak": (tflop_s / self.peak_tflops if self.peak_tflops
                                          else None)}

    def best_bf16_rate(self) -> Optional[float]:
        rates = [r for name, r in self.rates.items() if name.endswith("_bf16")]
        return max(rates) if rates else None


def bf16_peak(name: str) -> Optional[float]:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


# ----------------------------------------------------------------------------- checks
def check_train(ctx: Context, fusion: str, amp: str) -> dict:
    amp_dtype = ctx.amp_dtype(amp)
    model = ctx.build(fusion)
    flops = ctx.flops_of(fusion, model)
    warmup = ctx.args.warmup + (FP16_EXTRA_WARMUP if amp == "fp16" else 0)
    timing = ctx.timed(model, amp_dtype, warmup)
    ctx.rates[f"train_{fusion}_{amp}"] = timing["rec_s"]
    return {"fusion": fusion, "amp": amp, "autocast": str(amp_dtype),
            "params": backbones.count_parameters(model)[1], "batch_size": ctx.args.batch_size,
            "length": ctx.args.length, "timed_steps": ctx.args.steps, "warmup_steps": warmup,
            **timing, **ctx.throughput(timing["rec_s"], flops)}


def check_cohort(ctx: Context) -> dict:
    a = ctx.args
    base = os.path.join(ctx.scratch, "cohort")
    os.makedirs(base, exist_ok=True)
    h5 = os.path.join(base, "cohort.h5")
    npz, labels = os.path.join(base, "npz"), os.path.join(base, "labels.csv")
    make_synthetic_cohort.make_cohort(h5, n_subjects=a.cohort_subjects,
                                      records_per_subject=a.records_per_subject, seed=0)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = run_cli(prepare_kailuan_npz.main,
                       ["--h5_path", h5, "--target_cols", *TARGETS, "--output_npz", npz,
                        "--output_csv", labels, "--target_seq_len", str(a.length),
                        "--workers", str(min(8, os.cpu_count() or 1))])
    if code:
        raise CheckFailed(f"prepare_kailuan_npz.py exited {code}", log_tail=log.getvalue()[-3000:])
    n = len(pd.read_csv(labels, usecols=["ssoid"]))
    ctx.cohort = {"npz": npz, "labels": labels, "n_records": n}
    return {"n_records": n, "length": a.length}


def need_cohort(ctx: Context) -> dict:
    if ctx.cohort is None:
        raise CheckFailed("not run: the synthetic_cohort check did not make the cohort")
    return ctx.cohort


def run_logged(argv: List[str], log_path: str, timeout: float, env: dict) -> int:
    """Run ``argv`` in the repo root, its stdout and stderr into ``log_path``; -1 after
    ``timeout`` seconds. It runs in a session of its own, which is killed whole on a
    timeout or an interrupt, so no torchrun worker outlives its launcher."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            log.write(f"\ngpu_check: killed after {timeout:g} s\n")
            return -1
        finally:
            kill_session(proc)  # an interrupt


def kill_session(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-n:]


def check_end_to_end(ctx: Context) -> dict:
    a, cohort = ctx.args, need_cohort(ctx)
    base = os.path.join(ctx.scratch, "e2e")
    os.makedirs(base, exist_ok=True)
    run = os.path.join(base, "run")
    device = ctx.device.type
    train_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=1", os.path.join(ROOT, "train_bp.py"),
                  "--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"],
                  "--out_dir", run, "--target_cols", *TARGETS, "--arch", a.arch,
                  "--modality", "both", "--epochs", str(a.epochs),
                  "--batch_size", str(a.e2e_batch_size), "--cache_dir",
                  os.path.join(base, "cache"), "--num_workers", str(a.num_workers),
                  "--device", device]
    figures: Dict[str, object] = {"device": device}
    train_log = os.path.join(base, "train.log")
    tic = time.perf_counter()
    code = run_logged(train_argv, train_log, a.timeout, ctx.env)
    figures["train_seconds"] = time.perf_counter() - tic
    if code:
        raise CheckFailed(f"torchrun train_bp.py exited {code}", figures, tail(train_log))
    with open(train_log, errors="replace") as fh:
        summary = [ln.strip() for ln in fh if ln.startswith("device ")]
    figures["train_summary"] = summary[0] if summary else None
    backend = "nccl" if ctx.on_gpu else "gloo"
    if not summary or not (summary[0].startswith(f"device {ctx.device.type}")
                           and f"processes 1 ({backend})" in summary[0]):
        raise CheckFailed(f"train_bp.py did not report training on {ctx.device.type} with "
                          f"{backend}", figures, tail(train_log))
    with open(os.path.join(run, "final_metrics.json")) as fh:
        final = json.load(fh)
    for split in ("val", "test"):
        mae = final.get(split, {}).get("mean", {}).get("mae")
        figures[f"{split}_mae_mean"] = mae
        if not (isinstance(mae, (int, float)) and math.isfinite(mae)):
            raise CheckFailed(f"final_metrics.json: {split}.mean.mae is {mae!r}, not a finite "
                              f"number", figures, tail(train_log))
    figures["best_epoch"] = final.get("best_epoch")
    history = pd.read_csv(os.path.join(run, "history.csv"))
    figures["train_records_per_s"] = [float(r) for r in history["train_records_per_s"]]

    output = os.path.join(base, "predict.csv")
    predict_argv = [sys.executable, os.path.join(ROOT, "predict_bp.py"),
                    "--checkpoint", os.path.join(run, "bp_best.pth"),
                    "--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"],
                    "--output", output, "--device", device]
    predict_log = os.path.join(base, "predict.log")
    tic = time.perf_counter()
    code = run_logged(predict_argv, predict_log, a.timeout, ctx.env)
    figures["predict_seconds"] = time.perf_counter() - tic
    if code:
        raise CheckFailed(f"predict_bp.py exited {code}", figures, tail(predict_log))
    theirs = pd.read_csv(os.path.join(run, "test_predictions.csv"),
                         dtype={"ssoid": str}).set_index("ssoid")
    ours = pd.read_csv(output, dtype={"ssoid": str}).set_index("ssoid")
    missing = theirs.index.difference(ours.index)
    if len(missing):
        raise CheckFailed(f"predict_bp.py did not predict {len(missing)} test records "
                          f"(e.g. {missing[0]})", figures, tail(predict_log))
    columns = [f"{t}_pred" for t in TARGETS]
    diff = np.abs(ours.loc[theirs.index, columns].to_numpy(np.float64)
                  - theirs[columns].to_numpy(np.float64))
    tolerance = PREDICT_TOLERANCE[device]
    figures.update(n_test_records=len(theirs), predict_max_abs_diff_mmhg=float(diff.max()),
                   predict_tolerance_mmhg=tolerance)
    if not diff.max() <= tolerance:  # also catches NaN
        raise CheckFailed(f"predict_bp.py differs from test_predictions.csv by up to "
                          f"{diff.max():.4g} mmHg (tolerance {tolerance:g})", figures)
    return figures


def check_loader(ctx: Context) -> dict:
    a, cohort = ctx.args, need_cohort(ctx)
    loader_args = bench_loader.get_args_parser().parse_args([
        "--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"],
        "--target_cols", *TARGETS, "--seq_len", str(a.length),
        "--batch_size", str(a.batch_size), "--workers", str(a.num_workers),
        "--passes", str(a.loader_passes)])
    scratch = os.path.join(ctx.scratch, "loader")
    os.makedirs(scratch, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        rates = bench_loader.measure(loader_args, scratch)
    npz = rates[f"npz files, --num_workers {a.num_workers}"]
    cache = rates[bench_loader.CACHE]
    step = ctx.best_bf16_rate()
    figures = {"n_records": cohort["n_records"], "batch_size": a.batch_size,
               "num_workers": a.num_workers, "bare_np_load_rec_s": rates["bare np.load loop"],
               "npz_rec_s": npz, "cache_rec_s": cache, "bf16_step_rec_s": step,
               "npz_over_step": npz / step if step else None,
               "cache_over_step": cache / step if step else None, "aim": LOADER_AIM,
               "cache_meets_aim": bool(cache / step >= LOADER_AIM) if step else None}
    bad = [k for k, v in rates.items() if not finite_positive(v)]
    if bad:
        raise CheckFailed(f"loader rates not finite and positive: {', '.join(bad)}", figures)
    return figures


def check_compile(ctx: Context) -> dict:
    eager = ctx.rates.get("train_early_bf16")
    model = ctx.build("early")
    flops = ctx.flops_of("early", model)
    # on the CPU Inductor would build C++ for minutes: graph capture only (see the docstring)
    backend = "inductor" if ctx.on_gpu else "eager"
    compiled = torch.compile(model, backend=backend)
    timing = ctx.timed(compiled, ctx.amp_dtype("bf16"))
    return {"backend": backend, **timing, **ctx.throughput(timing["rec_s"], flops),
            "eager_rec_s": eager, "speedup": timing["rec_s"] / eager if eager else None}


def plan(ctx: Context) -> List[tuple]:
    """(name, group, function) of every check, in running order."""
    checks = [(f"train_{fusion}_{amp}", "train",
               lambda fusion=fusion, amp=amp: check_train(ctx, fusion, amp))
              for fusion in FUSIONS for amp in AMPS]
    checks += [("synthetic_cohort", "cohort", lambda: check_cohort(ctx)),
               ("end_to_end", "end_to_end", lambda: check_end_to_end(ctx)),
               ("loader", "loader", lambda: check_loader(ctx)),
               ("compile_early_bf16", "compile", lambda: check_compile(ctx))]
    return checks


CHECK_NAMES = [f"train_{f}_{a}" for f in FUSIONS for a in AMPS] + [
    "synthetic_cohort", "end_to_end", "loader", "compile_early_bf16"]


# ----------------------------------------------------------------------------- report
def summary(entry: dict) -> str:
    """The figures of one check in one short line."""
    if entry.get("skipped"):
        return f"skipped: {entry['skipped']}"
    f = entry.get("figures") or {}
    parts = []
    if "rec_s" in f:
        parts.append(f"{f['rec_s']:.1f} rec/s")
    if "tflop_s" in f:
        parts.append(f"{f['tflop_s']:.2f} TFLOP/s")
    if f.get("fraction_of_bf16_peak") is not None:
        parts.append(f"{100 * f['fraction_of_bf16_peak']:.1f}% of bf16 peak")
    if f.get("peak_memory_gib") is not None:
        parts.append(f"{f['peak_memory_gib']:.1f} GiB")
    if f.get("speedup") is not None:
        parts.append(f"{f['speedup']:.2f}x eager")
    if "n_records" in f and "cache_rec_s" not in f:
        parts.append(f"{f['n_records']} records")
    if "test_mae_mean" in f:
        parts.append(f"test MAE {f['test_mae_mean']:.2f}")
    if f.get("predict_max_abs_diff_mmhg") is not None:
        parts.append(f"predict diff {f['predict_max_abs_diff_mmhg']:.2g} mmHg")
    if "cache_rec_s" in f:
        parts.append(f"cache {f['cache_rec_s']:.0f} rec/s, npz {f['npz_rec_s']:.0f} rec/s")
        if f.get("cache_over_step") is not None:
            parts.append(f"/ step: cache {f['cache_over_step']:.1f}, "
                         f"npz {f['npz_over_step']:.1f}")
    if not entry["ok"]:
        parts.insert(0, f"error: {' '.join(str(entry.get('error', '')).split())[:160]}")
    return ", ".join(parts)


def table_line(entry: dict) -> str:
    status = "skip" if entry.get("skipped") else ("ok" if entry["ok"] else "FAIL")
    return f"{entry['name']:<20} {status:>4} {entry['seconds']:>8.1f}  {summary(entry)}"


def header(ctx: Context) -> dict:
    report = {"device": ctx.device_name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "dry_run": ctx.args.dry_run, "ok": None,
              "settings": {k: v for k, v in vars(ctx.args).items()
                           if k not in ("out", "work_dir")},
              "bf16_peak_tflops": ctx.peak_tflops, "work_dir": ctx.scratch,
              "checks": []}
    if ctx.on_gpu:
        report.update(cudnn=torch.backends.cudnn.version(),
                      tf32={"matmul": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn": torch.backends.cudnn.allow_tf32},
                      gpu_memory_gib=torch.cuda.get_device_properties(ctx.device).total_memory
                      / 2 ** 30)
    return report


def run_all(ctx: Context) -> dict:
    report = header(ctx)
    print(f"# gpu_check: torch {report['torch']} on {report['device']}"
          + (" (dry run: CPU, tiny sizes)" if ctx.args.dry_run else "")
          + f"; arch {ctx.args.arch}, batch {ctx.args.batch_size}, length {ctx.args.length}, "
            f"{ctx.args.steps} timed steps after {ctx.args.warmup}", flush=True)
    print(f"{'check':<20} {'':>4} {'seconds':>8}  figures", flush=True)
    for name, group, fn in plan(ctx):
        skipped = set(ctx.args.skip)
        if {"end_to_end", "loader"} <= skipped:
            skipped.add("cohort")  # made for those two only
        if group in skipped:
            entry = {"name": name, "ok": True, "skipped": "--skip", "figures": {},
                     "seconds": 0.0}
        else:
            entry = run_check(name, fn)
        report["checks"].append(entry)
        report["ok"] = all(c["ok"] for c in report["checks"])
        utils.write_json_atomic(ctx.args.out, report)
        print(table_line(entry), flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA device: gpu_check.py needs a GPU (use --dry_run to test its "
                        "logic on CPU)")
    if args.work_dir is not None:
        scratch_cm = contextlib.nullcontext(tempfile.mkdtemp(prefix="gpu_check_",
                                                             dir=args.work_dir))
    else:
        scratch_cm = tempfile.TemporaryDirectory(prefix="gpu_check_")
    with scratch_cm as scratch:
        report = run_all(Context(args, scratch))
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    print(f"wrote {args.out}: {len(report['checks'])} checks, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
