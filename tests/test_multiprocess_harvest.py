"""Multi-process harvest: process slots from the launcher's environment, parts that merge into exactly the
one-process cache, killed parts and merges that resume, and the refusals that name the part to fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dictlearn.activations import harvest as harvest_mod
from dictlearn.activations import merge as merge_mod
from dictlearn.activations.cache import ActivationCache, CacheError, CacheWriter
from dictlearn.activations.corpus import CorpusConfig
from dictlearn.activations.harvest import HarvestConfig, harvest
from dictlearn.activations.merge import MERGED_FROM, merge, unmerged_note
from dictlearn.activations.processes import ProcessSlotError, part_dir, process_slot, shard_range
from dictlearn.cli import main as cli
from dictlearn.run import Run, cache_identity

from conftest import CORPUS

HARVEST = dict(hookpoints=["resid_post.1", "mlp_hidden.1"], n_tokens=4096, dtype="float32", batch_size=4,
               shard_mb=0.25, eval_fraction=0.25)  # 16 shards of 4 sequences, 4 of them held out
SLOT_VARS = ("DICTLEARN_PROCESS_INDEX", "DICTLEARN_PROCESS_COUNT", "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE")


def _harvest(loaded, out: Path, process=(0, 1), **overrides) -> ActivationCache:
    corpus = CorpusConfig(path=str(CORPUS), context_length=64)
    return harvest(loaded, corpus, HarvestConfig(**{**HARVEST, **overrides}), out, progress=False, process=process)


@pytest.fixture(scope="module")
def harvested(tiny_loaded, tmp_path_factory):
    """(a one-process cache, a folder holding the two finished parts of the same harvest), made once."""
    root = tmp_path_factory.mktemp("multiprocess")
    one = _harvest(tiny_loaded, root / "one")
    for i in (0, 1):
        part = _harvest(tiny_loaded, root / "two", process=(i, 2))
        assert part.path == part_dir(root / "two", i, 2) and part.complete
    return one, root / "two"


def _copy_parts(harvested, dest: Path) -> Path:
    shutil.copytree(harvested[1], dest)
    return dest


def _assert_equal_caches(merged: ActivationCache, one: ActivationCache) -> None:
    """The merged cache is the one-process cache: manifest key for key (shards, splits, left-out counts,
    checksums), every array of every shard, and the cache identity the stages' stamps use."""
    assert merged.manifest[MERGED_FROM]["process_count"] >= 2
    assert {k: v for k, v in merged.manifest.items() if k != MERGED_FROM} == one.manifest
    for k in range(len(one.shards)):
        a, b = one.shard_arrays(k), merged.shard_arrays(k)
        assert sorted(a) == sorted(b)
        for key in a:
            assert np.array_equal(a[key], b[key]), (k, key)
    assert cache_identity(merged) == cache_identity(one)


# --- process slots ------------------------------------------------------------------------------------------------
def test_process_slot_reads_the_launchers_environment(monkeypatch):
    for var in SLOT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert process_slot() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert process_slot() == (3, 4)  # torchrun
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert process_slot() == (1, 2)  # srun before torchrun
    monkeypatch.setenv("DICTLEARN_PROCESS_INDEX", "0")
    monkeypatch.setenv("DICTLEARN_PROCESS_COUNT", "5")
    assert process_slot() == (0, 5)  # ours before both
    assert process_slot(2, 3) == (2, 3)  # explicit values win


@pytest.mark.parametrize("env, explicit, message", [
    ({"SLURM_PROCID": "1"}, (None, None), "SLURM_PROCID is set but SLURM_NTASKS is not"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, (None, None), "RANK='one' is not an integer"),
    ({"DICTLEARN_PROCESS_INDEX": "2", "DICTLEARN_PROCESS_COUNT": "2"}, (None, None),
     r"index is 2 \(from DICTLEARN_PROCESS_INDEX/DICTLEARN_PROCESS_COUNT\) but must be in 0..1"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, (None, None), "count is 0"),
    ({}, (1, None), "give both --process-index and --process-count"),
    ({}, (-1, 2), "index is -1 .*the command line"),
])
def test_bad_process_slots_are_named(monkeypatch, env, explicit, message):
    for var in SLOT_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ProcessSlotError, match=message):
        process_slot(*explicit)


def test_shares_are_contiguous_disjoint_and_cover_the_plan():
    for n_shards in (1, 7, 16):
        for count in (1, 2, 3, 5):
            shares = [shard_range(n_shards, i, count) for i in range(count)]
            assert [k for s in shares for k in s] == list(range(n_shards))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --- merge equals one process ---------------------------------------------------------------------------------------
def test_two_parts_merge_into_exactly_the_one_process_cache(harvested, tmp_path):
    one, _ = harvested
    out = _copy_parts(harvested, tmp_path / "cache")
    parts = [ActivationCache.open(part_dir(out, i, 2)) for i in (0, 1)]
    assert [len(p.shards) for p in parts] == [8, 8]
    assert sorted(set(np.concatenate([p.shard_arrays(k)["seq"] for p in parts for k in range(8)]))) == list(range(64))
    assert "all 2 parts are complete" in unmerged_note(out)

    merged = merge(out, checksums=True, progress=False)
    merged.verify()
    assert not (out / "parts").exists()
    _assert_equal_caches(ActivationCache.open(out), one)
    assert merged.manifest["left_out"] == one.manifest["left_out"] and sum(one.manifest["left_out"].values()) > 0
    assert [s["split"] for s in merged.shards].count("eval") == 4

    before = (out / "manifest.json").read_bytes()
    assert merge(out, progress=False).manifest == merged.manifest  # again: nothing to do
    assert (out / "manifest.json").read_bytes() == before


def test_three_processes_with_uneven_shares_merge_too(tiny_loaded, harvested, tmp_path):
    one, _ = harvested
    out = tmp_path / "cache"
    sizes = [len(_harvest(tiny_loaded, out, process=(i, 3)).shards) for i in range(3)]
    assert sizes == [5, 5, 6]
    _assert_equal_caches(merge(out, progress=False), one)
    assert _harvest(tiny_loaded, out, process=(1, 3)).manifest == ActivationCache.open(out).manifest  # merged: found


# --- a killed part, a killed merge ------------------------------------------------------------------------------------
def test_a_killed_part_is_named_then_resumes_and_merges(tiny_loaded, harvested, tmp_path, monkeypatch, capfd):
    one, _ = harvested
    out = tmp_path / "cache"
    shutil.copytree(part_dir(harvested[1], 0, 2), part_dir(out, 0, 2))
    real_add = CacheWriter.add_shard

    def dies_after_three(self, arrays, info):
        if self.n_done == 3:
            raise RuntimeError("killed")
        real_add(self, arrays, info)

    monkeypatch.setattr(CacheWriter, "add_shard", dies_after_three)
    with pytest.raises(RuntimeError, match="killed"):
        _harvest(tiny_loaded, out, process=(1, 2))
    monkeypatch.setattr(CacheWriter, "add_shard", real_add)
    with pytest.raises(CacheError, match=r"part 1-of-2 is unfinished \(3 of 8 shards\).*run `dictlearn harvest CONFIG "
                                         r"--process-index 1 --process-count 2` with the same config"):
        merge(out, progress=False)
    assert part_dir(out, 0, 2).is_dir() and not (out / "manifest.json").exists()  # a refused merge changes nothing

    corpus = CorpusConfig(path=str(CORPUS), context_length=64)
    capfd.readouterr()
    harvest(tiny_loaded, corpus, HarvestConfig(**HARVEST), out, process=(1, 2))
    err = capfd.readouterr().err
    assert "process 1 of 2: shards 8-15 of 16" in err and "resuming after shard 10" in err
    _assert_equal_caches(merge(out, progress=False), one)


def test_a_merge_killed_at_any_step_is_finished_by_running_it_again(harvested, tmp_path, monkeypatch):
    one, _ = harvested
    # killed before the merged manifest is written: the parts are whole, the folder is not yet a cache
    out = _copy_parts(harvested, tmp_path / "a")
    real_write = merge_mod.atomic_write_json
    monkeypatch.setattr(merge_mod, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        merge(out, progress=False)
    monkeypatch.setattr(merge_mod, "atomic_write_json", real_write)
    assert not (out / "manifest.json").exists()
    for i in (0, 1):
        part = ActivationCache.open(part_dir(out, i, 2))
        assert part.complete and all((part.path / s["file"]).is_file() for s in part.shards)
    _assert_equal_caches(merge(out, progress=False), one)

    # killed while removing the parts: the merged cache is already valid, a rerun removes the rest
    out = _copy_parts(harvested, tmp_path / "b")
    monkeypatch.setattr(merge_mod.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        merge(out, progress=False)
    monkeypatch.undo()
    ActivationCache.open(out).verify()
    assert (out / "parts").is_dir()
    merge(out, progress=False)
    assert not (out / "parts").exists()
    _assert_equal_caches(ActivationCache.open(out), one)

    # a file system without hard links: shards are moved, and a merge killed mid-move finishes on the rerun
    out = _copy_parts(harvested, tmp_path / "c")
    moved = []
    real_replace = os.replace

    def no_links(*a, **k):
        raise OSError(1, "hard links not supported")

    def replace_then_die(src, dst):
        if len(moved) == 5:
            raise KeyboardInterrupt()
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(merge_mod.os, "link", no_links)
    monkeypatch.setattr(merge_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        merge(out, progress=False)
    monkeypatch.setattr(merge_mod.os, "replace", real_replace)
    assert len(moved) == 5 and not (out / "manifest.json").exists()
    _assert_equal_caches(merge(out, progress=False), one)


# --- refusals ----------------------------------------------------------------------------------------------------------
def test_missing_foreign_and_mixed_parts_are_refused_by_name(tiny_loaded, harvested, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(part_dir(harvested[1], 0, 2), part_dir(out, 0, 2))
    with pytest.raises(CacheError, match=r"part 1-of-2 is missing .*--process-index 1 --process-count 2"):
        merge(out, progress=False)
    assert cli(["cache", "merge", str(out)]) == 1
    err = capsys.readouterr().err
    assert "part 1-of-2 is missing" in err and "Traceback" not in err
    assert cli(["cache", "info", str(out)]) == 1
    assert "unmerged parts of a 2-process harvest (part 1-of-2 is missing" in capsys.readouterr().err
    assert cli(["cache", "verify", str(part_dir(out, 0, 2))]) == 1
    assert "is part 0-of-2 of a multi-process harvest" in capsys.readouterr().err
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "run"}"\n[train]\ncache = "{out}"\n')
    with pytest.raises(CacheError, match=r"unmerged parts of a 2-process harvest .* `dictlearn cache merge"):
        Run.from_config(cfg).open_cache()  # what train, eval and export open

    # part 1 from another config: named with what differs
    _harvest(tiny_loaded, out, process=(1, 2), n_tokens=4096 + 64, shard_mb=0.25)
    with pytest.raises(CacheError, match=r"part 1-of-2 was harvested with a different config .*harvest.n_tokens: part "
                                         r"0-of-2 has 4096, part 1-of-2 has 4160"):
        merge(out, progress=False)

    # another process count beside existing parts: the harvest and the merge both refuse
    with pytest.raises(ProcessSlotError, match=r"holds parts of a 2-process harvest \(0-of-2, 1-of-2\) but this harvest "
                                               "uses 3 processes"):
        _harvest(tiny_loaded, out, process=(0, 3))
    with pytest.raises(ProcessSlotError, match="uses 1 process; harvest with --process-count 2 and merge"):
        _harvest(tiny_loaded, out)
    part_dir(out, 2, 3).mkdir(parents=True)
    with pytest.raises(CacheError, match="mixes parts of harvests with 2 and 3 processes"):
        merge(out, progress=False)
    with pytest.raises(CacheError, match=rf"is one part of a multi-process harvest; merge .* {out}$"):
        merge(part_dir(out, 0, 2), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="holds no parts to merge"):
        merge(tmp_path / "empty", progress=False)


def test_cli_two_concurrent_processes_from_the_environment_merge_and_match(tiny_gpt2, smol, tmp_path):
    """Two `dictlearn harvest` processes started together with DICTLEARN_PROCESS_INDEX/COUNT: each harvests its
    part, the first to see both complete merges, both wait for the merge and exit 0; the result equals an
    in-process one-process harvest of the same saved model."""
    from dictlearn.activations.models import load_model

    model_dir = tmp_path / "tiny-model"
    tiny_gpt2.save_pretrained(model_dir)
    smol.tokenizer.save_pretrained(model_dir)
    h = {**HARVEST, "n_tokens": 2048}
    cfg = tmp_path / "run.toml"
    cfg.write_text("\n".join([f'out_dir = "{tmp_path / "run"}"', "[model]", f'name = "{model_dir}"', "[corpus]",
                              f'path = "{CORPUS}"', "context_length = 64", "[harvest]"]
                             + [f"{k} = {json.dumps(v)}" for k, v in h.items()]) + "\n")
    exe = str(Path(sys.executable).with_name("dictlearn"))
    env = {k: v for k, v in os.environ.items() if k not in SLOT_VARS}
    procs = [subprocess.Popen([exe, "harvest", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "DICTLEARN_PROCESS_INDEX": str(i), "DICTLEARN_PROCESS_COUNT": "2"})
             for i in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-3000:]
    assert all(f"process {i} of 2 (from DICTLEARN_PROCESS_INDEX/DICTLEARN_PROCESS_COUNT)" in log
               for i, log in enumerate(logs))
    assert sum("merge: 2 parts" in log for log in logs) == 1  # exactly one process merged
    merged = ActivationCache.open(tmp_path / "run" / "cache")
    merged.verify()
    assert merged.manifest[MERGED_FROM]["process_count"] == 2 and not (merged.path / "parts").exists()

    one = harvest(load_model(str(model_dir)), CorpusConfig(path=str(CORPUS), context_length=64), HarvestConfig(**h),
                  tmp_path / "one", progress=False)
    assert merged.manifest["identity"] == one.manifest["identity"]
    assert [{k: v for k, v in s.items() if k not in ("sha256", "bytes")} for s in merged.shards] == [
        {k: v for k, v in s.items() if k not in ("sha256", "bytes")} for s in one.shards]
    for k in range(len(one.shards)):
        a, b = one.shard_arrays(k), merged.shard_arrays(k)
        for key in ("token_id", "seq", "pos", "sequence_tokens"):
            assert np.array_equal(a[key], b[key]), (k, key)
        for key in HARVEST["hookpoints"]:  # another process: float32 sums may differ in the last bits
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
