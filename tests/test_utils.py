"""Tests for utils: split, atomic writes, the error path, checkpoints."""
import os

import numpy as np
import pytest
import torch

import utils


def test_split_is_subject_wise_deterministic_and_sized():
    subjects = [f"s{i:03d}" for i in range(100)]
    a = utils.split_subjects(subjects, 0.1, 0.2, seed=666)
    b = utils.split_subjects(list(reversed(subjects)) * 3, 0.1, 0.2, seed=666)
    assert a == b
    counts = {k: sum(v == k for v in a.values()) for k in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}
    assert utils.split_subjects(subjects, 0.1, 0.2, seed=1) != a


@pytest.mark.parametrize("val,test,msg", [
    (1.0, 0.1, "--val_ratio must be in [0, 1)"),
    (0.1, -0.1, "--test_ratio must be in [0, 1)"),
    (0.5, 0.5, "must be below 1"),
])
def test_split_rejects_bad_ratios(val, test, msg):
    with pytest.raises(utils.UserError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        utils.split_subjects(["a", "b", "c"], val, test, seed=0)


def test_split_rejects_too_few_subjects():
    with pytest.raises(utils.UserError, match="too few subjects \\(2\\)"):
        utils.split_subjects(["a", "b"], 0.1, 0.2, seed=0)


def test_subject_of_takes_text_before_first_underscore():
    assert utils.subject_of("123_4_5") == "123"
    assert utils.subject_of("abc") == "abc"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with utils.atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    utils.write_text_atomic(str(target), "whole")
    assert target.read_text() == "whole" and os.listdir(tmp_path) == ["out.txt"]


def test_run_cli_turns_user_error_into_status_2(capsys):
    def main(argv):
        raise utils.UserError("labels CSV x.csv:\n no such file")
    assert utils.run_cli(main) == 2
    assert capsys.readouterr().err == "error: labels CSV x.csv: no such file\n"


def test_argument_parser_error_is_one_line_user_error():
    parser = utils.ArgumentParser()
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(utils.UserError, match="--n"):
        parser.parse_args([])


class _NotData:
    pass


def test_load_checkpoint_allows_numpy_scalars_and_refuses_objects(tmp_path):
    good, bad, junk = (str(tmp_path / n) for n in ("good.pth", "bad.pth", "junk.pth"))
    torch.save({"state_dict": {"w": torch.ones(2)}, "score": np.float64(0.5),
                "arr": np.arange(3)}, good)
    torch.save({"state_dict": {}, "obj": _NotData()}, bad)
    open(junk, "w").write("not a checkpoint")
    ck = utils.load_checkpoint(good)
    assert float(ck["score"]) == 0.5 and ck["arr"].tolist() == [0, 1, 2]
    with pytest.raises(utils.UserError, match="--trust_checkpoint"):
        utils.load_checkpoint(bad)
    assert "obj" in utils.load_checkpoint(bad, trust=True)
    with pytest.raises(utils.UserError, match="not a readable PyTorch checkpoint"):
        utils.load_checkpoint(junk)
    with pytest.raises(utils.UserError, match="no such file"):
        utils.load_checkpoint(str(tmp_path / "missing.pth"))


def test_dist_env_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert utils.dist_env() == utils.DistInfo(0, 0, 1) and not utils.dist_env().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = utils.dist_env()
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert info.enabled and not info.is_main
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert utils.dist_env().enabled  # torchrun --nproc_per_node=1 still runs DDP


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "0"}, "must all be set to integers"),
    ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "must all be set to integers"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "do not fit together"),
])
def test_dist_env_rejects_an_inconsistent_environment(monkeypatch, env, fragment):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(utils.UserError, match=fragment):
        utils.dist_env()


def test_collectives_are_the_identity_without_a_process_group():
    assert utils.broadcast_object({"a": 1}) == {"a": 1}
    assert utils.all_gather_object(5) == [5]
    assert utils.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    utils.barrier()


def test_run_on_rank0_returns_the_result_or_raises_the_user_error():
    assert utils.run_on_rank0(lambda: 41 + 1, utils.DistInfo()) == 42

    def fail():
        raise utils.UserError("bad input")

    with pytest.raises(utils.UserError, match="bad input"):
        utils.run_on_rank0(fail, utils.DistInfo())


def test_folds_deal_every_subject_once_and_test_each_fold_once():
    subjects = [f"s{i:02d}" for i in range(23)] * 2  # records: each subject twice
    folds = utils.subject_folds(subjects, 5, seed=3)
    assert sorted(folds) == sorted(set(subjects))
    sizes = np.bincount(list(folds.values()))
    assert sizes.tolist() == [5, 5, 5, 4, 4]
    assert utils.subject_folds(list(reversed(subjects)), 5, seed=3) == folds  # row order
    assert utils.subject_folds(subjects, 5, seed=4) != folds
    tested = []
    for k in range(5):
        split = utils.split_by_fold(subjects, 5, k, 0.1, seed=3)
        test = sorted(s for s, name in split.items() if name == "test")
        assert test == sorted(s for s, f in folds.items() if f == k)
        assert sum(name == "val" for name in split.values()) == round(0.1 * (23 - len(test)))
        tested += test
    assert sorted(tested) == sorted(set(subjects))  # out of fold exactly once


@pytest.mark.parametrize("folds, fold, val, fragment", [
    (1, 0, 0.1, "--folds must be at least 2"), (5, 5, 0.1, "--fold must be in [0, 4]"),
    (30, 0, 0.1, "too few subjects (23) for --folds 30"), (5, 0, 0.0, "--val_ratio must be in (0, 1)"),
])
def test_bad_fold_settings_are_user_errors(folds, fold, val, fragment):
    with pytest.raises(utils.UserError) as err:
        utils.split_by_fold([f"s{i}" for i in range(23)], folds, fold, val, seed=0)
    assert fragment in str(err.value)


def test_an_unreadable_npz_manifest_is_a_user_error_naming_it(tmp_path):
    assert utils.npz_manifest(str(tmp_path)) == {}
    (tmp_path / utils.NPZ_MANIFEST).write_text("{")
    with pytest.raises(utils.UserError, match=r"\.prepare_kailuan_npz\.json \(prep's record "
                                              r"of the npz folder\) is unreadable"):
        utils.npz_manifest(str(tmp_path))
