"""The batch loader: determinism, resumption, per-epoch reshuffling, splits and bounded reads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dictlearn.activations.cache import CacheError, to_float32
from dictlearn.activations.loader import BatchLoader


def _take(loader: BatchLoader, n: int, start: int = 0) -> list[dict]:
    it = loader.iterate(start_batch=start)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()


def _ids(batch: dict) -> set[tuple[int, int]]:
    return set(zip(batch["seq"].tolist(), batch["pos"].tolist()))


@pytest.fixture
def cache(tiny_harvest):
    return tiny_harvest()


def test_same_seed_same_batches_and_resume_at_any_batch(cache):
    keys = ["resid_post.1", "seq", "pos"]
    a = _take(BatchLoader(cache, keys, 100, seed=3, mix_shards=2), 70)
    b = _take(BatchLoader(cache, keys, 100, seed=3, mix_shards=2), 70)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in keys)
    loader = BatchLoader(cache, keys, 100, seed=3, mix_shards=2)
    for start in (1, 29, 30, 31, 65):  # 30 batches per epoch: inside, at and across epoch seams
        resumed = _take(loader, 3, start=start)
        assert all(np.array_equal(x[k], a[start + i][k]) for i, x in enumerate(resumed) for k in keys)
        assert np.array_equal(loader.batch(start)["seq"], a[start]["seq"])
    c = _take(BatchLoader(cache, keys, 100, seed=4, mix_shards=2), 2)
    assert not np.array_equal(c[0]["seq"], a[0]["seq"])


def test_each_epoch_visits_rows_once_in_a_new_order(cache):
    loader = BatchLoader(cache, ["seq", "pos"], 100, split="train", seed=0)
    n = loader.batches_per_epoch
    assert n == cache.rows("train") // 100
    batches = _take(loader, 2 * n)
    for epoch in (batches[:n], batches[n:]):
        rows = [r for b in epoch for r in zip(b["seq"].tolist(), b["pos"].tolist())]
        assert len(set(rows)) == len(rows) == n * 100  # no row twice within an epoch
    assert [_ids(b) for b in batches[:n]] != [_ids(b) for b in batches[n:]]
    # a batch mixes many sequences: far more than the 2-3 a sequential read would give
    assert all(len(np.unique(b["seq"])) >= 10 for b in batches)


def test_values_are_float32_copies_of_stored_rows(cache):
    loader = BatchLoader(cache, ["resid_post.1", "mlp_hidden.1", "seq", "pos"], 64, split="all", seed=1)
    batch = loader.batch(5)
    assert batch["resid_post.1"].dtype == np.float32 and batch["resid_post.1"].shape == (64, 32)
    assert batch["mlp_hidden.1"].shape == (64, 128) and batch["seq"].dtype == np.int32
    lookup = {}
    for k in range(len(cache.shards)):
        a = cache.shard_arrays(k, ["resid_post.1", "seq", "pos"])
        for i, key in enumerate(zip(a["seq"].tolist(), a["pos"].tolist())):
            lookup[key] = to_float32(a["resid_post.1"][i])
    for i, key in enumerate(zip(batch["seq"].tolist(), batch["pos"].tolist())):
        assert np.array_equal(batch["resid_post.1"][i], lookup[key])


def test_eval_split_is_disjoint_from_train(cache):
    ev = set(cache.eval_sequences().tolist())
    train = BatchLoader(cache, ["seq"], 50, split="train")
    held = BatchLoader(cache, ["seq"], 50, split="eval")
    assert train.rows() + held.rows() == cache.n_rows
    tseq = np.concatenate([b["seq"] for b in _take(train, train.batches_per_epoch)])
    eseq = np.concatenate([b["seq"] for b in _take(held, held.batches_per_epoch)])
    assert set(eseq.tolist()) <= ev and not set(tseq.tolist()) & ev


def test_reads_only_one_window_at_a_time(cache, monkeypatch):
    loader = BatchLoader(cache, ["resid_post.1"], 32, seed=0, mix_shards=2, prefetch=0)  # no read-ahead
    opened = []
    real = type(cache).shard_arrays
    monkeypatch.setattr(type(cache), "shard_arrays", lambda self, i, keys=None, **kw: opened.append(i) or real(self, i, keys, **kw))
    first = loader.batch(0)
    assert len(opened) == 2 and first["resid_post.1"].shape == (32, 32)  # one window of 2 shards, not the cache
    opened.clear()
    _take(loader, 2 * loader.batches_per_epoch)
    assert len(opened) == 2 * len(cache.shard_ids("train"))  # each shard read once per epoch


def test_bad_key_and_tiny_split_are_refused(cache):
    with pytest.raises(CacheError, match="no 'resid_post.7'.*it holds: resid_post.1, mlp_hidden.1"):
        BatchLoader(cache, ["resid_post.7"], 10)
    with pytest.raises(CacheError, match="fewer than one batch"):
        BatchLoader(cache, ["resid_post.1"], 10**6)
    with pytest.raises(ValueError, match="split"):
        BatchLoader(cache, ["resid_post.1"], 10, split="test")


def test_smol_cache_streams_transcoder_pairs(smol_cache):
    loader = BatchLoader(smol_cache, ["mlp_in.10", "mlp_out.10"], 1024, split="train", seed=0)
    b = next(iter(_take(loader, 1)))
    assert b["mlp_in.10"].shape == b["mlp_out.10"].shape == (1024, 576)
    assert np.isfinite(b["mlp_in.10"]).all() and 1 < np.linalg.norm(b["mlp_in.10"], axis=1).mean() < 1e3


def test_reader_slices_make_each_batch_from_parts_read_apart(cache, monkeypatch):
    """S slices: a loader reading slice s alone yields part s of every batch, opening only slice s's shards;
    the parts concatenate to the batches of a loader reading all slices, at any resume point."""
    keys = ["resid_post.1", "seq", "pos"]
    whole = BatchLoader(cache, keys, 96, seed=2, mix_shards=2, slices=3)
    assert whole.slice_shards == [cache.shard_ids("train")[s::3] for s in range(3)] and whole.part == 32
    assert whole.batches_per_epoch == min(sum(cache.shards[i]["rows"] for i in ids) // 32 for ids in whole.slice_shards)
    n = whole.batches_per_epoch + 3  # across an epoch seam
    full = _take(whole, n)
    opened = []
    real = type(cache).shard_arrays
    monkeypatch.setattr(type(cache), "shard_arrays", lambda self, i, keys=None, **kw: opened.append(i) or real(self, i, keys, **kw))
    parts = []
    for s in range(3):
        opened.clear()
        alone = BatchLoader(cache, keys, 96, seed=2, mix_shards=2, slices=3, read=[s], prefetch=0)
        parts.append(_take(alone, n))
        assert set(opened) == set(whole.slice_shards[s])  # its own shards, nothing else
        assert alone.rows_read == sum(cache.shards[i]["rows"] for i in opened)
    for b, batch in enumerate(full):
        assert all(np.array_equal(batch[k], np.concatenate([p[b][k] for p in parts])) for k in keys)
    two = _take(BatchLoader(cache, keys, 96, seed=2, mix_shards=2, slices=3, read=[1, 2]), 5, start=n - 5)
    assert all(np.array_equal(x[k], full[n - 5 + i][k][32:]) for i, x in enumerate(two) for k in keys)
    # an epoch still visits no row twice; one slice is the plain loader
    rows = [r for b in full[: whole.batches_per_epoch] for r in zip(b["seq"].tolist(), b["pos"].tolist())]
    assert len(set(rows)) == len(rows)
    plain, one = _take(BatchLoader(cache, keys, 96, seed=2), 3), _take(BatchLoader(cache, keys, 96, seed=2, slices=1), 3)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(plain, one) for k in keys)


def test_bad_reader_slices_are_refused(cache):
    with pytest.raises(CacheError, match="reader slices = 3 must be a positive divisor of batch_size 100"):
        BatchLoader(cache, ["seq"], 100, slices=3)
    with pytest.raises(CacheError, match="has 12 shard\\(s\\), fewer than the 16 reader slices"):
        BatchLoader(cache, ["seq"], 64, slices=16)
    with pytest.raises(CacheError, match="must list distinct reader slices in 0..1"):
        BatchLoader(cache, ["seq"], 64, slices=2, read=[2])


def test_a_source_that_hashes_on_read_catches_a_corrupt_shard_the_structure_check_misses(tmp_path):
    """Multi-process training checks only the folder's structure up front and each shard's sha256 as it is
    read: a same-size corruption passes the structure check and is caught by the first read of that shard."""
    from dictlearn.activations.cache import ActivationCache, CacheError
    from dictlearn.trainers.data import CacheSource
    from conftest import write_cache  # noqa: E402

    rng = np.random.default_rng(0)
    path = write_cache(tmp_path / "cache", {"x": rng.normal(size=(512, 8)).astype(np.float32)}, n_shards=4)
    cache = ActivationCache.open(path)
    name = cache.shards[cache.shard_ids("train")[0]]["file"]
    data = bytearray((path / name).read_bytes())
    data[-5] ^= 0xFF  # a flipped bit inside the last array: same size, same header
    (path / name).write_bytes(bytes(data))
    cache = ActivationCache.open(path)
    cache.verify(checksums=False)  # the structure is intact
    plain = CacheSource(cache, ["x"], 64)
    next(plain.iterate(0))  # reads without hashing
    hashing = CacheSource(cache, ["x"], 64, verify_reads=True)
    with pytest.raises(CacheError, match="sha256|corrupt"):
        for _, _ in zip(range(8), hashing.iterate(0)):  # 8 batches of 64 cover every train shard
            pass
