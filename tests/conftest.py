"""Shared fixtures: the real SmolLM2 model and corpus from ../shared/assets, a tiny random GPT-2, caches from
both, a minimal training loop over the decomposer protocol, and constructed decomposers with known answers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dictlearn.decomposers.base import REGISTRY, Decomposer, DecomposerConfig

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


# --- a minimal Adam loop over the decomposer protocol (tests that must not depend on the trainers) ----------------
def adam_steps(model, data: dict[str, np.ndarray], steps: int, batch_size: int, lr: float = 1e-3, seed: int = 0,
               init: bool = True, decay: bool = False) -> dict[str, np.ndarray]:
    """(Optionally) init from a data sample, then `steps` Adam steps on random minibatches, updating `model` in
    place, with the SGD trainer's hook order (loss_and_grads, project_grads, Adam, after_step); returns every
    step's metrics, stacked (index -1: the last step). Steps run in one jitted lax.scan, so a few hundred small
    steps cost well under a second. decay: the learning rate falls linearly to a tenth over the last 40%."""
    rows = next(iter(data.values())).shape[0]
    if init:
        model.init_from_data(jnp.asarray(data["x"][:2048]), jnp.asarray(data["y"][:2048]))
    schedule = lr
    if decay:
        hold = int(steps * 0.6)
        schedule = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, lr / 10, steps - hold)], [hold])
    opt = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    graph, state = nnx.split((model, opt))
    idx = np.random.default_rng(seed).integers(0, rows, (steps, batch_size))
    batches = {k: jnp.asarray(v[idx]) for k, v in data.items()}

    def one(state, batch):
        model, opt = nnx.merge(graph, state)
        (loss, metrics), grads = model.loss_and_grads(batch)
        opt.update(model, model.project_grads(grads))
        model.after_step(metrics)
        return nnx.state((model, opt)), {**metrics, "loss": loss}

    state, metrics = jax.jit(lambda s, b: jax.lax.scan(one, s, b))(state, batches)
    nnx.update((model, opt), state)
    return jax.device_get(metrics)


@pytest.fixture(scope="session")
def train_steps():
    """`adam_steps` (see there): train a decomposer a few steps on in-memory data."""
    return adam_steps


# --- constructed decomposers with known answers, for the evaluation-suite tests (not registered kinds) -----------
class SplitIdentity(Decomposer):
    """codes = scale * [relu(x), relu(-x)], decode = (pos - neg) / scale * gain: with gain 1, decode(encode(x)) == x exactly."""

    kind = "test_split_identity"

    def __init__(self, d: int, hookpoint: str = "resid_post.0", scale: float = 1.0, gain: float = 1.0):
        self.config = DecomposerConfig(d_in=d, n_features=2 * d, hookpoint_in=hookpoint)
        self.scale, self.gain = scale, gain

    def encode(self, x):
        return self.scale * jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)

    def decode(self, codes):
        d = self.config.d_in
        return (codes[..., :d] - codes[..., d:]) * (self.gain / self.scale)

    def features(self):
        eye = jnp.eye(self.config.d_in)
        return jnp.concatenate([eye, -eye]) * self.gain


class AllZero(Decomposer):
    """Encodes everything to no active feature and decodes to zero: the ablation baseline."""

    kind = "test_all_zero"

    def __init__(self, d_in: int, n_features: int, d_out: int | None = None, hookpoint_in: str = "resid_post.0",
                 hookpoint_out: str = ""):
        self.config = DecomposerConfig(d_in=d_in, n_features=n_features, d_out=d_out, hookpoint_in=hookpoint_in,
                                       hookpoint_out=hookpoint_out)

    def encode(self, x):
        return jnp.zeros(x.shape[:-1] + (self.config.n_features,), x.dtype)

    def decode(self, codes):
        return jnp.zeros(codes.shape[:-1] + (self.config.d_out,), codes.dtype)

    def features(self):
        return jnp.zeros((self.config.n_features, self.config.d_out))


class LinearReLU(Decomposer):
    """codes = relu(x W_enc + b_enc), out = codes W_dec + b_dec, with weights given (a known transcoder/SAE)."""

    kind = "test_linear_relu"

    def __init__(self, w_enc, b_enc, w_dec, b_dec, hookpoint_in: str = "resid_post.0", hookpoint_out: str = ""):
        w_enc, w_dec = np.asarray(w_enc, np.float32), np.asarray(w_dec, np.float32)
        self.config = DecomposerConfig(d_in=w_enc.shape[0], n_features=w_enc.shape[1], d_out=w_dec.shape[1],
                                       hookpoint_in=hookpoint_in, hookpoint_out=hookpoint_out)
        self.w_enc, self.b_enc = nnx.Param(jnp.asarray(w_enc)), nnx.Param(jnp.asarray(b_enc, jnp.float32))
        self.w_dec, self.b_dec = nnx.Param(jnp.asarray(w_dec)), nnx.Param(jnp.asarray(b_dec, jnp.float32))

    def encode(self, x):
        return jax.nn.relu(x @ self.w_enc[...] + self.b_enc[...])

    def decode(self, codes):
        return codes @ self.w_dec[...] + self.b_dec[...]

    def features(self):
        return self.w_dec[...]


class SavedLinear(Decomposer):
    """A loadable kind (build/save/load round trip) for end-to-end runs of the suite: relu(x W_enc + b) W_dec.

    Never registered at import: the `saved_linear_kind` fixture registers it for one test and removes it
    afterwards, so code that walks the registry (export, configs, test_every_kind) never meets it."""

    kind = "test_saved_linear"

    def __init__(self, config: DecomposerConfig, *, rngs: nnx.Rngs):
        self.config = config
        k1, k2 = rngs.params(), rngs.params()
        self.W_enc = nnx.Param(jax.random.normal(k1, (config.d_in, config.n_features)) / np.sqrt(config.d_in))
        self.b_enc = nnx.Param(jnp.zeros((config.n_features,)))
        self.W_dec = nnx.Param(jax.random.normal(k2, (config.n_features, config.d_out)) / np.sqrt(config.n_features))

    def encode(self, x):
        return jax.nn.relu(x @ self.W_enc[...] + self.b_enc[...])

    def decode(self, codes):
        return codes @ self.W_dec[...]

    def features(self):
        return self.W_dec[...]


@contextlib.contextmanager
def registered_saved_linear():
    """SavedLinear in the registry for the duration of the block only."""
    REGISTRY[SavedLinear.kind] = SavedLinear
    try:
        yield SavedLinear
    finally:
        REGISTRY.pop(SavedLinear.kind, None)


@pytest.fixture
def saved_linear_kind():
    """The SavedLinear class, registered as kind "test_saved_linear" for this test only."""
    with registered_saved_linear() as cls:
        yield cls


@pytest.fixture(scope="session")
def known_decomposers():
    """The constructed decomposers with known answers: .SplitIdentity, .AllZero, .LinearReLU, .SavedLinear."""
    import types

    return types.SimpleNamespace(SplitIdentity=SplitIdentity, AllZero=AllZero, LinearReLU=LinearReLU, SavedLinear=SavedLinear)
