"""Issue 19, what the scripts do around the work itself: a closed pipe ends quietly, prep
leaves no lock file and still keeps two runs apart, a PPG-only file names the flag to use,
crossval accepts the same folder written as another path, demo.py never deletes a user's
file, and plot texts fit inside their figures."""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import h5py
import matplotlib.legend
import matplotlib.text
import pandas as pd
import pytest

import crossval_bp
import demo
import make_synthetic_cohort as msc
import plot_results
import prepare_kailuan_npz as prep
from conftest import ROOT, prepared_cohort
from test_plots import write_run
from utils import UserError, run_cli

TARGETS = ["right_arm_sbp", "right_arm_dbp"]


@pytest.fixture(scope="module")
def cohort_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("cohort") / "cohort.h5"
    msc.make_cohort(str(path), n_subjects=4, records_per_subject=2, seed=3)
    return path


def prep_argv(h5, out, *extra):
    return ["--h5_path", str(h5), "--id_key", "new_id", "--target_cols", *TARGETS,
            "--output_npz", str(out / "npz"), "--output_csv", str(out / "labels.csv"),
            "--target_seq_len", "200", "--workers", "1", *extra]


# ----------------------------------------------------------------------------- closed pipe
def test_a_closed_pipe_ends_prep_quietly_with_status_141(cohort_h5, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (say `head -2`) has gone before prep prints its summary
    try:
        result = subprocess.run([sys.executable, "prepare_kailuan_npz.py",
                                 *prep_argv(cohort_h5, tmp_path)], cwd=ROOT, stdout=write_end,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert result.stderr == ""  # no BrokenPipeError traceback, not even at shutdown
    assert result.returncode == 141  # 128 + SIGPIPE, as a shell reports `cmd | head`
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 8  # the work itself was done


# ----------------------------------------------------------------------------- prep's lock
def test_prep_leaves_no_lock_file_and_a_held_lock_still_refuses_a_second_run(cohort_h5,
                                                                            tmp_path):
    prep.main(prep_argv(cohort_h5, tmp_path))
    assert sorted(os.listdir(tmp_path / "npz")) == sorted(
        [prep.MANIFEST] + [f"{i}.npz" for i in pd.read_csv(tmp_path / "labels.csv")["ssoid"]])
    with prep.folder_lock(str(tmp_path / "npz")):
        assert (tmp_path / "npz" / prep.LOCK).is_file()
        with pytest.raises(UserError, match="another prepare_kailuan_npz.py is writing"):
            prep.main(prep_argv(cohort_h5, tmp_path))
    assert not (tmp_path / "npz" / prep.LOCK).exists()


def test_a_lock_file_removed_between_open_and_lock_is_not_taken(tmp_path, monkeypatch):
    """Run A opens the lock file; before A locks it, its holder finishes and removes it,
    and run C makes a new one and locks that. A must not run beside C on the old file."""
    real_flock, path, run_c = fcntl.flock, tmp_path / prep.LOCK, []

    def flock(fh, op):
        if not run_c:
            os.remove(path)
            run_c.append(open(path, "a"))
            real_flock(run_c[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_flock(fh, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(UserError, match="another prepare_kailuan_npz.py is writing"):
        with prep.folder_lock(str(tmp_path)):
            pass
    run_c[0].close()


# ----------------------------------------------------------------------------- one-signal files
@pytest.mark.parametrize("drop, flag, name", [("signals/ecg", "--ecg_key", "ECG"),
                                              ("signals/ppg", "--ppg_key", "PPG")])
def test_a_file_without_one_signal_is_told_the_flag_value_for_it(cohort_h5, tmp_path, capsys,
                                                                 drop, flag, name):
    h5 = tmp_path / "one_signal.h5"
    shutil.copy(cohort_h5, h5)
    with h5py.File(h5, "a") as f:
        del f[drop]
    assert run_cli(prep.main, prep_argv(h5, tmp_path)) == 2
    assert capsys.readouterr().err == (f"error: {flag}: {drop} does not exist in {h5}; for a "
                                       f"file without {name} give {flag} none\n")
    assert run_cli(prep.main, prep_argv(h5, tmp_path, flag, "none")) == 0  # as suggested
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 8


def test_a_file_without_either_signal_gets_no_such_hint(cohort_h5, tmp_path, capsys):
    h5 = tmp_path / "no_signal.h5"
    shutil.copy(cohort_h5, h5)
    with h5py.File(h5, "a") as f:
        del f["signals"]
    assert run_cli(prep.main, prep_argv(h5, tmp_path)) == 2
    assert capsys.readouterr().err == f"error: --ecg_key: signals/ecg does not exist in {h5}\n"


# ----------------------------------------------------------------------------- crossval paths
def cv_argv(npz, labels, out):
    return ["--folds", "2", "--out_dir", out, "--npz_dir", npz, "--labels_csv", labels,
            "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "1", "--batch_size", "8",
            "--num_workers", "0", "--val_ratio", "0.2", "--seed", "1"]


def test_crossval_rerun_naming_the_same_folders_otherwise_keeps_and_resumes_its_folds(
        tmp_path, monkeypatch):
    base = tmp_path / "real"
    (base / "prep").mkdir(parents=True)
    prepared_cohort(base / "prep", 8, 2, 2, TARGETS, 200)
    monkeypatch.chdir(base)
    monkeypatch.setattr(plot_results, "save", lambda *args: [])  # drawing is not the point
    crossval_bp.main(cv_argv("prep/npz", "prep/labels.csv", "cv"))
    saved = json.loads((base / "cv" / "fold_0" / "args.json").read_text())
    assert (saved["npz_dir"], saved["out_dir"]) == (str(base / "prep" / "npz"),
                                                    str(base / "cv" / "fold_0"))
    finished = (base / "cv" / "fold_0" / "final_metrics.json").stat().st_mtime_ns
    pooled = json.loads((base / "cv" / "cv_metrics.json").read_text())["pooled"]
    (base / "cv" / "fold_1" / "final_metrics.json").unlink()  # fold 1 resumes from bp_last.pth
    crossval_bp.main(cv_argv("../real/prep/npz", "./prep/../prep/labels.csv", "../real/cv/"))
    assert (base / "cv" / "fold_0" / "final_metrics.json").stat().st_mtime_ns == finished
    assert json.loads((base / "cv" / "cv_metrics.json").read_text())["pooled"] == pooled
    with pytest.raises(UserError, match="--labels_csv"):  # another file is still refused
        crossval_bp.main(cv_argv("prep/npz", str(tmp_path / "real" / "cv" / "cv_predictions.csv"),
                                 "cv"))


def test_a_relative_path_saved_by_an_older_run_is_read_from_the_working_directory(
        tmp_path, monkeypatch):
    (tmp_path / "prep" / "npz").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert crossval_bp.same_setting("npz_dir", "prep/npz", str(tmp_path / "prep" / "npz"))
    assert not crossval_bp.same_setting("npz_dir", "prep/npz", str(tmp_path / "npz"))
    assert not crossval_bp.same_setting("seed", 1, 2)


# ----------------------------------------------------------------------------- demo --out
def fake_demo_outputs(out):
    """What a finished demo leaves in ``out`` (its entries, not their real contents)."""
    for name in ("npz", "run/plots"):
        (out / name).mkdir(parents=True)
    for name in ("cohort.h5", "labels.csv", "labels_rejected.csv", "labels_prepare.json",
                 "npz/a_1.npz", "run/bp_best.pth"):
        (out / name).write_text("demo")


def test_a_demo_rerun_replaces_its_outputs_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "demo_out"
    demo.fresh_folder(str(out))
    fake_demo_outputs(out)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    demo.fresh_folder(str(out))  # the second `make demo`
    assert sorted(os.listdir(out)) == [demo.MARKER, "mine", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    fake_demo_outputs(out)
    demo.fresh_folder(str(out))  # and a third
    assert sorted(os.listdir(out)) == [demo.MARKER, "mine", "notes.txt"]


def test_demo_refuses_a_folder_it_did_not_make_and_touches_nothing(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "run").mkdir()  # a name the demo writes, but not the demo's
    result = subprocess.run([sys.executable, "demo.py", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --out {out} is not empty and was not made by demo.py; "
                             f"choose a new or empty folder\n")
    assert sorted(os.listdir(out)) == ["notes.txt", "run"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        demo.fresh_folder(str(tmp_path / "file"))



# ----------------------------------------------------------------------------- plot layout
@pytest.mark.parametrize("n_targets", [1, 2, 5, 8])
def test_every_drawn_text_and_legend_of_every_plot_lies_inside_its_figure(tmp_path, monkeypatch,
                                                                         n_targets):
    """Recorded as the figures are drawn: every title, axis and tick label, legend entry
    and legend box."""
    drawn = []

    def recording(cls):
        draw = cls.draw

        def record(self, renderer):
            draw(self, renderer)
            if self.get_visible() and (cls is not matplotlib.text.Text or self.get_text()):
                drawn.append((self.figure, getattr(self, "get_text", str)(),
                              self.get_window_extent(renderer), self.figure.bbox.frozen()))
        monkeypatch.setattr(cls, "draw", record)

    names = [f"{side}_arm_{kind}" for kind in ("dbp", "mbp", "sbp", "pp")
             for side in ("right", "left")][:n_targets]
    write_run(str(tmp_path), targets=names)
    recording(matplotlib.text.Text)
    recording(matplotlib.legend.Legend)
    # each figure drawn as for its PNG (the check does not depend on the dpi), not encoded
    monkeypatch.setattr(plot_results, "save", lambda fig, *args: fig.canvas.draw() or [])
    plot_results.plot_run(str(tmp_path))
    assert len({id(fig) for fig, *_ in drawn}) == 5  # learning curves, 2 x (scatter, B-A)
    titles = [text for _, text, _, _ in drawn if "split:" in text]
    assert {t.split(" split:")[0] for t in titles} == {"val", "test"}
    assert all("train-mean predictor" in t for t in titles)
    outside = [(text, [round(v) for v in box.extents], [round(v) for v in fig.extents])
               for _, text, box, fig in drawn
               if box.x0 < -1 or box.y0 < -1 or box.x1 > fig.x1 + 1 or box.y1 > fig.y1 + 1]
    assert outside == []
