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


def write_run(out_dir, n=60, epochs=4, targets=TARGETS, clinical=True, cuffless=False,
              per_subject=3):
    """A fake out_dir with the CONTRACT files, errors drawn around known truths; with
    ``cuffless`` also the cuffless-BP blocks (tracking in ssoid order, as train_bp.py)
    and split.csv."""
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    train_mean = np.linspace(80.0, 130.0, len(targets))
    report = {"target_cols": list(targets), "best_epoch": 2}
    splits = []
    for split in ("val", "test"):
        subjects = np.array([f"S{split}{i // per_subject}" for i in range(n)])
        t = train_mean + rng.normal(0, 12, (n, len(targets)))
        p = t + rng.normal(1, 6, (n, len(targets)))
        cols = {"ssoid": [f"{s}_{i}" for i, s in enumerate(subjects)]}
        for k, c in enumerate(targets):
            cols[f"{c}_true"], cols[f"{c}_pred"] = t[:, k], p[:, k]
        pd.DataFrame(cols).to_csv(os.path.join(out_dir, f"{split}_predictions.csv"), index=False)
        block = metrics.split_metrics(t, p, subjects, targets, train_mean, n_boot=200)
        if cuffless:
            block.update(metrics.clinical_blocks(t, p, subjects, targets,
                                                 metrics.target_band_sets(targets),
                                                 order=np.array(cols["ssoid"])))
            splits.append(pd.DataFrame({"ssoid": cols["ssoid"], "subject_id": subjects,
                                        "split": split}))
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
    if splits:
        pd.concat(splits).to_csv(os.path.join(out_dir, "split.csv"), index=False)
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


# ----------------------------------------------------------------------------- cuffless-BP plots
def drawn_figures(monkeypatch, out):
    """plot_run's figures by name, each drawn as for its PNG (not encoded), and what was
    drawn: (figure name, text, its box, the figure's box) of every visible text (titles,
    axis and tick labels, legend entries) and legend box, recorded as it is drawn (a tick
    label outside the axis range is not drawn)."""
    import matplotlib.legend
    import matplotlib.text

    figures, drawn, name = {}, [], [None]

    def recording(cls):
        draw = cls.draw

        def record(self, renderer):
            draw(self, renderer)
            if self.get_visible() and (cls is not matplotlib.text.Text or self.get_text()):
                drawn.append((name[0], getattr(self, "get_text", str)(),
                              self.get_window_extent(renderer), self.figure.bbox.frozen()))
        monkeypatch.setattr(cls, "draw", record)

    def keep(fig, plot_dir, figure_name, formats):
        name[0] = figure_name
        fig.canvas.draw()
        figures[figure_name] = fig
        return [os.path.join(plot_dir, f"{figure_name}.png")]
    recording(matplotlib.text.Text)
    recording(matplotlib.legend.Legend)
    monkeypatch.setattr(plot_results, "save", keep)
    plot_results.plot_run(out)
    return figures, drawn


def test_change_plot_draws_each_change_and_titles_the_reported_concordance(tmp_path,
                                                                          monkeypatch):
    out = str(tmp_path / "run")
    report = write_run(out, targets=["sbp", "dbp"], cuffless=True)
    tracking = report["test"]["tracking"]
    assert tracking["n_changes"] == 40  # 20 subjects of 3 records: 2 changes each
    fig = drawn_figures(monkeypatch, out)[0]["test_changes"]
    for ax, target in zip(fig.axes, ["sbp", "dbp"]):
        entry = tracking["per_target"][target]
        agree, disagree, excluded = (len(c.get_offsets()) for c in ax.collections[:3])
        assert agree + disagree + excluded == 40
        assert agree + disagree == entry["n_concordance"]
        assert agree / (agree + disagree) == pytest.approx(entry["concordance"])
        assert f"concordance: {100 * entry['concordance']:.0f} % of {agree + disagree} " \
               f"changes of \u2265 5 mmHg" in ax.get_title()
    assert "40 changes from the first record of 20 subjects" in \
        fig.get_suptitle().replace("\n", " ")


def test_no_change_plot_and_one_line_where_tracking_is_skipped(tmp_path, capsys):
    out = str(tmp_path / "run")
    write_run(out, n=12, targets=["sbp"], cuffless=True, per_subject=1)
    paths = plot_results.plot_run(out)
    assert [os.path.basename(p) for p in paths if "changes" in p or "by_band" in p] == \
        ["val_by_band.png", "test_by_band.png"]
    assert not any("changes" in name for name in os.listdir(os.path.join(out, "plots")))
    assert capsys.readouterr().out.splitlines() == [
        "val_changes not drawn: no subject has two or more records",
        "test_changes not drawn: no subject has two or more records"]


@pytest.mark.parametrize("n_targets", [1, 2, 5])
def test_every_text_of_the_cuffless_plots_lies_inside_its_figure(tmp_path, monkeypatch,
                                                                 n_targets):
    """The by-band and change plots (tests/test_trust_cli.py checks the others alike)."""
    names = ["right_arm_sbp", "right_arm_dbp", "left_arm_mbp", "left_arm_pp",
             "left_arm_sbp"][:n_targets]
    write_run(str(tmp_path), targets=names, cuffless=True)
    figures, drawn = drawn_figures(monkeypatch, str(tmp_path))
    cuffless = {f"{s}_{k}" for s in ("val", "test") for k in ("by_band", "changes")}
    assert cuffless <= set(figures)
    assert {name for name, *_ in drawn} >= cuffless
    outside = [(name, text, [round(v) for v in box.extents])
               for name, text, box, fig in drawn if name in cuffless
               and (box.x0 < -1 or box.y0 < -1 or box.x1 > fig.x1 + 1 or box.y1 > fig.y1 + 1)]
    assert outside == []
