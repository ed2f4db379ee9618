"""Tests for plot_results.py: the PNG files of a run, the metrics in their titles, and the
one-line errors for missing or bad inputs."""
import json
import os
import struct

import numpy as np
import pandas as pd
import pytest

import metrics
import plot_results
import utils

TARGETS = ["right_arm_sbp", "right_arm_dbp", "left_arm_mbp"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(out_dir, n=60, epochs=4, targets=TARGETS, clinical=True):
    """A fake out_dir with the CONTRACT files, errors drawn around known truths."""
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    train_mean = np.linspace(80.0, 130.0, len(targets))
    report = {"target_cols": list(targets), "best_epoch": 2}
    for split in ("val", "test"):
        subjects = np.array([f"S{i // 3}" for i in range(n)])
        t = train_mean + rng.normal(0, 12, (n, len(targets)))
        p = t + rng.normal(1, 6, (n, len(targets)))
        cols = {"ssoid": [f"{s}_{i}" for i, s in enumerate(subjects)]}
        for k, c in enumerate(targets):
            cols[f"{c}_true"], cols[f"{c}_pred"] = t[:, k], p[:, k]
        pd.DataFrame(cols).to_csv(os.path.join(out_dir, f"{split}_predictions.csv"), index=False)
        block = metrics.split_metrics(t, p, subjects, targets, train_mean, n_boot=200)
        if not clinical:
            block = {"per_target": {c: {k: block["per_target"][c][k] for k in metrics.METRIC_KEYS}
                                    for c in targets}}
        report[split] = {"loss": 0.4, **block}
    epoch = np.arange(1, epochs + 1)
    history = {"epoch": epoch, "train_loss": 1 / epoch, "val_loss": 1.2 / epoch,
               "val_mae_mean": 8 + 4 / epoch}
    history.update({f"val_mae_{c}": 8 + k + 4 / epoch for k, c in enumerate(targets)})
    history.update({"lr_backbone": 1e-5 / epoch, "lr_head": 3e-4 / epoch, "seconds": 1.0})
    pd.DataFrame(history).to_csv(os.path.join(out_dir, "history.csv"), index=False)
    with open(os.path.join(out_dir, "final_metrics.json"), "w") as fh:
        json.dump(report, fh)
    return report


def png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    report = write_run(out)
    return out, report, plot_results.plot_run(out)


def test_plot_run_writes_every_plot_as_a_real_png(run):
    out, _, paths = run
    names = ["learning_curves", "val_scatter", "val_bland_altman", "test_scatter",
             "test_bland_altman"]
    assert paths == [os.path.join(out, "plots", f"{n}.png") for n in names]
    assert sorted(os.listdir(os.path.join(out, "plots"))) == sorted(f"{n}.png" for n in names)
    for path in paths:
        width, height = png_size(path)
        assert 1000 <= width <= 2500 and 400 <= height <= 2500, (path, width, height)
        assert 30_000 < os.path.getsize(path) < 2_000_000
    # three targets in one row of square panels: wide, not tall
    width, height = png_size(os.path.join(out, "plots", "val_scatter.png"))
    assert width > 1.5 * height


def test_png_pixels_are_drawn_not_blank(run):
    import matplotlib.image

    image = matplotlib.image.imread(run[2][1])
    assert image.shape[2] in (3, 4)
    assert (image[..., :3] < 0.5).mean() > 0.01  # text, lines and points, on white


def test_titles_carry_the_reported_metrics():
    m = metrics.target_metrics(*map(np.asarray, ([120.0, 120, 120, 120], [125.0, 110, 120, 121])))
    m["mae_ci95"] = [1.25, 6.5]
    assert plot_results.scatter_title("sbp", m) == (
        "sbp\nMAE 4.00 mmHg (95% CI 1.25\u20136.50)\nr 0.000   R\u00b2 0.000   IEEE 1708: A")
    # e = 5, -10, 0, 1: ME -1, SD sqrt(122 / 3), LoA ME -/+ 1.96 SD
    sd = np.sqrt(122 / 3)
    # means of true and predicted 122.5, 115, 120, 120.5: errors rise with them
    slope, intercept = np.polyfit([122.5, 115, 120, 120.5], [5, -10, 0, 1], 1)
    assert plot_results.bland_altman_title("sbp", m) == (
        f"sbp\nME -1.00   SD {sd:.2f}   LoA {-1 - 1.96 * sd:.1f} to {-1 + 1.96 * sd:.1f} mmHg\n"
        f"proportional bias: error = {intercept:.2f} {slope:+.3f} x mean\n"
        "within 5/10/15 mmHg: 75/100/100 %\nBHS: A   AAMI: pass")


def test_titles_take_json_values_and_compute_what_the_json_lacks():
    t, p = np.array([100.0, 110.0, 120.0]), np.array([105.0, 104.0, 120.0])
    block = {"per_target": {"sbp": {"mae": 99.0}}}
    m = plot_results.target_summary(block, "sbp", t, p)
    assert m["mae"] == 99.0  # as the run reported it
    assert m["within_5"] == pytest.approx(2 / 3) and m["me"] == pytest.approx(-1 / 3)


def test_split_title_names_records_subjects_and_baseline(run):
    _, report, _ = run
    title = plot_results.split_title("val", report["val"], 60)
    assert title.startswith("val split: 60 records of 20 subjects")
    assert f"mean MAE {report['val']['mean']['mae']:.2f} mmHg" in title
    assert f"train-mean predictor {report['val']['baseline']['mean']['mae']:.2f} mmHg" in title


def test_cli_writes_pdf_and_works_for_a_run_without_clinical_fields(tmp_path, capsys):
    out = str(tmp_path / "old")
    write_run(out, n=12, epochs=1, targets=["sbp"], clinical=False)
    assert utils.run_cli(plot_results.main, [out, "--formats", "pdf"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and all(p.endswith(".pdf") for p in printed)
    with open(printed[0], "rb") as fh:
        assert fh.read(5) == b"%PDF-"


@pytest.mark.parametrize("breakage,message", [
    (lambda out: os.remove(os.path.join(out, "history.csv")), "history.csv: no such file"),
    (lambda out: open(os.path.join(out, "final_metrics.json"), "w").write("{not json"),
     "final_metrics.json: not readable JSON"),
    (lambda out: pd.read_csv(os.path.join(out, "test_predictions.csv")).drop(
        columns="sbp_pred").to_csv(os.path.join(out, "test_predictions.csv"), index=False),
     "test_predictions.csv: columns must be exactly ssoid, sbp_true, sbp_pred"),
    (lambda out: open(os.path.join(out, "val_predictions.csv"), "w").write(
        "ssoid,sbp_true,sbp_pred\na_1,120,\n"), "val_predictions.csv: empty, non-numeric"),
    (lambda out: open(os.path.join(out, "history.csv"), "w").write("epoch,train_loss\n1,0.5\n"),
     "history.csv: missing column\\(s\\) val_loss, val_mae_mean"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys, breakage, message):
    out = str(tmp_path / "run")
    write_run(out, n=6, epochs=1, targets=["sbp"])
    breakage(out)
    assert utils.run_cli(plot_results.main, [out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out}")
    with pytest.raises(utils.UserError, match=message):
        plot_results.plot_run(out)
    assert not os.path.exists(os.path.join(out, "plots"))


def test_missing_out_dir_is_a_one_line_error(tmp_path, capsys):
    assert utils.run_cli(plot_results.main, [str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such directory\n"
