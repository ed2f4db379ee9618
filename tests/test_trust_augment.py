"""Issue 19 (trust fixes) on the model inputs: npz checks that say what is wrong with a file
(a missing signal, a missing array, a file that is no npz)."""
import os

import numpy as np
import pytest

import dataset
import train_bp
from conftest import error_line, prepared_cohort
from utils import UserError, run_cli

TARGETS = ["right_arm_sbp", "right_arm_dbp"]


# ----------------------------------------------------------------------------- npz checks (16, 17)
def _save(folder, name, **arrays):
    np.savez(os.path.join(folder, f"{name}.npz"), **arrays)


def test_each_unreadable_npz_says_what_is_missing_or_wrong(tmp_path):
    x = np.ones((20, 2), np.float32)
    _save(tmp_path, "two", a=x, b=x)
    _save(tmp_path, "obj", x=np.array([1, "a", None], dtype=object))
    np.save(tmp_path / "bare.npy", x)
    os.rename(tmp_path / "bare.npy", tmp_path / "bare.npz")
    (tmp_path / "text.npz").write_text("ssoid,sbp\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    reasons = {name: dataset._inspect(str(tmp_path / f"{name}.npz"))[1]
               for name in ("two", "obj", "bare", "text", "empty")}
    assert reasons == {"two": "no array 'x' (holds: a, b)",
                       "obj": "array 'x' is a pickled object array (refused)",
                       "bare": "a bare .npy array, not an npz file",
                       "text": "not an npz/zip file", "empty": "empty file"}


def test_an_all_nan_column_is_a_missing_signal_and_a_partial_one_is_bad_values(tmp_path):
    x = np.ones((20, 2), np.float32)
    x[:, 0] = np.nan
    _save(tmp_path, "ppg_only", x=x)
    x = np.ones((20, 2), np.float32)
    x[[2, 5], 0] = np.inf
    _save(tmp_path, "two_bad", x=x)
    assert dataset._inspect(str(tmp_path / "ppg_only.npz"))[1] == \
        "the ECG column is all NaN (no ECG signal)"
    assert dataset._inspect(str(tmp_path / "two_bad.npz"))[1] == \
        "non-finite values in the ECG column (2 of 20 samples)"
    assert dataset._inspect(str(tmp_path / "two_bad.npz"), [1]) == (20, "")


@pytest.fixture(scope="module")
def copied_without_manifest(tmp_path_factory):
    """A prepared cohort whose ECG is all NaN, copied without prep's manifest (`cp *.npz`)."""
    base = tmp_path_factory.mktemp("no_manifest")
    cohort = prepared_cohort(base, 8, 2, seed=5, target_cols=TARGETS, seq_len=300)
    folder = base / "copied"
    folder.mkdir()
    for name in os.listdir(cohort["npz"]):
        if name.endswith(".npz"):
            x = dataset.load_x(os.path.join(cohort["npz"], name))
            x[:, 0] = np.nan
            np.savez(folder / name, x=x)
    return {"npz": str(folder), "labels": cohort["labels"]}


def _train_argv(cohort, out, modality):
    return ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--out_dir",
            str(out), "--target_cols", *TARGETS, "--arch", "tiny", "--epochs", "1",
            "--batch_size", "8", "--num_workers", "0", "--val_ratio", "0.25",
            "--test_ratio", "0.25", "--modality", modality]


def test_a_ppg_only_folder_without_its_manifest_names_the_modality_to_use(
        copied_without_manifest, tmp_path, capsys):
    out = tmp_path / "both"
    assert run_cli(train_bp.main, _train_argv(copied_without_manifest, out, "both")) == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"error: --npz_dir {copied_without_manifest['npz']}: the ECG column is all "
                    f"NaN in every file (a PPG-only folder copied without its manifest "
                    f".prepare_kailuan_npz.json?): use --modality ppg")
    assert not out.exists()
    ids = [f[:-4] for f in sorted(os.listdir(copied_without_manifest["npz"]))]
    with pytest.raises(UserError, match="use --modality ppg"):
        dataset.check_records(ids, copied_without_manifest["npz"])


def test_modality_ppg_trains_on_a_ppg_only_folder_without_its_manifest(
        copied_without_manifest, tmp_path):
    out = tmp_path / "ppg"
    train_bp.main(_train_argv(copied_without_manifest, out, "ppg"))
    assert open(out / "skipped_records.csv").read().strip() == "ssoid,path,reason"
    assert (out / "bp_best.pth").is_file()
