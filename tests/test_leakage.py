"""Leakage a user cannot see (issue 14): subjects from several metadata fields, the same
recording stored under two ids, records per subject in the summaries, the one-record-subjects
warning, split_audit.json, and the refusal of a split that separates two copies of one
recording."""
import hashlib
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest

import make_synthetic_cohort as msc
import prepare_kailuan_npz as prep
import train_bp
import utils
from conftest import error_line
from utils import run_cli

TARGET = "right_arm_sbp"
SEQ = 200
SEQ_TRAIN = 400  # the tiny Net1D's input in tests/test_train.py


def prep_argv(h5, out, *extra, seq=SEQ):
    return ["--h5_path", str(h5), "--target_cols", TARGET, "--output_npz", str(out / "npz"),
            "--output_csv", str(out / "labels.csv"), "--target_seq_len", str(seq),
            "--workers", "1", *extra]


def read_rejected(out):
    return pd.read_csv(out / "labels_rejected.csv", dtype=str, keep_default_na=False)


def read_labels(out):
    return pd.read_csv(out / "labels.csv", dtype={"ssoid": str, "subject_id": str})


def npz_ids(out):
    return sorted(f[:-4] for f in os.listdir(out / "npz") if f.endswith(".npz"))


def ids_of(h5):
    with h5py.File(h5) as f:
        return [v.decode() for v in f["metadata/new_id"][:]]


def copy_signals(h5, pairs, as_float32=False):
    """Overwrite row ``dst``'s ECG and PPG with row ``src``'s for each (src, dst)."""
    with h5py.File(h5, "a") as f:
        for src, dst in pairs:
            for key in ("signals/ecg", "signals/ppg"):
                row = f[key][src]
                f[key][dst] = row.astype(np.float32) if as_float32 else row


def independent_digest(ecg, ppg):
    raw = np.asarray(ecg, "<f4").tobytes() + np.asarray(ppg, "<f4").tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


# ----------------------------------------------------------------------------- subjects
@pytest.fixture(scope="module")
def people(tmp_path_factory):
    """6 persons x 3 records; row 7 lost its age (NaN) and row 10 its name (empty)."""
    base = tmp_path_factory.mktemp("people")
    h5 = base / "c.h5"
    msc.make_cohort(str(h5), n_subjects=6, records_per_subject=3, seed=5)
    with h5py.File(h5, "a") as f:
        age = f["metadata/age"][:].astype(np.float64)
        age[7] = np.nan
        del f["metadata/age"]
        f["metadata/age"] = age
        f["metadata/name"][10] = b""
        meta = {k: f["metadata"][k][:] for k in ("name", "age", "sex", "uid")}
    return {"h5": h5, "base": base, "meta": meta, "ids": ids_of(h5)}


def test_several_key_fields_give_a_stable_hash_and_no_name(people, tmp_path, capsys):
    prep.main(prep_argv(people["h5"], tmp_path, "--subject_key", "name", "age", "sex"))
    out = capsys.readouterr().out
    labels, meta, ids = read_labels(tmp_path), people["meta"], people["ids"]
    assert list(labels.columns) == ["ssoid", "subject_id", TARGET, "signal_digest"]
    assert list(labels["ssoid"]) == ids  # every record kept, unknown subjects too
    for row, sid in enumerate(labels["subject_id"]):
        if row in (7, 10):
            assert sid == f"unknown_{ids[row]}"
            continue
        text = f"{meta['name'][row].decode()}\x1f{int(meta['age'][row])}\x1f{meta['sex'][row]}"
        assert sid == hashlib.blake2b(text.lower().encode(), digest_size=6).hexdigest()
    known = labels.drop(index=[7, 10])
    assert known.groupby(meta["uid"][known.index])["subject_id"].nunique().eq(1).all()
    assert known["subject_id"].nunique() == 6
    assert "name_" not in (tmp_path / "labels.csv").read_text()
    # 6 persons (two with 2 known records) + 2 unknown: counts 3,3,3,3,2,2,1,1
    assert ("subjects (subject_id from --subject_key name age sex): 8; records per subject "
            "min 1 / median 2.5 / max 3; 2 subjects with one record") in out
    assert (f"unknown subjects (a --subject_key value is missing; each record is kept as its "
            f"own subject unknown_<id>): 2: {ids[7]}, {ids[10]}") in out
    settings = json.load(open(tmp_path / "labels_prepare.json"))
    assert settings["subject_key"] == ["name", "age", "sex"]
    assert settings["subject_rule"].startswith("subject_id = blake2b-48 hash of the normalised "
                                               "values of name, age, sex")
    again = tmp_path / "again"
    again.mkdir()
    prep.main(prep_argv(people["h5"], again, "--subject_key", "name", "age", "sex"))
    assert (again / "labels.csv").read_text() == (tmp_path / "labels.csv").read_text()


def test_key_values_are_normalised_before_hashing():
    assert prep.subject_hash([" Name_1 ", "63", "1"]) == prep.subject_hash(["name_1", "63", "1"])
    assert prep.subject_hash(["a", "63"]) != prep.subject_hash(["a", "64"])
    assert len(prep.subject_hash(["a", "63"])) == 12
    assert [prep.key_text(v) for v in (np.float32(63.0), np.int64(63), np.float64(63.5),
                                       np.float32(63.1), "Ann ", np.float64(np.nan), "", "  ")] \
        == ["63", "63", "63.5", "63.1", "Ann ", None, None, None]
    subjects, unknown = prep.subject_ids([["x", "", "y"], np.array([1.0, 2.0, np.nan])],
                                         ["r0", "r1", "r2"])
    assert subjects[1:] == ["unknown_r1", "unknown_r2"] and unknown == [False, True, True]
    assert subjects[0] == prep.subject_hash(["x", "1"])


def test_one_key_field_is_its_value_and_a_missing_one_is_unknown(people, tmp_path, capsys):
    prep.main(prep_argv(people["h5"], tmp_path, "--subject_key", "name"))
    out = capsys.readouterr().out
    labels, ids = read_labels(tmp_path), people["ids"]
    expected = [f"unknown_{ids[r]}" if r == 10 else v.decode()
                for r, v in enumerate(people["meta"]["name"])]
    assert list(labels["subject_id"]) == expected
    assert f"own subject unknown_<id>): 1: {ids[10]}" in out
    assert json.load(open(tmp_path / "labels_prepare.json"))["subject_key"] == "name"


def test_subject_key_errors(people, tmp_path, capsys):
    for extra, needle in ((["--subject_key", "age", "age"], "--subject_key names a field twice"),
                          (["--subject_key", "name", "height"],
                           "--subject_key: metadata/height does not exist"),
                          (["--extra_cols", "signal_digest"],
                           "column signal_digest would appear twice")):
        assert run_cli(prep.main, prep_argv(people["h5"], tmp_path, *extra)) == 2
        assert needle in error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- duplicates
@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """6 persons x 3 records (float32): row 2 repeats row 0 (the same person), row 4 repeats
    row 1 (another person's record)."""
    base = tmp_path_factory.mktemp("copies")
    h5 = base / "c.h5"
    msc.make_cohort(str(h5), n_subjects=6, records_per_subject=3, seed=6)
    copy_signals(h5, [(0, 2), (1, 4)])
    return {"h5": h5, "ids": ids_of(h5)}


def test_exact_copies_are_rejected_with_the_id_they_repeat(copies, tmp_path, capsys):
    prep.main(prep_argv(copies["h5"], tmp_path, "--subject_key", "uid"))
    out = capsys.readouterr().out
    ids, rej = copies["ids"], read_rejected(tmp_path)
    assert list(rej.columns) == ["row", "id", "reason", "duplicate_of"]
    assert rej.values.tolist() == [["2", ids[2], "duplicate_signal", ids[0]],
                                   ["4", ids[4], "duplicate_signal", ids[1]]]
    assert npz_ids(tmp_path) == sorted(set(ids) - {ids[2], ids[4]})
    labels = read_labels(tmp_path)
    assert list(labels["ssoid"]) == [i for r, i in enumerate(ids) if r not in (2, 4)]
    assert labels["signal_digest"].is_unique
    with h5py.File(copies["h5"]) as f:
        expected = [independent_digest(f["signals/ecg"][r], f["signals/ppg"][r])
                    for r in range(len(ids)) if r not in (2, 4)]
    assert list(labels["signal_digest"]) == expected
    assert "18 records: 16 written (0 already there), 2 rejected" in out
    assert "rejected duplicate_signal: 2" in out
    assert "same recording, different subject: 1 (" in out  # row 4; row 2 is the same person
    assert "subjects (subject_id from --subject_key uid): 6; records per subject min 2 / " \
           "median 3 / max 3; 0 subjects with one record" in out


def test_without_subject_key_duplicates_are_not_compared_by_subject(copies, tmp_path, capsys):
    prep.main(prep_argv(copies["h5"], tmp_path))
    out = capsys.readouterr().out
    assert "rejected duplicate_signal: 2" in out and "different subject" not in out
    assert "subjects (id part before the first '_', no --subject_key): 6;" in out


def test_float64_copy_of_float32_samples_is_a_duplicate(tmp_path, capsys):
    h5 = tmp_path / "c.h5"
    msc.make_cohort(str(h5), n_subjects=3, records_per_subject=2, seed=7, dtype="float64")
    copy_signals(h5, [(3, 5)], as_float32=True)  # row 5: row 3 rounded to float32
    with h5py.File(h5) as f:
        ecg = f["signals/ecg"][:]
    assert ecg.dtype == np.float64 and not np.array_equal(ecg[3], ecg[5])
    np.testing.assert_array_equal(ecg[3].astype(np.float32), ecg[5].astype(np.float32))
    prep.main(prep_argv(h5, tmp_path))
    ids = ids_of(h5)
    assert read_rejected(tmp_path).values.tolist() == [["5", ids[5], "duplicate_signal", ids[3]]]
    a, b = np.sin(np.arange(50.0)).astype(np.float32), np.cos(np.arange(60.0)).astype(np.float32)
    assert prep.signal_digest(a, b) == prep.signal_digest(a.astype(np.float64),
                                                          b.astype(np.float64))
    assert prep.signal_digest(a, b) == independent_digest(a, b)
    assert prep.signal_digest(a, b) != prep.signal_digest(b, a)


def test_rerun_finds_the_same_duplicates_also_when_the_copy_was_written(copies, tmp_path,
                                                                       capsys):
    argv = prep_argv(copies["h5"], tmp_path, "--subject_key", "uid", "--workers", "2")
    prep.main(argv)
    first = {n: (tmp_path / n).read_text() for n in ("labels.csv", "labels_rejected.csv")}
    ids = copies["ids"]
    npz = tmp_path / "npz"
    stamps = {f: os.stat(npz / f).st_mtime_ns for f in os.listdir(npz) if f.endswith(".npz")}
    # as if a killed run had written the copy's npz before the duplicate check
    (npz / f"{ids[4]}.npz").write_bytes((npz / f"{ids[1]}.npz").read_bytes())
    (tmp_path / "labels_rejected.csv").write_text("row,id,reason\n")  # an older file's header
    capsys.readouterr()
    prep.main(argv)
    out = capsys.readouterr().out
    assert "18 records: 16 written (16 already there), 2 rejected" in out
    assert "same recording, different subject: 1 (" in out
    assert {n: (tmp_path / n).read_text() for n in first} == first
    assert npz_ids(tmp_path) == sorted(set(ids) - {ids[2], ids[4]})
    assert {f: os.stat(npz / f).st_mtime_ns for f in stamps} == stamps  # not rewritten


# ----------------------------------------------------------------------------- training
def train_argv(cohort, out_dir, *extra):
    return ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--out_dir",
            str(out_dir), "--target_cols", TARGET, "--arch", "tiny", "--epochs", "1",
            "--batch_size", "8", "--num_workers", "0", "--val_ratio", "0.2",
            "--test_ratio", "0.2", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def int_ids(tmp_path_factory):
    """12 persons x 2 records with integer ids (no '_'), prepared without --subject_key
    and with uid as an extra column."""
    base = tmp_path_factory.mktemp("int_ids")
    h5 = base / "c.h5"
    msc.make_cohort(str(h5), n_subjects=12, records_per_subject=2, seed=8, id_type="int")
    prep.main(prep_argv(h5, base, "--extra_cols", "uid", seq=SEQ_TRAIN))
    return {"npz": str(base / "npz"), "labels": str(base / "labels.csv"), "base": base}


def _check_audit_against_split(audit, split):
    for name in ("train", "val", "test"):
        part = split[split["split"] == name]
        counts = part["subject_id"].value_counts()
        assert audit["splits"][name] == {
            "records": len(part), "subjects": len(counts),
            "records_per_subject": {"min": int(counts.min()), "median": float(counts.median()),
                                    "max": int(counts.max())},
            "one_record_subjects": int((counts == 1).sum())}
    assert audit["records"] == len(split)
    assert audit["subjects"] == split["subject_id"].nunique()
    assert audit["subjects_in_several_splits"] == 0


def test_subject_col_picks_the_person_and_the_audit_describes_the_split(int_ids, tmp_path,
                                                                      capsys):
    out_dir = tmp_path / "run"
    train_bp.main(train_argv(int_ids, out_dir, "--subject_col", "uid"))
    out = capsys.readouterr().out
    assert "subjects: column uid of the labels CSV (--subject_col)\n" in out
    assert "exactly one record" not in out
    split = pd.read_csv(out_dir / "split.csv", dtype=str)
    labels = pd.read_csv(int_ids["labels"], dtype=str).set_index("ssoid")
    assert list(split["subject_id"]) == list(labels.loc[split["ssoid"], "uid"])
    audit = json.load(open(out_dir / "split_audit.json"))
    _check_audit_against_split(audit, split)
    assert audit["subject_rule"] == "column uid of the labels CSV (--subject_col)"
    assert (audit["records"], audit["subjects"]) == (24, 12)
    assert audit["records_per_subject"] == {"min": 2, "median": 2.0, "max": 2}
    assert audit["one_record_subjects_only"] is False and audit["one_record_subjects"] == 0
    assert audit["digest_check"] == "passed" and audit["records_sharing_a_digest"] == 0


def test_one_record_per_subject_is_a_warning_naming_the_rule_and_flags(int_ids, tmp_path,
                                                                      capsys):
    out_dir = tmp_path / "run"
    train_bp.main(train_argv(int_ids, out_dir))
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")
                and "one record" in ln]
    rule = ("the part of ssoid before the first '_' (the labels CSV has no subject_id column; "
            "set one with prepare's --subject_key, or name a column with --subject_col)")
    assert warnings == [
        f"warning: every subject has exactly one record (24 records / 24 subjects; subject = "
        f"{rule}): if a person has several records, they may sit in train and test. Name the "
        f"person with --subject_key at prep (e.g. --subject_key name age sex) or --subject_col "
        f"here; ignore this only if the cohort truly has one record per person"]
    audit = json.load(open(out_dir / "split_audit.json"))
    _check_audit_against_split(audit, pd.read_csv(out_dir / "split.csv", dtype=str))
    assert audit["subject_rule"] == rule
    assert audit["one_record_subjects_only"] is True and audit["one_record_subjects"] == 24
    assert audit["records_per_subject"] == {"min": 1, "median": 1.0, "max": 1}


def test_split_separating_two_copies_of_a_recording_is_refused(int_ids, tmp_path, capsys):
    labels = pd.read_csv(int_ids["labels"], dtype=str)
    labels["subject_id"] = labels["uid"]
    split = utils.split_subjects(labels["subject_id"], 0.2, 0.2, 3)
    a = labels.index[labels["subject_id"].map(split) == "train"][0]
    b = labels.index[labels["subject_id"].map(split) == "test"][0]
    labels.loc[b, "signal_digest"] = labels.loc[a, "signal_digest"]
    crafted = tmp_path / "labels.csv"
    labels.to_csv(crafted, index=False)
    out_dir = tmp_path / "run"
    cohort = {"npz": int_ids["npz"], "labels": str(crafted)}
    assert run_cli(train_bp.main, train_argv(cohort, out_dir)) == 2
    line = error_line(capsys.readouterr().err)
    ida, idb = labels.loc[a, "ssoid"], labels.loc[b, "ssoid"]
    assert line == (f"error: labels CSV {crafted}: records {ida} (train) and {idb} (test) hold "
                    f"the same recording (signal_digest {labels.loc[a, 'signal_digest']}) but "
                    f"fall in different splits; give them one subject (prepare's "
                    f"--subject_key, or --subject_col) or drop the copy")
    assert not out_dir.exists()


def test_split_audit_function_on_explicit_values():
    ids, subjects = ["a", "b", "c", "d", "e"], ["s1", "s1", "s2", "s3", "s4"]
    splits = ["train", "train", "val", "test", "train"]
    audit = train_bp.split_audit(ids, subjects, splits, "rule")
    assert audit["digest_check"] == "no signal_digest column"
    assert audit["records_per_subject"] == {"min": 1, "median": 1.0, "max": 2}
    assert (audit["subjects"], audit["one_record_subjects"]) == (4, 3)
    assert audit["one_record_subjects_only"] is False
    assert audit["splits"]["train"]["records_per_subject"] == {"min": 1, "median": 1.5, "max": 2}
    same_split = train_bp.split_audit(ids, subjects, splits, "rule", ["x", "y", "z", "w", "x"])
    assert same_split["digest_check"] == "passed"  # a and e: one recording, both in train
    assert same_split["records_sharing_a_digest"] == 2
    failed = train_bp.split_audit(ids, subjects, splits, "rule", ["x", np.nan, "z", "x", ""])
    assert failed["digest_check"] == "failed"
    assert failed["digest_conflicts"] == [{"digest": "x", "ids": ["a", "d"],
                                           "splits": ["train", "test"]}]


def test_subject_col_errors(int_ids, tmp_path, capsys):
    assert run_cli(train_bp.main, train_argv(int_ids, tmp_path / "r", "--subject_col",
                                             "person")) == 2
    assert error_line(capsys.readouterr().err).startswith(
        f"error: --subject_col: labels CSV {int_ids['labels']} has no column person (columns: ")
    labels = pd.read_csv(int_ids["labels"], dtype=str)
    labels.loc[[0, 5], "uid"] = ""
    crafted = tmp_path / "labels.csv"
    labels.to_csv(crafted, index=False)
    cohort = {"npz": int_ids["npz"], "labels": str(crafted)}
    assert run_cli(train_bp.main, train_argv(cohort, tmp_path / "r", "--subject_col", "uid")) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: labels CSV {crafted}: 2 usable rows have an empty uid (--subject_col)")
    assert run_cli(train_bp.main, train_argv(int_ids, tmp_path / "r", "--subject_col",
                                             TARGET)) == 2
    assert error_line(capsys.readouterr().err) == \
        f"error: --subject_col: {TARGET} is a target, not a subject"
    assert not (tmp_path / "r").exists()
