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
