"""pretrain_ssl.py: the objectives' losses on hand-made batches, the views and their labels,
the sampler, and end-to-end runs on a tiny cohort (encoder file into train_bp.py, exact
resume, --exclude, DDP on gloo equal to one process, one-line errors)."""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import backbones
import losses
import pretrain_ssl
import train_bp
import utils
from conftest import ROOT, error_line

TAU = 0.5  # large enough that the known minima stay far above float32 noise
TARGETS = ["right_arm_sbp", "right_arm_dbp"]


# ----------------------------------------------------------------------------- losses
def _one_hot(n, d):
    return torch.eye(d)[:n]


def test_supcon_of_aligned_views_with_orthogonal_records_is_the_known_minimum():
    b = 4
    z = torch.cat([_one_hot(b, 8), _one_hot(b, 8)])  # view 2 == view 1, records orthogonal
    ids = torch.arange(b).repeat(2)
    none = -torch.ones(2 * b, dtype=torch.long)
    positive = losses.contrastive_positives(ids, ids, none, none)
    loss, acc = losses.supcon_loss(z, z, torch.arange(2 * b), positive, TAU)
    # one positive at similarity 1, 2B - 2 negatives at 0
    assert float(loss) == pytest.approx(math.log(1 + (2 * b - 2) * math.exp(-1 / TAU)), rel=1e-5)
    assert float(acc) == 1.0


def test_subject_positives_pull_a_subjects_other_records():
    # records 0 and 1 are one subject but orthogonal: as positives they cost 1/3 of the
    # similarity term, as negatives (no subject known) the anchor keeps its whole 1/t
    b = 4
    z = torch.cat([_one_hot(b, 8), _one_hot(b, 8)])
    ids = torch.arange(b).repeat(2)
    subjects = torch.tensor([0, 0, 1, 2]).repeat(2)
    positive = losses.contrastive_positives(ids, ids, subjects, subjects)
    assert positive[0].tolist() == [True, True, False, False, True, True, False, False]
    assert positive[2].tolist() == [False, False, True, False, False, False, True, False]
    loss, _ = losses.supcon_loss(z, z, torch.arange(2 * b), positive, TAU)
    lse = math.log(math.exp(1 / TAU) + 6)
    expected = (4 * (lse - 1 / (3 * TAU)) + 4 * (lse - 1 / TAU)) / 8
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    instance_only = losses.contrastive_positives(ids, ids, -torch.ones_like(ids),
                                                 -torch.ones_like(ids))
    plain, _ = losses.supcon_loss(z, z, torch.arange(2 * b), instance_only, TAU)
    assert float(plain) == pytest.approx(lse - 1 / TAU, rel=1e-5)


def test_supcon_of_random_embeddings_scores_chance():
    g = torch.Generator().manual_seed(0)
    b, d = 64, 4096
    z = torch.nn.functional.normalize(torch.randn(2 * b, d, generator=g), dim=1)
    ids = torch.arange(b).repeat(2)
    none = -torch.ones(2 * b, dtype=torch.long)
    loss, acc = losses.supcon_loss(z, z, torch.arange(2 * b),
                                   losses.contrastive_positives(ids, ids, none, none), TAU)
    assert float(loss) == pytest.approx(math.log(2 * b - 1), abs=0.05)
    assert float(acc) < 0.1


def test_clip_of_aligned_pairs_is_the_known_minimum_and_shuffled_pairs_score_chance():
    b = 6
    a = _one_hot(b, 8)
    loss, acc = losses.clip_loss(a, a, a, a, torch.arange(b), TAU)
    assert float(loss) == pytest.approx(math.log(1 + (b - 1) * math.exp(-1 / TAU)), rel=1e-5)
    assert float(acc) == 1.0
    g = torch.Generator().manual_seed(1)
    n, d = 128, 4096
    x, y = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) for _ in "ab")
    shuffled, acc = losses.clip_loss(x, y, x, y, torch.arange(n), TAU)
    assert float(shuffled) == pytest.approx(math.log(n), abs=0.05)
    assert float(acc) < 0.05


def test_clip_takes_the_global_rows_of_this_rank():
    # rows 2..3 of a global batch of 4 score as those rows of the whole batch
    g = torch.Generator().manual_seed(2)
    a, b = (torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1) for _ in "ab")
    whole = [losses.clip_loss(a[i:i + 1], b[i:i + 1], a, b, torch.tensor([i]), TAU)[0]
             for i in range(4)]
    half, _ = losses.clip_loss(a[2:], b[2:], a, b, torch.tensor([2, 3]), TAU)
    assert float(half) == pytest.approx(float(torch.stack(whole[2:]).mean()), rel=1e-6)


def test_timing_loss_is_log2_for_no_opinion_and_counts_correct_labels():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss, acc = losses.timing_loss(torch.zeros(4), labels)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    _, acc = losses.timing_loss(torch.tensor([3.0, -2.0, -1.0, -4.0]), labels)
    assert float(acc) == 0.75


def test_a_non_positive_temperature_is_a_user_error():
    z = _one_hot(2, 4)
    with pytest.raises(utils.UserError, match="--temperature must be a finite number > 0"):
        losses.clip_loss(z, z, z, z, torch.arange(2), 0.0)


# ----------------------------------------------------------------------------- views
def test_timing_views_pair_the_true_ppg_or_move_it_by_the_delay_range():
    fs, length = 100.0, 1000
    views = pretrain_ssl.ViewMaker(seed=3, crop=0.5, length=length, fs=fs,
                                   delay_ms=(40, 300), augment=[])
    assert views.delay == (4, 30)
    ramp = np.arange(length, dtype=np.float32)
    x = np.stack([ramp, ramp])  # the PPG crop minus the ECG crop is the move in samples
    moves, labels = [], []
    for index in range(400):
        view, aligned = views.timing(x, index, epoch=1)
        move = view[1] - view[0]
        assert np.all(move == move[0])
        labels.append(aligned)
        moves.append(move[0])
    labels, moves = np.array(labels), np.array(moves)
    assert np.all(moves[labels == 1] == 0)
    assert np.all((np.abs(moves[labels == 0]) >= 4) & (np.abs(moves[labels == 0]) <= 30))
    assert (moves > 0).any() and (moves < 0).any()  # later and earlier
    assert 0.4 < labels.mean() < 0.6
    again = [views.timing(x, index, epoch=1)[1] for index in range(400)]
    assert np.array_equal(again, labels)  # a function of (seed, epoch, record) alone


def test_contrastive_views_keep_both_channels_in_step():
    views = pretrain_ssl.ViewMaker(seed=0, crop=0.3, length=500, fs=None, delay_ms=(40, 300),
                                   augment=[])
    ramp = np.arange(500, dtype=np.float32)
    made = views.make(torch.from_numpy(np.stack([np.stack([ramp, ramp])] * 3)), [5, 6, 7],
                      epoch=2, objectives=["contrastive"])
    assert made["a"].shape == (3, 2, 150) and made["b"].shape == (3, 2, 150)
    assert torch.equal(made["a"][:, 0], made["a"][:, 1])
    assert not torch.equal(made["a"], made["b"])  # two crops of one record


def test_global_batches_are_the_same_for_any_number_of_processes():
    one = list(pretrain_ssl.GlobalBatches(21, 8, 0, 1, seed=4))
    two = [pretrain_ssl.GlobalBatches(21, 4, r, 2, seed=4) for r in (0, 1)]
    halves = list(zip(*[list(s) for s in two]))
    assert len(one) == 2 == len(halves)
    assert [a + b for a, b in halves] == one


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 subjects x 3 records of 15 s at 40 Hz (600 samples)."""
    import make_synthetic_cohort
    import prepare_kailuan_npz

    base = tmp_path_factory.mktemp("ssl_cohort")
    h5 = str(base / "cohort.h5")
    make_synthetic_cohort.make_cohort(h5, n_subjects=24, records_per_subject=3, seed=0)
    npz, labels = str(base / "npz"), str(base / "labels.csv")
    prepare_kailuan_npz.main(["--h5_path", h5, "--id_key", "new_id", "--target_cols", *TARGETS,
                              "--output_npz", npz, "--output_csv", labels, "--target_seq_len",
                              "600", "--workers", "1", "--record_seconds", "15"])
    return {"npz": npz, "labels": labels, "base": base}


def ssl_argv(cohort, out, *extra):
    return ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"], "--out_dir", str(out),
            "--arch", "tiny", "--modality", "both", "--fusion", "late", "--epochs", "2",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--val_ratio", "0.25",
            "--target_cols", *TARGETS, *extra]


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "run"
    pretrain_ssl.main(ssl_argv(cohort, out, "--epochs", "3"))
    return out


def test_history_has_loss_and_accuracy_per_objective_and_the_monitor(run, cohort):
    history = pd.read_csv(run / "ssl_history.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    for k in pretrain_ssl.OBJECTIVES:
        trained = history.loc[history["epoch"] > 0]
        assert trained[f"loss_{k}"].notna().all() and trained[f"acc_{k}"].between(0, 1).all()
        assert history[f"heldout_acc_{k}"].between(0, 1).all()
    weights = trained[[f"loss_{k}" for k in pretrain_ssl.OBJECTIVES]].sum(axis=1)
    np.testing.assert_allclose(trained["loss"], weights, rtol=1e-5)
    assert (history["heldout_records"] == 18).all()  # 6 of 24 subjects held out
    # the monitor's baseline is the train-mean predictor of the held-out records' targets
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str}).set_index("ssoid")
    roles = pd.read_csv(run / "ssl_records.csv", dtype=str).set_index("ssoid")
    fit = labels.loc[roles.index[roles["role"] == "pretrain"], TARGETS]
    held = labels.loc[roles.index[roles["role"] == "heldout"], TARGETS]
    base = np.mean(np.abs(held - fit.mean()).mean())
    assert history["monitor_mean_mae"].iloc[0] == pytest.approx(base, rel=1e-9)
    assert history["monitor_ridge_mae"].notna().all()
    assert (run / "ssl_history.png").stat().st_size > 10_000


def test_encoder_file_loads_into_train_bp_with_every_tensor(run, cohort, tmp_path, capsys):
    ckpt = torch.load(run / "ssl_encoders.pth", weights_only=True)
    assert ckpt["encoder_settings"]["fusion"] == "late" and ckpt["epoch"] == 3
    for fusion in ("late", "mid"):
        model = backbones.build_bp_model(backbones.BPModelConfig(
            arch="tiny", modality="both", fusion=fusion, n_targets=2))
        report = backbones.load_pretrained(model, str(run / "ssl_encoders.pth"), verbose=False)
        for name in ("ecg", "ppg"):
            enc = report["encoders"][name]
            assert enc["source"] == name
            assert enc["loaded"] == len(model.encoders[name].state_dict())
            assert (enc["missing"], enc["unexpected"], enc["mismatched"]) == ([], [], [])
            for key, value in model.encoders[name].state_dict().items():
                assert torch.equal(value, ckpt["state_dict"][f"{name}.{key}"])
    out = tmp_path / "ft"
    train_bp.main(["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"],
                   "--out_dir", str(out), "--target_cols", *TARGETS, "--arch", "tiny",
                   "--modality", "both", "--fusion", "late", "--epochs", "1",
                   "--batch_size", "16", "--num_workers", "0", "--device", "cpu",
                   "--pretrain", str(run / "ssl_encoders.pth")])
    n = len(model.encoders["ecg"].state_dict())
    text = capsys.readouterr().out
    assert f"encoder ecg <- ecg: {n} loaded, 0 missing, 0 unexpected, 0 shape-mismatched" in text
    assert f"encoder ppg <- ppg: {n} loaded, 0 missing, 0 unexpected, 0 shape-mismatched" in text


@pytest.mark.parametrize("flags, shown", [
    (["--fusion", "early"], "--arch tiny --modality both --fusion early"),
    (["--modality", "ppg"], "--arch tiny --modality ppg"),
    (["--arch", "small"], "--arch small --modality both --fusion late"),
])
def test_encoder_file_into_other_settings_is_one_line_naming_both(run, cohort, tmp_path, capsys,
                                                                  flags, shown):
    argv = ["--npz_dir", cohort["npz"], "--labels_csv", cohort["labels"],
            "--out_dir", str(tmp_path / "ft"), "--target_cols", *TARGETS, "--arch", "tiny",
            "--modality", "both", "--fusion", "late", "--epochs", "1", "--device", "cpu",
            "--num_workers", "0", "--pretrain", str(run / "ssl_encoders.pth"), *flags]
    assert utils.run_cli(train_bp.main, argv) == 2
    line = error_line(capsys.readouterr().err)
    assert "pre-trained with --arch tiny --modality both --fusion late" in line
    assert f"but this model is {shown}" in line


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_encoders_and_history(run, cohort, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    save = pretrain_ssl.save_epoch

    def save_then_die(args, model, data, epoch, state, history):
        save(args, model, data, epoch, state, history)
        if epoch == 2:
            raise Killed

    monkeypatch.setattr(pretrain_ssl, "save_epoch", save_then_die)
    with pytest.raises(Killed):
        pretrain_ssl.main(ssl_argv(cohort, out, "--epochs", "3"))
    monkeypatch.setattr(pretrain_ssl, "save_epoch", save)
    assert len(pd.read_csv(out / "ssl_history.csv")) == 3
    pretrain_ssl.main(ssl_argv(cohort, out, "--epochs", "3", "--resume"))
    a = torch.load(run / "ssl_encoders.pth", weights_only=True)["state_dict"]
    b = torch.load(out / "ssl_encoders.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ["seconds", "records_per_s"]
    pd.testing.assert_frame_equal(pd.read_csv(run / "ssl_history.csv").drop(columns=timing),
                                  pd.read_csv(out / "ssl_history.csv").drop(columns=timing))


def test_exclude_keeps_the_listed_subjects_out_and_unread(cohort, tmp_path):
    labels = pd.read_csv(cohort["labels"], dtype={"ssoid": str})
    subjects = labels["ssoid"].map(utils.subject_of)
    gone = sorted(set(subjects))[:2]
    split = pd.DataFrame({"ssoid": labels["ssoid"], "subject_id": subjects,
                          "split": np.where(subjects.isin(gone), "test", "train")})
    split.to_csv(tmp_path / "split.csv", index=False)
    folder = tmp_path / "npz"
    shutil.copytree(cohort["npz"], folder)
    broken = labels.loc[subjects == gone[0], "ssoid"].iloc[0]
    (folder / f"{broken}.npz").write_bytes(b"not an npz")  # never opened
    out = tmp_path / "run"
    pretrain_ssl.main(ssl_argv(dict(cohort, npz=str(folder)), out, "--epochs", "1",
                               "--exclude", str(tmp_path / "split.csv")))
    assert len(pd.read_csv(out / "skipped_records.csv")) == 0
    roles = pd.read_csv(out / "ssl_records.csv", dtype=str)
    excluded = roles[roles["role"] == "excluded"]
    assert sorted(set(excluded["subject_id"])) == gone and len(excluded) == 6
    assert not roles.loc[roles["role"] != "excluded", "subject_id"].isin(gone).any()
    summary = torch.load(out / "ssl_encoders.pth", weights_only=True)["exclude"]
    assert (summary["records"], summary["subjects"]) == (6, 2)
    assert summary["by"] == "subject_id of its rows of split test"


@pytest.mark.parametrize("flags, message", [
    (["--fusion", "early", "--objectives", "crossmodal"],
     "--objectives crossmodal needs separate ECG and PPG encoders (--fusion late or mid)"),
    (["--modality", "ppg", "--objectives", "timing"], "--objectives timing needs --modality both"),
    (["--objectives", "timing=-1"], "--objectives: the weight of timing must be a number > 0"),
    (["--objectives", "masked"], "--objectives: unknown objective 'masked'"),
    (["--crop", "0.99", "--objectives", "timing"], "leaves no room to move the PPG"),
    (["--resume"], "holds no ssl_last.pth to continue from"),
])
def test_bad_invocations_are_one_line_errors(cohort, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert utils.run_cli(pretrain_ssl.main, ssl_argv(cohort, out, *flags)) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_timing_without_a_sampling_rate_is_refused(tmp_path, capsys):
    from conftest import prepared_cohort

    data = prepared_cohort(tmp_path, 4, 2, 0, TARGETS)  # prepared with no time base
    argv = ["--npz_dir", data["npz"], "--out_dir", str(tmp_path / "out"), "--arch", "tiny",
            "--fusion", "late", "--device", "cpu", "--batch_size", "2"]
    assert utils.run_cli(pretrain_ssl.main, argv) == 2
    assert "--objectives timing moves the PPG by --delay_ms, which needs the records' " \
           "sampling rate" in error_line(capsys.readouterr().err)


def test_ddp_on_two_gloo_ranks_equals_one_process_on_the_same_global_batch(cohort, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--epochs", "1", "--val_ratio", "0.25"]
    pretrain_ssl.main(ssl_argv(cohort, single, *common, "--batch_size", "8"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "pretrain_ssl.py"), *ssl_argv(cohort, ddp, *common, "--batch_size",
                                                          "4", "--threads", "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "processes 2  records per step 4 x 2 = 8" in result.stdout
    a, b = (pd.read_csv(d / "ssl_history.csv") for d in (single, ddp))
    cols = ["loss"] + [f"{w}_{k}" for k in pretrain_ssl.OBJECTIVES for w in ("loss", "acc")]
    np.testing.assert_allclose(b[cols].to_numpy(float)[1:], a[cols].to_numpy(float)[1:],
                               rtol=1e-4)
    wa, wb = (torch.load(d / "ssl_encoders.pth", weights_only=True)["state_dict"]
              for d in (single, ddp))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4)
