"""The SGD trainer on planted data with a minimal ReLU SAE defined here (so the loop is tested on its own)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dictlearn.decomposers import base

from conftest import CLI_CONFIG, planted, spec, train_cfg, write_cache

pytestmark = pytest.mark.usefixtures("tiny_kind")


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
    # Training moved along the sparsity/reconstruction trade-off: reconstruction improved, or (a penalty kind
    # tightening towards its L0 in the first steps) the code got sparser without the FVU getting worse by much.
    first, last = log[0], log[-1]
    assert last["fvu"] < first["fvu"] or (last["l0"] < 0.8 * first["l0"] and last["fvu"] < 1.1 * first["fvu"]), (kind, log)
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
