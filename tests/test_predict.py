"""Tests for predict_bp.py: it reproduces training's test predictions, --h5_path equals
--npz_dir, the metrics JSON, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import metrics
import predict_bp
import train_bp
from conftest import MMHG_ATOL, ROOT, error_line
from test_train import TARGETS, cohort, train_argv  # noqa: F401 - cohort is a fixture


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("predict") / "run"
    train_bp.main(train_argv(cohort, out, "--epochs", "1"))
    split = pd.read_csv(out / "split.csv", dtype=str)
    test_dir = tmp_path_factory.mktemp("test_npz")
    for ssoid in split.loc[split["split"] == "test", "ssoid"]:
        shutil.copy(os.path.join(cohort["npz"], f"{ssoid}.npz"), test_dir)
    return {"run": out, "ckpt": str(out / "bp_best.pth"), "test_npz": str(test_dir)}


def test_prediction_of_the_test_split_reproduces_training_output(trained, cohort, tmp_path):  # noqa: F811
    out = tmp_path / "pred.csv"
    predict_bp.main(["--checkpoint", trained["ckpt"], "--npz_dir", trained["test_npz"],
                     "--output", str(out), "--labels_csv", cohort["labels"]])
    ours = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    theirs = pd.read_csv(trained["run"] / "test_predictions.csv", dtype={"ssoid": str}).set_index("ssoid")
    intervals = [f"{t}_{k}" for t in TARGETS for k in ("lo", "hi")]  # after every other
    assert list(ours.columns) == [c for c in theirs.columns if c not in intervals] + ["split"] \
        + intervals
    assert set(ours["split"]) == {"test"}
    ours = ours.loc[theirs.index]
    # other batches than training's evaluation: equal to float32 precision
    np.testing.assert_allclose(ours[theirs.columns].to_numpy(), theirs.to_numpy(), rtol=0,
                               atol=MMHG_ATOL)
    report = json.load(open(tmp_path / "pred_metrics.json"))
    assert list(report) == ["target_cols", "test"]
    final = json.load(open(trained["run"] / "final_metrics.json"))["test"]
    for t in TARGETS:
        assert report["test"]["per_target"][t]["mae"] == pytest.approx(
            final["per_target"][t]["mae"], abs=MMHG_ATOL)
    recomputed = metrics.split_metrics(ours[[f"{t}_true" for t in TARGETS]].to_numpy(),
                                       ours[[f"{t}_pred" for t in TARGETS]].to_numpy(),
                                       [i.split("_")[0] for i in ours.index], TARGETS,
                                       torch.load(trained["ckpt"], weights_only=True)["target_mean"])
    # the JSON comes from the very values the CSV holds (rounded to 1e-4 mmHg first)
    assert report["test"]["mean"]["mae"] == recomputed["mean"]["mae"]
    assert pd.read_csv(tmp_path / "pred_skipped.csv").empty


def test_metrics_come_per_split_and_training_records_are_never_the_headline(
        trained, cohort, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "all.csv"
    split = pd.read_csv(trained["run"] / "split.csv", dtype=str).set_index("ssoid")
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    # records of a subject the run never saw (their own recordings: other signal digests)
    new = labels.iloc[:2].assign(ssoid=["newcomer_1", "newcomer_2"],
                                 signal_digest=["recording_1", "recording_2"])
    npz = tmp_path / "npz"
    shutil.copytree(cohort["npz"], npz)
    for old_id, new_id in zip(labels["ssoid"].iloc[:2], new["ssoid"]):
        shutil.copy(npz / f"{old_id}.npz", npz / f"{new_id}.npz")
    both = tmp_path / "labels.csv"
    pd.concat([labels, new]).to_csv(both, index=False)
    capsys.readouterr()
    predict_bp.main(["--checkpoint", trained["ckpt"], "--npz_dir", str(npz), "--output", str(out),
                     "--labels_csv", str(both)])
    lines = capsys.readouterr().out.splitlines()
    pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    assert pred.loc[split.index, "split"].tolist() == split["split"].tolist()
    assert pred.loc[new["ssoid"], "split"].tolist() == ["new", "new"]
    report = json.load(open(tmp_path / "all_metrics.json"))
    assert list(report) == ["target_cols", "new", "test", "val", "train"]
    for name in ("new", "test", "val", "train"):
        assert report[name]["n_records"] == int((pred["split"] == name).sum())
        part = pred[pred["split"] == name]
        for t in TARGETS:
            assert report[name]["per_target"][t]["mae"] == pytest.approx(
                (part[f"{t}_pred"] - part[f"{t}_true"]).abs().mean(), rel=1e-12)
    assert lines[1].startswith("new: MAE mean ") and "over 2 labelled records" in lines[1]
    assert lines[4].startswith("train: ") and "not a measure of performance" in lines[4]
    assert not any("MAE" in ln and f"over {len(pred)} " in ln for ln in lines)


def test_checkpoint_without_its_split_says_so(trained, tmp_path, capsys):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    del ckpt["split_ids"]  # as saved before checkpoints recorded their split
    old = tmp_path / "old.pth"
    torch.save(ckpt, old)
    out = tmp_path / "p.csv"
    predict_bp.main(["--checkpoint", str(old), "--npz_dir", trained["test_npz"], "--output",
                     str(out)])
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "does not record its run's split" in warnings[0]
    assert set(pd.read_csv(out)["split"]) == {"unknown"}


def test_h5_path_gives_the_same_predictions_as_npz_dir(trained, cohort, tmp_path):  # noqa: F811
    from_npz, from_h5 = tmp_path / "a.csv", tmp_path / "b.csv"
    predict_bp.main(["--checkpoint", trained["ckpt"], "--npz_dir", cohort["npz"],
                     "--output", str(from_npz)])
    predict_bp.main(["--checkpoint", trained["ckpt"], "--h5_path",
                     str(cohort["base"] / "cohort.h5"), "--output", str(from_h5),
                     "--batch_size", "7"])
    a = pd.read_csv(from_npz, dtype={"ssoid": str}).set_index("ssoid")
    b = pd.read_csv(from_h5, dtype={"ssoid": str}).set_index("ssoid")
    preds = [f"{t}_pred" for t in TARGETS]
    assert list(a.columns) == preds + ["split"] + [f"{t}_{k}" for t in TARGETS for k in ("lo", "hi")]
    assert sorted(a.index) == sorted(b.index) and len(a) == 60
    np.testing.assert_allclose(b.loc[a.index, preds].to_numpy(),
                               a[preds].to_numpy(), rtol=0, atol=MMHG_ATOL)


def _cli(argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "predict_bp.py"), *argv], cwd=ROOT,
                       capture_output=True, text=True)
    return r.returncode, error_line(r.stderr)


def test_bad_inputs_are_one_line_errors_and_write_nothing(trained, cohort, tmp_path):  # noqa: F811
    out = str(tmp_path / "p.csv")
    junk = tmp_path / "junk.pth"
    junk.write_text("no")
    bad_labels = tmp_path / "l.csv"
    bad_labels.write_text("ssoid,other\nx_1,1\n")
    cases = [
        (["--checkpoint", trained["ckpt"], "--output", out], "exactly one of --npz_dir and --h5_path"),
        (["--checkpoint", str(junk), "--npz_dir", cohort["npz"], "--output", out],
         "not a readable PyTorch checkpoint"),
        (["--checkpoint", trained["ckpt"], "--npz_dir", str(tmp_path), "--output", out],
         "holds no .npz files"),
        (["--checkpoint", trained["ckpt"], "--npz_dir", cohort["npz"], "--output", out,
          "--labels_csv", str(bad_labels)], "has no column"),
        (["--checkpoint", trained["ckpt"], "--npz_dir", cohort["npz"],
          "--output", str(tmp_path / "nope" / "p.csv")], "does not exist"),
        (["--checkpoint", trained["ckpt"], "--h5_path", str(tmp_path / "x.h5"), "--output", out],
         "--h5_path"),
    ]
    for argv, needle in cases:
        code, line = _cli(argv)
        assert code == 2 and needle in line, (argv, line)
    assert not os.path.exists(out)
    existing = tmp_path / "keep.csv"
    existing.write_text("mine\n")
    code, line = _cli(["--checkpoint", trained["ckpt"], "--npz_dir", cohort["npz"],
                       "--output", str(existing)])
    assert code == 2 and "--overwrite" in line and existing.read_text() == "mine\n"


def test_h5_duplicate_ids_keep_the_first_row_as_prepare_does(trained, tmp_path):
    import make_synthetic_cohort
    h5 = str(tmp_path / "dup.h5")
    info = make_synthetic_cohort.make_cohort(h5, n_subjects=4, records_per_subject=2, seed=5,
                                             n_duplicate=2)
    out = tmp_path / "p.csv"
    predict_bp.main(["--checkpoint", trained["ckpt"], "--h5_path", h5, "--output", str(out)])
    pred = pd.read_csv(out, dtype={"ssoid": str})
    skipped = pd.read_csv(tmp_path / "p_skipped.csv", dtype={"ssoid": str})
    assert pred["ssoid"].is_unique and len(pred) == info["n_records"] - 2
    assert skipped["reason"].tolist() == ["duplicate_id", "duplicate_id"]
    assert set(skipped["ssoid"]) <= set(pred["ssoid"])
