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
