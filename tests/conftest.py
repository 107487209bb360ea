"""Shared fixtures: the real SmolLM2 model and corpus from ../shared/assets, a tiny random GPT-2, caches from
both, a minimal training loop over the decomposer protocol, and constructed decomposers with known answers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dictlearn.decomposers import base
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
    """A tiny randomly initialised GPT-2 (for fast hook-wiring tests)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

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


# --- a minimal ReLU SAE kind for trainer, resume and run-stage tests (registered only while a test asks) ----
@dataclasses.dataclass
class TinyConfig(base.DecomposerConfig):
    l1: float = 1e-3
    explode_at: int = 0  # > 0: the loss turns nan from this many completed steps on (for the stop test)


class TinySAE(base.Decomposer):
    """A small ReLU SAE/transcoder: z = relu((x - b_pre) W_enc + b_enc), y_hat = z W_dec + b_dec."""

    kind = "test_tiny_relu"
    config_cls = TinyConfig

    def __init__(self, config: TinyConfig, rngs: nnx.Rngs):
        self.config = config
        rng = np.random.default_rng(config.seed)  # numpy: no compile per shape, which keeps the tests quick
        w = (rng.normal(size=(config.n_features, config.d_out)) / np.sqrt(config.d_out)).astype(np.float32)
        w_in = (rng.normal(size=(config.d_in, config.n_features)) / np.sqrt(config.d_in)).astype(np.float32)
        self.W_dec = nnx.Param(w)
        self.W_enc = nnx.Param(w_in)
        self.b_enc = nnx.Param(np.zeros(config.n_features, np.float32))
        self.b_pre = nnx.Param(np.zeros(config.d_in, np.float32))
        self.b_dec = nnx.Param(np.zeros(config.d_out, np.float32))
        self.steps_done = nnx.Variable(np.zeros((), np.int32))
        self.tokens_since_fired = nnx.Variable(np.zeros(config.n_features, np.int32))  # the decomposer counts dead latents

    def encode(self, x):
        return jax.nn.relu((x - self.b_pre[...]) @ self.W_enc[...] + self.b_enc[...])

    def decode(self, codes):
        return codes @ self.W_dec[...] + self.b_dec[...]

    def loss(self, batch):
        z = self.encode(batch["x"])
        err = self.decode(z) - batch["y"]
        mse = jnp.mean(jnp.sum(err**2, -1))
        var = jnp.mean(jnp.sum((batch["y"] - batch["y"].mean(0)) ** 2, -1))
        loss = mse + self.config.l1 * jnp.mean(jnp.sum(z * jnp.linalg.norm(self.W_dec[...], axis=1), -1))
        if self.config.explode_at:
            loss = jnp.where(self.steps_done[...] >= self.config.explode_at, jnp.nan, loss)
        metrics = {"mse": mse, "fvu": mse / var, "l0": jnp.mean(jnp.sum(z > 0, -1)), "fired": jnp.any(z > 0, 0),
                   "rows": jnp.asarray(z.shape[0], jnp.int32),
                   "dead_frac": jnp.mean((self.tokens_since_fired[...] >= 256).astype(jnp.float32))}
        return loss, metrics

    def features(self):
        return self.W_dec[...]

    def init_from_data(self, x, y):
        self.b_pre[...] = x.mean(0)
        self.b_dec[...] = y.mean(0)

    def after_step(self, metrics):
        self.steps_done[...] += 1
        since = self.tokens_since_fired[...]
        self.tokens_since_fired[...] = jnp.where(metrics["fired"], 0, jnp.minimum(since + metrics["rows"], 1 << 30))

    def fold_input_scale(self, scale_in, scale_out):
        self.W_enc[...] = self.W_enc[...] * scale_in
        self.b_pre[...] = self.b_pre[...] / scale_in
        self.W_dec[...] = self.W_dec[...] / scale_out
        self.b_dec[...] = self.b_dec[...] / scale_out


def planted(n_rows=4096, d=16, n_atoms=32, k=3, noise=0.01, norm=50.0, seed=0):
    """Rows that are k-sparse non-negative mixtures of a random unit dictionary, at a large norm."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n_rows, n_atoms))
    for i in range(n_rows):
        codes[i, rng.choice(n_atoms, k, replace=False)] = rng.uniform(0.5, 1.5, k)
    x = codes @ atoms + noise * rng.normal(size=(n_rows, d))
    return (norm * x).astype(np.float32)


def spec(tmp_path, name="tiny", n_features=64, d_in=16, d_out=None, hp_in="act", hp_out="", **kw):
    from dictlearn.trainers.sgd import DecomposerSpec

    cfg = TinyConfig(d_in=d_in, n_features=n_features, d_out=d_out, hookpoint_in=hp_in, hookpoint_out=hp_out, **kw)
    return DecomposerSpec(name=name, kind=TinySAE.kind, config=cfg, folder=tmp_path / "decomposers" / name)


def train_cfg(**kw):
    from dictlearn.trainers.sgd import TrainConfig

    base_kw = dict(batch_size=64, n_steps=200, lr=3e-3, warmup_steps=10, log_every=20, checkpoint_every=100,
                   sample_tokens=1024, progress=False)
    return TrainConfig(**{**base_kw, **kw})


def register_tiny_kind() -> None:
    """Make TinySAE loadable by its kind (subprocesses of the CLI tests call this before dictlearn.cli.main)."""
    REGISTRY[TinySAE.kind] = TinySAE


@pytest.fixture
def tiny_kind():
    """TinySAE registered for one test and removed afterwards: no test leaves the global registry changed."""
    register_tiny_kind()
    yield TinySAE
    REGISTRY.pop(TinySAE.kind, None)


def write_cache(path: Path, arrays: dict[str, np.ndarray], n_shards: int = 4, context: int = 16) -> Path:
    """A complete activation cache holding `arrays` (rows split evenly over shards; the last is eval)."""
    from dictlearn.activations.cache import FORMAT, FORMAT_VERSION, CacheWriter

    n = len(next(iter(arrays.values())))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "identity": {"test": "planted"},
        "model": {"name": "planted", "fingerprint": "0"}, "corpus": {"fingerprint": "0", "config": {"path": "-"}},
        "context_length": context, "n_shards_planned": n_shards, "n_tokens": 0, "n_rows": 0,
        "hookpoints": {k: {"width": int(v.shape[1]), "dtype": "float32"} for k, v in arrays.items()},
    }
    writer = CacheWriter.create_or_resume(path, manifest)
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    for i in range(n_shards):
        lo, hi = bounds[i], bounds[i + 1]
        rows = np.arange(lo, hi)
        shard = {k: v[lo:hi] for k, v in arrays.items()}
        shard.update(token_id=(rows % 1000).astype(np.int32), seq=(rows // context).astype(np.int32),
                     pos=(rows % context).astype(np.int32),
                     sequence_tokens=np.zeros((int(np.ceil((hi - lo) / context)), context), np.int32))
        writer.add_shard(shard, {"rows": int(hi - lo), "tokens": int(hi - lo), "seq_start": int(lo // context),
                                 "seq_stop": int(np.ceil(hi / context)), "split": "eval" if i == n_shards - 1 else "train"})
    writer.finish()
    return path


CLI_CONFIG = """
out_dir = "{out}"
[train]
batch_size = 64
n_steps = 60
lr = 3e-3
warmup_steps = 5
log_every = 20
checkpoint_every = 30
sample_tokens = 512
progress = false
[wandb]
mode = "{wandb}"
[[decomposers]]
name = "tiny4x"
kind = "test_tiny_relu"
hookpoint_in = "act"
expansion = 4
[[decomposers]]
name = "tiny32"
kind = "test_tiny_relu"
hookpoint_in = "act"
n_features = 32
lr = 1e-3
l1 = 0.01
"""


def kill_once_checkpointed(command: list[str], ckdir: Path, step: int, **popen) -> subprocess.Popen:
    """Start `command`, SIGKILL it as soon as a checkpoint of `step` or later appears under ckdir (mid-run, maybe
    mid-save), and return the killed process: the resume tests' one way of interrupting a run."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckdir.is_dir() and any(p.name.isdigit() and int(p.name) >= step for p in ckdir.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return proc
