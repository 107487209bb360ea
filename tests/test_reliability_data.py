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


# --- 4. one harvest at a time per cache folder ----------------------------------------------------------------
def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s lock until killed."""
    code = ("import sys, time; from dictlearn.files import FolderLock; FolderLock(sys.argv[1], 'a test holder').__enter__(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _tiny_config(path: Path, out: Path, corpus: Path, field: str = "text") -> Path:
    path.write_text(textwrap.dedent(f"""\
        out_dir = "{out}"
        [model]
        name = "tiny-gpt2"
        [corpus]
        path = "{corpus}"
        field = "{field}"
        context_length = 64
        [harvest]
        hookpoints = ["resid_post.1", "mlp_hidden.1"]
        n_tokens = 1024
        dtype = "float32"
        batch_size = 4
        shard_mb = 0.25
        """))
    return path


def test_a_second_harvest_into_a_held_folder_refuses_naming_the_pid(tiny_harvest, tiny_loaded, tmp_path, capsys,
                                                                   monkeypatch):
    from conftest import CORPUS
    from dictlearn.activations.models import ModelConfig

    first = tiny_harvest(out=tmp_path / "run" / "cache", n_tokens=1024)
    _edit_manifest(first.path, lambda m: (m["shards"].pop(), m.update(complete=False)))  # as if mid-harvest
    in_flight = first.path / (first.shards[-1]["file"] + ".tmp99999")  # the holder's shard in mid-write
    in_flight.write_bytes(b"half a shard")
    holder = _hold_lock(first.path)
    try:
        with pytest.raises(LockedError, match=rf"in use by another dictlearn process \(pid {holder.pid} "):
            tiny_harvest(out=first.path, n_tokens=1024)
        monkeypatch.setattr(ModelConfig, "load", lambda self: tiny_loaded)
        assert cli(["harvest", str(_tiny_config(tmp_path / "run.toml", tmp_path / "run", CORPUS))]) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "Traceback" not in err
        assert in_flight.exists()  # the joining run removed nothing of the holder's
        assert not ActivationCache.open(first.path).complete
    finally:
        holder.kill()
        holder.wait()
    resumed = tiny_harvest(out=first.path, n_tokens=1024)  # the dead holder's lock is recovered
    assert resumed.complete and not in_flight.exists()  # now this run holds the lock, so it cleans up
    resumed.verify()


# --- 5. a full disk mid-harvest -------------------------------------------------------------------------------
def _no_space_on(monkeypatch, writer: str, nth_call: int) -> None:
    """Make the `writer` helper the cache module uses raise ENOSPC on its nth call."""
    real, calls = getattr(cache_mod, writer), []

    def full(path, *a, **kw):
        calls.append(path)
        if len(calls) == nth_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(cache_mod, writer, full)


@pytest.mark.parametrize("writer, nth, done", [("atomic_write_bytes", 6, 5), ("atomic_write_json", 5, 3)])
def test_a_full_disk_is_a_sentence_and_the_rerun_gives_the_uninterrupted_cache(tiny_harvest, tmp_path, monkeypatch,
                                                                                 writer, nth, done):
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        _no_space_on(m, writer, nth)  # shard 5's file, or (create, then 3 shards) the manifest listing shard 3
        with pytest.raises(HarvestError) as e:
            tiny_harvest(out=out, n_tokens=2048)
    msg = str(e.value)
    on_disk = ActivationCache.open(out)
    rows, mb = sum(s["rows"] for s in on_disk.shards), sum(s["bytes"] for s in on_disk.shards) / 1e6
    assert len(on_disk.shards) == done
    assert (f"the disk holding {out} is full (No space left on device): {done} of 8 shards ({rows:,} rows, {mb:.1f} MB) "
            f"are safely written; free some space and run the same command again: it resumes after shard {done - 1}") == msg
    assert not list(out.glob("*.tmp*"))
    resumed = tiny_harvest(out=out, n_tokens=2048)  # the same command, space freed
    ref = tiny_harvest(out=tmp_path / "ref", n_tokens=2048)
    resumed.verify()
    assert [(s["file"], s["rows"], s["sha256"]) for s in resumed.shards] == [(s["file"], s["rows"], s["sha256"]) for s in ref.shards]


# --- 7. the disk-space check ------------------------------------------------------------------------------------
def test_a_resuming_harvest_short_of_space_is_not_told_to_change_n_tokens(tiny_harvest, tmp_path, monkeypatch):
    out = tmp_path / "partial"
    with monkeypatch.context() as m:
        _no_space_on(m, "atomic_write_bytes", 4)
        with pytest.raises(HarvestError):
            tiny_harvest(out=out, n_tokens=2048)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 15 * 10**6, 15 * 10**6))
    with pytest.raises(HarvestError) as e:
        tiny_harvest(out=out, n_tokens=2048)
    msg = str(e.value)
    assert msg.startswith("the cache still needs about 0.") and " MB plus a safety margin of 16.8 MB (2% + 16 MiB" in msg
    assert "has only 15.0 MB free" in msg and "run the same command again" in msg
    assert "n_tokens" not in msg and "dtype" not in msg  # changing them would be refused as a different config


# --- 10. the corpus is checked before the cache folder exists ---------------------------------------------------
def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_wrong_field_or_empty_corpus_leaves_no_folder_and_the_corrected_run_works(tiny_loaded, tmp_path, capsys):
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from conftest import CORPUS
    import gzip

    texts = [json.loads(line)["text"] for _, line in zip(range(40), gzip.open(CORPUS, "rt"))]
    body = _jsonl(tmp_path / "body.jsonl", [{"body": t} for t in texts])
    config = HarvestConfig(hookpoints=["resid_post.1"], n_tokens=512, dtype="float32", batch_size=4, shard_mb=0.1)
    out = tmp_path / "cache"
    with pytest.raises(CorpusError, match=r"body.jsonl:1: has no field 'text' \(fields: body\); set corpus.field"):
        harvest(tiny_loaded, CorpusConfig(path=str(body)), config, out, progress=False)
    assert not out.exists()
    for records, expected in (([], "holds no documents"), ([{"text": ""}, {"text": "  "}], "have no text in field 'text'")):
        bad = _jsonl(tmp_path / "bad.jsonl", records)
        with pytest.raises(CorpusError, match=expected):
            harvest(tiny_loaded, CorpusConfig(path=str(bad)), config, out, progress=False)
        assert not out.exists()
        assert cli(["harvest", str(_tiny_config(tmp_path / "bad.toml", tmp_path / "run", bad))]) == 1
        assert expected in capsys.readouterr().err and not (tmp_path / "run").exists()  # before the model loads
    fixed = harvest(tiny_loaded, CorpusConfig(path=str(body), field="body"), config, out, progress=False)
    assert fixed.complete and fixed.n_rows > 0
