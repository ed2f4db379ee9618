"""train_bp.py under torchrun: two gloo processes on CPU with the tiny arch.

The DDP run uses the same split as a single process, evaluates every record exactly once,
writes metrics equal to a recomputation from its CSVs, leaves checkpoints that load in a
single process, and resumes under torchrun to the same numbers as an uninterrupted run.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import backbones
import predict_bp
import train_bp
from conftest import MMHG_ATOL, ROOT, error_line, wait_for_epochs
from test_train import TARGETS, _metrics_from_csv, cohort, train_argv  # noqa: F401 - fixture

EPOCHS = "6"
# 3 of 20 subjects (9 records) in val: an odd count, which a padding sampler would round up
VAL = ("--val_ratio", "0.15")


def torchrun_argv(nproc, *train_args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", os.path.join(ROOT, "train_bp.py"), *train_args]


def run_torchrun(*train_args):
    result = subprocess.run(torchrun_argv(2, *train_args), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp(cohort, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("ddp")
    out = base / "run"
    result = run_torchrun(*train_argv(cohort, out, "--epochs", EPOCHS, *VAL, "--cache_dir",
                                      str(base / "cache")))
    return {"out": out, "stdout": result.stdout, "base": base}


@pytest.fixture(scope="module")
def single(cohort, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "run"
    train_bp.main(train_argv(cohort, out, "--epochs", "1", *VAL))
    return out


def test_ddp_split_equals_the_single_process_split(ddp, single):
    assert (ddp["out"] / "split.csv").read_text() == (single / "split.csv").read_text()


def test_ddp_says_it_runs_two_processes_and_prints_once(ddp):
    assert "processes 2 (gloo)  records per step 8 x 1 x 2 = 16" in ddp["stdout"]
    assert ddp["stdout"].count("best epoch") == 1
    assert ddp["stdout"].count("epoch 1/6") == 1


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_record_is_predicted_exactly_once(ddp, split):
    table = pd.read_csv(ddp["out"] / "split.csv", dtype=str)
    pred = pd.read_csv(ddp["out"] / f"{split}_predictions.csv", dtype={"ssoid": str})
    expected = table.loc[table["split"] == split, "ssoid"].tolist()
    assert pred["ssoid"].tolist() == expected  # split order, no padded duplicates
    assert len(expected) == {"val": 9, "test": 12}[split]


def test_ddp_metrics_equal_recomputation_from_its_csvs(ddp):
    report = json.loads((ddp["out"] / "final_metrics.json").read_text())
    for split in ("val", "test"):
        recomputed, n = _metrics_from_csv(ddp["out"] / f"{split}_predictions.csv")
        assert report[split]["n_records"] == n
        for t in TARGETS:
            for key, value in recomputed[t].items():
                assert report[split]["per_target"][t][key] == pytest.approx(
                    value, rel=1e-9, abs=1e-9), (split, t, key)
    history = pd.read_csv(ddp["out"] / "history.csv")
    assert history["epoch"].tolist() == list(range(1, int(EPOCHS) + 1))
    assert report["best_epoch"] == int(history.loc[history["val_mae_mean"].idxmin(), "epoch"])


def test_ddp_checkpoint_loads_in_one_process_and_reproduces_predictions(ddp, cohort, tmp_path):  # noqa: F811
    ckpt = torch.load(ddp["out"] / "bp_best.pth", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = backbones.build_bp_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])  # strict
    last = torch.load(ddp["out"] / "bp_last.pth", weights_only=True)
    assert last["world_size"] == 2 and len(last["rng_states"]) == 2
    output = tmp_path / "pred.csv"
    predict_bp.main(["--checkpoint", str(ddp["out"] / "bp_best.pth"), "--npz_dir", cohort["npz"],
                     "--output", str(output), "--device", "cpu"])
    again = pd.read_csv(output, dtype={"ssoid": str}).set_index("ssoid")
    test = pd.read_csv(ddp["out"] / "test_predictions.csv", dtype={"ssoid": str})
    for t in TARGETS:
        np.testing.assert_allclose(again.loc[test["ssoid"], f"{t}_pred"].to_numpy(),
                                   test[f"{t}_pred"].to_numpy(), rtol=0, atol=MMHG_ATOL)


def _children(pid):
    """Every descendant process of ``pid`` (from /proc; torchrun starts its workers in
    sessions of their own, so killing its process group would not reach them)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def test_killed_torchrun_run_resumes_to_the_same_numbers(ddp, cohort, tmp_path):  # noqa: F811
    killed = tmp_path / "killed"
    argv = train_argv(cohort, killed, "--epochs", EPOCHS, *VAL, "--cache_dir",
                      str(ddp["base"] / "cache"))
    proc = subprocess.Popen(torchrun_argv(2, *argv), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    history = killed / "history.csv"
    wait_for_epochs(proc, history, 2)
    for pid in _children(proc.pid) + [proc.pid]:  # a node failure: every process at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(pd.read_csv(history))
    assert 2 <= done < int(EPOCHS)
    assert not (killed / "final_metrics.json").exists()
    run_torchrun(*argv, "--resume")
    assert len(pd.read_csv(history)) == int(EPOCHS)
    a = json.loads((ddp["out"] / "final_metrics.json").read_text())
    b = json.loads((killed / "final_metrics.json").read_text())
    assert a == b
    assert (ddp["out"] / "test_predictions.csv").read_text() == \
        (killed / "test_predictions.csv").read_text()


def test_resume_with_another_number_of_processes_is_refused(ddp, cohort):  # noqa: F811
    argv = [sys.executable, os.path.join(ROOT, "train_bp.py"),
            *train_argv(cohort, ddp["out"], "--epochs", EPOCHS, *VAL, "--resume")]
    before = (ddp["out"] / "history.csv").read_text()
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "trained with 2 process(es), this one has 1" in error_line(result.stderr)
    assert (ddp["out"] / "history.csv").read_text() == before


def test_bad_input_under_torchrun_is_reported_once_by_rank0(cohort, tmp_path):  # noqa: F811
    argv = train_argv(cohort, tmp_path / "out", "--target_cols", "no_such_col")
    result = subprocess.run(torchrun_argv(2, *argv), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    errors = [ln for ln in (result.stdout + result.stderr).splitlines()
              if ln.startswith("error: ")]
    assert len(errors) == 1 and "has no column no_such_col" in errors[0]
    assert "[rank1]" not in result.stderr  # rank 1 leaves with status 2, no traceback
    assert "exitcode  : 2" in result.stderr and "exitcode  : 1" not in result.stderr
    assert not (tmp_path / "out").exists()
