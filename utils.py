"""Shared helpers: the user-facing error path, atomic file writes, seeding, the
subject-wise split, the one checkpoint reader/writer, progress bars and the
distributed (torchrun) helpers (metrics live in metrics.py).

Every script's entry point is ``raise SystemExit(run_cli(main))``: a ``UserError``
raised anywhere becomes one line ``error: ...`` on stderr and exit status 2.

Distributed runs: ``init_distributed`` reads torchrun's environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``) and joins the process group; without torchrun (or with
one process) nothing is initialised and every collective helper below is the identity,
so single-process code needs no branches. Ranks other than 0 print nothing to stdout
and show no progress bars; their ``error:`` lines still reach stderr.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import os
import random
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from tqdm import tqdm


# ----------------------------------------------------------------------------- errors
class UserError(Exception):
    """Bad input or bad invocation: reported as ``error: <message>``, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except for required flags and flags whose
    default is None (their help says what happens without them)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad invocation as a ``UserError`` (one line, status 2) and
    shows the defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(message)


def run_cli(main: Callable[[Optional[Sequence[str]]], None],
            argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; turn a ``UserError`` into a one-line message and status 2, and
    a reader that closed the pipe (``script | head``) into a quiet end with status 141."""
    # a log file gets each line as it is printed, in order with stderr (no block buffering)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        main(argv)
        sys.stdout.flush()  # a closed pipe must fail here, not at interpreter shutdown
    except UserError as exc:
        msg = " ".join(str(exc).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Python docs, "Note on SIGPIPE": point stdout at devnull so the flush at exit
        # does not raise again; 128 + SIGPIPE is what a shell reports for `cmd | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0


def check_output_file(flag: str, path: str, overwrite: bool) -> None:
    """``UserError`` unless ``path`` (the value of ``flag``) can be written: its folder
    exists, and it does not, or ``overwrite`` (the user's --overwrite) says to replace it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} already exists; add --overwrite to replace it")


def check_run_dir(out: str, resume: bool, overwrite: bool, last: str) -> None:
    """Refuse to write over another run in ``out`` (an --out_dir) unless ``overwrite``;
    with ``resume`` require the run's ``last`` checkpoint there. Creates nothing: the
    folder appears only once every input has been checked."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out_dir {out} exists and is not a directory")
    if resume:
        if not os.path.isfile(os.path.join(out, last)):
            raise UserError(f"--resume: {out} holds no {last} to continue from")
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out_dir {out} is not empty; add --resume to continue that run, "
                        f"--overwrite to replace it, or choose a new --out_dir")


# ----------------------------------------------------------------------------- atomic files
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The file therefore appears whole or not at all, also when the process is killed.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: str, frame) -> None:
    """Write a pandas DataFrame as CSV (no index), atomically."""
    write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` to ``path`` (exact name, no suffix added), atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- npz folders
NPZ_MANIFEST = ".prepare_kailuan_npz.json"  # prepare_kailuan_npz.py's record of a folder
NPZ_CHANNELS = ("ecg", "ppg")  # the signals of npz columns 0 and 1


def read_json(path: str, what: str) -> dict:
    """The JSON file ``path`` ({} when there is none); ``UserError`` naming it and ``what``
    it is when it cannot be read."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} ({what}) is unreadable: {err}")


def npz_manifest(npz_dir: str) -> dict:
    """The manifest prep wrote in ``npz_dir`` ({} when there is none)."""
    return read_json(os.path.join(npz_dir, NPZ_MANIFEST), "prep's record of the npz folder")


def npz_sample_rate(npz_dir: str) -> Optional[float]:
    """The sampling rate (Hz) of the records in ``npz_dir`` as prep recorded it, or None
    (unknown: prepared without a time base, or by an older prep)."""
    return npz_manifest(npz_dir).get("sample_rate_hz")


def npz_channels(npz_dir: str) -> List[str]:
    """The signals present in the records of ``npz_dir`` (``["ppg"]`` for a cohort prepared
    with ``--ecg_key none``, whose ECG column is all NaN); both when the manifest does not
    say (an older prep, or files from elsewhere)."""
    return list(npz_manifest(npz_dir).get("channels", NPZ_CHANNELS))


def missing_channels(channels: Sequence[int], present: Sequence[str]) -> List[str]:
    """The names of the npz ``channels`` (column numbers a model reads) not in ``present``."""
    return [NPZ_CHANNELS[c] for c in channels if NPZ_CHANNELS[c] not in present]


# ----------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state(device) -> dict:
    """This process's torch random state: the CPU generator's and, on CUDA, the device's
    (dropout on a GPU draws from the latter)."""
    import torch

    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device) -> None:
    """Restore ``rng_state``'s result (or, from older checkpoints, a bare CPU state)."""
    import torch

    if not isinstance(state, dict):
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def loader_generator(seed: int, rank: int, stream: int):
    """A DataLoader's own generator, seeded from (seed, rank, stream): the loader draws
    its worker seeds from it instead of the global generator, so how often loaders are
    (re)started (persistent workers, a resumed run) never shifts the dropout masks."""
    import torch

    state = np.random.SeedSequence([seed, rank, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ----------------------------------------------------------------------------- split
def subject_of(ssoid: str) -> str:
    """The subject of a record id: the part before the first ``_`` (the whole id if none)."""
    return str(ssoid).split("_", 1)[0]


def split_subjects(subjects: Sequence[str], val_ratio: float, test_ratio: float,
                   seed: int) -> Dict[str, str]:
    """Map each distinct subject to ``train``/``val``/``test``.

    Subjects are sorted, shuffled with ``seed`` and cut by the ratios, so the same
    subjects and seed always give the same split, whatever the row order.
    """
    for name, ratio in (("--val_ratio", val_ratio), ("--test_ratio", test_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {ratio}")
    if val_ratio + test_ratio >= 1.0:
        raise UserError(f"--val_ratio + --test_ratio must be below 1, got "
                        f"{val_ratio} + {test_ratio} = {val_ratio + test_ratio:g}")
    unique = sorted(set(str(s) for s in subjects))
    n = len(unique)
    n_test = int(round(n * test_ratio))
    n_val = int(round(n * val_ratio))
    n_test = max(n_test, 1) if test_ratio > 0 else 0
    n_val = max(n_val, 1) if val_ratio > 0 else 0
    if n - n_test - n_val < 1 or (val_ratio > 0 and n_val < 1):
        raise UserError(f"too few subjects ({n}) for --val_ratio {val_ratio} and "
                        f"--test_ratio {test_ratio}: each split needs at least one subject")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [unique[i] for i in order]
    split = {}
    for i, subj in enumerate(shuffled):
        split[subj] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return split


def subject_folds(subjects: Sequence[str], folds: int, seed: int) -> Dict[str, int]:
    """Each distinct subject's fold, 0 to ``folds`` - 1: subjects sorted, shuffled with
    ``seed`` and dealt in turn, so fold sizes differ by one at most and the same subjects
    and seed always give the same folds."""
    unique = sorted(set(str(s) for s in subjects))
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if len(unique) < folds:
        raise UserError(f"too few subjects ({len(unique)}) for --folds {folds}: each fold "
                        f"needs at least one")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i]: k % folds for k, i in enumerate(order)}


def split_by_fold(subjects: Sequence[str], folds: int, fold: int, val_ratio: float,
                  seed: int) -> Dict[str, str]:
    """``split_subjects`` for K-fold cross-validation: fold ``fold``'s subjects are the test
    split; validation takes ``val_ratio`` of the other subjects (at least one), in the
    order ``seed`` shuffled them; the rest train."""
    fold_of = subject_folds(subjects, folds, seed)
    if not 0 <= fold < folds:
        raise UserError(f"--fold must be in [0, {folds - 1}] with --folds {folds}, got {fold}")
    if not 0.0 < val_ratio < 1.0:
        raise UserError(f"--val_ratio must be in (0, 1), got {val_ratio}")
    rest = [s for s, k in fold_of.items() if k != fold]  # in shuffled order
    n_val = max(1, int(round(len(rest) * val_ratio)))
    if n_val >= len(rest):
        raise UserError(f"too few subjects ({len(fold_of)}) for --folds {folds} and "
                        f"--val_ratio {val_ratio}: the train split would be empty")
    val = set(rest[:n_val])
    return {s: "test" if k == fold else ("val" if s in val else "train")
            for s, k in fold_of.items()}


# ----------------------------------------------------------------------------- checkpoints
TRUST_FLAG = "--trust_checkpoint"


def _numpy_safe_globals() -> list:
    """Plain-data numpy types that a weights-only load may rebuild (CONTRACT section 5)."""
    allowed = [np.dtype, np.ndarray]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["scalar", "_reconstruct"])
        except ImportError:
            continue
        allowed += [mod.scalar, mod._reconstruct]
        break
    allowed += [type(np.dtype(t)) for t in
                ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return allowed


def load_checkpoint(path: str, trust: bool = False, map_location="cpu") -> dict:
    """Load a ``torch.save``d file; weights-only unless ``trust`` (the user's flag).

    Raises ``UserError`` for a missing file, a file that is not a torch checkpoint, or
    one that needs full unpickling when ``trust`` is off.
    """
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) and "GLOBAL" in str(exc):
            raise UserError(f"checkpoint {path} holds objects that need full unpickling; "
                            f"if you trust this file, add {TRUST_FLAG}") from None
        raise UserError(f"checkpoint {path} is not a readable PyTorch checkpoint "
                        f"({type(exc).__name__})") from None
    except Exception as exc:  # torch raises many types for a file that is not its own
        raise UserError(f"checkpoint {path} is not a readable PyTorch checkpoint "
                        f"({type(exc).__name__})") from None


def save_checkpoint(path: str, payload: dict) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (the one checkpoint writer)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# ----------------------------------------------------------------------------- progress
_SHOW_PROGRESS = True
LOG_EVERY_S = 60.0  # seconds between progress lines when the output is a file or a pipe


class _ProgressLines(tqdm):
    """tqdm for output that is not a terminal (batch jobs, ``nohup``, ``> log``): a plain
    line at most every ``LOG_EVERY_S`` seconds, and only for work that lasts that long; no
    carriage-return frames and nothing on closing (the caller prints its own summary)."""

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing its line: nothing to clear in a log
            return False
        now = self._time()
        last = getattr(self, "_line_t", getattr(self, "start_t", now - self.mininterval))
        if now - last < self.mininterval:
            return True  # an explicit refresh (set_postfix) does not add lines either
        self._line_t = now
        self.fp.write((self.__str__() if msg is None else msg).strip() + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        pass

    def close(self):
        if not self.disable:
            self.disable = True
            self._decr_instances(self)


def progress(iterable=None, **kwargs) -> tqdm:
    """A progress bar on stderr: tqdm's bar in a terminal, plain lines every
    ``LOG_EVERY_S`` seconds otherwise; hidden on ranks other than 0 of a distributed run."""
    kwargs.setdefault("file", sys.stderr)
    if not getattr(kwargs["file"], "isatty", lambda: False)():
        kwargs.update(delay=LOG_EVERY_S, mininterval=LOG_EVERY_S)
        return _ProgressLines(iterable, disable=not _SHOW_PROGRESS, **kwargs)
    return tqdm(iterable, disable=not _SHOW_PROGRESS, **kwargs)


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun).

    ``enabled``: launched by torchrun, even as its only process, so that
    ``torchrun --nproc_per_node=1`` runs the real process group (NCCL) and DDP paths."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    torchrun: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.torchrun


def dist_env() -> DistInfo:
    """The torchrun environment of this process; ``UserError`` if it is inconsistent."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not any(n in os.environ for n in names):
        return DistInfo()
    try:
        rank, local_rank, world = (int(os.environ[n]) for n in names)
    except (KeyError, ValueError):
        raise UserError(f"distributed environment: {', '.join(names)} must all be set to "
                        f"integers (launch with torchrun)") from None
    if not (0 <= rank < world and 0 <= local_rank <= rank):
        raise UserError(f"distributed environment: RANK {rank}, LOCAL_RANK {local_rank}, "
                        f"WORLD_SIZE {world} do not fit together")
    return DistInfo(rank, local_rank, world, torchrun=True)


def init_distributed(info: DistInfo, backend: str) -> None:
    """Join the process group (``nccl`` on GPUs, ``gloo`` on CPUs) when ``info`` has
    several processes; quieten ranks other than 0."""
    import torch.distributed as dist

    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if not info.is_main:
        _quieten()


def _quieten() -> None:
    """No stdout prints and no progress bars from this process (stderr still shows)."""
    global _SHOW_PROGRESS
    _SHOW_PROGRESS = False
    plain_print = builtins.print

    def print_to_stderr_only(*args, **kwargs):
        if kwargs.get("file") not in (None, sys.stdout):
            plain_print(*args, **kwargs)

    builtins.print = print_to_stderr_only


def _dist():
    """``torch.distributed`` when a process group is up, else ``None``."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (pickled; for tables and small state)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_rank0(fn: Callable[[], object], info: DistInfo):
    """``fn()`` on rank 0 alone, its result on every rank.

    A ``UserError`` in ``fn`` ends every rank with status 2: rank 0 reports it, the others
    leave quietly instead of failing on a lost peer in their next collective.
    """
    outcome = None
    if info.is_main:
        try:
            outcome = (None, fn())
        except UserError as exc:
            outcome = (exc, None)
    error, result = broadcast_object(outcome)
    if error is not None:
        if info.is_main:
            raise error
        raise SystemExit(2)
    return result


def all_gather_object(obj) -> List:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: List = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Element-wise sums of ``values`` over the ranks (float64)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    import torch

    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def destroy_distributed() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()
