"""Harvesting: resume after SIGKILL, gradients, refusals (bad hookpoint, config key, corpus, disk, mixing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dictlearn.activations import hookpoints as H
from dictlearn.activations.cache import ActivationCache, CacheError, to_float32
from dictlearn.activations.corpus import CorpusConfig
from dictlearn.activations.harvest import HarvestConfig, HarvestError, harvest
from dictlearn.cli import main as cli

from conftest import CORPUS, SMOL_GGUF


def _sorted_rows(cache: ActivationCache, keys: list[str]) -> dict[str, np.ndarray]:
    parts = [cache.shard_arrays(k, keys + ["seq", "pos"]) for k in range(len(cache.shards))]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in keys + ["seq", "pos"]}
    order = np.lexsort((cat["pos"], cat["seq"]))
    return {k: v[order] for k, v in cat.items()}


def _write_config(path: Path, out: Path, **harvest_keys) -> Path:
    h = {"hookpoints": ["resid_post.3", "mlp_hidden.3"], "n_tokens": 2048, "batch_size": 4, "shard_mb": 1.1,
         "dtype": "float32", "eval_fraction": 0.1, **harvest_keys}
    lines = [f'out_dir = "{out}"', "[model]", f'name = "{SMOL_GGUF}"', "[corpus]", f'path = "{CORPUS}"',
             "context_length = 64", "[harvest]"] + [f"{k} = {json.dumps(v)}" for k, v in h.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resume_after_sigkill_gives_the_uninterrupted_rows(tmp_path, smol, capfd):
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "run.toml", out)
    cmd = [str(Path(sys.executable).with_name("dictlearn")), "harvest", str(cfg)]
    manifest = out / "cache" / "manifest.json"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 2:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.01)
        assert proc.poll() is None, f"harvest ended before it could be killed: {(tmp_path / 'killed.log').read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed = ActivationCache.open(out / "cache")
    assert not killed.complete and 2 <= len(killed.shards) < killed.manifest["n_shards_planned"]
    with pytest.raises(CacheError, match="unfinished"):
        killed.verify()

    # the same command again (in this process, to save a second model load): it finishes the cache
    corpus = CorpusConfig(path=str(CORPUS), context_length=64)
    config = HarvestConfig(hookpoints=["resid_post.3", "mlp_hidden.3"], n_tokens=2048, batch_size=4, shard_mb=1.1,
                           dtype="float32", eval_fraction=0.1)
    resumed = harvest(smol, corpus, config, out / "cache")
    assert f"resuming after shard {len(killed.shards) - 1}" in capfd.readouterr().err
    resumed.verify()
    assert not list((out / "cache").glob("*.tmp*"))

    ref = harvest(smol, corpus, config, tmp_path / "ref", progress=False)  # uninterrupted
    assert [(s["rows"], s["seq_start"], s["split"]) for s in ref.shards] == [
        (s["rows"], s["seq_start"], s["split"]) for s in resumed.shards]
    for k in range(len(ref.shards)):  # shard by shard, the same rows in the same shuffled order
        a, b = ref.shard_arrays(k), resumed.shard_arrays(k)
        for key in ("token_id", "seq", "pos", "sequence_tokens"):
            assert np.array_equal(a[key], b[key]), (k, key)
        for key in ("resid_post.3", "mlp_hidden.3"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_a_different_config_is_refused_not_mixed(tiny_harvest, tmp_path):
    tiny_harvest(out=tmp_path / "c", n_tokens=1024)
    again = tiny_harvest(out=tmp_path / "c", n_tokens=1024)  # same config: already complete, nothing redone
    assert again.complete
    with pytest.raises(CacheError, match=r"different config \(harvest.n_tokens: cache has 1024, config has 2048"):
        tiny_harvest(out=tmp_path / "c", n_tokens=2048)
    with pytest.raises(CacheError, match="harvest.hookpoints"):
        tiny_harvest(out=tmp_path / "c", n_tokens=1024, hookpoints=["resid_post.1"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty"):
        tiny_harvest(out=tmp_path / "other")
    assert [f.name for f in (tmp_path / "other").iterdir()] == ["notes.txt"]  # not even a lock file left there


def test_bad_hookpoint_fails_before_any_work(tiny_harvest, tmp_path):
    with pytest.raises(H.HookpointError, match="valid hookpoints"):
        tiny_harvest(out=tmp_path / "x", hookpoints=["resid_post.1", "mlp_hiddden.1"])
    assert not (tmp_path / "x").exists()


def test_disk_too_small_is_refused_before_any_work(tiny_harvest, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(HarvestError, match=r"needs about \d+\.\d MB plus a safety margin of \d+\.\d MB \(2% \+ 16 MiB .* "
                                            r"has only 0\.0 MB free; free some space, lower harvest.n_tokens, .*or choose"):
        tiny_harvest(out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_refuses_bad_config_key_and_bad_corpus(tmp_path, capsys):
    cfg = _write_config(tmp_path / "a.toml", tmp_path / "run", shard_sizes=3)
    assert cli(["harvest", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "unknown key(s) 'shard_sizes'" in err and "valid keys are: batch_size" in err and "shard_mb" in err
    cfg = _write_config(tmp_path / "b.toml", tmp_path / "run")
    assert cli(["harvest", str(cfg), "--set", "corpus.path=/no/such/corpus.jsonl"]) == 1
    assert "corpus '/no/such/corpus.jsonl' does not exist" in capsys.readouterr().err
    assert cli(["harvest", str(cfg), "--set", "harvest.dtype=int8"]) == 1
    assert "dtype 'int8' is not a storage dtype" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _reference_grads(model, tokens: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """d(sum of next-token losses)/d(activation) by plain autograd from the input embeddings."""
    ids = torch.from_numpy(tokens).long()
    hps = H.resolve(model, names)
    with torch.enable_grad(), H.capture(model, hps, detach=False) as acts:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits
        for t in acts.values():
            t.retain_grad()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        loss.backward()
    return {n: acts[n].grad[0].numpy() for n in names}


def test_gradients_equal_autograd_on_tiny_gpt2(tiny_harvest, tiny_gpt2):
    cache = tiny_harvest(n_tokens=1024, hookpoints=["mlp_hidden.1", "resid_post.1"], gradients=["mlp_hidden.1", "resid_post.1"])
    assert cache.hookpoints["resid_post.1@grad"] == {"width": 32, "dtype": "float32", "kind": "gradient"}
    rows = _sorted_rows(cache, ["resid_post.1@grad", "mlp_hidden.1@grad"])
    for seq in (0, 9):
        ref = _reference_grads(tiny_gpt2, cache.sequence_tokens([seq]), ["mlp_hidden.1", "resid_post.1"])
        sel = rows["seq"] == seq
        for name in ("mlp_hidden.1", "resid_post.1"):
            got = rows[name + "@grad"][sel]
            want = ref[name][rows["pos"][sel]]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        assert np.all(rows["resid_post.1@grad"][sel & (rows["pos"] == 63)] == 0)  # the last position predicts nothing


def test_smol_gradients_equal_autograd(smol_grad_cache, smol):
    smol_grad_cache.verify()
    rows = _sorted_rows(smol_grad_cache, ["resid_post.10@grad"])
    seq = int(smol_grad_cache.eval_sequences()[0])
    ref = _reference_grads(smol.model, smol_grad_cache.sequence_tokens([seq]), ["resid_post.10"])["resid_post.10"]
    sel = rows["seq"] == seq
    got, want = to_float32(rows["resid_post.10@grad"][sel]), ref[rows["pos"][sel]]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # bfloat16 storage
