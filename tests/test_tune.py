"""tune_bp.py: seeded suggestions, validation-only scoring (noise test labels change no
trial), pruning, a killed study continued, two processes sharing one SQLite study, and the
one-line refusals of a bad space, storage or study."""
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import optuna
import pandas as pd
import pytest

import tune_bp
import utils
from conftest import ROOT, error_line, prepared_cohort, wait_for_epochs

TARGETS = ["right_arm_sbp", "right_arm_dbp"]
SPACE = {"lr_head": {"low": 1e-3, "high": 1e-2, "log": True}, "dropout": {"low": 0.0, "high": 0.3}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("tune_cohort")
    data = prepared_cohort(base, 16, 2, 3, TARGETS, 200)
    (base / "space.json").write_text(json.dumps(SPACE))
    data["space"] = str(base / "space.json")
    return data


def tune_argv(cohort, out, *extra, labels=None, n_trials=3, epochs=2):
    return ["--out_dir", str(out), "--n_trials", str(n_trials), "--space", cohort["space"],
            "--pruner", "none", "--npz_dir", cohort["npz"],
            "--labels_csv", labels or cohort["labels"], "--target_cols", *TARGETS,
            "--arch", "tiny", "--epochs", str(epochs), "--batch_size", "8", "--num_workers", "0",
            "--threads", "1", "--seed", "4", "--val_ratio", "0.2", "--augment", "none", *extra]


def trials(out) -> pd.DataFrame:
    return pd.read_csv(out / "trials.csv")


@pytest.fixture(scope="module")
def study_a(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "a"
    tune_bp.main(tune_argv(cohort, out))
    return out


def test_one_process_repeats_its_suggestions_and_scores_exactly(study_a, cohort, tmp_path):
    tune_bp.main(tune_argv(cohort, tmp_path / "b"))
    a, b = trials(study_a), trials(tmp_path / "b")
    assert (a["state"] == "COMPLETE").all() and len(a) == 3
    assert a[["number", "lr_head", "dropout", "value"]].equals(b[["number", "lr_head", "dropout",
                                                                  "value"]])
    assert a["lr_head"].nunique() == 3 and a["lr_head"].between(1e-3, 1e-2).all()


def test_sampler_seeds_each_trial_from_the_seed_and_its_number():
    space = {k: tune_bp.normalise_spec(k, v, "") for k, v in tune_bp.DEFAULT_SPACE.items()}

    def draws(seed, start=0, n=4):
        study = optuna.create_study(sampler=tune_bp.make_sampler(
            Namespace(sampler="tpe", startup_trials=10), seed))
        for _ in range(start):  # trials of an earlier process
            study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL))
        out = []
        for _ in range(n):
            trial = study.ask()
            out.append(tune_bp.suggest(trial, space, Namespace())["lr_head"])
            study.tell(trial, 1.0)
        return out

    assert draws(4) == draws(4)
    assert draws(4)[2:] == draws(4, start=2, n=2)  # trial 2 draws the same, whoever runs it
    assert not set(draws(4)) & set(draws(5))       # another seed, other settings


def test_scores_come_from_validation_only_test_evaluated_once_for_the_best(
        study_a, cohort, tmp_path):
    # the same study with every test label replaced by noise: no trial's score moves
    split = pd.read_csv(study_a / "trial_0" / "split.csv", dtype=str)
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    test = labels["ssoid"].isin(split.loc[split["split"] == "test", "ssoid"])
    rng = np.random.default_rng(0)
    for col in TARGETS:
        labels.loc[test, col] = rng.uniform(40, 250, int(test.sum())).round(1)
    noisy = tmp_path / "noisy_labels.csv"
    labels.to_csv(noisy, index=False)
    tune_bp.main(tune_argv(cohort, tmp_path / "noisy", labels=str(noisy)))
    a, n = trials(study_a), trials(tmp_path / "noisy")
    score_cols = ["lr_head", "dropout", "value", "best_epoch", "val_mae_mean",
                  *[f"val_mae_{t}" for t in TARGETS]]
    assert a[score_cols].equals(n[score_cols])
    best_a = json.loads((study_a / "best.json").read_text())
    best_n = json.loads((tmp_path / "noisy" / "best.json").read_text())
    assert best_a["best_trial"] == best_n["best_trial"] == int(a.loc[a["value"].idxmin(), "number"])
    assert best_a["val"]["mean"]["mae"] == pytest.approx(a["value"].min(), abs=1e-9)
    assert best_a["test"]["mean"]["mae"] != pytest.approx(best_n["test"]["mean"]["mae"], abs=0.5)
    # only the best trial was ever evaluated on test
    for number in a["number"]:
        folder = study_a / f"trial_{number}"
        report = json.loads((folder / "final_metrics.json").read_text())
        evaluated = number == best_a["best_trial"]
        assert ("test" in report) == evaluated
        assert (folder / "test_predictions.csv").exists() == evaluated
    command = best_a["command"].split()
    assert command[:2] == ["python", "train_bp.py"] and command.count("--npz_dir") == 1
    assert command[command.index("--lr_head") + 1] == repr(best_a["params"]["lr_head"])
    for name in ("optimization_history", "trial_curves", "importances", "top_parameters"):
        assert (study_a / "plots" / f"{name}.png").stat().st_size > 0
    imp = pd.read_csv(study_a / "importances.csv")
    assert set(imp["parameter"]) == {"lr_head", "dropout"}
    assert imp["importance"].sum() == pytest.approx(1.0)


def test_median_pruner_stops_a_diverging_trial_after_its_first_epoch(cohort, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr_head: [0.003, 300.0]\n")
    out = tmp_path / "prune"
    argv = tune_argv(cohort, out, n_trials=5, epochs=4)
    argv[argv.index("--space") + 1] = str(space)
    argv[argv.index("--pruner") + 1] = "median"
    tune_bp.main(argv + ["--sampler", "random", "--prune_startup", "1", "--prune_warmup", "1"])
    frame = trials(out)
    first_complete = frame.loc[frame["state"] == "COMPLETE", "number"].min()
    late_bad = frame[(frame["lr_head"] == 300.0) & (frame["number"] > first_complete)]
    assert len(late_bad) >= 1 and (late_bad["state"] == "PRUNED").all()
    assert (late_bad["epochs_run"] == 1).all()
    for number in late_bad["number"]:
        folder = out / f"trial_{number}"  # what a run killed after epoch 1 leaves
        assert len(pd.read_csv(folder / "history.csv")) == 1
        assert (folder / "bp_last.pth").exists() and not (folder / "final_metrics.json").exists()
    good = frame[frame["lr_head"] == 0.003]
    assert len(good) and (good["state"] == "COMPLETE").all() and (good["epochs_run"] == 4).all()
    study = optuna.load_study(study_name="tune_bp", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == frame["state"].tolist()


def _spawn(argv, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tune_bp.py"), *argv], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_killed_study_continues_and_retries_the_killed_trial(cohort, tmp_path):
    out = tmp_path / "kill"
    argv = tune_argv(cohort, out, "--heartbeat", "1", epochs=3)
    proc = _spawn(argv, tmp_path / "first.log")
    wait_for_epochs(proc, out / "trial_1" / "history.csv", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = (out / "trial_0" / "history.csv").stat().st_mtime_ns  # finished: not trained again
    time.sleep(3)  # the killed trial's heartbeat is now older than its grace period (2 s)
    tune_bp.main(argv)
    frame = trials(out)
    assert frame["state"].tolist() == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert frame.loc[1, "note"] == "killed (no heartbeat); retried as trial 2"
    assert frame.loc[2, "retry_of"] == 1 and frame.loc[2, "lr_head"] == frame.loc[1, "lr_head"]
    assert (out / "trial_0" / "history.csv").stat().st_mtime_ns == kept
    assert json.loads((out / "best.json").read_text())["states"] == {"COMPLETE": 3, "FAIL": 1}


def test_two_processes_share_one_sqlite_study_and_finish_n_distinct_trials(cohort, tmp_path):
    out = tmp_path / "shared"
    argv = tune_argv(cohort, out, n_trials=5, epochs=3)
    procs = [_spawn(argv, tmp_path / f"p{k}.log") for k in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    frame = trials(out)
    done = frame[frame["state"] == "COMPLETE"]
    assert len(done) == 5 and done["number"].is_unique and done["lr_head"].is_unique
    others = frame.loc[frame["state"] != "COMPLETE", "note"].fillna("").astype(str)
    assert others.str.startswith("surplus").all(), others  # a process late for the last place
    logs = [(tmp_path / f"p{k}.log").read_text() for k in range(2)]
    started = [{int(ln.split()[1]) for ln in log.splitlines() if " started: " in ln}
               for log in logs]
    assert all(started) and not started[0] & started[1]  # both worked, never on one trial
    assert json.loads((out / "best.json").read_text())["states"]["COMPLETE"] == 5


def test_a_process_that_loses_the_race_to_create_the_tables_opens_them_next(tmp_path,
                                                                             monkeypatch):
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):  # the other process inserted alembic_version first
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception(
                "UNIQUE constraint failed: alembic_version.version_num"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert isinstance(tune_bp.open_storage(url, 60), real) and len(calls) == 2


def _error(argv, capsys):
    assert utils.run_cli(tune_bp.main, argv) == 2
    return error_line(capsys.readouterr().err)


@pytest.mark.parametrize("space, needle", [
    ({"lr_haed": [1e-3]}, "--space {}: lr_haed is not a train_bp.py flag (did you mean lr_head?)"),
    ({"seed": [1, 2]}, "--space {}: seed cannot be searched"),
    ({"dropout": {"low": 0.0, "high": 1.5}}, "--space {}: dropout = 1.5: --dropout must be in [0, 1)"),
    ({"freeze_backbone": {"low": 0, "high": 1}}, "freeze_backbone is an on/off flag"),
    ({"lr_head": {"low": 1e-3}}, "lr_head: give low and high, or choices"),
    ({"weight_decay": {"choices": [0.1], "when": {"loss": "l1"}}, "loss": ["l1"]},
     "weight_decay: when loss: loss must come before weight_decay"),
    ({"loss": ["huber", "l2"]}, "loss = 'l2': argument --loss: invalid choice"),
])
def test_a_bad_space_is_one_line_and_writes_nothing(cohort, tmp_path, capsys, space, needle):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    argv = tune_argv(cohort, tmp_path / "out")
    argv[argv.index("--space") + 1] = str(path)
    assert needle.format(path) in _error(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_bad_files_flags_and_storages_are_one_line(cohort, tmp_path, capsys):
    argv = tune_argv(cohort, tmp_path / "out")
    space = argv.index("--space") + 1
    (tmp_path / "bad.yaml").write_text("lr_head: [1e-3\n")
    assert f"--space {tmp_path / 'bad.yaml'}: not valid YAML" in _error(
        argv[:space] + [str(tmp_path / "bad.yaml")] + argv[space + 1:], capsys)
    assert "space.json: dropout is searched, so leave --dropout out" in _error(
        argv + ["--dropout", "0.2"], capsys)
    assert _error(argv + ["--resume"], capsys) == \
        "error: --resume is set by tune_bp.py for each trial; leave it out"
    assert "--metric val_mae_pp: choose one of val_mae_mean, val_mae_right_arm_sbp" in _error(
        argv + ["--metric", "val_mae_pp"], capsys)
    assert "--storage nosuchdb://x cannot be opened" in _error(
        argv + ["--storage", "nosuchdb://x"], capsys)
    labels = argv.index("--labels_csv") + 1
    assert _error(argv[:labels] + [str(tmp_path / "none.csv")] + argv[labels + 1:], capsys) \
        == f"error: labels CSV {tmp_path / 'none.csv'}: no such file"  # before any study
    assert not (tmp_path / "out").exists()


def test_a_study_made_with_other_fixed_flags_is_refused(study_a, cohort, capsys):
    argv = tune_argv(cohort, study_a, epochs=3)
    line = _error(argv, capsys)
    assert "study tune_bp in sqlite:///" in line
    assert "was made with --epochs 2 (this command: 3)" in line
    other_space = tune_argv(cohort, study_a)
    del other_space[other_space.index("--space"):other_space.index("--space") + 2]
    assert "was made with another search space" in _error(other_space, capsys)


def test_importances_are_empty_when_every_complete_trial_scored_the_same():
    # two PPG-BP trials that kept the same epoch-0 checkpoint: fANOVA raised "zero total
    # variance" on them (or, with other parameters, shared out a variance of 0)
    dist = optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)

    def study_of(values):
        study = optuna.create_study()
        for (lr_backbone, lr_head), value in zip(((1.7049e-05, 3.6003e-04),
                                                  (3.6862e-04, 8.2992e-04)), values):
            study.add_trial(optuna.create_trial(
                params={"lr_backbone": lr_backbone, "lr_head": lr_head},
                distributions={"lr_backbone": dist, "lr_head": dist}, value=value))
        return study

    assert tune_bp.importances(study_of([12.788, 12.788]), seed=1) == {}
    assert set(tune_bp.importances(study_of([12.788, 13.0]), seed=1)) == {"lr_backbone",
                                                                          "lr_head"}
