"""Every shipped config parses into the stages' dataclasses and names real hookpoints of its model family.

The realistic configs need a model hub and a GPU, so they are validated here, not run: each model family
is rebuilt as a tiny random model with the real layer count, and every hookpoint the config names must
resolve on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from dictlearn.activations.corpus import CorpusConfig
from dictlearn.activations.harvest import HarvestConfig
from dictlearn.activations.hookpoints import expand_hookpoints, resolve
from dictlearn.activations.models import ModelConfig
from dictlearn.run import read_run_config
from dictlearn.config import from_dict
from dictlearn.export import ExportConfig
from dictlearn.eval.suite import EvalConfig
from dictlearn.trainers.logging import WandbConfig
from dictlearn.trainers.sgd import train_config
from dictlearn.trainers.spec import build_spec

HARVEST_ONLY = {"chat_gsm8k.toml"}  # configs that only harvest (`dictlearn harvest CONFIG`)
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

# model name -> a tiny random model of the same family and depth (real widths are not needed to check names)
FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=16, n_head=2, vocab_size=64, n_positions=32)),
    "EleutherAI/pythia-70m": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=6, hidden_size=16, num_attention_heads=2, intermediate_size=64, vocab_size=64)),
    "meta-llama/Llama-3.1-8B": lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=56,
        vocab_size=64)),
    "SmolLM2-135M-Instruct.Q4_1.gguf": lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=30, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
        vocab_size=64)),
}


def test_every_config_is_checked():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.toml", "gpt2_small_resid.toml", "pythia70m_transcoders.toml", "llama31_8b_snmf.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_names_real_hookpoints(path: Path, tmp_path: Path):
    data = read_run_config(path)
    model_cfg = from_dict(ModelConfig, data["model"])
    from_dict(CorpusConfig, data["corpus"])
    harvest = from_dict(HarvestConfig, data["harvest"])
    train_config(data.get("train", {}))
    from_dict(EvalConfig, data.get("eval", {}))
    from_dict(ExportConfig, data.get("export", {}))
    from_dict(WandbConfig, data.get("wandb", {}))

    family = next(v for k, v in FAMILIES.items() if model_cfg.name.endswith(k))
    torch.manual_seed(0)
    model = family().eval()
    resolved = {h.name: h for h in resolve(model, harvest.hookpoints + harvest.gradients)}
    assert set(harvest.hookpoints) <= set(resolved)

    # every decomposer reads and writes hookpoints the harvest stores, and its table is valid for its kind
    widths = {name: {"width": h.width, "dtype": harvest.dtype} for name, h in resolved.items()}
    widths.update({f"{g}@grad": widths[g] for g in harvest.gradients})
    if path.name in HARVEST_ONLY:
        assert "decomposers" not in data
        return
    assert data["decomposers"], f"{path.name} trains nothing"
    for table in data["decomposers"]:
        assert set(expand_hookpoints(table["hookpoint_in"])) <= set(harvest.hookpoints)  # a range: every layer
        assert set(expand_hookpoints(table.get("hookpoint_out", table["hookpoint_in"]))) <= set(harvest.hookpoints)
        build_spec(table, widths, tmp_path / table["name"], where=path.name)


def test_removed_train_key_says_what_replaced_it():
    from dictlearn.config import ConfigError

    with pytest.raises(ConfigError, match=r"dead_window_tokens` is no longer a \[train\] option.*`dead_tokens`"):
        train_config({"dead_window_tokens": 1000})
