"""End-to-end tests of train_bp.py on a small synthetic cohort: the CONTRACT files,
metrics recomputed from the CSVs, the subject split, determinism, kill-and-resume,
and the one-line errors for bad input."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import backbones
import dataset
import train_bp
from conftest import ROOT, error_line, prepared_cohort, wait_for_epochs

TARGETS = ["right_arm_sbp", "right_arm_dbp", "left_arm_mbp"]
SEQ_LEN = 400


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return prepared_cohort(tmp_path_factory.mktemp("cohort"), 20, 3, 3, TARGETS, SEQ_LEN)


def train_argv(cohort, out_dir, *extra):
    return ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--out_dir", str(out_dir),
            "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "3", "--batch_size", "8",
            "--lr_backbone", "1e-3", "--lr_head", "1e-3", "--num_workers", "0",
            "--val_ratio", "0.2", "--test_ratio", "0.2", "--seed", "7", *extra]


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    train_bp.main(train_argv(cohort, out))
    return str(out)


def _metrics_from_csv(path):
    """Independent recomputation of the CONTRACT metrics from a predictions CSV."""
    frame = pd.read_csv(path)
    out = {}
    for t in TARGETS:
        y, p = frame[f"{t}_true"].to_numpy(), frame[f"{t}_pred"].to_numpy()
        e = p - y
        out[t] = {"mae": np.abs(e).mean(), "rmse": np.sqrt((e ** 2).mean()), "me": e.mean(),
                  "sd": e.std(ddof=1), "pearson": np.corrcoef(y, p)[0, 1],
                  "r2": 1 - (e ** 2).sum() / ((y - y.mean()) ** 2).sum()}
        out[t]["ba_slope"], out[t]["ba_intercept"] = np.polyfit((y + p) / 2, e, 1)
    return out, len(frame)


def test_every_contract_file_has_its_columns_and_keys(run):
    for name in ("bp_best.pth", "bp_last.pth", "args.json", "split.csv", "history.csv",
                 "val_predictions.csv", "test_predictions.csv", "final_metrics.json",
                 "skipped_records.csv"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert list(pd.read_csv(os.path.join(run, "split.csv")).columns) == ["ssoid", "subject_id", "split"]
    history = pd.read_csv(os.path.join(run, "history.csv"))
    expected = (["epoch", "train_loss", "val_loss", "val_mae_mean"]
                + [f"val_mae_{t}" for t in TARGETS] + ["lr_backbone", "lr_head", "seconds"])
    assert list(history.columns[:len(expected)]) == expected
    assert history["epoch"].tolist() == [1, 2, 3]
    pred_cols = ["ssoid"] + [f"{t}_{k}" for t in TARGETS for k in ("true", "pred")]
    interval_cols = [f"{t}_{k}" for t in TARGETS for k in ("lo", "hi")]  # --interval, after
    for split in ("val", "test"):
        columns = list(pd.read_csv(os.path.join(run, f"{split}_predictions.csv")).columns)
        assert columns == pred_cols + interval_cols
    metrics = json.load(open(os.path.join(run, "final_metrics.json")))
    assert metrics["target_cols"] == TARGETS and 1 <= metrics["best_epoch"] <= 3
    for split in ("val", "test"):
        block = metrics[split]
        assert {"loss", "n_records", "n_subjects", "per_target", "mean"} <= set(block)
        assert set(block["per_target"]) == set(TARGETS)
        assert {"mae", "rmse", "pearson", "r2", "me", "sd"} <= set(block["per_target"][TARGETS[0]])
        assert {"mae", "rmse", "pearson", "r2"} <= set(block["mean"])
    args = json.load(open(os.path.join(run, "args.json")))
    assert args["target_cols"] == TARGETS and args["arch"] == "tiny"


def test_best_checkpoint_loads_weights_only_and_has_contract_keys(run):
    ckpt = torch.load(os.path.join(run, "bp_best.pth"), weights_only=True)
    for key in ("model", "epoch", "target_cols", "modality", "arch", "fusion", "target_mean",
                "target_std", "y_min", "y_max", "constrain", "args"):
        assert key in ckpt, key
    assert ckpt["target_cols"] == TARGETS and len(ckpt["target_mean"]) == 3
    history = pd.read_csv(os.path.join(run, "history.csv"))
    assert ckpt["epoch"] == int(history.loc[history["val_mae_mean"].idxmin(), "epoch"])
    assert ckpt["y_min"][0] < ckpt["target_mean"][0] < ckpt["y_max"][0]


def test_history_learning_rates_are_the_ones_each_epoch_trained_at(run):
    # 36 train records, batch 8: 4 steps an epoch; 1 warm-up epoch (rate (k+1)/4 of the
    # peak at step k), then cosine over the 8 steps left: 0.5 (1 + cos(pi (k - 4) / 8))
    history = pd.read_csv(os.path.join(run, "history.csv"))
    peak = 1e-3
    factor = [(k + 1) / 4 if k < 4 else 0.5 * (1 + math.cos(math.pi * (k - 4) / 8))
              for k in range(12)]
    assert history["lr_head"].tolist() == pytest.approx([peak * factor[k] for k in (0, 4, 8)])
    assert history["lr_head_last"].tolist() == pytest.approx([peak * factor[k] for k in (3, 7, 11)])
    assert history["lr_head"].iloc[0] == pytest.approx(peak / 4)  # warm-up, not the peak
    assert history["lr_head_last"].iloc[-1] > 0  # the last epoch trained, at a small rate


def test_final_metrics_equal_recomputation_from_prediction_csvs(run):
    metrics = json.load(open(os.path.join(run, "final_metrics.json")))
    split = pd.read_csv(os.path.join(run, "split.csv"), dtype=str)
    for name in ("val", "test"):
        recomputed, n = _metrics_from_csv(os.path.join(run, f"{name}_predictions.csv"))
        block = metrics[name]
        assert block["n_records"] == n == int((split["split"] == name).sum())
        assert block["n_subjects"] == split.loc[split["split"] == name, "subject_id"].nunique()
        for t in TARGETS:  # the CSV holds the exact values the metrics came from
            for k, v in recomputed[t].items():
                assert block["per_target"][t][k] == pytest.approx(v, rel=1e-9, abs=1e-9), (name, t, k)
            preds = pd.read_csv(os.path.join(run, f"{name}_predictions.csv"))[f"{t}_pred"]
            assert (preds.round(4) == preds).all()  # 1e-4 mmHg, not 17 digits
        assert block["mean"]["mae"] == pytest.approx(np.mean([recomputed[t]["mae"] for t in TARGETS]))


def test_split_is_subject_wise_and_covers_every_used_row(run, cohort):
    split = pd.read_csv(os.path.join(run, "split.csv"), dtype=str)
    assert split["ssoid"].is_unique
    assert (split.groupby("subject_id")["split"].nunique() == 1).all()
    assert split["subject_id"].tolist() == [s.split("_")[0] for s in split["ssoid"]]
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    assert len(split) == labels[TARGETS].notna().all(axis=1).sum()
    val_ids = set(pd.read_csv(os.path.join(run, "val_predictions.csv"), dtype={"ssoid": str})["ssoid"])
    assert val_ids == set(split.loc[split["split"] == "val", "ssoid"])


def test_same_seed_gives_same_split_and_metrics(run, cohort, tmp_path):
    again = tmp_path / "again"
    train_bp.main(train_argv(cohort, again))
    for name in ("split.csv", "test_predictions.csv"):
        assert open(os.path.join(run, name)).read() == open(again / name).read(), name
    a = json.load(open(os.path.join(run, "final_metrics.json")))
    b = json.load(open(again / "final_metrics.json"))
    assert a == b


TIMING = ["seconds", "train_records_per_s"]


def test_kill_and_resume_ends_with_the_same_numbers_with_loader_workers(cohort, tmp_path):
    # DataLoader workers, dropout and augmentation: the loaders draw from their own
    # generators, augmentation from (seed, epoch, record), and every RNG state is restored,
    # so the resumed run repeats the uninterrupted one bit for bit
    # (same machine, same settings: the same kernels see the same batches)
    workers = ("--epochs", "4", "--num_workers", "2", "--dropout", "0.3", "--augment", "all")
    straight = tmp_path / "straight"
    train_bp.main(train_argv(cohort, straight, *workers))
    killed = tmp_path / "killed"
    argv = [sys.executable, os.path.join(ROOT, "train_bp.py"),
            *train_argv(cohort, killed, *workers)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = killed / "history.csv"
    wait_for_epochs(proc, history, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(pd.read_csv(history))
    assert 2 <= done < 4
    train_bp.main(train_argv(cohort, killed, *workers, "--resume"))
    assert len(pd.read_csv(history)) == 4
    pd.testing.assert_frame_equal(pd.read_csv(straight / "history.csv").drop(columns=TIMING),
                                  pd.read_csv(history).drop(columns=TIMING), check_exact=True)
    a = json.load(open(straight / "final_metrics.json"))
    b = json.load(open(killed / "final_metrics.json"))
    assert a == b
    assert open(straight / "test_predictions.csv").read() == open(killed / "test_predictions.csv").read()


def test_loader_workers_do_not_change_the_numbers(run, cohort, tmp_path):
    # so --num_workers may change on --resume; the run fixture has --num_workers 0
    two = tmp_path / "two"
    train_bp.main(train_argv(cohort, two, "--num_workers", "2"))
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(run, "history.csv")).drop(columns=TIMING),
                                  pd.read_csv(two / "history.csv").drop(columns=TIMING),
                                  check_exact=True)
    assert open(os.path.join(run, "test_predictions.csv")).read() == \
        (two / "test_predictions.csv").read_text()


def test_cache_dir_gives_the_same_numbers_as_the_npz_files(run, cohort, tmp_path):
    cached = tmp_path / "cached"
    train_bp.main(train_argv(cohort, cached, "--cache_dir", str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").glob("records_*.npy"))) == 1
    for name in ("final_metrics.json", "test_predictions.csv", "val_predictions.csv"):
        assert open(os.path.join(run, name)).read() == (cached / name).read_text(), name


def test_compiled_run_saves_plain_keys_and_predicts_like_eager(run, cohort, tmp_path):
    compiled = tmp_path / "compiled"
    train_bp.main(train_argv(cohort, compiled, "--epochs", "1", "--compile"))
    ckpt = torch.load(compiled / "bp_best.pth", weights_only=True)
    eager = torch.load(os.path.join(run, "bp_best.pth"), weights_only=True)
    assert list(ckpt["model"]) == list(eager["model"])  # no _orig_mod. prefix
    model = backbones.build_bp_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    test = pd.read_csv(compiled / "test_predictions.csv", dtype={"ssoid": str})
    x = torch.stack([dataset.BPDataset([s], cohort["npz"], np.zeros((1, 0)), [0, 1])[0][0]
                     for s in test["ssoid"]])
    with torch.no_grad():
        pred = model(x).double().numpy() * ckpt["target_std"] + ckpt["target_mean"]
    for k, t in enumerate(TARGETS):
        np.testing.assert_allclose(test[f"{t}_pred"], pred[:, k], rtol=0, atol=1e-3)


def _cli(argv):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_bp.py"), *argv],
                            cwd=ROOT, capture_output=True, text=True)
    return result.returncode, result.stderr


def _labels_subset(cohort, tmp_path, keep):
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    path = tmp_path / "subset.csv"
    keep(labels).to_csv(path, index=False)
    return str(path)


def _garbage(tmp_path, name, data=b"\x00\xff\x00 not what it claims"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = {
    "missing target": (lambda c, t: {"--target_cols": ["right_arm_sbp", "no_such_col"]},
                       "has no column no_such_col"),
    "ratio outside [0,1)": (lambda c, t: {"--val_ratio": ["1.5"]}, "--val_ratio must be in [0, 1)"),
    "ratios sum to 1": (lambda c, t: {"--val_ratio": ["0.5"], "--test_ratio": ["0.5"]},
                        "must be below 1"),
    "too few subjects": (lambda c, t: {"--labels_csv": [_labels_subset(
        c, t, lambda f: f[f["ssoid"].str.split("_").str[0].isin(f["ssoid"].str.split("_").str[0].unique()[:2])])]},
        "too few subjects (2)"),
    "no overlap": (lambda c, t: {"--labels_csv": [_labels_subset(
        c, t, lambda f: f.assign(ssoid="zz" + f["ssoid"]))]}, "no usable rows"),
    "missing CSV": (lambda c, t: {"--labels_csv": ["/nonexistent/labels.csv"]},
                    "labels CSV /nonexistent/labels.csv: no such file"),
    "unreadable CSV": (lambda c, t: {"--labels_csv": [_garbage(t, "bad.csv")]}, "bad.csv"),
    "pretrain not a checkpoint": (lambda c, t: {"--pretrain": [_garbage(t, "w.pth")]},
                                  "is not a readable PyTorch checkpoint"),
    "no cuda": (lambda c, t: {"--device": ["cuda"]}, "--device cuda"),
    "zero epochs": (lambda c, t: {"--epochs": ["0"]}, "--epochs must be at least 1"),
    "no validation split": (lambda c, t: {"--val_ratio": ["0"]},
                            "--val_ratio must be above 0"),
    "no test split": (lambda c, t: {"--test_ratio": ["0"]}, "--test_ratio must be above 0"),
    "zero accum steps": (lambda c, t: {"--accum_steps": ["0"]}, "--accum_steps must be at least 1"),
    "negative threads": (lambda c, t: {"--threads": ["-1"]}, "--threads must be 0 or more"),
    "augment none and more": (lambda c, t: {"--augment": ["none", "gain"]},
                              "--augment none cannot be combined with other parts"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error_with_status_2(cohort, tmp_path, case):
    make_change, needle = BAD_INPUTS[case]
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = train_argv(cohort, tmp_path / "out")
    for flag, values in make_change(cohort, tmp_path).items():
        if flag in argv:
            i = argv.index(flag)
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            argv[i + 1:j] = values
        else:
            argv += [flag, *values]
    code, err = _cli(argv)
    assert code == 2
    assert needle in error_line(err)
    assert not (tmp_path / "out" / "bp_best.pth").exists()


def test_non_empty_out_dir_of_another_run_is_not_overwritten(run, cohort):
    before = open(os.path.join(run, "final_metrics.json")).read()
    code, err = _cli(train_argv(cohort, run))
    assert code == 2 and "is not empty" in error_line(err) and "--resume" in err
    assert open(os.path.join(run, "final_metrics.json")).read() == before


def test_prediction_truths_equal_the_labels_csv_exactly(run, cohort):
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str}).set_index("ssoid")
    pred = pd.read_csv(os.path.join(run, "test_predictions.csv"), dtype={"ssoid": str})
    for t in TARGETS:
        np.testing.assert_array_equal(pred[f"{t}_true"].to_numpy(),
                                      labels.loc[pred["ssoid"], t].to_numpy())


def test_log_redirected_to_a_file_reads_as_lines(cohort, tmp_path):
    out = tmp_path / "logged"
    log = tmp_path / "train.log"
    with open(log, "w") as fh:  # a batch job: stdout and stderr into one file
        code = subprocess.call([sys.executable, os.path.join(ROOT, "train_bp.py"),
                                *train_argv(cohort, out)], cwd=ROOT, stdout=fh, stderr=fh)
    text = log.read_text()
    assert code == 0 and "\r" not in text
    lines = text.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert lines[0].startswith("git ") and len(lines[0]) < 300
    assert lines[0].endswith(f"out_dir {out}")
    assert f"every argument: {out / 'args.json'}" in lines
    assert "  augment shift gain noise wander  " in lines[0]  # the default, --augment all
    assert max(len(ln) for ln in lines) < 400
    table = lines.index(next(ln for ln in lines if ln.startswith("test metrics (mmHg)")))
    assert lines[table + 2].split()[0] == TARGETS[0]
