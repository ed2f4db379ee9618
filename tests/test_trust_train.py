"""Trust fixes in training (issue 19): a reused head keeps its mmHg, epoch 0 is labelled
for what it is, prep's settings reach the input filter, a checkpoint's conditioning is
followed, and bad labels fail before training with a message a user can act on."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import metrics
import train_bp
from backbones import BPModelConfig, build_bp_model, load_pretrained
from conftest import MMHG_ATOL, error_line, prepared_cohort
from utils import UserError, run_cli, save_checkpoint

AGE = {"name": "age", "kind": "numeric", "mean": 55.0, "std": 10.0, "fill": 55.0,
       "missing_indicator": False}
OLD = {"target_mean": [120.0, 80.0], "target_std": [15.0, 10.0], "covariates": [AGE],
       "ridge": {"coef": [[0.5, 0.2]], "intercept": [92.5, 69.0]}}


def offset_model(stats):
    """A tiny ECG model with the ridge offset of ``stats`` in normalised units."""
    torch.manual_seed(0)
    model = build_bp_model(BPModelConfig(arch="tiny", modality="ecg", n_targets=2,
                                         n_covariates=1, covariate_offset=True))
    mean, std = np.array(stats["target_mean"]), np.array(stats["target_std"])
    coef, intercept = np.array(stats["ridge"]["coef"]), np.array(stats["ridge"]["intercept"])
    model.set_covariate_offset((coef / std).T, (intercept - mean) / std)
    return model


def mmhg(model, stats, x, age):
    cov = ((age - stats["covariates"][0]["mean"]) / stats["covariates"][0]["std"])[:, None]
    with torch.no_grad():
        out = model.eval()(x, cov)
    return (out * torch.tensor(stats["target_std"]) + torch.tensor(stats["target_mean"])).double()


def ridge_mmhg(stats, age):
    coef, intercept = np.array(stats["ridge"]["coef"]), np.array(stats["ridge"]["intercept"])
    return torch.from_numpy(age.double().numpy()[:, None] @ coef + intercept)


@pytest.mark.parametrize("new_std", [[15.0, 10.0], [18.0, 7.5]])
def test_a_reused_head_with_the_ridge_offset_moves_exactly_with_the_refitted_ridge(
        tmp_path, new_std):
    trained = offset_model(OLD)
    with torch.no_grad():
        for param in trained.head.parameters():
            param.add_(0.3 * torch.randn_like(param))
    path = str(tmp_path / "bp_best.pth")
    save_checkpoint(path, {"model": trained.state_dict(), "target_cols": ["sbp", "dbp"],
                           "model_config": {"covariate_offset": True}, **OLD})
    # the new cohort: targets +25 / +10 mmHg, so the ridge refitted on it moves by as much
    new = {**OLD, "target_mean": [145.0, 90.0], "target_std": new_std,
           "ridge": {"coef": OLD["ridge"]["coef"], "intercept": [117.5, 79.0]}}
    model = offset_model(new)
    report = load_pretrained(model, path, target_cols=["sbp", "dbp"], stats=new, verbose=False)
    assert report["head"]["loaded"] > 0
    torch.manual_seed(1)
    x, age = torch.randn(6, 1, 200), 40 + 40 * torch.rand(6)
    before, after = mmhg(trained, OLD, x, age), mmhg(model, new, x, age)
    # every prediction moves by exactly the ridge's move; the network adds the same mmHg
    torch.testing.assert_close(after - before, torch.tensor([[25.0, 10.0]] * 6,
                                                            dtype=torch.float64),
                               rtol=0, atol=1e-3)
    torch.testing.assert_close(after - ridge_mmhg(new, age), before - ridge_mmhg(OLD, age),
                               rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- calibration
def test_calibration_with_one_cuff_reading_per_subject_reports_no_grades():
    subj = np.array(["A", "A", "A", "B", "B"])
    t = np.array([[120.0, 80.0]] * 3 + [[140.0, 90.0]] * 2)
    p = t + np.array([[1.0, 2.0], [1.1, 2.2], [0.9, 1.9], [-3.0, 0.0], [-3.1, 0.1]])
    block = metrics.calibrated_block(t, p, subj, np.arange(5), ["sbp", "dbp"], n_boot=20)
    assert block["informative"] is False and "per_target" not in block and "mean" not in block
    assert block["bp_changes"] == {"sbp": 0, "dbp": 0}
    assert (block["n_records"], block["n_calibration_records"]) == (3, 2)
    assert block["note"] == metrics.CALIBRATION_MEASURES_NOTHING
    # one target changes within A: metrics come back, the constant one is named
    t[1, 0] = 126.0
    block = metrics.calibrated_block(t, p, subj, np.arange(5), ["sbp", "dbp"], n_boot=20)
    assert block["informative"] is True and block["bp_changes"] == {"sbp": 1, "dbp": 0}
    assert block["note"].startswith("dbp: the truth never changes within a subject")
    # A calibrates on 120 vs 121: offset -1; record 2 (126, pred 121.1) -> 120.1, record 3
    # (120, pred 120.9) -> 119.9; B: offset +3, record (140, pred 136.9) -> 139.9
    assert block["per_target"]["sbp"]["mae"] == pytest.approx((5.9 + 0.1 + 0.1) / 3)


# ----------------------------------------------------------------------------- end to end
TARGETS = ["right_arm_sbp", "right_arm_dbp"]
SHIFT = {"right_arm_sbp": 25.0, "right_arm_dbp": 10.0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return prepared_cohort(tmp_path_factory.mktemp("trust_cohort"), 24, 2, 11, TARGETS,
                           extra_cols=("age", "sex"))


def argv_of(cohort, out, *extra, labels=None):
    return ["--npz_dir", cohort["npz"], "--labels_csv", labels or cohort["labels"],
            "--out_dir", str(out), "--target_cols", *TARGETS, "--arch", "tiny",
            "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--seed", "3", *extra]


def labels_with(cohort, tmp_path, name, change):
    table = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    table = change(table)
    path = tmp_path / name
    table.to_csv(path, index=False)
    return str(path)


def predictions(out, split="test"):
    return pd.read_csv(out / f"{split}_predictions.csv", dtype={"ssoid": str}).set_index("ssoid")


def test_epoch_0_of_a_reused_covariate_model_is_that_model_moved_by_the_target_shift(
        cohort, tmp_path, capsys):
    first = tmp_path / "first"
    train_bp.main(argv_of(cohort, first, "--covariates", "age", "sex"))
    shifted = labels_with(cohort, tmp_path, "shifted.csv",
                          lambda t: t.assign(**{c: t[c] + d for c, d in SHIFT.items()}))
    capsys.readouterr()
    again = tmp_path / "again"
    train_bp.main(argv_of(cohort, again, "--covariates", "age", "sex", "--pretrain",
                          str(first / "bp_best.pth"), "--lr_backbone", "1e-9", "--lr_head",
                          "1e-9", labels=shifted))
    out = capsys.readouterr().out
    assert (f"epoch 0/1  the model loaded from --pretrain {first / 'bp_best.pth'} with its "
            f"ridge refitted on this run's train split, before training: val MAE mean") in out
    assert "the ridge on the covariates" not in out
    before, after = predictions(first), predictions(again)
    assert list(before.index) == list(after.index)  # the same split
    for c, d in SHIFT.items():
        np.testing.assert_allclose(after[f"{c}_pred"] - before[f"{c}_pred"], d, rtol=0,
                                   atol=MMHG_ATOL)


def test_a_blank_calibration_order_cell_fails_before_training(cohort, tmp_path):
    def visit(table):
        table["visit"] = [f"2020-01-{1 + i % 2:02d}" for i in range(len(table))]
        table.loc[3, "visit"] = np.nan
        return table

    labels = labels_with(cohort, tmp_path, "visits.csv", visit)
    with pytest.raises(UserError, match=r"--calibration_order: column visit of labels CSV .* "
                                        r"is empty in 1 usable rows \(ssoid "):
        train_bp.main(argv_of(cohort, tmp_path / "run", "--calibration_order", "visit",
                              labels=labels))
    assert not (tmp_path / "run").exists()


def test_a_report_step_that_fails_after_training_keeps_both_prediction_files(
        cohort, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("report step failed")

    monkeypatch.setattr(metrics, "calibrated_block", broken)
    with pytest.raises(RuntimeError, match="report step failed"):
        train_bp.main(argv_of(cohort, tmp_path / "run"))
    for split in ("val", "test"):
        frame = predictions(tmp_path / "run", split)
        assert list(frame.columns)[:4] == [f"{c}_{k}" for c in TARGETS for k in ("true", "pred")]
        assert len(frame) > 0


def test_one_cuff_reading_per_subject_gives_no_calibrated_grades_and_says_so(
        cohort, tmp_path, capsys):
    def constant(table):
        subject = table["ssoid"].str.split("_").str[0]
        for c in TARGETS:
            table[c] = table.groupby(subject)[c].transform("first")
        return table

    labels = labels_with(cohort, tmp_path, "constant.csv", constant)
    train_bp.main(argv_of(cohort, tmp_path / "run", labels=labels))
    block = json.loads((tmp_path / "run" / "final_metrics.json").read_text())["test"]
    assert block["calibrated"]["informative"] is False
    assert "per_target" not in block["calibrated"]
    assert block["calibrated"]["bp_changes"] == {c: 0 for c in TARGETS}
    assert (f"note: test 'calibrated' block: {metrics.CALIBRATION_MEASURES_NOTHING}"
            in capsys.readouterr().out)


# ----------------------------------------------------------------------------- messages
@pytest.mark.parametrize("case", ["inf", "header only"])
def test_labels_that_cannot_train_are_named_before_anything_runs(cohort, tmp_path, capsys,
                                                                 case):
    def change(table):
        if case == "header only":
            return table.iloc[:0]
        table.loc[[2, 5, 9], "right_arm_sbp"] = np.inf
        return table

    labels = labels_with(cohort, tmp_path, "bad.csv", change)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        assert run_cli(train_bp.main, argv_of(cohort, tmp_path / "run", labels=labels)) == 2
    err = error_line(capsys.readouterr().err)
    if case == "inf":
        table = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
        ids = ", ".join(table["ssoid"].iloc[[2, 5, 9]])
        assert err == (f"error: labels CSV {labels}: column right_arm_sbp has 3 infinite "
                       f"values (ssoid {ids}); leave a missing value empty")
    else:
        assert err.startswith(f"error: labels CSV {labels} has no rows (only the header ssoid,")
    assert not (tmp_path / "run").exists()


def test_the_start_line_names_args_json_only_once_it_is_written(cohort, tmp_path, capsys):
    assert run_cli(train_bp.main, argv_of(cohort, tmp_path / "run",
                                          labels=str(tmp_path / "none.csv"))) == 2
    assert "args.json" not in capsys.readouterr().out
    train_bp.main(argv_of(cohort, tmp_path / "ok"))
    out = capsys.readouterr().out
    assert f"every argument: {tmp_path / 'ok' / 'args.json'}" in out
    assert (tmp_path / "ok" / "args.json").is_file()


def test_a_split_of_few_subjects_is_warned_about(tmp_path, capsys):
    small = prepared_cohort(tmp_path, 10, 2, 4, TARGETS)
    train_bp.main(argv_of(small, tmp_path / "run", "--val_ratio", "0.1", "--test_ratio", "0.2"))
    out = capsys.readouterr().out
    assert "split: train 14 records / 7 subjects, val 2 records / 1 subjects, test 4 records " \
           "/ 2 subjects" in out
    assert "warning: few subjects in a split (val 1, test 2; fewer than 5)" in out


def test_the_console_table_keeps_columns_apart_when_r2_is_large_and_negative(capsys):
    m = {"mae": 12.345, "rmse": 15.0, "me": -1.5, "sd": 14.9, "pearson": 0.892,
         "r2": -21.047}
    block = {"per_target": {"a_very_long_target_name_sbp": m}, "mean": m,
             "baseline": {"per_target": {"a_very_long_target_name_sbp": {"mae": 9.0}},
                          "mean": {"mae": 9.0}}}
    train_bp.print_test_table(block, ["a_very_long_target_name_sbp"])
    row, mean = capsys.readouterr().out.splitlines()[-2:]
    assert row.split() == ["a_very_long_target_name_sbp", "12.35", "15.00", "-1.50", "14.90",
                           "0.892", "-21.047", "9.00"]
    assert mean.split() == ["mean", "12.35", "15.00", "0.892", "-21.047", "9.00"]


def test_a_failed_population_check_is_shown_against_its_minimum():
    audit = metrics.population_audit(np.repeat(np.arange(32), 4), sbp=np.full(128, 120.0),
                                     sex=np.repeat(np.arange(32) < 9, 4).astype(int))
    checks = audit["checks"]
    assert train_bp.audit_shortfall(checks["subjects"]) == "32 < 85"
    assert train_bp.audit_shortfall(checks["sbp_ge_160"]) == "0.0% < 5%"
    assert train_bp.audit_shortfall(checks["sex"]) == "0 72%, 1 28%; each >= 30%"
