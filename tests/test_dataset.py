"""Tests for dataset.py: labels reading, usable rows, npz checks, z-scoring, the cache."""
import os

import numpy as np
import pandas as pd
import pytest

import dataset
from utils import UserError


def _write_npz(folder, ssoid, x):
    np.savez_compressed(os.path.join(folder, f"{ssoid}.npz"), x=x)


@pytest.fixture
def records(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        x = np.stack([rng.normal(3.0, 2.0, 50), rng.normal(-1.0, 0.5, 50)], axis=1)
        _write_npz(folder, f"s{i}_0", x.astype(np.float32))
    bad = np.ones((50, 2), np.float32)
    bad[3, 1] = np.nan
    _write_npz(folder, "s9_nan", bad)
    _write_npz(folder, "s9_shape", np.ones((50, 3), np.float32))
    _write_npz(folder, "s9_short", np.ones((40, 2), np.float32))
    (folder / "s9_junk.npz").write_bytes(b"not a zip")
    whole = (folder / "s0_0.npz").read_bytes()
    (folder / "s9_cut.npz").write_bytes(whole[: len(whole) // 2])
    return str(folder)


def test_check_records_lists_each_bad_file_with_its_reason(records):
    ids = ["s0_0", "s1_0", "s9_nan", "s9_shape", "s9_short", "s9_junk", "s9_cut", "s2_0"]
    good, length, skipped = dataset.check_records(ids, records)
    assert good == ["s0_0", "s1_0", "s2_0"] and length == 50
    assert list(skipped.columns) == ["ssoid", "path", "reason"]
    reasons = dict(zip(skipped["ssoid"], skipped["reason"]))
    assert reasons == {"s9_nan": "non-finite values in the PPG column (1 of 50 samples)",
                       "s9_shape": "shape (50, 3) is not (L, 2)",
                       "s9_short": "length 40 differs from the common length 50",
                       "s9_junk": "not an npz/zip file",
                       "s9_cut": "damaged npz/zip file (BadZipFile: File is not a zip file)"}


def test_usable_rows_counts_each_drop_reason(records, tmp_path):
    labels = pd.DataFrame({"ssoid": ["s0_0", "s1_0", "s1_0", "gone_0", "s2_0"],
                           "sbp": [120.0, 130.0, 130.0, 110.0, np.nan]})
    rows, dropped = dataset.usable_rows(labels, records, ["sbp"])
    assert list(rows["ssoid"]) == ["s0_0", "s1_0"]
    assert dropped == {"duplicate ssoid in labels CSV": 1, "no npz file": 1,
                       "missing target value": 1}


def test_usable_rows_without_overlap_is_a_user_error(records):
    labels = pd.DataFrame({"ssoid": ["x_1", "y_2"], "sbp": [1.0, 2.0]})
    with pytest.raises(UserError, match="no usable rows"):
        dataset.usable_rows(labels, records, ["sbp"])


def test_read_labels_errors_name_file_and_column(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ssoid,sbp\n001_1,120\n")
    frame = dataset.read_labels(str(path), ["sbp"])
    assert frame["ssoid"].tolist() == ["001_1"]  # leading zeros kept: ids are text
    with pytest.raises(UserError, match=r"labels.csv has no column dbp"):
        dataset.read_labels(str(path), ["sbp", "dbp"])
    with pytest.raises(UserError, match="no such file"):
        dataset.read_labels(str(tmp_path / "missing.csv"), ["sbp"])
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage\x00\xff")
    with pytest.raises(UserError, match="bin.csv"):
        dataset.read_labels(str(tmp_path / "bin.csv"), ["sbp"])


def test_dataset_zscores_each_channel_and_picks_channels(records):
    targets = np.array([[0.5], [1.5]], np.float32)
    ds = dataset.BPDataset(["s0_0", "s1_0"], records, targets, channels=[1])
    x, cov, y, ssoid = ds[1]
    raw = dataset.load_x(os.path.join(records, "s1_0.npz"))[:, 1]
    assert tuple(x.shape) == (1, 50) and ssoid == "s1_0" and float(y[0]) == 1.5
    assert tuple(cov.shape) == (0,)
    np.testing.assert_allclose(x[0].numpy(), (raw - raw.mean()) / raw.std(), rtol=1e-5)
    both = dataset.BPDataset(["s0_0"], records, targets[:1], channels=[0, 1], normalize=False)
    np.testing.assert_array_equal(both[0][0].numpy(),
                                  dataset.load_x(os.path.join(records, "s0_0.npz")).T)


def test_zscore_of_flat_channel_is_zero():
    x = np.stack([np.full(10, 7.0), np.arange(10.0)]).astype(np.float32)
    z = dataset.zscore(x)
    assert z.dtype == np.float32 and np.all(z[0] == 0)
    np.testing.assert_allclose(z[1], (np.arange(10) - 4.5) / np.arange(10).std(), rtol=1e-6)


def test_zscore_stays_exact_for_a_large_offset():
    # a float32 running sum would lose the small swing on top of a large baseline
    rng = np.random.default_rng(1)
    raw = 1000.0 + rng.normal(0, 0.01, 7500)
    z = dataset.zscore(raw.astype(np.float32)[None])[0]
    x32 = raw.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(z, (x32 - x32.mean()) / x32.std(), atol=2e-3)


def test_cache_holds_model_inputs_and_is_reused(records, tmp_path):
    ids = ["s0_0", "s1_0", "s2_0"]
    paths = [dataset.npz_path(records, s) for s in ids]
    cache_dir = str(tmp_path / "cache")
    cache = dataset.open_cache(cache_dir, paths, 50)
    assert cache.shape == (3, 2, 50) and cache.dtype == np.float32
    raw = dataset.load_x(paths[2])
    np.testing.assert_allclose(cache[2], ((raw - raw.mean(0)) / raw.std(0)).T, rtol=1e-5,
                               atol=1e-6)
    before = sorted(os.listdir(cache_dir))
    again = dataset.open_cache(cache_dir, paths, 50)
    assert sorted(os.listdir(cache_dir)) == before and len(before) == 2
    raw_cache = dataset.open_cache(cache_dir, paths, 50, normalize=False)
    assert len(os.listdir(cache_dir)) == 4  # --no_zscore gets its own file
    np.testing.assert_array_equal(raw_cache[2], raw.T)
    del cache, again, raw_cache


@pytest.mark.parametrize("channels", [[0, 1], [0], [1]])
def test_cached_dataset_equals_npz_dataset_to_the_bit(records, tmp_path, channels):
    ids = ["s0_0", "s1_0", "s2_0", "s3_0"]
    cache = dataset.open_cache(str(tmp_path / "c"), [dataset.npz_path(records, s) for s in ids],
                               50)
    y = np.arange(8, dtype=np.float32).reshape(4, 2)
    # the cached dataset sees rows 3, 1 of the cache as its records 0, 1
    cached = dataset.CachedBPDataset(["s3_0", "s1_0"], cache, np.array([3, 1]), y[[3, 1]],
                                     channels)
    files = dataset.BPDataset(["s3_0", "s1_0"], records, y[[3, 1]], channels)
    x, cov, yb, batch_ids = cached.__getitems__([1, 0, 1])
    assert tuple(x.shape) == (3, len(channels), 50) and batch_ids == ["s1_0", "s3_0", "s1_0"]
    assert tuple(cov.shape) == (3, 0)
    for k, i in enumerate([1, 0, 1]):
        np.testing.assert_array_equal(x[k].numpy(), files[i][0].numpy())
        np.testing.assert_array_equal(yb[k].numpy(), files[i][2].numpy())
    single = cached[0]
    assert single[3] == "s3_0" and tuple(single[0].shape) == (len(channels), 50)


def test_shard_sampler_covers_each_index_once():
    shards = [list(dataset.ShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(dataset.ShardSampler(2, r, 3)) for r in range(3)] == [1, 1, 0]


def test_augmentation_keeps_the_channels_aligned_and_depends_on_seed_epoch_record():
    n = 1000
    x = np.zeros((2, n), dtype=np.float32)
    x[0, 300], x[1, 425] = 10.0, 10.0  # R peak, and the pulse 125 samples later
    aug = dataset.Augmenter(dataset.AUGMENTATIONS, seed=5)
    shifts = set()
    for epoch in range(1, 6):
        out = aug(x, index=3, epoch=epoch)
        r, p = int(np.argmax(out[0])), int(np.argmax(out[1]))
        assert p - r == 125  # shifted together: the delay survives
        assert 300 - r <= int(dataset.MAX_SHIFT * n)
        shifts.add(300 - r)
        np.testing.assert_array_equal(out, aug(x, index=3, epoch=epoch))  # a function of
    assert len(shifts) > 1  # (seed, epoch, index) alone, and not the same every epoch
    assert not np.array_equal(aug(x, 3, 1), aug(x, 4, 1))
    assert not np.array_equal(aug(x, 3, 1), dataset.Augmenter(["shift"], seed=6)(x, 3, 1))
    gained = dataset.Augmenter(["gain"], seed=5)(x, 0, 1)
    ratio = gained.max(axis=1) / 10.0
    assert ((ratio >= dataset.GAIN[0]) & (ratio <= dataset.GAIN[1])).all()


def test_datasets_augment_training_draws_only(tmp_path):
    raw = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.savez(tmp_path / "a_1.npz", x=raw)
    aug = dataset.Augmenter(["noise"], seed=1)
    ds = dataset.BPDataset(["a_1"], str(tmp_path), np.zeros((1, 1)), (0, 1), augmenter=aug)
    plain = dataset.model_input(raw, (0, 1), True)
    np.testing.assert_array_equal(ds[0][0].numpy(), plain)  # an evaluation draw
    np.testing.assert_array_equal(ds[(0, 2)][0].numpy(), aug(plain, 0, 2))  # epoch 2
    cache = dataset.open_cache(str(tmp_path / "c"), [str(tmp_path / "a_1.npz")], 50)
    cached = dataset.CachedBPDataset(["a_1"], cache, np.array([0]), np.zeros((1, 1)), (0, 1),
                                     augmenter=aug)
    np.testing.assert_array_equal(cached.__getitems__([(0, 2)])[0][0].numpy(), aug(plain, 0, 2))
    np.testing.assert_array_equal(cached[0][0].numpy(), plain)
