"""Trust fixes of predict_bp.py (issue 19): a new record of a subject the run saw is not
``new``, a renamed copy of a run's record is found by its signal digest, labels that match
no record are one line, and the time-base flags speak of prediction."""
import json
import os
import shutil
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import predict_bp
import prepare_kailuan_npz as prep
import train_bp
import utils
from conftest import error_line
from test_predict import trained  # noqa: F401 - a fixture
from test_timebase import FS_ECG, FS_PPG, TARGET_FS, prep_argv, vlen_h5  # noqa: F401
from test_train import TARGETS, cohort, train_argv  # noqa: F401 - cohort is a fixture

SEEN_REASON = {"train_subject": "subject in the run's train split: not an unseen-subject estimate",
               "val_subject": "subject in the run's val split",
               "test_subject": "subject in the run's test split"}


def run_split(trained):  # noqa: F811
    return pd.read_csv(trained["run"] / "split.csv", dtype=str)


def new_windows(cohort, base, rename, digest=lambda d: "other_" + d, extra=None):  # noqa: F811
    """A copy of the cohort under ids ``rename(ssoid)`` (stand-ins for new windows of the
    same people: other recordings, so other digests), plus the ``extra`` labels rows with
    the npz of the first record; returns the npz folder and the labels CSV."""
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str, "signal_digest": str})
    npz = base / "npz"
    npz.mkdir()
    new = labels.assign(ssoid=labels["ssoid"].map(rename),
                        signal_digest=labels["signal_digest"].map(digest))
    for old_id, new_id in zip(labels["ssoid"], new["ssoid"]):
        shutil.copy(os.path.join(cohort["npz"], f"{old_id}.npz"), npz / f"{new_id}.npz")
    if extra is not None:
        for new_id in extra["ssoid"]:
            shutil.copy(os.path.join(cohort["npz"], f"{labels['ssoid'][0]}.npz"),
                        npz / f"{new_id}.npz")
        new = pd.concat([new, extra])
    new.to_csv(base / "labels.csv", index=False)
    return str(npz), str(base / "labels.csv")


def test_checkpoint_keeps_each_records_subject_and_digest(trained, cohort):  # noqa: F811
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    split = run_split(trained)
    labels = pd.read_csv(cohort["labels"], dtype=str).set_index("ssoid")
    for name, part in split.groupby("split"):
        assert ckpt["split_ids"][name] == part["ssoid"].tolist()
        assert ckpt["split_subjects"][name] == part["subject_id"].tolist()
        assert ckpt["split_digests"][name] == labels.loc[part["ssoid"], "signal_digest"].tolist()


def test_new_windows_of_the_runs_subjects_are_reported_apart_from_new_subjects(
        trained, cohort, tmp_path, capsys):  # noqa: F811
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    strangers = labels.iloc[:3].assign(ssoid=["stranger_1", "stranger_2", "nobody_1"],
                                       signal_digest=["s1", "s2", "n1"])
    npz, csv = new_windows(cohort, tmp_path, lambda s: s + "w5", extra=strangers)
    out = tmp_path / "p.csv"
    capsys.readouterr()
    predict_bp.main(["--checkpoint", trained["ckpt"], "--npz_dir", npz, "--labels_csv", csv,
                     "--output", str(out)])
    lines = capsys.readouterr().out.splitlines()
    pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    subject_split = run_split(trained).groupby("subject_id")["split"].first()
    expected = [f"{subject_split[s.split('_')[0]]}_subject" for s in labels["ssoid"]]
    assert pred.loc[labels["ssoid"] + "w5", "split"].tolist() == expected
    assert pred.loc[strangers["ssoid"], "split"].tolist() == ["new"] * 3
    report = json.load(open(tmp_path / "p_metrics.json"))
    assert list(report) == ["target_cols", "new", "test_subject", "val_subject", "train_subject"]
    for name in list(report)[1:]:
        part = pred[pred["split"] == name]
        assert report[name]["n_records"] == len(part) == (
            3 if name == "new" else expected.count(name))
        for t in TARGETS:
            assert report[name]["per_target"][t]["mae"] == pytest.approx(
                (part[f"{t}_pred"] - part[f"{t}_true"]).abs().mean(), rel=1e-12)
    assert lines[1] == (f"new: MAE mean {report['new']['mean']['mae']:.2f} mmHg over 3 "
                        f"labelled records (subjects the checkpoint's run never saw)")
    for line, name in zip(lines[2:5], ("test_subject", "val_subject", "train_subject")):
        assert line.startswith(f"{name}: MAE mean ") and SEEN_REASON[name] in line
        assert f"over {report[name]['n_records']} labelled" in line
    assert not any(ln.startswith("warning:") for ln in lines)


def test_the_labels_subject_id_finds_the_subject_of_an_unrelated_id(trained, cohort,
                                                                    tmp_path):  # noqa: F811
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    renamed = {s: f"window{k:03d}" for k, s in enumerate(labels["ssoid"])}
    npz, csv = new_windows(cohort, tmp_path, renamed.get)
    table = pd.read_csv(csv, dtype=str)
    table.insert(1, "subject_id", labels["ssoid"].str.split("_").str[0])
    table.to_csv(csv, index=False)
    out = tmp_path / "p.csv"
    predict_bp.main(["--checkpoint", trained["ckpt"], "--npz_dir", npz, "--labels_csv", csv,
                     "--output", str(out)])
    pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    subject_split = run_split(trained).groupby("subject_id")["split"].first()
    assert pred.loc[list(renamed.values()), "split"].tolist() == [
        f"{subject_split[s.split('_')[0]]}_subject" for s in renamed]


def test_a_renamed_copy_is_found_by_its_signal_digest(trained, cohort, tmp_path,
                                                      capsys):  # noqa: F811
    npz, csv = new_windows(cohort, tmp_path, lambda s: "copy" + s.replace("_", "x"),
                           digest=lambda d: d)
    out = tmp_path / "p.csv"
    capsys.readouterr()
    predict_bp.main(["--checkpoint", trained["ckpt"], "--npz_dir", npz, "--labels_csv", csv,
                     "--output", str(out)])
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    split = run_split(trained)
    assert pred.loc["copy" + split["ssoid"].str.replace("_", "x"), "split"].tolist() == \
        split["split"].tolist()
    assert notes == [f"note: {len(split)} records are renamed copies of the run's records "
                     f"(same signal_digest, other ssoid): each is counted in that record's split"]


def test_h5_rows_under_new_ids_are_found_by_the_digest_of_their_raw_signals(
        trained, cohort, tmp_path):  # noqa: F811
    h5 = tmp_path / "renamed.h5"
    shutil.copy(cohort["h5"], h5)
    with h5py.File(h5, "r+") as f:
        old = [v.decode() if isinstance(v, bytes) else str(v) for v in f["metadata/new_id"][:]]
        del f["metadata/new_id"]
        f["metadata/new_id"] = np.array([f"r{k}" for k in range(len(old))], dtype="S")
    out = tmp_path / "p.csv"
    predict_bp.main(["--checkpoint", trained["ckpt"], "--h5_path", str(h5), "--output", str(out)])
    pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
    split = run_split(trained).set_index("ssoid")["split"]
    assert pred.loc[[f"r{k}" for k in range(len(old))], "split"].tolist() == \
        split.loc[old].tolist()


def older_checkpoint(trained, folder):  # noqa: F811
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    for key in ("split_subjects", "split_digests"):  # as saved before they were kept
        del ckpt[key]
    path = folder / "old.pth"
    torch.save(ckpt, path)
    return str(path)


def test_an_older_checkpoint_takes_subjects_from_its_split_csv_or_says_it_cannot(
        trained, cohort, tmp_path, capsys):  # noqa: F811
    npz, csv = new_windows(cohort, tmp_path, lambda s: s + "w5")
    beside = tmp_path / "run"
    shutil.copytree(trained["run"], beside)
    alone = tmp_path / "alone"
    alone.mkdir()
    results = {}
    for name, folder in (("beside", beside), ("alone", alone)):
        out = tmp_path / f"{name}.csv"
        capsys.readouterr()
        predict_bp.main(["--checkpoint", older_checkpoint(trained, folder), "--npz_dir", npz,
                         "--labels_csv", csv, "--output", str(out)])
        results[name] = (pd.read_csv(out)["split"], capsys.readouterr().out.splitlines())
    splits, lines = results["beside"]
    assert set(splits) == {"train_subject", "val_subject", "test_subject"}
    assert not any(ln.startswith("warning:") for ln in lines)
    splits, lines = results["alone"]
    assert set(splits) == {"new"}
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert warnings == [f"warning: {len(splits)} records new to the run cannot be checked for "
                        f"a subject it saw (the checkpoint predates the record of its subjects "
                        f"and no split.csv lies beside it): 'new' counts them unchecked"]
    assert any(ln.startswith("new: ") and ln.endswith(
        "(records the checkpoint's run never saw; their subjects could not be checked)")
        for ln in lines)


@pytest.fixture(scope="module")
def person_run(cohort, tmp_path_factory):  # noqa: F811
    """A run whose subjects come from a labels column (--subject_col person) that pairs
    the synthetic subjects two by two, so the ssoid prefix is not the run's rule."""
    base = tmp_path_factory.mktemp("person")
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    prefix = labels["ssoid"].str.split("_").str[0]
    labels.insert(1, "person", "p" + (prefix.astype(int) // 2).astype(str))
    labels.to_csv(base / "labels.csv", index=False)
    argv = train_argv(cohort, base / "run", "--epochs", "1", "--subject_col", "person")
    argv[argv.index("--labels_csv") + 1] = str(base / "labels.csv")
    train_bp.main(argv)
    return {"run": base / "run", "labels": labels}


def test_subjects_follow_the_runs_subject_column(person_run, cohort, tmp_path,
                                                 capsys):  # noqa: F811
    npz, csv = new_windows(cohort, tmp_path, lambda s: s + "w5")
    table = pd.read_csv(csv, dtype=str)
    with_person = tmp_path / "with_person.csv"
    table.assign(person=person_run["labels"]["person"].to_numpy()).to_csv(with_person,
                                                                          index=False)
    ckpt = str(person_run["run"] / "bp_best.pth")
    person_split = pd.read_csv(person_run["run"] / "split.csv", dtype=str) \
        .groupby("subject_id")["split"].first()
    out = tmp_path / "a.csv"
    predict_bp.main(["--checkpoint", ckpt, "--npz_dir", npz, "--labels_csv", str(with_person),
                     "--output", str(out)])
    assert pd.read_csv(out)["split"].tolist() == [
        f"{person_split[p]}_subject" for p in person_run["labels"]["person"]]
    capsys.readouterr()
    predict_bp.main(["--checkpoint", ckpt, "--npz_dir", npz, "--labels_csv", csv,
                     "--output", str(tmp_path / "b.csv")])
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: {len(table)} records new to the run cannot be checked for "
                        f"a subject it saw (the run took its subjects from column person, and "
                        f"--labels_csv has no person value): 'new' counts them unchecked"]


# ----------------------------------------------------------------------------- item 9
@pytest.fixture(scope="module")
def cov_ckpt(cohort, tmp_path_factory):  # noqa: F811
    """A model that takes the covariate ``age`` from the labels CSV."""
    base = tmp_path_factory.mktemp("cov")
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    labels["age"] = np.random.default_rng(0).uniform(30, 80, len(labels)).round()
    labels.to_csv(base / "labels.csv", index=False)
    argv = train_argv(cohort, base / "run", "--epochs", "1", "--covariates", "age")
    argv[argv.index("--labels_csv") + 1] = str(base / "labels.csv")
    train_bp.main(argv)
    return {"ckpt": str(base / "run" / "bp_best.pth"), "labels": labels}


def _cli(capsys, argv):
    """Exit status and stderr of predict_bp.py's entry point, run in this process."""
    capsys.readouterr()
    code = utils.run_cli(predict_bp.main, argv)
    return code, capsys.readouterr().err


def test_labels_that_match_no_record_are_one_line_errors(trained, cov_ckpt, cohort, tmp_path,
                                                         capsys):  # noqa: F811
    foreign = cov_ckpt["labels"].assign(ssoid="other" + cov_ckpt["labels"]["ssoid"])
    foreign.to_csv(tmp_path / "foreign.csv", index=False)
    first = sorted(f for f in os.listdir(cohort["npz"]) if f.endswith(".npz"))[0][:-4]
    out = tmp_path / "p.csv"
    for ckpt in (trained["ckpt"], cov_ckpt["ckpt"]):
        for source in (["--npz_dir", cohort["npz"]], ["--h5_path", cohort["h5"]]):
            code, err = _cli(capsys, ["--checkpoint", ckpt, *source, "--labels_csv",
                                      str(tmp_path / "foreign.csv"), "--output", str(out)])
            assert code == 2 and error_line(err) == (
                f"error: --labels_csv {tmp_path / 'foreign.csv'}: none of its "
                f"{len(foreign)} ssoids is a record of {source[0]} {source[1]} (e.g. "
                f"'{foreign['ssoid'].iloc[0]}' vs '{first}'); give the labels of "
                f"these records"), (ckpt, source, err)
            assert not out.exists()
    # a covariate model whose labelled records are all unusable files
    npz = tmp_path / "npz"
    npz.mkdir()
    shutil.copy(os.path.join(cohort["npz"], f"{first}.npz"), npz / "unlabelled_1.npz")
    (npz / f"{first}.npz").write_bytes(b"not an npz")
    code, err = _cli(capsys, ["--checkpoint", cov_ckpt["ckpt"], "--npz_dir", str(npz),
                              "--labels_csv", str(tmp_path / "foreign.csv"), "--output", str(out)])
    assert code == 2 and "none of its" in error_line(err)
    cov_ckpt["labels"].to_csv(tmp_path / "own.csv", index=False)
    code, err = _cli(capsys, ["--checkpoint", cov_ckpt["ckpt"], "--npz_dir", str(npz),
                              "--labels_csv", str(tmp_path / "own.csv"), "--output", str(out)])
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: --npz_dir {npz}: no usable record has a row "
                                         f"in --labels_csv {tmp_path / 'own.csv'} (first "
                                         f"skipped: {first}: ")
    assert not out.exists()


def test_labels_for_some_records_warn_with_the_counts(trained, cov_ckpt, cohort, tmp_path,
                                                      capsys):  # noqa: F811
    labels = cov_ckpt["labels"]
    part = pd.concat([labels.iloc[:10], labels.iloc[:5].assign(ssoid=lambda f: "x" + f["ssoid"])])
    part.to_csv(tmp_path / "part.csv", index=False)
    n = len(labels)
    cases = [(trained["ckpt"], ["--npz_dir", cohort["npz"]], "no truth, left out of the metrics"),
             (trained["ckpt"], ["--h5_path", cohort["h5"]], "no truth, left out of the metrics"),
             (cov_ckpt["ckpt"], ["--npz_dir", cohort["npz"]],
              "skipped: the model needs their covariates")]
    for k, (ckpt, source, fate) in enumerate(cases):
        out = tmp_path / f"p{k}.csv"
        capsys.readouterr()
        predict_bp.main(["--checkpoint", ckpt, *source, "--labels_csv", str(tmp_path / "part.csv"),
                         "--output", str(out)])
        warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning")]
        assert warnings == [f"warning: --labels_csv {tmp_path / 'part.csv'}: {n - 10} of the {n} "
                            f"records of {source[0]} {source[1]} have no row ({fate}); 5 of its "
                            f"15 ssoids match no record"]
        pred = pd.read_csv(out, dtype={"ssoid": str}).set_index("ssoid")
        assert len(pred) == (10 if ckpt == cov_ckpt["ckpt"] else n)
        assert pred[f"{TARGETS[0]}_true"].notna().sum() == 10
        report = json.load(open(tmp_path / f"p{k}_metrics.json"))
        assert sum(block["n_records"] for name, block in report.items()
                   if name != "target_cols") == 10


# ----------------------------------------------------------------------------- item 18
def test_time_base_help_speaks_of_prediction_not_of_prep():
    text = " ".join(predict_bp.get_args_parser().format_help().split())
    assert "manifest" not in text and "--target_seq_len" not in text
    assert ("--record_seconds RECORD_SECONDS time span of every HDF5 row in seconds (rows of "
            "one duration): each row is resampled to the checkpoint's record length, which "
            "must make the checkpoint's sampling rate (record length / record_seconds)") in text
    assert ("--fs_ecg FS_ECG native sampling rate of the ECG rows in Hz (with --fs_ppg; with "
            "--ppg_key none, alone): each row is resampled to the checkpoint's sampling rate "
            "and cut or padded to its record length") in text
    assert ("--target_fs TARGET_FS not needed: with --fs_ecg/--fs_ppg the rows are resampled "
            "to the checkpoint's sampling rate; another value is refused") in text


def test_target_fs_other_than_the_checkpoints_rate_is_refused(vlen_h5, trained, tmp_path,
                                                              capsys):  # noqa: F811
    rates = ["--fs_ecg", str(FS_ECG), "--fs_ppg", str(FS_PPG)]
    prep.main(prep_argv(vlen_h5, tmp_path, *rates, "--target_fs", str(TARGET_FS)))
    train_bp.main(["--npz_dir", str(tmp_path / "npz"), "--labels_csv", str(tmp_path / "labels.csv"),
                   "--out_dir", str(tmp_path / "run"), "--target_cols", "sbp", "--arch", "tiny",
                   "--epochs", "1", "--batch_size", "4", "--num_workers", "0"])
    ckpt = str(tmp_path / "run" / "bp_best.pth")
    out = tmp_path / "p.csv"
    base = ["--h5_path", vlen_h5, "--output", str(out), *rates]
    for argv, line in (
            (["--checkpoint", ckpt, "--target_fs", "500"],
             f"error: --target_fs 500: the model in {ckpt} was trained on records at 100 Hz, "
             f"and the rows are resampled to that rate; leave --target_fs out"),
            (["--checkpoint", trained["ckpt"]],
             f"error: the model in {trained['ckpt']} records no sampling rate (its records "
             f"were prepared without --record_seconds or --fs_ecg/--fs_ppg): leave those "
             f"flags out")):
        capsys.readouterr()
        assert utils.run_cli(predict_bp.main, [*argv, *base]) == 2
        assert error_line(capsys.readouterr().err) == line
    assert not out.exists()
    predict_bp.main(["--checkpoint", ckpt, "--target_fs", str(TARGET_FS), *base])
    assert len(pd.read_csv(out)) == 12
