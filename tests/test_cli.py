"""What every script shows a user: full --help text with defaults, and logs that read
well when redirected to a file (no carriage-return frames)."""
import glob
import importlib
import io
import os
import subprocess
import sys

import pytest

import utils
from conftest import ROOT

SCRIPTS = ["prepare_kailuan_npz", "train_bp", "predict_bp", "plot_results",
           "make_synthetic_cohort", "demo"] + sorted(
    f"benchmarks.{os.path.basename(p)[:-3]}" for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


def _parser(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    return importlib.import_module(name.split(".")[-1]).get_args_parser()


def test_there_is_a_parser_per_script():
    assert len(SCRIPTS) >= 13
    assert "benchmarks.gpu_check" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_shows_its_default(name):
    parser = _parser(name)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{name}: {flag} has no help text"
        shown = formatter._get_help_string(action)
        if action.required or action.default is None:
            assert "%(default)" not in shown, f"{name}: {flag} shows a default it has not"
        else:
            assert "%(default)" in shown, f"{name}: {flag} hides its default"
    assert "(default: None)" not in parser.format_help()


def test_required_flags_show_no_default_and_machine_defaults_say_so():
    text = " ".join(_parser("train_bp").format_help().split())
    assert "--epochs EPOCHS passes over the train split (fewer with --patience) (default: 40)" in text
    assert "--npz_dir NPZ_DIR folder of <ssoid>.npz from prepare_kailuan_npz.py --labels_csv" in text
    assert f"(default: min(4, CPU cores), {min(4, os.cpu_count() or 1)} here)" in text
    prep = " ".join(_parser("prepare_kailuan_npz").format_help().split())
    assert "(default: 7500)" in prep and f"min(8, CPU cores), {min(8, os.cpu_count() or 1)} here" in prep


def test_help_runs_as_a_command():
    res = subprocess.run([sys.executable, "predict_bp.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--batch_size BATCH_SIZE" in res.stdout
    assert "records per forward pass (memory grows with it) (default: 64)" in " ".join(res.stdout.split())


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    monkeypatch.setattr(utils, "LOG_EVERY_S", 0.0)
    log = io.StringIO()  # not a terminal
    for _ in utils.progress(range(5), desc="epoch 1 train", unit="batch", leave=False, file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines and all(ln.startswith("epoch 1 train: ") for ln in lines)
    assert lines[-1].startswith("epoch 1 train: 100%") and "5/5" in lines[-1]


def test_short_work_in_a_log_file_prints_no_progress_at_all():
    log = io.StringIO()
    with utils.progress(total=3, desc="predict", file=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""
