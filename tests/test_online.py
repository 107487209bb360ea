"""Online training (train.source = "model"): the model computes the train split as training runs.

The strongest check: batch b of the online source equals batch b of the loader over a cache harvested with the
same config, row for row, at every start batch (so resuming is exact); the rest follow from it or check the
wiring (a SIGKILLed `dictlearn train` resumes to the parameters of an uninterrupted run, which equal those of a
run on the cache), the memory bound, the held-out cache, and the SmolLM2 quickstart config."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from conftest import CORPUS, kill_once_checkpointed

KEYS = ["resid_post.1", "mlp_hidden.1", "token_id", "seq", "pos"]
HARVEST = dict(hookpoints=["resid_post.1", "mlp_hidden.1"], n_tokens=4096, batch_size=4, shard_mb=0.25,
               eval_fraction=0.25, dtype="bfloat16")


def _configs(context_length=64, **overrides):
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig

    return CorpusConfig(path=str(CORPUS), context_length=context_length), HarvestConfig(**{**HARVEST, **overrides})


def _take(it, n):
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()


def _equal(a: dict, b: dict, keys) -> bool:
    return all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in keys)


@pytest.fixture(scope="module")
def online_pair(tiny_loaded, tmp_path_factory):
    """(OnlinePlan, the cache harvested with the same config) on the tiny GPT-2."""
    from dictlearn.activations.harvest import harvest
    from dictlearn.activations.online import OnlinePlan

    corpus, config = _configs()
    cache = harvest(tiny_loaded, corpus, config, tmp_path_factory.mktemp("online") / "cache", progress=False)
    return OnlinePlan(tiny_loaded, corpus, config), cache


def test_online_batches_equal_cache_batches_row_for_row(online_pair):
    from dictlearn.activations.loader import BatchLoader
    from dictlearn.activations.online import ModelSource
    from dictlearn.trainers.data import CacheSource

    online, cache = online_pair
    assert online.shard_rows == [s["rows"] for s in cache.shards]  # the token count predicts the model pass's rows
    assert online.plan.eval_shards == cache.shard_ids("eval")
    source, reference = ModelSource(online, KEYS, 100, seed=3, mix_shards=2), CacheSource(cache, KEYS, 100, seed=3)
    reference.loader.mix_shards = 2
    per_epoch = source.rows() // 100
    assert source.rows() == reference.rows() and per_epoch >= 10
    n = per_epoch + 5  # across an epoch seam (the next epoch is shuffled afresh and computed again)
    got, want = _take(source.iterate(0), n), _take(reference.iterate(0), n)
    for b, (x, y) in enumerate(zip(got, want)):
        assert _equal(x, y, KEYS), f"batch {b} differs"
    for start in (1, per_epoch - 1, per_epoch + 2):  # resuming anywhere yields the uninterrupted batches
        assert all(_equal(x, want[start + i], KEYS) for i, x in enumerate(_take(source.iterate(start), 3)))
    assert _equal(source.batch(7), want[7], KEYS)
    sliced = _take(source.iterate_slices(2, 2, [0, 1]), 3)  # reader slices (train.reader_slices) as the cache's
    sliced_loader = BatchLoader(cache, KEYS, 100, seed=3, mix_shards=2, slices=2)
    assert all(_equal(x, sliced_loader.batch(2 + i), KEYS) for i, x in enumerate(sliced))
    default = ModelSource(online, KEYS, 100, seed=3)  # the loader's default window, as CacheSource uses
    assert _equal(default.sample(300), reference.sample(300), KEYS)  # the init/scale draw too
    view = default.view(["mlp_hidden.1"], 50)  # fewer keys: the forward captures only what they need
    first = _take(view.iterate(0), 1)[0]
    assert list(first) == ["mlp_hidden.1"]
    assert _equal(first, _take(CacheSource(cache, ["mlp_hidden.1"], 50, seed=3).iterate(0), 1)[0], ["mlp_hidden.1"])


def test_online_gradients_equal_cache_gradients(tiny_loaded, tmp_path):
    from dictlearn.activations.harvest import harvest
    from dictlearn.activations.loader import BatchLoader
    from dictlearn.activations.online import ModelSource, OnlinePlan

    corpus, config = _configs(hookpoints=["resid_post.1"], gradients=["resid_post.1"], n_tokens=1024, dtype="float32")
    cache = harvest(tiny_loaded, corpus, config, tmp_path / "cache", progress=False)
    keys = ["resid_post.1", "resid_post.1@grad", "seq"]
    source = ModelSource(OnlinePlan(tiny_loaded, corpus, config), keys, 64, seed=1)
    loader = BatchLoader(cache, keys, 64, seed=1)
    got = _take(source.iterate(0), 4)
    assert all(_equal(x, loader.batch(b), keys) for b, x in enumerate(got))
    assert np.abs(got[0]["resid_post.1@grad"]).sum() > 0


def test_buffer_never_exceeds_its_bound_and_timings_are_reported(online_pair):
    from dictlearn.activations.online import ModelSource

    online, _ = online_pair
    source = ModelSource(online, KEYS, 50, seed=0, mix_shards=2, prefetch=1)
    it = source.iterate(0)
    try:
        for b, _batch in enumerate(it):
            if b < 5:
                time.sleep(0.05)  # a slow trainer: the model fills the buffer and must wait
            if b == 3 * (source.rows() // 50):  # three epochs: every window computed three times
                break
    finally:
        it.close()
    bound = source.held_rows_bound()
    assert 0 < source.max_held_rows <= bound == 3 * max(online.shard_rows)
    assert source.max_held_rows > 2 * min(online.shard_rows)  # it did run a window ahead (the bound is what stops it)
    stats = source.stats()
    assert set(stats) == {"data_wait_frac", "model_wait_frac", "model_busy_frac", "model_tokens_per_s"}
    assert all(0 <= stats[k] <= 1.0 for k in ("data_wait_frac", "model_wait_frac", "model_busy_frac"))
    assert stats["model_wait_frac"] > 0 and stats["model_tokens_per_s"] > 0


def test_held_out_cache_holds_the_eval_split(online_pair, tmp_path):
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.activations.online import is_held_out_only, write_held_out

    online, cache = online_pair
    held = write_held_out(online, tmp_path / "held", progress=False)
    held.verify()
    assert is_held_out_only(held) and not is_held_out_only(cache)
    assert held.shard_ids("train") == [] and held.rows("eval") == cache.rows("eval")
    S = online.plan.sequences_per_shard
    for j, k in enumerate(cache.shard_ids("eval")):
        a = held.shard_arrays(j, KEYS + ["sequence_tokens"])
        b = cache.shard_arrays(k, KEYS + ["sequence_tokens"])
        for key in ("resid_post.1", "mlp_hidden.1", "token_id", "pos", "sequence_tokens"):
            assert np.array_equal(a[key], b[key]), key
        assert np.array_equal(a["seq"], b["seq"] - k * S + j * S)  # sequence ids renumbered, rows in harvest order
    assert np.array_equal(held.sequence_tokens(held.eval_sequences()), cache.sequence_tokens(cache.eval_sequences()))
    assert write_held_out(online, tmp_path / "held", progress=False).manifest == ActivationCache.open(tmp_path / "held").manifest


def test_outlier_filter_is_refused_online(tiny_loaded):
    from dictlearn.activations.online import OnlineError, OnlinePlan

    corpus, config = _configs(outlier_norm_factor=8.0)
    with pytest.raises(OnlineError, match="outlier_norm_factor = 8.0: online training cannot count"):
        OnlinePlan(tiny_loaded, corpus, config)


# --- the CLI: dictlearn run / train with train.source = "model" ------------------------------------------------------
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
RUN_CONFIG = """
out_dir = "{out}"
[model]
name = "{model}"
[corpus]
path = "{corpus}"
context_length = 64
[harvest]
hookpoints = ["resid_post.1"]
n_tokens = 4096
batch_size = 4
shard_mb = 0.1
eval_fraction = 0.25
[train]
source = "{source}"
batch_size = 64
n_steps = {steps}
lr = 3e-3
warmup_steps = 5
log_every = 10
checkpoint_every = 10
sample_tokens = 512
progress = false
[wandb]
mode = "disabled"
[[decomposers]]
name = "topk"
kind = "topk"
hookpoint_in = "resid_post.1"
expansion = 4
k = 8
[eval]
n_eval_rows = 512
batch_size = 128
n_downstream_sequences = 0
n_feature_cards = 0
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_gpt2, smol, tmp_path_factory) -> Path:
    """The tiny GPT-2 with the SmolLM2 tokenizer as a model folder (what [model].name can point at)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_gpt2.save_pretrained(folder)
    smol.tokenizer.save_pretrained(folder)
    return folder


def _run_config(tmp_path: Path, name: str, model: Path, source: str = "model", steps: int = STEPS) -> tuple[Path, Path]:
    out, config = tmp_path / name, tmp_path / f"{name}.toml"
    config.write_text(RUN_CONFIG.format(out=out, model=model, corpus=CORPUS, source=source, steps=steps))
    return config, out


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _params(out: Path, name: str = "topk") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "decomposers" / name / "params.safetensors"))


def test_sigkilled_online_run_resumes_to_the_parameters_of_a_cache_run(tiny_model_dir, tmp_path, capsys):
    """`dictlearn run` (harvest + train stages) online, SIGKILLed mid-training and run again, ends with exactly the
    parameters of an uninterrupted run on a cache harvested with the same config: resuming is exact and the
    online rows are the cache's rows."""
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.cli import main
    from dictlearn.trainers.logging import read_log

    config, out = _run_config(tmp_path, "online", tiny_model_dir)
    script = "import sys; from dictlearn.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", script, "run", str(config), "--stages", "harvest", "train"]
    kill_once_checkpointed(command, out / "decomposers" / "topk" / "checkpoints", 20, env=_env(tmp_path), cwd=ROOT)
    assert not (out / "decomposers" / "topk" / "params.safetensors").exists()
    assert main(command[3:]) == 0  # the same command again (in this process: one interpreter start less)
    said = capsys.readouterr()
    assert "resuming topk (topk) at step" in said.out + said.err

    held = ActivationCache.open(out / "cache")  # nothing but the held-out shards was written
    assert held.shard_ids("train") == [] and held.rows("eval") > 0
    assert sorted(p.name for p in out.iterdir()) == ["cache", "decomposers"]
    log = read_log(out / "decomposers" / "topk" / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(10, STEPS + 1, 10))
    assert all(0 <= r["data_wait_frac"] <= 1 and 0 <= r["model_wait_frac"] <= 1 for r in log)

    cache_config, cache_out = _run_config(tmp_path, "cached", tiny_model_dir, source="cache")
    assert main(["run", str(cache_config), "--stages", "harvest", "train",
                 "--set", f"train.checkpoint_every={STEPS}"]) == 0
    capsys.readouterr()
    assert main(["run", str(cache_config), "--stages", "harvest", "--set", "train.source=model"]) == 0
    assert "is a full harvest of this plan; the eval stage uses its held-out shards" in capsys.readouterr().out
    assert ActivationCache.open(cache_out / "cache").rows("eval") == held.rows("eval")
    a, b = _params(out), _params(cache_out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key}: max diff {np.abs(a[key] - b[key]).max()}"


def test_online_config_errors_are_sentences(tiny_model_dir, tmp_path, capsys):
    from dictlearn.cli import main

    config, out = _run_config(tmp_path, "bad", tiny_model_dir, steps=5)
    assert main(["train", str(config), "--set", "train.source=disk"]) == 1
    assert "source must be one of cache, model, got 'disk'" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "train.distributed=true"]) == 1
    assert 'train.source = "model" runs the model inside the one training process' in capsys.readouterr().err
    assert main(["train", str(config), "--set", "harvest.outlier_norm_factor=5.0"]) == 1
    assert "online training cannot count the rows" in capsys.readouterr().err
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace('hookpoint_in = "resid_post.1"', 'hookpoint_in = "resid_post.2"'))
    assert main(["train", str(other)]) == 1
    assert "online, the rows are harvest.hookpoints and harvest.gradients" in capsys.readouterr().err
    assert main(["run", str(config), "--stages", "harvest"]) == 0  # the held-out shards only
    assert main(["train", str(config), "--set", "train.source=cache"]) == 1
    assert "holds only the held-out shards of an online run" in capsys.readouterr().err


def test_quickstart_online_config_runs_every_stage_on_smollm2(smol, tmp_path):
    """configs/quickstart_online.toml, shrunk: harvest (held-out shards only), train from SmolLM2, eval, export."""
    import json

    from dictlearn.activations.cache import ActivationCache
    from dictlearn.cli import main

    out = tmp_path / "qs"
    small = [f"out_dir={out}", "harvest.n_tokens=4096", "harvest.batch_size=4", "harvest.shard_mb=0.5",
             "train.batch_size=512", "train.n_tokens=1024", "train.warmup_steps=1", "train.log_every=1",
             "train.progress=false", "train.sample_tokens=512", "wandb.mode=disabled", "eval.n_eval_rows=256",
             "eval.n_downstream_sequences=0", "eval.n_feature_cards=0"]
    small = [arg for pair in zip(["--set"] * len(small), small) for arg in pair]
    assert main(["run", str(ROOT / "configs" / "quickstart_online.toml"), *small]) == 0
    held = ActivationCache.open(out / "cache")
    assert held.shard_ids("train") == [] and held.rows("eval") > 0  # no train-split cache was written
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    record = metrics["decomposers"][0]
    assert record["name"] == "topk" and 0 < record["fvu"] < 1


@pytest.mark.slow
def test_smollm2_online_and_cache_reach_the_same_held_out_fvu(smol, tmp_path):
    """A TopK SAE on SmolLM2 resid_post.10, online and on a cache of the same tokens: the same batches, so the
    same parameters and held-out FVU (the issue asks for "within noise"; on one machine it is exact)."""
    from dictlearn.activations.cache import to_float32
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.online import ModelSource, OnlinePlan
    from dictlearn.decomposers import REGISTRY
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import DecomposerSpec, TrainConfig, train

    corpus = CorpusConfig(path=str(CORPUS), context_length=128)
    hcfg = HarvestConfig(hookpoints=["resid_post.10"], n_tokens=16384, shard_mb=1, eval_fraction=0.1)
    cache = harvest(smol, corpus, hcfg, tmp_path / "cache", progress=False)
    cfg = TrainConfig(batch_size=512, n_steps=24, lr=5e-4, warmup_steps=3, log_every=24, checkpoint_every=1000,
                      sample_tokens=2048, progress=False)
    x = np.concatenate([to_float32(cache.shard_arrays(i, ["resid_post.10"])["resid_post.10"]) for i in cache.shard_ids("eval")])
    fvu = {}
    for name, source in (("cache", CacheSource(cache, ["resid_post.10"], 512)),
                         ("online", ModelSource(OnlinePlan(smol, corpus, hcfg), ["resid_post.10"], 512))):
        config = REGISTRY["topk"].config_cls(d_in=576, n_features=2304, k=32, hookpoint_in="resid_post.10")
        spec = DecomposerSpec(name="topk", kind="topk", config=config, folder=tmp_path / name / "topk")
        d = train([spec], source, cfg, WandbConfig(mode="disabled"), log_dir=tmp_path / name).decomposers["topk"]
        fvu[name] = float(np.sum((np.asarray(d.decode(d.encode(x))) - x) ** 2) / np.sum((x - x.mean(0)) ** 2))
    print(f"held-out FVU: cache {fvu['cache']:.4f}, online {fvu['online']:.4f}")
    assert fvu["online"] == pytest.approx(fvu["cache"], abs=1e-6) and fvu["cache"] < 0.9
