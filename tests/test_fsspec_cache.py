"""Caches read through fsspec URLs (memory://, file://; s3:// and gs:// with their packages): the same
batches bit for bit as the local folder, the same integrity checks and errors, training and evaluation
end to end from a URL, and clear sentences for a missing fsspec package and for writing to a URL."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import CLI_CONFIG, planted, write_cache
from dictlearn.activations.cache import ActivationCache, CacheError, CacheWriter
from dictlearn.activations.loader import BatchLoader
from test_loader import _take

KEYS = ["act", "seq", "pos", "token_id"]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("fsspec") / "cache", {"act": planted(n_rows=1280)}, n_shards=5)


@pytest.fixture
def memory_url(local):
    """The local cache copied file by file into fsspec's in-memory file system (removed afterwards)."""
    fs = fsspec.filesystem("memory")
    root = f"/dictlearn-test-{uuid.uuid4().hex[:8]}/cache"
    for f in local.iterdir():
        if f.is_file() and not f.name.startswith("."):
            fs.pipe(f"{root}/{f.name}", f.read_bytes())
    yield f"memory://{root}"
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("where", ["memory", "file", "simplecache::memory"])
def test_url_batches_equal_the_local_ones_bit_for_bit(local, memory_url, where):
    urls = {"memory": memory_url, "file": local.resolve().as_uri(), "simplecache::memory": f"simplecache::{memory_url}"}
    url = urls[where]  # file:///..., and a chained URL that keeps a local copy of what it reads
    assert url.startswith(f"{where}://")
    here, there = ActivationCache.open(local), ActivationCache.open(url)
    assert there.path == url and there.manifest == here.manifest
    there.verify()  # sizes, headers and every sha256, read through fsspec
    for kw in ({}, {"verify": True}, {"slices": 2, "read": [1]}):
        a = _take(BatchLoader(here, KEYS, 64, seed=5, mix_shards=2, **kw), 25)
        b = _take(BatchLoader(there, KEYS, 64, seed=5, mix_shards=2, **kw), 25)
        assert _same(a, b), kw
    assert np.array_equal(there.sequence_tokens([3, 70]), here.sequence_tokens([3, 70]))
    for k in range(len(here.shards)):
        x, y = here.shard_arrays(k), there.shard_arrays(k, verify=True)
        assert x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x)


def test_a_url_read_fetches_only_the_arrays_asked_for(local, memory_url, monkeypatch):
    cache = ActivationCache.open(memory_url)
    fs = cache._folder.fs
    fetched = []
    real = type(fs).cat_file
    monkeypatch.setattr(type(fs), "cat_file", lambda self, path, start=None, end=None, **kw:
                        fetched.append((end or 0) - (start or 0)) or real(self, path, start, end, **kw))
    arrays = cache.shard_arrays(0, ["seq"])
    assert arrays["seq"].shape == (cache.shards[0]["rows"],)
    assert sum(fetched) < cache.shards[0]["bytes"] // 4  # header and the one array, not the shard


def test_a_damaged_shard_in_memory_is_caught(memory_url):
    fs = fsspec.filesystem("memory")
    root = memory_url.removeprefix("memory://")
    cache = ActivationCache.open(memory_url)
    name = cache.shards[2]["file"]
    data = bytearray(fs.cat_file(f"{root}/{name}"))
    data[-50] ^= 0xFF  # one flipped bit pattern in the last array: same size, same header
    fs.pipe(f"{root}/{name}", bytes(data))
    with pytest.raises(CacheError, match="shard-00002.*corrupt: sha256 does not match"):
        cache.verify()
    cache.verify(checksums=False)  # the quick check cannot see it; the checksum on read does:
    with pytest.raises(CacheError, match="shard-00002.*corrupt: its sha256 does not match"):
        cache.shard_arrays(2, ["act"], verify=True)
    fs.pipe(f"{root}/{name}", bytes(data[:-10]))
    with pytest.raises(CacheError, match="shard-00002.*truncated"):
        cache.verify(checksums=False)
    fs.rm(f"{root}/{name}")
    with pytest.raises(CacheError, match="shard-00002.safetensors is listed but missing"):
        BatchLoader(cache, ["act"], 64)
    fs.pipe(f"{root}/shard-00099.safetensors", b"x")
    with pytest.raises(CacheError, match="shard-00099.safetensors is in the folder but not listed"):
        cache.check_folder()


def test_missing_caches_packages_and_schemes_are_named():
    with pytest.raises(CacheError, match="memory:///no-such-cache' is not an activation cache: manifest.json is missing"):
        ActivationCache.open("memory:///no-such-cache")
    with pytest.raises(CacheError, match=r"no fsspec file system reads nosuchfs:// URLs"):
        ActivationCache.open("nosuchfs://bucket/cache")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(CacheError, match=r"s3:// URLs needs the s3fs package, which is not installed: pip install s3fs"):
            ActivationCache.open("s3://some-bucket/cache")
    else:
        pytest.skip("s3fs is installed here, so its missing-package message cannot be shown")


def test_caches_are_written_to_local_folders_only(tmp_path):
    manifest = {"identity": {"test": 1}}
    for where in ("memory://somewhere/cache", Path("s3://bucket/cache")):  # the second as Path() folds it
        with pytest.raises(CacheError, match="written to a local folder, not a URL; harvest into a local folder"):
            CacheWriter.create_or_resume(where, manifest)
    assert not (Path.cwd() / "s3:").exists() and not (Path.cwd() / "memory:").exists()


def test_train_and_evaluate_from_a_url(tmp_path, local, memory_url, tiny_kind):
    """`dictlearn train` with train.cache = a memory:// URL trains the same parameters, bit for bit, as the local
    folder; the held-out scores computed from the URL equal the local ones."""
    from dictlearn.cli import main
    from dictlearn.decomposers import base
    from dictlearn.eval.suite import EvalConfig, evaluate

    outs = {}
    for name, cache in (("local", local), ("url", memory_url)):
        outs[name] = tmp_path / name
        config = tmp_path / f"{name}.toml"
        config.write_text(CLI_CONFIG.format(out=outs[name], wandb="disabled")
                          .replace("[train]\n", f'[train]\ncache = "{cache}"\n'))
        assert main(["train", str(config), "--only", "tiny32", "--set", "train.n_steps=12"]) == 0
    a, b = (load_file(str(outs[n] / "decomposers" / "tiny32" / "params.safetensors")) for n in ("local", "url"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    decomposer = {"tiny32": base.load(outs["url"] / "decomposers" / "tiny32")}
    cfg = EvalConfig(n_eval_rows=200, batch_size=64, n_downstream_sequences=0, n_feature_cards=0)
    scores = [evaluate(decomposer, None, ActivationCache.open(c), cfg, log=lambda _: None, progress=False)["tiny32"]
              for c in (local, memory_url)]
    for s in scores:
        s.pop("seconds")
    assert scores[0] == scores[1] and np.isfinite(scores[0]["fvu"]) and scores[0]["fvu"] > 0
