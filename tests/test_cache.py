"""The cache on disk: manifest, stored values, integrity checks and the `dictlearn cache` commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dictlearn.activations import hookpoints as H
from dictlearn.activations.cache import ActivationCache, CacheError, to_float32
from dictlearn.cli import main as cli


def _rows_of_sequence(cache: ActivationCache, key: str, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, float32 rows) of one sequence, gathered from the shuffled shard that holds it."""
    for k, s in enumerate(cache.shards):
        if s["seq_start"] <= seq < s["seq_stop"]:
            a = cache.shard_arrays(k, [key, "seq", "pos"])
            sel = np.nonzero(a["seq"] == seq)[0]
            order = np.argsort(a["pos"][sel])
            return a["pos"][sel][order], to_float32(a[key][sel][order])
    raise AssertionError(f"sequence {seq} not found")


def test_manifest_holds_what_the_issue_lists(tiny_harvest):
    cache = tiny_harvest()
    m = cache.manifest
    assert m["format_version"] == 1 and m["complete"] is True
    assert m["model"]["name"] == "tiny-gpt2" and m["model"]["fingerprint"] == "test:tiny-gpt2"
    assert m["corpus"]["fingerprint"].startswith("local:") and m["context_length"] == 64
    assert cache.hookpoints == {
        "resid_post.1": {"width": 32, "dtype": "float32", "kind": "activation"},
        "mlp_hidden.1": {"width": 128, "dtype": "float32", "kind": "activation"},
    }
    assert m["n_tokens"] == 4096 and cache.n_rows == m["n_rows"] == sum(s["rows"] for s in cache.shards)
    assert all(len(s["sha256"]) == 64 and s["rows"] > 0 for s in cache.shards)
    assert len(cache.shards) == m["n_shards_planned"] == 16
    cache.verify()


def test_rows_equal_a_fresh_forward_and_skip_special_tokens(tiny_harvest, tiny_gpt2):
    cache = tiny_harvest()
    excluded = set(cache.manifest["excluded_token_ids"])
    assert excluded and not excluded & set(np.unique(cache.shard_arrays(0, ["token_id"])["token_id"]).tolist())
    hps = H.resolve(tiny_gpt2, ["resid_post.1", "mlp_hidden.1"])
    for seq in (0, 13, 37):
        tokens = cache.sequence_tokens([seq])
        with torch.no_grad(), H.capture(tiny_gpt2, hps) as acts:
            tiny_gpt2(torch.from_numpy(tokens).long())
        keep = np.nonzero(~np.isin(tokens[0], list(excluded)) & (np.arange(tokens.shape[1]) > 0))[0]  # sink left out
        for key in ("resid_post.1", "mlp_hidden.1"):
            pos, rows = _rows_of_sequence(cache, key, seq)
            assert np.array_equal(pos, keep)
            np.testing.assert_allclose(rows, acts[key][0, keep].numpy(), rtol=1e-5, atol=1e-5)
        a = cache.shard_arrays(next(k for k, s in enumerate(cache.shards) if s["seq_start"] <= seq < s["seq_stop"]))
        sel = a["seq"] == seq
        assert np.array_equal(a["token_id"][sel], tokens[0, a["pos"][sel]])


def test_keeping_special_tokens_stores_every_position(tiny_harvest):
    cache = tiny_harvest(exclude_special_tokens=False, skip_sink_positions=False, n_tokens=1024)
    assert cache.n_rows == 1024 and cache.manifest["excluded_token_ids"] == []


def _all_rows(cache: ActivationCache, key: str) -> np.ndarray:
    """Every row of `key` in (seq, pos) order, in its stored dtype."""
    parts = [cache.shard_arrays(k, [key, "seq", "pos"]) for k in range(len(cache.shards))]
    seq, pos = (np.concatenate([p[n] for p in parts]) for n in ("seq", "pos"))
    return np.concatenate([p[key] for p in parts])[np.lexsort((pos, seq))]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_is_the_rounded_float32(tiny_harvest, tmp_path, dtype):
    ref = tiny_harvest(out=tmp_path / "f32", n_tokens=512)
    half = tiny_harvest(out=tmp_path / dtype, n_tokens=512, dtype=dtype)
    assert half.hookpoints["resid_post.1"]["dtype"] == dtype
    a, b = _all_rows(ref, "resid_post.1"), _all_rows(half, "resid_post.1")
    assert b.dtype.name == dtype and a.shape == b.shape == (ref.n_rows, 32)
    expected = torch.from_numpy(a).to(getattr(torch, dtype)).float().numpy()
    assert np.array_equal(to_float32(b), expected)  # the same rows, rounded once


def test_rows_are_shuffled_across_the_shard(tiny_harvest):
    cache = tiny_harvest(n_tokens=2048)
    seq = cache.shard_arrays(0, ["seq"])["seq"]
    assert len(np.unique(seq)) == cache.shards[0]["seq_stop"] - cache.shards[0]["seq_start"] > 1
    assert not np.all(np.diff(seq) >= 0)  # not in harvest order
    # every sequence is spread over the shard, not bunched together
    firsts = [np.nonzero(seq == s)[0] for s in np.unique(seq)]
    assert all(f.max() - f.min() > len(seq) // 2 for f in firsts)


def test_eval_split_is_whole_shards_disjoint_from_train(tiny_harvest):
    cache = tiny_harvest()
    assert len(cache.shard_ids("eval")) == 4 and len(cache.shard_ids("train")) == 12
    ev = set(cache.eval_sequences().tolist())
    train_seqs = set()
    for k in cache.shard_ids("train"):
        train_seqs |= set(np.unique(cache.shard_arrays(k, ["seq"])["seq"]).tolist())
    assert ev and train_seqs and not ev & train_seqs
    assert len(ev | train_seqs) == 4096 // 64


def test_truncated_and_corrupt_shards_are_named(tiny_harvest, tmp_path):
    good = tiny_harvest()
    for damage in ("truncate", "flip", "delete"):
        path = tmp_path / damage
        shutil.copytree(good.path, path)
        victim = path / good.shards[5]["file"]
        data = bytearray(victim.read_bytes())
        if damage == "truncate":
            victim.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data[len(data) - 100] ^= 0xFF
            victim.write_bytes(bytes(data))
        else:
            victim.unlink()
        with pytest.raises(CacheError, match="shard-00005"):
            ActivationCache.open(path).verify()
        assert cli(["cache", "verify", str(path)]) == 1
    assert cli(["cache", "verify", str(good.path)]) == 0


def test_unfinished_or_missing_caches_are_refused(tiny_harvest, tmp_path):
    with pytest.raises(CacheError, match="manifest.json is missing"):
        ActivationCache.open(tmp_path / "nothing")
    cache = tiny_harvest()
    m = json.loads((cache.path / "manifest.json").read_text())
    m["complete"] = False
    (cache.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="unfinished.*run the same `dictlearn harvest` command again"):
        ActivationCache.open(cache.path).verify()


def test_cache_info_command(tiny_harvest, capsys):
    cache = tiny_harvest()
    assert cli(["cache", "info", str(cache.path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-gpt2" in out and "resid_post.1" in out and "12 train / 4 eval" in out


def test_smol_cache_rows_match_the_model(smol_cache, smol):
    """The real cache: layer-10 rows of a sequence equal a fresh capture (to bfloat16 rounding)."""
    smol_cache.verify()
    names = ["resid_post.10", "mlp_in.10", "mlp_out.10", "mlp_hidden.10"]
    hps = H.resolve(smol.model, names)
    seq = int(smol_cache.eval_sequences()[0])
    tokens = smol_cache.sequence_tokens([seq])
    with torch.no_grad(), H.capture(smol.model, hps, stop_early=True) as acts:
        H.run_forward(smol.model, torch.from_numpy(tokens).long())
    for key in names:
        pos, rows = _rows_of_sequence(smol_cache, key, seq)
        want = acts[key][0, pos].to(torch.bfloat16).float().numpy()
        np.testing.assert_allclose(rows, want, rtol=0.02, atol=0.02)
