"""The SGD trainer on planted data with a minimal ReLU SAE defined here (so the loop is tested on its own)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dictlearn.decomposers import base


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


@pytest.fixture(autouse=True)
def tiny_kind():
    """TinySAE is registered for each test and removed afterwards: no test leaves the global registry changed."""
    base.REGISTRY[TinySAE.kind] = TinySAE
    yield
    base.REGISTRY.pop(TinySAE.kind, None)


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


def test_loss_decreases_on_planted_data(tmp_path):
    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.logging import WandbConfig, read_log
    from dictlearn.trainers.sgd import train

    x = planted()
    source = ArraySource({"act": x}, batch_size=64, seed=0)
    result = train([spec(tmp_path), spec(tmp_path, name="tiny_l1", l1=3e-2)], source, train_cfg(),
                   WandbConfig(mode="disabled"))
    out = result.folders
    for name in ("tiny", "tiny_l1"):
        log = read_log(out[name] / "train_log.jsonl")
        assert [r["step"] for r in log] == list(range(20, 201, 20))
        assert {"loss", "mse", "fvu", "l0", "dead_frac", "lr", "tokens", "tokens_per_s"} <= set(log[0])
        assert result.logs[name] == log  # the trainer returns what it logged
        assert log[-1]["fvu"] < 0.3 * log[0]["fvu"], (log[0]["fvu"], log[-1]["fvu"])
        assert log[-1]["loss"] < log[0]["loss"]
        assert log[-1]["tokens"] == 200 * 64
        assert (out[name] / "params.safetensors").is_file()
    # the larger sparsity penalty gives sparser codes on the same batches
    assert read_log(out["tiny_l1"] / "train_log.jsonl")[-1]["l0"] < read_log(out["tiny"] / "train_log.jsonl")[-1]["l0"]
    # the saved dictionary reconstructs raw activations (scale folded back in)
    saved = base.load(out["tiny"])
    fvu = np.sum((np.asarray(saved(x)) - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert fvu < 0.3
    returned = result.decomposers["tiny"]  # the returned dictionary is the saved one
    np.testing.assert_array_equal(np.asarray(returned.W_dec[...]), np.asarray(saved.W_dec[...]))


def _checkpoint_model(folder: Path, module: base.Decomposer, step: int):
    """The in-training (scaled) decomposer as the checkpoint at `step` holds it."""
    from dictlearn.trainers.checkpoint import Checkpointer

    graphdef, state = nnx.split(module)
    ck = Checkpointer(folder / "checkpoints")
    model_state, meta = ck.restore_model(step, state), ck.meta(step)
    ck.close()
    return nnx.merge(graphdef, model_state), meta


@pytest.mark.parametrize("transcoder", [False, True])
def test_scale_folding_end_to_end(tmp_path, transcoder):
    """saved(raw x) == in-training model(s_in * x) / s_out, with s from the sample (separate for x and y)."""
    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import train

    x = planted(n_rows=1024, norm=50.0)
    arrays = {"act": x}
    if transcoder:
        rng = np.random.default_rng(1)
        arrays["out"] = (x @ rng.normal(size=(16, 8)) * 0.01).astype(np.float32)  # a different norm
        s = spec(tmp_path, d_out=8, hp_out="out")
    else:
        s = spec(tmp_path)
    source = ArraySource(arrays, batch_size=64, seed=0)
    out = train([s], source, train_cfg(n_steps=30, checkpoint_every=30, sample_tokens=1024),
                WandbConfig(mode="disabled")).folders
    saved = base.load(out["tiny"])
    extra = json.loads((out["tiny"] / "config.json").read_text())["extra"]
    s_in, s_out = extra["input_scale"], extra["output_scale"]
    assert s_in == pytest.approx(1 / np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, 1))), rel=1e-6)
    y = arrays["out"] if transcoder else x
    assert s_out == pytest.approx(1 / np.sqrt(np.mean(np.sum(y.astype(np.float64) ** 2, 1))), rel=1e-6)
    if transcoder:
        assert abs(np.log10(s_in / s_out)) > 1  # the two scales really differ
    trained, meta = _checkpoint_model(out["tiny"], base.build(s.kind, s.config), 30)
    assert meta["scale_in"] == s_in and meta["step"] == 30
    in_training = np.asarray(trained(jnp.asarray(x * np.float32(s_in)))) / s_out
    raw = np.asarray(saved(jnp.asarray(x)))
    np.testing.assert_allclose(raw, in_training, rtol=1e-4, atol=1e-5 * np.abs(in_training).max())
    # and the in-training reconstruction is far from what the unfolded weights give on raw data
    assert not np.allclose(np.asarray(trained(jnp.asarray(x))), raw, rtol=0.1)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from dictlearn.trainers.checkpoint import Checkpointer, CheckpointMismatch
    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import NonFiniteLoss, train

    source = ArraySource({"act": planted(n_rows=1024)}, batch_size=64, seed=0)
    s = spec(tmp_path, explode_at=12)
    with pytest.raises(NonFiniteLoss, match=r"'tiny': the loss is nan at step 13 of 40.*last good checkpoint is step 10"):
        train([s], source, train_cfg(n_steps=40, checkpoint_every=5, log_every=100), WandbConfig(mode="disabled"))
    assert not (s.folder / "params.safetensors").exists()
    ck = Checkpointer(s.folder / "checkpoints")
    assert ck.steps() == [5, 10]
    model, _ = _checkpoint_model(s.folder, base.build(s.kind, s.config), 10)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(nnx.state(model)))
    ck.close()
    # resuming those checkpoints with other settings is refused, naming what differs
    with pytest.raises(CheckpointMismatch, match=r"lr: saved 0.003, now 0.001.*delete .*checkpoints"):
        train([s], source, train_cfg(n_steps=40, checkpoint_every=5, lr=1e-3), WandbConfig(mode="disabled"))


def test_lr_schedule_shape():
    from dictlearn.trainers.optim import lr_schedule

    sched = lr_schedule(1.0, n_steps=100, warmup_steps=10, decay="linear", decay_fraction=0.2)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == 1.0 and float(sched(80)) == 1.0
    assert float(sched(90)) == pytest.approx(0.5) and float(sched(100)) == pytest.approx(0.0)
    cos = lr_schedule(1.0, n_steps=100, warmup_steps=0, decay="cosine", decay_fraction=0.5, final_lr_fraction=0.1)
    assert float(cos(50)) == 1.0 and float(cos(75)) == pytest.approx(0.55) and float(cos(100)) == pytest.approx(0.1)
    assert float(lr_schedule(1.0, 100, 0, "none")(99)) == 1.0
    with pytest.raises(ValueError, match="decay must be one of"):
        lr_schedule(1.0, 100, decay="step")


def test_input_scale_is_unit_mean_squared_norm():
    from dictlearn.trainers.scaling import input_scale

    x = planted(n_rows=512, norm=145.0)
    s = input_scale(x)
    assert np.mean(np.sum((s * x.astype(np.float64)) ** 2, 1)) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="non-finite"):
        input_scale(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="all zeros"):
        input_scale(np.zeros((4, 3), np.float32))


# --- the CLI on a small cache written here (planted rows in the real cache format) -------------------------


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


@pytest.fixture
def cli_run(tmp_path):
    """(config path, out dir) of a run whose cache holds planted rows at hookpoint `act`."""
    out = tmp_path / "run"
    write_cache(out / "cache", {"act": planted(n_rows=2048)})
    config = tmp_path / "tiny.toml"
    config.write_text(CLI_CONFIG.format(out=out, wandb="disabled"))
    return config, out


def test_cli_trains_tiny_config_then_skips_finished(cli_run, capsys):
    from dictlearn.cli import main
    from dictlearn.trainers.logging import read_log

    config, out = cli_run
    config.write_text(config.read_text().replace('mode = "disabled"', 'mode = "offline"'))
    assert main(["train", str(config), "--set", "train.n_steps=40", "--set", "train.log_every=10"]) == 0
    for name, n_features in (("tiny4x", 64), ("tiny32", 32)):
        folder = out / "decomposers" / name
        saved = json.loads((folder / "config.json").read_text())
        assert saved["kind"] == "test_tiny_relu"
        assert (saved["config"]["d_in"], saved["config"]["d_out"], saved["config"]["n_features"]) == (16, 16, n_features)
        assert saved["extra"]["trained_steps"] == 40
        assert [r["step"] for r in read_log(folder / "train_log.jsonl")] == [10, 20, 30, 40]
        assert base.load(folder).config.n_features == n_features
    assert json.loads((out / "decomposers/tiny32/config.json").read_text())["extra"]["lr"] == 1e-3
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    capsys.readouterr()
    # the same command again: both folders are complete, nothing trains
    assert main(["train", str(config), "--set", "train.n_steps=40", "--only", "tiny32"]) == 0
    assert "tiny32: already trained" in capsys.readouterr().out
    # a finished folder with a different config is refused rather than reused
    config.write_text(config.read_text().replace("l1 = 0.01", "l1 = 0.02"))
    assert main(["train", str(config), "--only", "tiny32"]) == 1
    assert "trained with a different config (decomposer.config.l1: saved 0.01, now 0.02)" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (("lr = 3e-3", "learning_rate = 3e-3"), "unknown key(s) 'learning_rate'; valid keys are: "),
    (("l1 = 0.01", "l1_coef = 0.01"), "'tiny32': unknown key(s) 'l1_coef'"),
    (("expansion = 4", "expansion = 4\nn_features = 8"), "give exactly one of `expansion`"),
    (('hookpoint_in = "act"\nexpansion', 'hookpoint_in = "resid_post.3"\nexpansion'), "no hookpoint 'resid_post.3'; it holds act"),
    (('kind = "test_tiny_relu"\nhookpoint_in = "act"\nexpansion', 'kind = "relux"\nhookpoint_in = "act"\nexpansion'),
     "unknown kind 'relux'"),
    (('mode = "disabled"', 'mode = "cloud"'), "mode must be one of offline, online, disabled"),
])
def test_cli_bad_config_is_refused_naming_the_key(cli_run, capsys, edit, message):
    from dictlearn.cli import main

    config, out = cli_run
    config.write_text(config.read_text().replace(*edit))
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "decomposers").exists()


def test_cli_refuses_unverifiable_cache(cli_run, capsys):
    from dictlearn.cli import main

    config, out = cli_run
    shard = out / "cache" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "does not verify" in err and "shard-00001.safetensors" in err and "truncated" in err
    assert not (out / "decomposers").exists()


def test_topk_trains_on_real_smol_cache(smol_cache, tmp_path):
    """`dictlearn train` with a real kind on real SmolLM2 activations (resid_post.10, bfloat16 cache)."""
    from dictlearn.activations.loader import BatchLoader
    from dictlearn.cli import main
    from dictlearn.trainers.logging import read_log

    config = tmp_path / "smol.toml"
    config.write_text(f"""
out_dir = "{tmp_path / 'run'}"
[train]
cache = "{smol_cache.path}"
batch_size = 256
n_steps = 24
lr = 2e-3
warmup_steps = 4
log_every = 8
checkpoint_every = 24
sample_tokens = 2048
progress = false
[wandb]
mode = "disabled"
[[decomposers]]
name = "topk4x"
kind = "topk"
hookpoint_in = "resid_post.10"
expansion = 4
k = 8
k_aux = 32
""")  # small k: TopK's gathers are unrolled per slot, and k = 32 takes minutes to compile on busy cores
    assert main(["train", str(config)]) == 0
    folder = tmp_path / "run" / "decomposers" / "topk4x"
    log = read_log(folder / "train_log.jsonl")
    assert [r["step"] for r in log] == [8, 16, 24]
    assert log[-1]["fvu"] < 0.85 * log[0]["fvu"] and log[-1]["l0"] == pytest.approx(8)
    saved = base.load(folder)
    assert (saved.config.d_in, saved.config.n_features, saved.kind) == (576, 2304, "topk")
    x = BatchLoader(smol_cache, ["resid_post.10"], 512, split="eval").batch(0)["resid_post.10"]
    fvu = float(np.sum((np.asarray(saved(jnp.asarray(x))) - x) ** 2) / np.sum((x - x.mean(0)) ** 2))
    assert fvu < 1.2 * log[-1]["fvu"] + 0.05, (fvu, log[-1]["fvu"])  # held-out raw rows, scale folded in


def test_cli_sends_snmf_tables_to_the_semi_nmf_solver(smol_cache, smol, tmp_path, monkeypatch):
    """kind = "snmf" goes to its own trainer (the kind's `trainer` attribute), which stores the residual
    directions F^T W_out through the family's MLP output projection, W_out (d_mlp, d_model)."""
    import dictlearn.activations.models as models
    from dictlearn.cli import main

    loaded = []
    monkeypatch.setattr(models, "load_model", lambda name, *a, **k: loaded.append(name) or smol)  # already loaded
    config = tmp_path / "nmf.toml"
    config.write_text(f'out_dir = "{tmp_path / "run"}"\n[train]\ncache = "{smol_cache.path}"\nprogress = false\n'
                      '[wandb]\nmode = "disabled"\n'
                      '[[decomposers]]\nname = "nmf"\nkind = "snmf"\nhookpoint_in = "mlp_hidden.10"\nn_features = 16\n'
                      'max_iters = 3\nmax_rows = 512\nprogress = false\n')
    assert main(["train", str(config)]) == 0
    assert loaded == [smol_cache.model_name]
    saved = base.load(tmp_path / "run" / "decomposers" / "nmf")
    assert saved.kind == "snmf" and saved.config.n_features == 16 and saved.config.d_in == 1536
    down_proj = smol.model.model.layers[10].mlp.down_proj.weight.detach().float().numpy()  # (d_model, d_mlp)
    f = np.asarray(saved.F[...])
    np.testing.assert_allclose(np.asarray(saved.resid_features()), f.T @ down_proj.T, rtol=1e-4, atol=1e-5)


def _train_cli_on(cache, tmp_path, name: str, tables: str) -> Path:
    from dictlearn.cli import main

    config = tmp_path / f"{name}.toml"
    config.write_text(f"""
out_dir = "{tmp_path / name}"
[train]
cache = "{cache.path}"
batch_size = 128
n_steps = 16
lr = 2e-3
warmup_steps = 2
log_every = 8
checkpoint_every = 16
sample_tokens = 512
progress = false
[wandb]
mode = "disabled"
{tables}""")
    assert main(["train", str(config)]) == 0
    return tmp_path / name / "decomposers"


def _check_trained(folder: Path, kind: str, x: np.ndarray, y: np.ndarray, grad: np.ndarray | None = None) -> None:
    from dictlearn.trainers.logging import read_log

    log = read_log(folder / "train_log.jsonl")
    assert [r["step"] for r in log] == [8, 16]
    assert log[-1]["fvu"] < log[0]["fvu"], (kind, log)
    saved = base.load(folder)
    assert saved.kind == kind
    args = (jnp.asarray(x),) if grad is None else (jnp.asarray(x), jnp.asarray(grad))
    y_hat = np.asarray(saved(*args))
    fvu = float(np.sum((y_hat - y) ** 2) / np.sum((y - y.mean(0)) ** 2))
    assert fvu < 1.0, (kind, fvu)  # held-out raw rows: the scale fold is right and it explains variance


def test_every_sgd_kind_trains_from_the_cli_on_real_smol_caches(smol_cache, smol_grad_cache, tmp_path):
    """ReLU, BatchTopK, JumpReLU, a transcoder and a skip-transcoder in one pass over the real SmolLM2
    cache, and gradient TopK on the real cache with harvested gradients (TopK itself: the test above)."""
    from dictlearn.activations.loader import BatchLoader

    tables = "".join(f"""
[[decomposers]]
name = "{name}"
kind = "{kind}"
hookpoint_in = "{src}"
{f'hookpoint_out = "{dst}"' if dst else ''}
expansion = 2
{extra}
""" for name, kind, src, dst, extra in [
        ("relu", "relu", "resid_post.10", None, "l1_coefficient = 1e-3"),
        ("batchtopk", "batchtopk", "resid_post.10", None, "k = 8"),
        ("jumprelu", "jumprelu", "resid_post.10", None, ""),
        ("tc", "transcoder", "mlp_in.10", "mlp_out.10", 'sparsity = "batchtopk"\nk = 8'),
        ("skip", "skip_transcoder", "mlp_in.10", "mlp_out.10", 'sparsity = "jumprelu"'),
    ])
    out = _train_cli_on(smol_cache, tmp_path, "plain", tables)
    held = BatchLoader(smol_cache, ["resid_post.10", "mlp_in.10", "mlp_out.10"], 512, split="eval").batch(0)
    for name, kind in [("relu", "relu"), ("batchtopk", "batchtopk"), ("jumprelu", "jumprelu")]:
        _check_trained(out / name, kind, held["resid_post.10"], held["resid_post.10"])
    for name, kind in [("tc", "transcoder"), ("skip", "skip_transcoder")]:
        _check_trained(out / name, kind, held["mlp_in.10"], held["mlp_out.10"])

    out = _train_cli_on(smol_grad_cache, tmp_path, "grad", """
[[decomposers]]
name = "gtopk"
kind = "gtopk"
hookpoint_in = "resid_post.10"
expansion = 2
k = 8
beta = 1.0
""")
    held = BatchLoader(smol_grad_cache, ["resid_post.10", "resid_post.10@grad"], 128, split="eval").batch(0)
    _check_trained(out / "gtopk", "gtopk", held["resid_post.10"], held["resid_post.10"], held["resid_post.10@grad"])
