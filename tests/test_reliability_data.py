"""Reliability of the data side (issue 14): faults injected the way users meet them, each refused with a
sentence that names the problem, and nothing lost or mixed silently."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dictlearn.activations import cache as cache_mod
from dictlearn.activations.cache import ActivationCache, CacheError
from dictlearn.activations.corpus import CorpusError
from dictlearn.activations.harvest import HarvestError
from dictlearn.activations.loader import BatchLoader
from dictlearn.cli import main as cli
from dictlearn.files import FolderLock, LockedError

ROOT = Path(__file__).resolve().parents[1]


def _copy(cache: ActivationCache, dest: Path) -> Path:
    shutil.copytree(cache.path, dest)
    return dest


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


# --- 1. the folder is accounted for against the manifest ------------------------------------------------------
@pytest.mark.parametrize("victim", [5, -1])
def test_a_shard_entry_removed_from_the_manifest_is_caught(tiny_harvest, tmp_path, capsys, victim):
    good = tiny_harvest()
    path = _copy(good, tmp_path / "edited")
    name = good.shards[victim]["file"]
    _edit_manifest(path, lambda m: m["shards"].remove(m["shards"][victim]))  # the file stays
    cache = ActivationCache.open(path)
    for checksums in (True, False):  # `cache verify` and the quick check eval and training run
        with pytest.raises(CacheError, match=rf"{name} is in the folder but not listed in manifest.json"):
            cache.verify(checksums=checksums)
    with pytest.raises(CacheError, match=name):
        BatchLoader(cache, ["resid_post.1"], batch_size=64)
    assert cli(["cache", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert name in err and "16 were planned" in err and "n_rows" in err and "Traceback" not in err
    if victim == 5:
        assert "skip or reorder" in err


def test_unlisted_files_gaps_and_totals_are_named(tiny_harvest, tmp_path):
    good = tiny_harvest()
    good.verify()
    stray = _copy(good, tmp_path / "stray")
    shutil.copy(stray / "shard-00003.safetensors", stray / "shard-00016.safetensors")
    (stray / "notes.txt").write_text("not data")  # not cache data: left alone
    with pytest.raises(CacheError, match=r"shard-00016.safetensors is in the folder but not listed") as e:
        ActivationCache.open(stray).verify(checksums=False)
    assert "notes.txt" not in str(e.value)

    totals = _copy(good, tmp_path / "totals")
    _edit_manifest(totals, lambda m: m.update(n_rows=m["n_rows"] + 7))
    with pytest.raises(CacheError, match=r"its n_rows is [\d,]+ but its shards hold [\d,]+ rows"):
        ActivationCache.open(totals).verify(checksums=False)

    ranges = _copy(good, tmp_path / "ranges")
    _edit_manifest(ranges, lambda m: m["shards"][2].update(seq_start=m["shards"][2]["seq_start"] + 1))
    with pytest.raises(CacheError, match=r"shard-00002.safetensors holds sequences .* not the planned range"):
        ActivationCache.open(ranges).verify(checksums=False)

    split = _copy(good, tmp_path / "split")
    _edit_manifest(split, lambda m: m["shards"][0].update(split="eval"))
    with pytest.raises(CacheError, match=r"shard-00000.safetensors is marked 'eval'"):
        ActivationCache.open(split).check_folder()


def test_an_unfinished_cache_may_hold_the_shard_a_kill_interrupted(tiny_harvest, tmp_path):
    good = tiny_harvest(n_tokens=1024)
    path = _copy(good, tmp_path / "killed")
    # killed after shard 3's file was renamed into place but before the manifest listed it
    _edit_manifest(path, lambda m: (m["shards"].pop(), m.update(complete=False, n_rows=sum(s["rows"] for s in m["shards"]),
                                                                n_tokens=sum(s["tokens"] for s in m["shards"]))))
    ActivationCache.open(path).check_folder()  # the harvest's rerun overwrites that file


# --- 3. reads that check the shard's sha256 -------------------------------------------------------------------
def test_verified_reads_equal_mapped_reads_and_name_a_flipped_shard(tiny_harvest, tmp_path):
    good = tiny_harvest(n_tokens=1024)
    for k in range(len(good.shards)):
        mapped, checked = good.shard_arrays(k), good.shard_arrays(k, verify=True)
        assert mapped.keys() == checked.keys()
        for key in mapped:
            assert mapped[key].dtype == checked[key].dtype and np.array_equal(mapped[key], checked[key])
    path = _copy(good, tmp_path / "flipped")
    victim = path / good.shards[2]["file"]
    data = bytearray(victim.read_bytes())
    data[-40] ^= 0x01  # one bit of a stored value: headers and sizes still look right
    victim.write_bytes(bytes(data))
    cache = ActivationCache.open(path)
    cache.shard_arrays(2, ["resid_post.1"])  # the unchecked read does not notice
    with pytest.raises(CacheError, match=r"shard-00002.safetensors in .*flipped: corrupt: its sha256 does not match"):
        cache.shard_arrays(2, ["resid_post.1"], verify=True)
    cache.shard_arrays(1, ["resid_post.1"], verify=True)  # the others still read
    loader = BatchLoader(cache, ["resid_post.1"], batch_size=16, split="all", mix_shards=1, prefetch=0, verify=True)
    with pytest.raises(CacheError, match="shard-00002"):
        for _ in zip(range(loader.batches_per_epoch), loader.iterate()):
            pass
    victim.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match=r"shard-00002.safetensors in .*: truncated or altered"):
        cache.shard_arrays(2, verify=True)
