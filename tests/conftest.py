"""Shared fixtures: the real SmolLM2 model and corpus from ../shared/assets, and a tiny random GPT-2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DICTLEARN_ASSETS", ROOT.parent / "shared" / "assets"))
SMOL_GGUF = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = ASSETS / "english-corpus.jsonl.gz"


@pytest.fixture(scope="session")
def assets() -> Path:
    if not SMOL_GGUF.is_file():
        pytest.fail(f"the shared assets are missing: expected {SMOL_GGUF}")
    return ASSETS


@pytest.fixture(scope="session")
def smol(assets):
    """The real SmolLM2-135M-Instruct (dequantised once, cached as safetensors)."""
    from dictlearn.activations.models import load_model

    return load_model(str(SMOL_GGUF))


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A tiny randomly initialised GPT-2 (for fast hook-wiring tests), with the SmolLM2 tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dictlearn.activations.models import LoadedModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=128, vocab_size=49152)
    model = GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    return model


# --- activation caches (owned by the activations area) ---------------------------------------------------
SMOL_CACHE_HOOKPOINTS = ["resid_post.10", "mlp_in.10", "mlp_out.10", "mlp_hidden.10"]


@pytest.fixture(scope="session")
def smol_cache(smol, tmp_path_factory):
    """A real cache from SmolLM2: 16,384 tokens of the corpus (context 128), layer 10's resid_post, mlp_in,
    mlp_out, mlp_hidden in bfloat16; 8 shards of 16 sequences, 2 of them held out (split "eval")."""
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest

    corpus = CorpusConfig(path=str(CORPUS), context_length=128)
    config = HarvestConfig(hookpoints=SMOL_CACHE_HOOKPOINTS, n_tokens=16384, shard_mb=16, eval_fraction=0.25)
    return harvest(smol, corpus, config, tmp_path_factory.mktemp("smol_cache") / "cache", progress=False)


@pytest.fixture(scope="session")
def smol_grad_cache(smol, tmp_path_factory):
    """A small real cache with gradients: 1,024 tokens, resid_post.10 and resid_post.10@grad
    (d of the summed next-token loss); 2 shards of 4 sequences, 1 held out. Gradients need the full
    forward and a backward pass, about 10x the cost of a truncated harvest, hence the small size."""
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest

    corpus = CorpusConfig(path=str(CORPUS), context_length=128)
    config = HarvestConfig(hookpoints=["resid_post.10"], gradients=["resid_post.10"], n_tokens=1024,
                           batch_size=4, shard_mb=0.6, eval_fraction=0.25)
    return harvest(smol, corpus, config, tmp_path_factory.mktemp("smol_grad_cache") / "cache", progress=False)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_gpt2, smol):
    """The tiny random GPT-2 wrapped as a LoadedModel with the SmolLM2 tokenizer (fast harvests)."""
    from dictlearn.activations.models import LoadedModel

    return LoadedModel(model=tiny_gpt2, tokenizer=smol.tokenizer, name="tiny-gpt2", fingerprint="test:tiny-gpt2")


@pytest.fixture
def tiny_harvest(tiny_loaded, tmp_path):
    """harvest_fn(**harvest_overrides) -> ActivationCache: a small, fast cache from the tiny GPT-2 on the real
    corpus (default: 4,096 tokens, context 64, resid_post.1 + mlp_hidden.1, float32, 8 shards, 2 eval)."""
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest

    def make(out=None, context_length=64, **overrides):
        kw = dict(hookpoints=["resid_post.1", "mlp_hidden.1"], n_tokens=4096, dtype="float32", batch_size=4,
                  shard_mb=0.25, eval_fraction=0.25)
        kw.update(overrides)
        corpus = CorpusConfig(path=str(CORPUS), context_length=context_length)
        return harvest(tiny_loaded, corpus, HarvestConfig(**kw), out or tmp_path / "cache", progress=False)

    return make
