"""The cross-layer transcoder (kind "clt"): it recovers a planted cross-layer dictionary, layer j's reconstruction
reads only layers <= j, per-layer scale folding is exact, save/load and resume are exact, a sharded mesh
matches one device, layer ranges and their errors, and a tiny CLT trained from the CLI on a harvested range."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn.decomposers  # noqa: F401  (registers the kinds)
from dictlearn.config import ConfigError
from dictlearn.decomposers import base
from dictlearn.hookpoint_names import expand_hookpoints

TESTS = Path(__file__).resolve().parent
SPARSITIES = ("topk", "batchtopk", "jumprelu")
SITES_IN, SITES_OUT = [f"mlp_in.{i}" for i in range(3)], [f"mlp_out.{i}" for i in range(3)]


def clt(sparsity="topk", d=16, n_features=32, layers="0-2", **kw):
    cfg = {"d_in": d, "n_features": n_features, "hookpoint_in": f"mlp_in.{layers}", "hookpoint_out": f"mlp_out.{layers}",
           "k": 2, "sparsity": sparsity, **kw}
    if sparsity == "jumprelu":
        cfg = {"initial_threshold": 0.05, "bandwidth": 0.1, **cfg}
    return base.build("clt", cfg)


def planted_clt(n_rows=4096, n_layers=3, d=16, n_true=16, k=2, seed=0, rows_seed=0):
    """Rows of a planted CLT: per layer, k of n_true features fire (values 0.5..1.5); input site l is the sum of
    its firing features' unit atoms, output site j the sum over layers i <= j of their decoders' blocks j - i
    (each feature's decoder, over all the layers it writes to, is a random unit vector). The dictionary comes
    from `seed`, the rows from `rows_seed`. -> x, y, decoders."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_layers, n_true, d))
    atoms /= np.linalg.norm(atoms, axis=-1, keepdims=True)
    decoders = []
    for i in range(n_layers):
        w = rng.normal(size=(n_true, n_layers - i, d))
        decoders.append(w / np.linalg.norm(w.reshape(n_true, -1), axis=1)[:, None, None])
    rng = np.random.default_rng([seed, rows_seed])
    chosen = np.argsort(rng.random((n_rows, n_layers, n_true)), axis=-1)[..., :k]
    codes = np.zeros((n_rows, n_layers, n_true))
    np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, chosen.shape), axis=-1)
    x = np.einsum("blf,lfd->bld", codes, atoms)
    y = np.zeros((n_rows, n_layers, d))
    for i in range(n_layers):
        y[:, i:] += np.einsum("bf,fjd->bjd", codes[:, i], decoders[i])
    return x.astype(np.float32), y.astype(np.float32), decoders


def _randomised(module, seed=1):
    """Biases and thresholds set off zero, so tests see every term."""
    rng = np.random.default_rng(seed)
    for name in ("b_enc", "b_in", "b_dec"):
        v = getattr(module, name)
        v[...] = jnp.asarray(0.1 * rng.normal(size=v.shape), jnp.float32)
    return module


@pytest.fixture(scope="module")
def trained(train_steps, tmp_path_factory):
    """sparsity -> a saved folder of a CLT trained 20 steps on planted rows (thresholds and counters away from their
    start); tests load their own copy."""
    x, y, _ = planted_clt(n_rows=512)
    root = tmp_path_factory.mktemp("clt")
    folders = {}
    for sparsity in SPARSITIES:
        m = clt(sparsity)
        metrics = train_steps(m, {"x": x, "y": y}, 20, 64, lr=3e-3)
        assert np.all(np.isfinite(metrics["loss"])) and metrics["mse"][-1] < metrics["mse"][0], sparsity
        folders[sparsity] = base.save(m, root / sparsity)
    return folders


# ---- the math ------------------------------------------------------------------------------------------------------
def test_decode_sums_the_writes_of_every_earlier_layer():
    m = _randomised(clt())
    codes = np.random.default_rng(0).random((5, 3, 32)).astype(np.float32)
    want = np.zeros((5, 3, 16), np.float32) + np.asarray(m.b_dec[...])
    for i in range(3):
        w = np.asarray(m.decoder(i)[...])
        assert w.shape == (32, 3 - i, 16)
        for j in range(i, 3):
            want[:, j] += codes[:, i] @ w[:, j - i]
    np.testing.assert_allclose(np.asarray(m.decode(jnp.asarray(codes))), want, rtol=1e-5, atol=1e-5)
    assert m.W_enc[...].shape == (3, 16, 32) and m.b_enc[...].shape == (3, 32) and m.b_in[...].shape == (3, 16)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_layer_j_reads_only_layers_up_to_j(sparsity):
    m = _randomised(clt(sparsity))
    x = np.random.default_rng(0).normal(size=(64, 3, 16)).astype(np.float32)
    base_out = np.asarray(m(jnp.asarray(x)))
    for j in range(3):
        later, here = x.copy(), x.copy()
        later[:, j + 1:] += 5.0  # every input after layer j
        here[:, j] += 5.0
        out_later, out_here = np.asarray(m(jnp.asarray(later))), np.asarray(m(jnp.asarray(here)))
        np.testing.assert_array_equal(out_later[:, : j + 1], base_out[:, : j + 1])
        assert not np.allclose(out_here[:, j], base_out[:, j])  # layer j itself does matter


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_metrics_per_layer_and_fired_layer_major(sparsity, trained):
    m = base.load(trained[sparsity])
    x, y, _ = planted_clt(n_rows=512)
    loss, metrics = m.loss({"x": jnp.asarray(x[:128]), "y": jnp.asarray(y[:128])})
    assert metrics["fired"].shape == (3 * 32,) and metrics["fired"].dtype == bool
    per_layer = sum(float(metrics[f"l0_{s}"]) for s in SITES_IN)
    assert float(metrics["l0"]) == pytest.approx(per_layer, rel=1e-6)
    codes = np.asarray(m.sparsity.train_codes(m.preacts(jnp.asarray(x[:128])))[0])
    np.testing.assert_array_equal(np.asarray(metrics["fired"]), np.any(codes != 0, axis=0).reshape(-1))
    assert all(f"fvu_{s}" in metrics for s in SITES_OUT)
    if sparsity == "topk":  # exactly k per row and layer
        assert all(float(metrics[f"l0_{s}"]) == 2.0 for s in SITES_IN)


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_planted_cross_layer_dictionary_is_recovered(sparsity, train_steps):
    x, y, decoders = planted_clt()
    m = clt(sparsity, dead_tokens=20_000)
    train_steps(m, {"x": x, "y": y}, 400, 256, lr=3e-3, decay=True)
    cosines = []
    for i, planted_dec in enumerate(decoders):
        learned = np.asarray(m.decoder(i)[...]).reshape(32, -1)
        learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
        cosines.append((planted_dec.reshape(len(planted_dec), -1) @ learned.T).max(axis=1))
    cosines = np.concatenate(cosines)
    assert cosines.mean() > 0.95 and np.quantile(cosines, 0.1) > 0.9, np.round(cosines, 3)
    held_x, held_y, _ = planted_clt(n_rows=1024, rows_seed=1)  # the same dictionary, fresh rows
    y_hat = np.asarray(m(jnp.asarray(held_x)))
    fvu = ((y_hat - held_y) ** 2).sum() / ((held_y - held_y.mean(0)) ** 2).sum()
    assert fvu < 0.05, fvu
    # a random CLT of the same shape does not look recovered: the measure can fail
    rand = np.asarray(clt(sparsity, seed=7).decoder(0)[...]).reshape(32, -1)
    assert (decoders[0].reshape(16, -1) @ rand.T).max(axis=1).mean() < 0.7


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_fold_input_scale_per_layer_is_exact(sparsity, trained):
    x, _, _ = planted_clt(n_rows=64)
    m = base.load(trained[sparsity])
    s_in, s_out = np.array([0.5, 2.0, 0.8], np.float32), np.array([1.5, 0.25, 3.0], np.float32)
    xs = jnp.asarray(x[:64] * s_in[:, None])
    codes, out = np.asarray(m.encode(xs)), np.asarray(m(xs))
    before = base.state_arrays(m)
    m.fold_input_scale(s_in, s_out)
    np.testing.assert_allclose(np.asarray(m.encode(jnp.asarray(x[:64]))), codes / s_out[:, None], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m(jnp.asarray(x[:64]))), out / s_out[:, None], rtol=1e-4, atol=1e-5)
    m.fold_input_scale(1 / s_in, 1 / s_out)
    for key, value in before.items():
        np.testing.assert_allclose(base.state_arrays(m)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="positive scales"):
        m.fold_input_scale(s_in, -s_out)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_save_load_round_trip(sparsity, trained, tmp_path):
    x, _, _ = planted_clt(n_rows=64)
    m = base.load(trained[sparsity])
    base.save(m, tmp_path / "clt")
    loaded = base.load(tmp_path / "clt")
    assert type(loaded) is type(m) and loaded.config == m.config and loaded.config.n_layers == 3
    before, after = base.state_arrays(m), base.state_arrays(loaded)
    assert before.keys() == after.keys() and {"W_enc", "b_enc", "b_in", "b_dec", "W_dec_0", "W_dec_2"} <= set(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(x))), np.asarray(m(jnp.asarray(x))))
    thresholds = m.thresholds()
    assert (thresholds is None) == (sparsity == "topk")
    if thresholds is not None:
        assert thresholds.shape == (3, 32)
        np.testing.assert_array_equal(np.asarray(loaded.thresholds()), np.asarray(thresholds))


# ---- layer ranges and their errors ---------------------------------------------------------------------------------
def test_layer_ranges_expand_in_order():
    assert expand_hookpoints(["mlp_in.0-3", "resid_post.5"]) == ["mlp_in.0", "mlp_in.1", "mlp_in.2", "mlp_in.3",
                                                                  "resid_post.5"]
    assert expand_hookpoints("mlp_out.4-4") == ["mlp_out.4"]
    # module paths and fnmatch patterns are never ranges
    assert expand_hookpoints(["model.layers.[0-3].mlp", "model.layers.*.mlp:input"]) == [
        "model.layers.[0-3].mlp", "model.layers.*.mlp:input"]
    from dictlearn.activations.harvest import HarvestConfig
    from dictlearn.activations.hookpoints import expand_hookpoints as from_hookpoints

    assert from_hookpoints is expand_hookpoints
    h = HarvestConfig(hookpoints=["mlp_in.1-2", "mlp_out.1-2"], gradients=["mlp_out.1-2"])
    assert h.hookpoints == ["mlp_in.1", "mlp_in.2", "mlp_out.1", "mlp_out.2"] and h.gradients == ["mlp_out.1", "mlp_out.2"]


@pytest.mark.parametrize("name, message", [
    ("mlp_in.3-1", r"runs backwards; write the lower layer first, mlp_in.1-3"),
    ("mlp_in.a-b", r"must be two whole numbers.*e.g. mlp_in.0-3"),
    ("mlp_in.1-", r"must be two whole numbers"),
])
def test_bad_ranges_are_refused_naming_the_fix(name, message):
    with pytest.raises(ValueError, match=message):
        expand_hookpoints([name])
    with pytest.raises(ValueError, match=message):
        clt(layers=name.split(".", 1)[1])


def _cache(widths: dict[str, int]) -> dict[str, dict]:
    return {k: {"width": w, "dtype": "float32"} for k, w in widths.items()}


def test_build_spec_checks_every_layer_and_its_width(tmp_path):
    from dictlearn.trainers.spec import build_spec

    table = {"name": "c", "kind": "clt", "hookpoint_in": "mlp_in.0-2", "hookpoint_out": "mlp_out.0-2", "expansion": 2, "k": 4}
    good = _cache({**{s: 16 for s in SITES_IN}, **{s: 16 for s in SITES_OUT}})
    spec = build_spec(table, good, tmp_path / "c", "t")
    assert spec.site_axis and spec.x_keys == SITES_IN and spec.y_keys == SITES_OUT
    assert spec.keys() == SITES_IN + SITES_OUT and spec.config.n_features == 32 and spec.config.d_in == 16
    with pytest.raises(ConfigError, match=r"no hookpoint 'mlp_in.2'.*the same range works in harvest.hookpoints"):
        build_spec(table, {k: v for k, v in good.items() if k != "mlp_in.2"}, tmp_path / "c", "t")
    with pytest.raises(ConfigError, match=r"layers of 'mlp_out.0-2' must have one width.*mlp_out.1 24"):
        build_spec(table, {**good, "mlp_out.1": {"width": 24}}, tmp_path / "c", "t")
    with pytest.raises(ConfigError, match=r"runs backwards"):
        build_spec({**table, "hookpoint_in": "mlp_in.2-0"}, good, tmp_path / "c", "t")
    with pytest.raises(ConfigError, match=r"hookpoint_in 'mlp_in.0-2' names 3, hookpoint_out 'mlp_out.0-1' names 2"):
        build_spec({**table, "hookpoint_out": "mlp_out.0-1"}, good, tmp_path / "c", "t")
    with pytest.raises(ConfigError, match=r"kind 'topk' reads and writes one hookpoint.*names 3.*'mlp_in.0'.*clt"):
        build_spec({"name": "t", "kind": "topk", "hookpoint_in": "mlp_in.0-2", "expansion": 2}, good, tmp_path / "t", "t")
    with pytest.raises(ConfigError, match=r"sparsity must be one of topk, batchtopk, jumprelu"):
        build_spec({**table, "sparsity": "relu"}, good, tmp_path / "c", "t")


# ---- the trainer: resume and mesh ----------------------------------------------------------------------------------
def _arrays(n_rows=1024, d=16):
    x, y, _ = planted_clt(n_rows=n_rows, d=d)
    scale_in, scale_out = np.array([1.0, 30.0, 0.2]), np.array([5.0, 0.5, 100.0])  # sites of very different norms
    return {**{s: x[:, i] * scale_in[i] for i, s in enumerate(SITES_IN)},
            **{s: y[:, i] * scale_out[i] for i, s in enumerate(SITES_OUT)}}


def _spec(folder, sparsity="batchtopk", n_features=32, d=16):
    from dictlearn.decomposers.clt import CLTConfig
    from dictlearn.trainers.spec import DecomposerSpec

    cfg = CLTConfig(d_in=d, n_features=n_features, hookpoint_in="mlp_in.0-2", hookpoint_out="mlp_out.0-2", k=2,
                    sparsity=sparsity)
    return DecomposerSpec(name="clt", kind="clt", config=cfg, folder=Path(folder) / "decomposers" / "clt")


class _StopAfter:
    """An ArraySource whose batches stop (an exception, as a crash would) after `stop` batches."""

    def __init__(self, source, stop: int):
        self.source, self.stop = source, stop

    def __getattr__(self, name):
        return getattr(self.source, name)

    def iterate(self, start_batch: int = 0):
        for i, batch in enumerate(self.source.iterate(start_batch), start=start_batch):
            if i >= self.stop:
                raise RuntimeError("interrupted")
            yield batch


def test_resume_after_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    from conftest import train_cfg
    from safetensors.numpy import load_file

    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import train

    arrays, cfg = _arrays(), train_cfg(n_steps=20, checkpoint_every=10, log_every=10, sample_tokens=512, warmup_steps=2)
    off = WandbConfig(mode="disabled")
    train([_spec(tmp_path / "a")], ArraySource(arrays, 64), cfg, off, log_dir=tmp_path / "a")
    with pytest.raises(RuntimeError, match="interrupted"):
        train([_spec(tmp_path / "b")], _StopAfter(ArraySource(arrays, 64), 15), cfg, off, log_dir=tmp_path / "b")
    assert not (tmp_path / "b" / "decomposers" / "clt" / base.PARAMS_FILE).exists()
    resumed = train([_spec(tmp_path / "b")], ArraySource(arrays, 64), cfg, off, log_dir=tmp_path / "b")
    a, b = (load_file(str(p / "decomposers" / "clt" / base.PARAMS_FILE)) for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    extra = json.loads((tmp_path / "b" / "decomposers" / "clt" / base.CONFIG_FILE).read_text())["extra"]
    assert len(extra["input_scale"]) == 3 and len(extra["output_scale"]) == 3  # one scale per site
    # each site was scaled to unit mean squared norm on its own: sites 30x apart get scales 30x apart
    assert extra["input_scale"][0] / extra["input_scale"][1] == pytest.approx(30.0, rel=0.05)
    # the saved dictionary reads raw activations (sites up to 100x apart in norm): every layer explained in part
    module = resumed.decomposers["clt"]
    x = jnp.asarray(np.stack([arrays[s] for s in SITES_IN], 1))
    y = np.stack([arrays[s] for s in SITES_OUT], 1)
    y_hat = np.asarray(module(x))
    fvu = ((y_hat - y) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    assert np.all(fvu < 1.0), fvu


MESH_SCRIPT = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import jax
import conftest as T
import test_clt as C
from flax import nnx
from dictlearn.decomposers import base
from dictlearn.trainers import sharding
from dictlearn.trainers.data import ArraySource
from dictlearn.trainers.logging import WandbConfig
from dictlearn.trainers.sgd import train

out = Path(sys.argv[1])
assert len(jax.devices()) == 4, jax.devices()
arrays = C._arrays(n_rows=1024)
report = {{}}
for data, model in [(1, 1), (2, 2)]:
    mesh = sharding.make_mesh(data, model, devices=jax.devices()[: data * model])
    folder = out / f"mesh{{data}}x{{model}}"
    # n_features == d_in (16): the latent axis of W_enc (3, 16, 16) must still be the last one
    spec = C._spec(folder, n_features=16)
    train([spec], ArraySource(arrays, 64, 0), T.train_cfg(n_steps=20, checkpoint_every=20, log_every=20, sample_tokens=512),
          WandbConfig(mode="disabled"), mesh=mesh, log_dir=folder)
    state = nnx.state(base.build(spec.kind, spec.config))
    placed = sharding.place(state, sharding.tree_shardings(state, mesh, spec.config.n_features))
    report[f"{{data}}x{{model}}"] = {{k: list(placed[k].get_value().sharding.spec) for k in ("W_enc", "b_enc", "W_dec_0", "W_dec_2", "tokens_since_fired")}}
print("REPORT" + json.dumps(report))
"""


def test_sharded_mesh_matches_one_device(tmp_path):
    from safetensors.numpy import load_file

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=TESTS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.split("REPORT", 1)[1])["2x2"]
    assert report["W_enc"] == [None, None, "model"] and report["b_enc"] == [None, "model"]
    assert report["W_dec_0"] == ["model", None, None] and report["W_dec_2"] == ["model", None, None]
    assert report["tokens_since_fired"] == [None, "model"]
    one, mesh = (load_file(str(tmp_path / m / "decomposers" / "clt" / base.PARAMS_FILE)) for m in ("mesh1x1", "mesh2x2"))
    for key, value in one.items():
        np.testing.assert_allclose(mesh[key], value, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(value).max())),
                                   err_msg=key)


# ---- the CLI on a harvested range ----------------------------------------------------------------------------------
CLI_CONFIG = """
out_dir = "{out}"
[train]
cache = "{cache}"
batch_size = 64
n_steps = 40
lr = 3e-3
warmup_steps = 4
log_every = 10
checkpoint_every = 20
sample_tokens = 512
progress = false
[wandb]
mode = "disabled"
[[decomposers]]
name = "clt"
kind = "clt"
hookpoint_in = "mlp_in.0-2"
hookpoint_out = "mlp_out.0-2"
expansion = 2
sparsity = "{sparsity}"
k = 4
"""


def test_cli_trains_a_clt_on_a_harvested_layer_range(tiny_harvest, tmp_path):
    from dictlearn.activations.loader import BatchLoader
    from dictlearn.cli import main
    from dictlearn.trainers.logging import read_log

    cache = tiny_harvest(hookpoints=["mlp_in.0-2", "mlp_out.0-2"], n_tokens=2048)
    assert sorted(cache.hookpoints) == sorted(SITES_IN + SITES_OUT)
    config = tmp_path / "clt.toml"
    config.write_text(CLI_CONFIG.format(out=tmp_path / "run", cache=cache.path, sparsity="batchtopk"))
    assert main(["train", str(config)]) == 0
    folder = tmp_path / "run" / "decomposers" / "clt"
    module = base.load(folder)
    assert module.kind == "clt" and module.config.hookpoints_in() == SITES_IN and module.config.d_in == 32
    log = read_log(folder / "train_log.jsonl")
    assert log[-1]["step"] == 40 and all(f"fvu_{s}" in log[-1] for s in SITES_OUT)
    held = BatchLoader(cache, SITES_IN + SITES_OUT, 256, split="eval").batch(0)
    x = jnp.asarray(np.stack([held[s] for s in SITES_IN], 1))
    y = np.stack([held[s] for s in SITES_OUT], 1)
    fvu = ((np.asarray(module(x)) - y) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    assert np.all(fvu < 1.0), fvu  # raw held-out activations, every layer explained in part


def test_jumprelu_target_l0_starts_and_stays_near_the_target(train_steps):
    x, y, _ = planted_clt(n_rows=2048)
    m = clt("jumprelu", target_l0=3.0, l0_coefficient=1e-3)
    metrics = train_steps(m, {"x": x, "y": y}, 150, 128, lr=3e-3)
    per_layer = metrics["l0"] / 3
    assert abs(per_layer[0] - 3.0) < 1.0, per_layer[:5]  # thresholds start where the sample fires 3 per layer
    assert abs(np.mean(per_layer[-20:]) - 3.0) < 1.0, per_layer[-20:]
