"""Hyper-parameter search for train_bp.py (Optuna) that never looks at the test split.

    python tune_bp.py --out_dir runs/tune1 --n_trials 24 \\
        --npz_dir data/npz --labels_csv data/labels.csv --target_cols right_arm_sbp right_arm_dbp \\
        --arch small --epochs 20 [--space space.yaml] [any other train_bp.py flag]

Each trial is one train_bp.py training in ``OUT/trial_<n>/`` (a complete out_dir, its log in
``OUT/logs/trial_<n>.log``) with the trial's settings on top of the flags given here; it is
scored on the validation split only (``--metric``, of the checkpoint train_bp.py keeps) and
its test split is never evaluated. Each epoch's validation metric goes to a median pruner,
which stops a trial that falls behind the earlier ones. Once the study holds ``--n_trials``
finished trials and none is running, the best trial alone is evaluated on its test split
(its folder gets test_predictions.csv and the test block of final_metrics.json), and:

- ``OUT/trials.csv``: one row per trial (settings, state, validation metrics, time);
- ``OUT/best.json``: the best settings, their validation and test blocks, the train_bp.py
  command that reproduces the run, and the parameter importances (fANOVA);
- ``OUT/importances.csv`` and ``OUT/plots/``: optimisation history, importances, the two
  most important parameters against the metric, and every trial's validation curve.

The study lives in ``--storage`` (default ``sqlite:///OUT/study.db``; any Optuna RDB URL,
e.g. PostgreSQL, or ``journal:FILE`` for Optuna's journal file). Running the same command
again continues it; several tune_bp.py processes on one storage share it (one per GPU, one
per node). A trial whose process was killed is marked failed once its heartbeat is older
than 2 x ``--heartbeat`` seconds and retried with the same settings (RDB storages). A study
made with other fixed flags, another space or another metric is refused.

The space: by default ``DEFAULT_SPACE`` less the flags given on the command line; or a
``--space`` YAML/JSON file mapping train_bp.py flags to ``{low, high[, log, step]}`` (float
or int), a list of choices, or ``{choices: [...]}``, each optionally with ``when: {flag:
value}`` (searched only when an earlier parameter, or a fixed flag, has that value).
"""
from __future__ import annotations

import contextlib
import difflib
import io
import json
import math
import os
import shlex
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import optuna
import pandas as pd
import sqlalchemy.exc
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter
from optuna.trial import TrialState

import crossval_bp
import plot_results
import train_bp
import utils
from utils import UserError

# train_bp.py flags set by this script (refused on its command line) or that change which
# records are validated (refused in a space: trials would be scored on different subjects)
MANAGED = ("--out_dir", "--resume", "--overwrite")
NOT_SEARCHABLE = {"npz_dir", "labels_csv", "out_dir", "target_cols", "resume", "overwrite",
                  "seed", "folds", "fold", "val_ratio", "test_ratio", "subject_col"}
SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
PATH_TOKENS = tuple(f"--{k}" for k in crossval_bp.PATH_FLAGS)
MAX_RETRY = 3  # retries of a killed trial (each one a new trial with the same settings)
SCHEMA_TRIES = 10  # attempts to open an RDB storage whose tables another process creates
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_SPACE: Dict[str, dict] = {
    "freeze_backbone": {"type": "categorical", "choices": [False, True]},
    "lr_backbone": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True,
                    "when": {"freeze_backbone": False}},
    "lr_head": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "warmup_epochs": {"type": "float", "low": 0.0, "high": 3.0},
    "loss": {"type": "categorical", "choices": ["huber", "mse", "l1", "mae_pearson"]},
    "huber_delta": {"type": "float", "low": 0.3, "high": 3.0, "log": True,
                    "when": {"loss": "huber"}},
    "alpha": {"type": "float", "low": 0.1, "high": 3.0, "log": True,
              "when": {"loss": "mae_pearson"}},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64, 128, 256]},
    "augment": {"type": "categorical", "choices": ["all", "none"]},
}


# ============================================================================= arguments
def get_args_parser() -> utils.ArgumentParser:
    # no abbreviations: a train_bp.py flag must never read as one of these
    p = utils.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Every other flag is passed to every trial's train_bp.py (see python "
               "train_bp.py --help); --out_dir, --resume and --overwrite are set per trial.")
    p.add_argument("--out_dir", required=True,
                   help="folder of the trials (trial_<n>/), the study database and the results")
    p.add_argument("--n_trials", type=int, required=True,
                   help="finished (complete or pruned) trials the study should hold: a re-run "
                        "or another process runs only those still missing")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds after which this process starts no new trial (the running "
                        "one finishes); the same command continues later")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by every process of the search: "
                        "sqlite:///FILE, postgresql://..., mysql://..., or journal:FILE "
                        "(default: sqlite:///OUT/study.db)")
    p.add_argument("--study_name", default="tune_bp", help="the study's name in --storage")
    p.add_argument("--space", default=None,
                   help="YAML or JSON file of the search space (see the module docstring); "
                        "default: the fine-tuning space DEFAULT_SPACE less the flags given")
    p.add_argument("--metric", default="val_mae_mean",
                   help="what trials are scored on, lower is better: val_mae_mean or "
                        "val_mae_<target>, of the checkpoint train_bp.py keeps")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random"),
                   help="tpe: Optuna's TPE, its first --startup_trials trials random; random: "
                        "random search (a baseline); both seeded from --seed and the trial number")
    p.add_argument("--startup_trials", type=int, default=10,
                   help="random trials before TPE models the results")
    p.add_argument("--pruner", default="median", choices=("median", "none"),
                   help="median: stop a trial whose metric after an epoch is worse than the "
                        "median of the earlier trials at that epoch")
    p.add_argument("--prune_startup", type=int, default=5,
                   help="completed trials before any trial is pruned")
    p.add_argument("--prune_warmup", type=int, default=3,
                   help="epochs every trial trains before it can be pruned")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats (RDB storages): a trial "
                        "silent for twice this is taken as killed, failed and retried")
    return p


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[object, List[str]]:
    args, train_argv = get_args_parser().parse_known_args(argv)
    crossval_bp.refuse_managed(train_argv, MANAGED, "tune_bp.py for each trial")
    for flag, value, low in (("--n_trials", args.n_trials, 1), ("--startup_trials",
                             args.startup_trials, 0), ("--prune_startup", args.prune_startup, 0),
                             ("--prune_warmup", args.prune_warmup, 1),
                             ("--heartbeat", args.heartbeat, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout must be above 0 seconds, got {args.timeout:g}")
    if utils.dist_env().enabled:
        raise UserError("tune_bp.py runs each trial in one process: instead of torchrun, "
                        "start one tune_bp.py per GPU on one --storage (see the README)")
    return args, train_argv


def trial_dir(out_dir: str, number: int) -> str:
    return os.path.abspath(os.path.join(out_dir, f"trial_{number}"))


def fixed_args(train_argv: List[str], out_dir: str):
    """train_bp.py's parse of the fixed flags (``UserError`` now, not in a trial)."""
    return train_bp.parse_args([*train_argv, "--out_dir", trial_dir(out_dir, 0)])


def check_metric(metric: str, target_cols: Sequence[str]) -> None:
    allowed = ["val_mae_mean"] + [f"val_mae_{c}" for c in target_cols]
    if metric not in allowed:
        raise UserError(f"--metric {metric}: choose one of {', '.join(allowed)}")


# ============================================================================= the space
def train_actions() -> Dict[str, object]:
    """train_bp.py's argparse actions by flag name."""
    return {a.dest: a for a in train_bp.get_args_parser()._actions if a.option_strings}


def read_space_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--space {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise UserError(f"--space {path}: name a .json, .yaml or .yml file")
    with open(path, encoding="utf-8") as fh:
        try:
            space = json.load(fh) if ext == ".json" else yaml.safe_load(fh)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"--space {path}: not valid {ext[1:].upper()} "
                            f"({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--space {path}: must map train_bp.py flags to their ranges")
    return space


def normalise_spec(name: str, spec, where: str) -> dict:
    """``spec`` in the one form the sampler reads: type float/int with low, high, log,
    step, or categorical with choices; ``when`` kept."""
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise UserError(f"{where}: {name}: give {{low, high}}, a list of choices or "
                        f"{{choices: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UserError(f"{where}: {name}: unknown key {unknown[0]} (keys: "
                        f"{', '.join(sorted(SPEC_KEYS))})")
    out = {"when": dict(spec.get("when") or {})}
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or spec.get("type", "categorical") \
                != "categorical":
            raise UserError(f"{where}: {name}: choices must be a non-empty list")
        return {"type": "categorical", "choices": choices, **out}
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: {name}: give low and high, or choices")
    low, high = spec["low"], spec["high"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high:
        raise UserError(f"{where}: {name}: low and high must be numbers with low < high, got "
                        f"{low!r}, {high!r}")
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high))
                                else "float")
    if kind not in ("int", "float"):
        raise UserError(f"{where}: {name}: type {kind} takes choices, not low/high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise UserError(f"{where}: {name}: log needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None and (log or not isinstance(step, (int, float)) or step <= 0):
        raise UserError(f"{where}: {name}: step must be a positive number, without log")
    return {"type": kind, "low": low, "high": high, "log": log, "step": step, **out}


def check_name(name: str, actions: dict, where: str) -> None:
    if name not in actions:
        close = difflib.get_close_matches(name, list(actions), n=1)
        raise UserError(f"{where}: {name} is not a train_bp.py flag"
                        + (f" (did you mean {close[0]}?)" if close else "")
                        + " (see python train_bp.py --help)")
    if name in NOT_SEARCHABLE:
        raise UserError(f"{where}: {name} cannot be searched: it names the data or changes "
                        f"which subjects are validated and tested")


def candidates(spec: dict) -> list:
    return spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]


def flag_tokens(action, value) -> List[str]:
    """The train_bp.py tokens that set ``action``'s flag to ``value``."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true
        return [flag] if value else []
    if action.nargs in ("+", "*"):
        return [flag, *str(value).split()]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def check_spec(name: str, spec: dict, action, argv: List[str], where: str) -> None:
    """Every endpoint and choice is a value train_bp.py accepts with the fixed flags."""
    if action.nargs == 0 and not (spec["type"] == "categorical"
                                  and all(isinstance(c, bool) for c in spec["choices"])):
        raise UserError(f"{where}: {name} is an on/off flag: give choices [false, true]")
    for value in candidates(spec):
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"{where}: {name}: choice {value!r} is not a single value")
        try:
            train_bp.parse_args([*argv, *flag_tokens(action, value)])
        except UserError as exc:
            raise UserError(f"{where}: {name} = {value!r}: {exc}") from None


def build_space(path: Optional[str], train_argv: List[str], parsed) -> Dict[str, dict]:
    """The checked search space: ``--space`` or the default less the flags given."""
    where = f"--space {path}" if path else "the default space"
    given = {a.split("=")[0].lstrip("-") for a in train_argv if a.startswith("--")}
    raw = read_space_file(path) if path else {
        k: v for k, v in DEFAULT_SPACE.items() if k not in given
        and not (k == "freeze_backbone" and not parsed.pretrain)}  # random features: no
    actions = train_actions()
    argv = [*train_argv, "--out_dir", parsed.out_dir]
    space: Dict[str, dict] = {}
    for key, spec in raw.items():
        name = str(key).lstrip("-")
        check_name(name, actions, where)
        if name in given:
            raise UserError(f"{where}: {name} is searched, so leave --{name} out of the "
                            f"command line (or out of the space)")
        spec = normalise_spec(name, spec, where)
        for cond in spec["when"]:
            check_name(cond, actions, f"{where}: {name}: when")
            if cond in raw and cond not in space:
                raise UserError(f"{where}: {name}: when {cond}: {cond} must come before "
                                f"{name} in the space")
        check_spec(name, spec, actions[name], argv, where)
        space[name] = spec
    return space


def wanted(spec: dict, params: dict, fixed) -> bool:
    """``spec``'s ``when`` holds for the parameters drawn so far and the fixed flags."""
    for cond, value in spec["when"].items():
        have = params[cond] if cond in params else getattr(fixed, cond)
        if have not in (value if isinstance(value, list) else [value]):
            return False
    return True


def suggest(trial, space: Dict[str, dict], fixed) -> dict:
    params = {}
    for name, spec in space.items():
        if not wanted(spec, params, fixed):
            continue
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, spec["low"], spec["high"],
                                             step=spec["step"] or 1, log=spec["log"])
        else:
            params[name] = trial.suggest_float(name, spec["low"], spec["high"],
                                               step=spec["step"], log=spec["log"])
    return params


def param_argv(params: dict) -> List[str]:
    actions = train_actions()
    return [tok for name, value in params.items() for tok in flag_tokens(actions[name], value)]


# ============================================================================= the study
class TrialSeeded(optuna.samplers.BaseSampler):
    """The sampler ``make(seed)`` made afresh for each trial, seeded from --seed and the
    trial's number: a continued study does not repeat the first trials' random draws, two
    processes never draw the same ones, and one process's draws repeat exactly."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study, trial) -> None:
        seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
        self._inner = self._make(seed)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)


def make_sampler(args, seed: int) -> optuna.samplers.BaseSampler:
    if args.sampler == "random":
        return TrialSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    return TrialSeeded(lambda s: optuna.samplers.TPESampler(
        seed=s, n_startup_trials=args.startup_trials, constant_liar=True), seed)


def make_pruner(args) -> optuna.pruners.BasePruner:
    if args.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup,
                                       n_warmup_steps=args.prune_warmup)


def shown_url(url: str) -> str:
    """``url`` without its password, for messages and best.json."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def open_storage(url: str, heartbeat: int):
    """The Optuna storage of ``url``; ``UserError`` when it cannot be opened."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        path = url[len("journal:"):]
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"--storage {url}: folder {os.path.dirname(path)} does not exist")
        print("note: the journal storage has no heartbeat: a killed trial stays RUNNING "
              "(an RDB storage fails and retries it)")
        return JournalStorage(JournalFileBackend(path))
    for attempt in range(SCHEMA_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages
                    .RetryHeartbeatStaleTrialCallback(MAX_RETRY))
        except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
            # processes that start together race to create a new database's tables: the
            # loser's insert fails (or finds it locked) and the next try finds them made
            racing = isinstance(exc, sqlalchemy.exc.IntegrityError) or (
                isinstance(exc, sqlalchemy.exc.OperationalError) and "locked" in str(exc))
            if racing and attempt + 1 < SCHEMA_TRIES:
                time.sleep(0.2 * (attempt + 1))
                continue
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UserError(f"--storage {shown_url(url)} cannot be opened: {reason}") from None


def study_settings(parsed, space: dict, metric: str) -> dict:
    """What a study is made with, as JSON: the fixed train_bp.py settings (those a resume
    may change left out), the space and the metric."""
    skip = train_bp.RESUMABLE_CHANGES | {"out_dir"} | set(space)
    fixed = {k: v for k, v in sorted(vars(parsed).items()) if k not in skip}
    return json.loads(json.dumps({"fixed": fixed, "space": space, "metric": metric}))


def settings_difference(saved: dict, now: dict) -> Optional[str]:
    """The first difference between two ``study_settings``, in words (None if none)."""
    if saved["space"] != now["space"]:  # first: the fixed flags are those not searched
        names = [n for n in {**saved["space"], **now["space"]}
                 if saved["space"].get(n) != now["space"].get(n)]
        return f"another search space (first difference: {names[0]})"
    if saved["metric"] != now["metric"]:
        return f"--metric {saved['metric']} (this command: {now['metric']})"
    for key in sorted(set(saved["fixed"]) | set(now["fixed"])):
        old, new = saved["fixed"].get(key), now["fixed"].get(key)
        if not crossval_bp.same_setting(key, old, new):
            return f"--{key} {old!r} (this command: {new!r})"
    return None


def open_study(args, storage, settings: dict) -> optuna.Study:
    """The study, new or continued; one made with other settings is refused."""
    study = optuna.create_study(storage=storage, study_name=args.study_name,
                                direction="minimize", load_if_exists=True,
                                sampler=make_sampler(args, settings["fixed"]["seed"]),
                                pruner=make_pruner(args))
    saved = study.user_attrs.get("tune_bp")
    where = f"study {args.study_name} in {shown_url(args.storage)}"
    if saved is None:
        if study.get_trials(deepcopy=False):
            raise UserError(f"{where} was not made by tune_bp.py; choose another --study_name")
        leftover = [d for d in os.listdir(args.out_dir) if d.startswith("trial_")]
        if leftover:
            raise UserError(f"--out_dir {args.out_dir} holds trial folders ({leftover[0]}, ...) "
                            f"of another study; choose a new --out_dir")
        study.set_user_attr("tune_bp", settings)
        return study
    difference = settings_difference(saved, settings)
    if difference:
        raise UserError(f"{where} was made with {difference}; run it with its own settings, "
                        f"or choose another --study_name or --out_dir")
    return study


# ============================================================================= trials
class Surplus(Exception):
    """A trial started by one process while others already held the last places."""


def retry_of(trial) -> Optional[int]:
    """The number of the killed trial that ``trial`` retries (the system attribute of
    RetryHeartbeatStaleTrialCallback), None for a first try."""
    return trial.system_attrs.get("failed_trial")


def replaced(trials) -> set:
    """Numbers of killed trials that were retried (their retry counts in their place)."""
    return {retry_of(t) for t in trials} \
        - {None}


def counts(trial, retried: set) -> bool:
    """Whether ``trial`` holds one of the --n_trials places: every trial but a surplus one
    and a killed one that was retried."""
    return not (trial.state == TrialState.FAIL
                and (trial.number in retried or trial.user_attrs.get("surplus")))


def places_taken(trials) -> int:
    retried = replaced(trials)
    return sum(counts(t, retried) for t in trials)


def metric_of(block: dict, metric: str) -> float:
    """``metric`` (val_mae_mean or val_mae_<target>) of a final_metrics.json block."""
    if metric == "val_mae_mean":
        return float(block["mean"]["mae"])
    return float(block["per_target"][metric[len("val_mae_"):]]["mae"])


def val_summary(block: dict) -> dict:
    """The validation numbers trials.csv shows."""
    out = {f"{k}_mean": float(v) for k, v in block["mean"].items()
           if k in ("mae", "rmse", "pearson", "r2")}
    out.update({f"mae_{t}": float(m["mae"]) for t, m in block["per_target"].items()})
    return out


def reporter(trial, metric: str) -> Callable[[int, dict], None]:
    """train_bp.py's ``on_epoch``: each epoch's validation metric to the pruner, which may
    end the trial there (its folder then holds what a killed run leaves)."""
    def on_epoch(epoch: int, row: dict) -> None:
        value = float(row[metric])
        trial.report(value, epoch)
        trial.set_user_attr("epochs_run", epoch)
        if trial.should_prune():
            trial.set_user_attr("note", f"pruned after epoch {epoch}")
            raise optuna.TrialPruned()
    return on_epoch


@contextlib.contextmanager
def logged(path: str):
    """train_bp.py's console output into ``path`` (one short line per trial stays here)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        yield


def make_objective(args, train_argv: List[str], space: dict, fixed) -> Callable:
    def objective(trial) -> float:
        trials = trial.study.get_trials(deepcopy=False)
        retried = replaced(trials)
        ahead = sum(counts(t, retried) for t in trials if t.number < trial.number)
        if ahead >= args.n_trials:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("note", "surplus: other processes held the last places")
            raise Surplus()
        params = suggest(trial, space, fixed)
        out = trial_dir(args.out_dir, trial.number)
        argv = [*train_argv, *param_argv(params), "--out_dir", out]
        for key, value in (("argv", argv), ("out_dir", out), ("epochs_run", 0), ("note", "")):
            trial.set_user_attr(key, value)
        log = os.path.join(args.out_dir, "logs", f"trial_{trial.number}.log")
        print(f"trial {trial.number} started: {settings_text(params)}  (log {log})", flush=True)
        with logged(log):
            try:
                train_bp.main(argv, on_epoch=reporter(trial, args.metric), evaluate_test=False)
            except RuntimeError as exc:  # a crash of this trial (e.g. out of memory): the
                traceback.print_exc(file=sys.stdout)  # search goes on; the log keeps it
                trial.set_user_attr("note", " ".join(f"{type(exc).__name__}: {exc}".split())[:300])
                raise
        with open(os.path.join(out, "final_metrics.json"), encoding="utf-8") as fh:
            report = json.load(fh)
        value = metric_of(report["val"], args.metric)
        if not math.isfinite(value):
            trial.set_user_attr("note", f"{args.metric} is {value}: the trial diverged")
            raise RuntimeError(trial.user_attrs["note"])
        trial.set_user_attr("best_epoch", int(report["best_epoch"]))
        trial.set_user_attr("val", val_summary(report["val"]))
        return value
    return objective


def settings_text(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items()) or "(no parameters)"


def trial_line(study: optuna.Study, trial, metric: str, n_trials: int, epochs: int) -> str:
    """The log line of a finished trial."""
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in DONE for t in trials)
    head = f"trial {trial.number} {trial.state.name.lower()} ({done}/{n_trials} done)"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else float("nan")
    if trial.state == TrialState.COMPLETE:
        best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        return (f"{head}: {metric} {trial.value:.3f} (epoch {trial.user_attrs['best_epoch']} "
                f"of {trial.user_attrs['epochs_run']})  best {best.value:.3f} (trial "
                f"{best.number})  {seconds:.0f} s")
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        last = max(trial.intermediate_values)
        return (f"{head} after epoch {last} of {epochs}: {metric} "
                f"{trial.intermediate_values[last]:.3f}  {seconds:.0f} s")
    return f"{head}: {trial.user_attrs.get('note', '')}  {seconds:.0f} s"


def search(args, study: optuna.Study, objective: Callable, epochs: int) -> None:
    """Run trials until the study holds --n_trials of them (or --timeout)."""
    start = time.time()

    def log(study, trial):
        print(trial_line(study, trial, args.metric, args.n_trials, epochs), flush=True)

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a killed trial's retry takes its place
        if places_taken(study.get_trials(deepcopy=False)) >= args.n_trials:
            return
        if args.timeout is not None and time.time() - start >= args.timeout:
            print(f"--timeout {args.timeout:g} s reached: no new trial; run the same command "
                  f"to continue the study")
            return
        study.optimize(objective, n_trials=1, catch=(RuntimeError, Surplus), callbacks=[log])


# ============================================================================= results
def trials_frame(trials, space: dict) -> pd.DataFrame:
    """trials.csv: one row per trial."""
    retried_as = {retry_of(t): t.number
                  for t in trials}
    rows = []
    for t in trials:
        ua = t.user_attrs
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        row = {"number": t.number, "state": t.state.name, "value": t.value,
               **{name: t.params.get(name) for name in space},
               "best_epoch": ua.get("best_epoch"), "epochs_run": ua.get("epochs_run"),
               **{f"val_{k}": v for k, v in ua.get("val", {}).items()},
               "seconds": seconds,
               "started": t.datetime_start.isoformat(timespec="seconds")
               if t.datetime_start else None,
               "retry_of": retry_of(t),
               "note": note_of(t, retried_as),
               "out_dir": ua.get("out_dir")}
        rows.append(row)
    return pd.DataFrame(rows).astype({"best_epoch": "Int64", "epochs_run": "Int64",
                                      "retry_of": "Int64"})


def note_of(trial, retried_as: Dict[int, int]) -> str:
    if trial.state == TrialState.FAIL and trial.number in retried_as:
        return f"killed (no heartbeat); retried as trial {retried_as[trial.number]}"
    return trial.user_attrs.get("note", "")


def importances(study: optuna.Study, seed: int) -> Dict[str, float]:
    """fANOVA importances over the completed trials ({} with fewer than two, when all
    scored the same (fANOVA has no variance to share out and raises), or when no
    parameter present in every one of them varied)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len({t.value for t in complete}) < 2:
        return {}
    common = set.intersection(*(set(t.params) for t in complete))
    varied = [p for p in common if len({repr(t.params[p]) for t in complete}) > 1]
    if not varied:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return {k: float(v) for k, v in optuna.importance.get_param_importances(
        study, evaluator=evaluator, params=sorted(varied)).items()}


def write_results(args, study: optuna.Study, space: dict, seed: int) -> Dict[str, float]:
    """trials.csv, importances.csv and the plots; returns the importances."""
    trials = study.get_trials(deepcopy=False)
    utils.write_csv_atomic(os.path.join(args.out_dir, "trials.csv"), trials_frame(trials, space))
    imp = importances(study, seed)
    utils.write_csv_atomic(os.path.join(args.out_dir, "importances.csv"),
                           pd.DataFrame({"parameter": list(imp), "importance": list(imp.values())}))
    plot_study(os.path.join(args.out_dir, "plots"), trials, imp, space, args.metric)
    return imp


def best_test(args, best) -> dict:
    """The best trial's final_metrics.json, its test split evaluated now (once: a later
    call finds the test block there). --resume of a finished train_bp.py run trains no
    epoch and evaluates the best checkpoint on val and test."""
    out = best.user_attrs["out_dir"]
    path = os.path.join(out, "final_metrics.json")
    if not os.path.isfile(path):
        raise UserError(f"the best trial's folder {out} is not on this machine (or lost its "
                        f"final_metrics.json); run tune_bp.py where it is")
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    if "test" not in report:
        print(f"evaluating the best trial ({best.number}) on its test split, once")
        with logged(os.path.join(args.out_dir, "logs", f"trial_{best.number}.log")):
            train_bp.main([*best.user_attrs["argv"], "--resume"])
        with open(path, encoding="utf-8") as fh:
            report = json.load(fh)
    return report


def finish(args, study: optuna.Study, space: dict, seed: int) -> None:
    """Results of the study so far; best.json and the one test evaluation once it is done."""
    imp = write_results(args, study, space, seed)
    trials = study.get_trials(deepcopy=False)
    busy = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if busy:
        print(f"trials {', '.join(map(str, busy))} are running or waiting (another process, "
              f"or a killed one that is retried once its heartbeat is {2 * args.heartbeat} s "
              f"old): the process that ends the study evaluates the best trial on test")
        return
    if places_taken(trials) < args.n_trials:
        return
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        print(f"warning: no trial completed: nothing to evaluate (see "
              f"{os.path.join(args.out_dir, 'trials.csv')} and logs/)")
        return
    best = study.best_trial
    report = best_test(args, best)
    result = {"study_name": args.study_name, "storage": shown_url(args.storage),
              "metric": args.metric, "states": {s.name: sum(t.state == s for t in trials)
                                                for s in TrialState if any(t.state == s
                                                                           for t in trials)},
              "best_trial": best.number, "params": best.params, "value": best.value,
              "best_epoch": report["best_epoch"], "out_dir": best.user_attrs["out_dir"],
              "command": reproduce_command(best.user_attrs["argv"]), "importances": imp,
              "val": report["val"], "test": report["test"]}
    utils.write_json_atomic(os.path.join(args.out_dir, "best.json"), result)
    print_best(result, report["target_cols"], args.out_dir)


def reproduce_command(argv: List[str]) -> str:
    """The train_bp.py command of the best run, into a new folder."""
    argv = argv[:argv.index("--out_dir")]
    # crossval_bp.absolute_paths appended each path flag again: show only that one
    last = {tok: i for i, tok in enumerate(argv) if tok in PATH_TOKENS}
    drop = {j for i, tok in enumerate(argv) if tok in last and i < last[tok] for j in (i, i + 1)}
    kept = [tok for i, tok in enumerate(argv) if i not in drop]
    return shlex.join(["python", "train_bp.py", *kept, "--out_dir", "runs/best"])


def print_best(result: dict, target_cols: Sequence[str], out_dir: str) -> None:
    val, test = result["val"], result["test"]
    print(f"\nbest trial {result['best_trial']}: {settings_text(result['params'])}")
    print(f"{'target':<16}{'val MAE':>9}{'test MAE':>10}")
    for t in target_cols:
        print(f"{t:<16}{val['per_target'][t]['mae']:9.2f}{test['per_target'][t]['mae']:10.2f}")
    print(f"{'mean':<16}{val['mean']['mae']:9.2f}{test['mean']['mae']:10.2f}")
    print(f"reproduce: {result['command']}")
    print(f"outputs in {out_dir}: best.json, trials.csv, importances.csv, plots/, trial_<n>/")


# ============================================================================= plots
def plot_study(plot_dir: str, trials, imp: Dict[str, float], space: dict, metric: str) -> None:
    os.makedirs(plot_dir, exist_ok=True)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    plot_results.save(history_figure(trials, metric), plot_dir, "optimization_history", ["png"])
    plot_results.save(curves_figure(trials, metric), plot_dir, "trial_curves", ["png"])
    if imp:
        plot_results.save(importance_figure(imp), plot_dir, "importances", ["png"])
        plot_results.save(top_params_figure(complete, list(imp)[:2], space, metric), plot_dir,
                          "top_parameters", ["png"])


def history_figure(trials, metric: str) -> Figure:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.plot([t.number for t in complete], [t.value for t in complete], "o", color="C0",
            label="complete")
    ax.plot([t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned], "x",
            color="C3", label="pruned (its last epoch)")
    if complete:
        best = np.minimum.accumulate([t.value for t in complete])
        ax.step([t.number for t in complete], best, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"optimisation history: {len(complete)} complete, {len(pruned)} pruned")
    ax.legend()
    fig.tight_layout()
    return fig


def curves_figure(trials, metric: str) -> Figure:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for t in trials:
        if not t.intermediate_values or t.state not in DONE:
            continue
        steps = sorted(t.intermediate_values)
        pruned = t.state == TrialState.PRUNED
        ax.plot(steps, [t.intermediate_values[s] for s in steps], "x--" if pruned else ".-",
                color="C3" if pruned else "C0", alpha=0.6, lw=1)
    ax.plot([], [], ".-", color="C0", label="complete")
    ax.plot([], [], "x--", color="C3", label="pruned (x: its last epoch)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title("each trial's validation metric per epoch")
    ax.legend()
    fig.tight_layout()
    return fig


def importance_figure(imp: Dict[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.5 * len(imp) + 1.5))
    ax = fig.add_subplot()
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="C0")
    ax.set_xlabel("fANOVA importance (share of the metric's variance)")
    ax.set_title("parameter importances over the complete trials")
    fig.tight_layout()
    return fig


def top_params_figure(complete, names: List[str], space: dict, metric: str) -> Figure:
    fig = Figure(figsize=(5 * len(names), 4.2))
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        have = [t for t in complete if name in t.params]
        values = [t.params[name] for t in have]
        if space[name]["type"] == "categorical":
            labels = [str(c) for c in space[name]["choices"]]
            ax.set_xticks(range(len(labels)), labels)
            values = [labels.index(str(v)) for v in values]
        elif space[name]["log"]:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
        ax.scatter(values, [t.value for t in have], c=[t.number for t in have], cmap="viridis")
        if space[name]["type"] == "categorical":
            ax.set_xlim(-0.5, len(space[name]["choices"]) - 0.5)
        ax.set_xlabel(name)
        ax.set_ylabel(f"{metric} (validation)")
        ax.set_title(f"{name} (colour: trial number)")
    fig.tight_layout()
    return fig


# ============================================================================= main
def check_data(parsed) -> None:
    """The labels CSV and npz folder every trial reads, checked once before the study and
    --out_dir are made (train_bp.py's own checks, its messages; its lines not printed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        train_bp.load_table(parsed)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, train_argv = parse_args(argv)
    parsed = fixed_args(train_argv, args.out_dir)  # fail early, before anything is written
    check_metric(args.metric, parsed.target_cols)
    check_data(parsed)
    train_argv = crossval_bp.absolute_paths(train_argv, parsed)
    space = build_space(args.space, train_argv, parsed)
    settings = study_settings(parsed, space, args.metric)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from here
    if args.storage is None:
        os.makedirs(args.out_dir, exist_ok=True)
        args.storage = f"sqlite:///{os.path.abspath(os.path.join(args.out_dir, 'study.db'))}"
    storage = open_storage(args.storage, args.heartbeat)
    os.makedirs(args.out_dir, exist_ok=True)
    study = open_study(args, storage, settings)
    print(f"study {args.study_name} in {shown_url(args.storage)}: {args.n_trials} trials, "
          f"{args.sampler} sampler, pruner {args.pruner}, metric {args.metric}; space: "
          + ", ".join(space))
    search(args, study, make_objective(args, train_argv, space, parsed), parsed.epochs)
    finish(args, study, space, parsed.seed)


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
