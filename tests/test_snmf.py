"""Semi-NMF: solver correctness on constructed data, the decomposer protocol, and training from a cache."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.decomposers import base
from dictlearn.decomposers import snmf_solver as solver
from dictlearn.decomposers.snmf import SemiNMF, SNMFConfig
from dictlearn.trainers import snmf as snmf_trainer


def planted(seed: int, n: int = 3000, d: int = 64, k: int = 8, nnz: int = 4, active: int = 2, noise: float = 0.0):
    """X = G F^T (+ noise): F (d, k) signed with `nnz` entries per column, G (n, k) >= 0 with `active` per row."""
    rng = np.random.default_rng(seed)
    f = np.zeros((d, k), np.float32)
    for j in range(k):
        rows = rng.choice(d, nnz, replace=False)
        f[rows, j] = rng.choice([-1.0, 1.0], nnz) * rng.uniform(0.5, 1.5, nnz)
    g = np.zeros((n, k), np.float32)
    for i in range(n):
        g[i, rng.choice(k, active, replace=False)] = rng.exponential(1.0, active) + 0.1
    x = g @ f.T + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), f, g


def best_cosines(true_f: np.ndarray, found_f: np.ndarray) -> np.ndarray:
    """For each true feature (column), the largest cosine with any found feature (signed: G >= 0 fixes the sign)."""
    a = true_f / np.linalg.norm(true_f, axis=0, keepdims=True)
    b = found_f / np.maximum(np.linalg.norm(found_f, axis=0, keepdims=True), 1e-12)
    return (a.T @ b).max(axis=1)


def reference_losses(x: np.ndarray, g0: np.ndarray, keep: int, iters: int, ridge=1e-6, eps=1e-12) -> list[float]:
    """A plain float64 numpy transcription of the paper's update rule (A = x.T, the d x n data)."""
    a, g = x.T.astype(np.float64), g0.astype(np.float64).copy()
    d, k = a.shape[0], g.shape[1]
    losses = []
    for _ in range(iters):
        f = a @ g @ np.linalg.inv(g.T @ g + ridge * np.eye(k))
        if keep < d:
            thresh = -np.sort(-np.abs(f), axis=0)[keep - 1]
            f = f * (np.abs(f) >= thresh)
        norms = np.maximum(np.linalg.norm(g, axis=0), 1e-8)
        g, f = g / norms, f * norms
        p, q = a.T @ f, f.T @ f
        pos, neg = (np.abs(p) + p) / 2, (np.abs(p) - p) / 2
        qpos, qneg = (np.abs(q) + q) / 2, (np.abs(q) - q) / 2
        g = g * np.sqrt((pos + g @ qneg) / (neg + g @ qpos + eps))
        losses.append(float(np.sum((a - f @ g.T) ** 2)))
    return losses


def test_planted_features_are_recovered():
    x, f_true, _ = planted(0, noise=0.01)
    # planted codes are cluster-like (2 of 8 features per row): the k-means start suits them (on real MLP
    # activations the SVD start, the default, is better; see the README)
    res = snmf_trainer.fit_memory(x, 8, keep_fraction=4 / 64, init="kmeans", max_iters=200, patience=30, seed=0)
    cos = best_cosines(f_true, np.asarray(res.f))
    assert np.mean(cos > 0.9) >= 0.9, cos


def test_jax_solver_matches_numpy_transcription():
    x, _, _ = planted(1, n=400, d=48, k=6, nnz=6, active=3, noise=0.05)
    x = np.abs(x) + 0.1 * x  # skewed, like MLP activations; still signed
    g0 = np.asarray(solver.init_random(jax.random.PRNGKey(3), 400, 6))
    keep = solver.keep_count(48, 0.1)
    expected = reference_losses(x, g0, keep, 50)
    res = snmf_trainer.fit_memory(x, 6, keep_fraction=0.1, init=g0, inner_steps=1, refit_steps=0, reseed_every=0,
                                  max_iters=50,
                                  patience=10**6, tol=0.0)
    got = np.array(res.losses)
    assert len(got) == 50
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("inner,refit", [(1, 0), (5, 10)])
def test_loss_never_increases_without_sparsity(inner, refit):
    x, _, _ = planted(2, n=1000, d=32, k=6, noise=0.3)
    res = snmf_trainer.fit_memory(x, 6, keep_fraction=1.0, init="random", inner_steps=inner, refit_steps=refit,
                                  reseed_every=0, max_iters=80, patience=10**6, tol=0.0)
    losses = np.array(res.losses)
    assert len(losses) == 80
    assert np.all(np.diff(losses) <= 1e-5 * losses[:-1]), np.diff(losses).max()
    assert losses[-1] < 0.9 * losses[0]


def test_sparse_solve_reports_the_kept_best_solution():
    x, _, _ = planted(3, n=600, d=40, k=8, noise=0.5)
    res = snmf_trainer.fit_memory(x, 8, keep_fraction=0.05, init="random", inner_steps=1, refit_steps=0,
                                  reseed_every=0, max_iters=60, patience=10**6, tol=0.0)
    losses = np.array(res.losses)
    assert np.any(np.diff(losses) > 0), "the test needs a trajectory where the sparsity step raises the loss"
    assert res.best_iter == int(np.argmin(losses)) and res.best_loss == pytest.approx(losses.min(), rel=1e-6)
    f, g = np.asarray(res.f, np.float64), np.asarray(res.g, np.float64)
    assert res.best_loss == pytest.approx(float(np.sum((x - g @ f.T) ** 2)), rel=1e-4)
    assert np.all((np.abs(f) > 0).sum(axis=0) <= solver.keep_count(40, 0.05))


def test_early_stopping_and_target():
    x, _, _ = planted(4, n=800, d=32, k=6, noise=0.1)
    res = snmf_trainer.fit_memory(x, 6, keep_fraction=1.0, max_iters=400, patience=5, tol=1e-2, chunk_iters=7)
    assert res.stopped == "patience" and res.iters < 400 and res.iters - 1 - res.best_iter == 5
    target = res.losses[2]
    res2 = snmf_trainer.fit_memory(x, 6, keep_fraction=1.0, max_iters=400, patience=400, tol=0.0,
                                   chunk_iters=50, target_loss=target)
    assert res2.stopped == "target" and res2.iters == 3 and res2.best_loss <= target


def test_streaming_is_close_to_in_memory():
    """From the same start (F0 fitted on a 500-row sample, as the streaming trainer does), streaming
    minibatches reach the in-memory solver's loss within a few percent. (Started apart, either can
    land in a different local minimum: that is initialisation, not the streaming algorithm.)"""
    x, _, _ = planted(5, n=4000, d=64, k=8, noise=0.2)
    init = snmf_trainer.fit_memory(x[:500], 8, keep_fraction=4 / 64, max_iters=10, patience=10, seed=0)
    f0 = init.f / jnp.linalg.norm(init.f, axis=0)
    g0 = solver.solve_codes(jnp.asarray(x) @ f0, f0.T @ f0, 50)
    mem = snmf_trainer.fit_memory(x, 8, keep_fraction=4 / 64, init=g0 + 1e-3 * g0.max(axis=0), max_iters=100, patience=20)
    rng = np.random.default_rng(0)

    def batches(passes):
        for _ in range(passes):
            order = rng.permutation(len(x))
            for i in range(0, len(x), 500):
                yield x[order[i:i + 500]]

    stream = snmf_trainer.fit_streaming(batches(4), 32, init.f, keep_fraction=4 / 64, forgetting=0.9, init_rows=x[:500])
    mem_loss, sq, _ = snmf_trainer.evaluate_loss(mem.f, iter(np.split(x, 8)), 8)
    stream_loss, _, _ = snmf_trainer.evaluate_loss(stream.f, iter(np.split(x, 8)), 8)
    assert mem_loss / sq < 0.2
    assert stream_loss <= 1.03 * mem_loss, (stream_loss / sq, mem_loss / sq)


@pytest.mark.parametrize("method,tol", [("pgd", 1e-3), ("mu", 3e-2)])
def test_encode_recovers_planted_codes(method, tol):
    x, f_true, g_true = planted(6, n=500)
    model = base.build("snmf", SNMFConfig(d_in=64, n_features=8, hookpoint_in="mlp_hidden.3", encode_iters=200,
                                          encode_solver=method))
    model.set_features(f_true)
    norms = np.linalg.norm(f_true, axis=0)
    codes = np.asarray(model.encode(jnp.asarray(x)))
    assert codes.min() >= 0
    np.testing.assert_allclose(codes, g_true * norms, atol=tol * np.abs(g_true * norms).max())
    _, metrics = model.loss({"x": jnp.asarray(x), "y": jnp.asarray(x)})
    assert float(metrics["fvu"]) < (1e-5 if method == "pgd" else 1e-2)
    assert float(metrics["l0"]) == pytest.approx(float(np.mean(np.sum(codes > 0, axis=1))))
    assert metrics["fired"].shape == (8,) and bool(metrics["fired"].all())
    if method == "pgd":  # the planted 2 features per row carry the codes (the rest: float noise on zero-gradient entries)
        assert np.mean(np.sum(codes > 1e-4 * codes.max(), axis=1)) == pytest.approx(2.0, abs=0.02)


def test_save_load_round_trip(tmp_path):
    x, f_true, _ = planted(7, n=200)
    model = base.build("snmf", SNMFConfig(d_in=64, n_features=8, hookpoint_in="mlp_hidden.3", encode_iters=50))
    model.set_features(f_true)
    w_out = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    model.set_w_out(w_out)
    base.save(model, tmp_path / "d")
    loaded = base.load(tmp_path / "d")
    assert isinstance(loaded, SemiNMF) and loaded.config == model.config and loaded.config.d_model == 24
    np.testing.assert_array_equal(np.asarray(loaded.features()), np.asarray(model.features()))
    np.testing.assert_allclose(np.asarray(loaded.resid_features()), (f_true / np.linalg.norm(f_true, axis=0)).T @ w_out,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(loaded.encode(jnp.asarray(x))), np.asarray(model.encode(jnp.asarray(x))))
    with pytest.raises(ValueError, match="transposed"):
        model.set_w_out(w_out.T)
    plain = base.build("snmf", SNMFConfig(d_in=64, n_features=8))
    with pytest.raises(ValueError, match="no residual directions"):
        plain.resid_features()


def test_fold_input_scale_round_trip():
    x, _, _ = planted(8, n=1000, noise=0.1)
    s = 37.0
    res = snmf_trainer.fit_memory(x * s, 8, keep_fraction=4 / 64, max_iters=30, patience=30)
    model = base.build("snmf", SNMFConfig(d_in=64, n_features=8))
    model.set_features(res.f)
    scaled_codes = np.asarray(model.encode(jnp.asarray(x * s)))
    scaled_recon = np.asarray(model(jnp.asarray(x * s)))
    model.fold_input_scale(s, s)
    raw_codes = np.asarray(model.encode(jnp.asarray(x)))
    np.testing.assert_allclose(raw_codes, scaled_codes / s, rtol=1e-3, atol=1e-5 * np.abs(raw_codes).max())
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), scaled_recon / s, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="must be equal"):
        model.fold_input_scale(2.0, 3.0)


def test_config_errors():
    with pytest.raises(ValueError, match="d_out must equal d_in"):
        SNMFConfig(d_in=8, n_features=2, d_out=4)
    from dictlearn.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key.*keep_fracton.*valid keys"):
        snmf_trainer.parse_table({"name": "s", "kind": "snmf", "hookpoint_in": "mlp_hidden.1", "n_features": 4,
                                  "keep_fracton": 0.1})
    with pytest.raises(ConfigError, match="solver must be one of"):
        snmf_trainer.parse_table({"name": "s", "hookpoint_in": "mlp_hidden.1", "n_features": 4, "solver": "disk"})
    with pytest.raises(ConfigError, match="exactly one of n_features"):
        snmf_trainer.parse_table({"name": "s", "hookpoint_in": "mlp_hidden.1"})


@pytest.mark.parametrize("solver_name", ["memory", "streaming"])
def test_train_from_source_writes_a_loadable_decomposer(tmp_path, solver_name):
    from dictlearn.trainers.data import ArraySource

    x, f_true, _ = planted(9, n=2048, noise=0.05)
    x = 25.0 * x  # raw activations are not unit scale; the saved model must read them as they are
    source = ArraySource({"mlp_hidden.3": x}, batch_size=256, seed=0)
    cfg = snmf_trainer.parse_table({"name": "s", "kind": "snmf", "hookpoint_in": "mlp_hidden.3", "n_features": 8,
                                    "keep_fraction": 4 / 64, "solver": solver_name, "max_iters": 60, "passes": 3,
                                    "init_rows": 512, "progress": False})
    w_out = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    folder = snmf_trainer.train_snmf_from_source(cfg, source, tmp_path / "s", w_out, seed=0)
    model = base.load(folder)
    assert model.kind == "snmf" and model.resid_features().shape == (8, 16)
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert len(log) >= 3 and all("loss" in r or "eval_loss" in r for r in log)
    meta = json.loads((folder / "config.json").read_text())["extra"]["train"]
    assert meta["solver"] == solver_name and meta["fvu"] < 0.15  # planted noise alone is ~0.04
    _, metrics = model.loss({"x": jnp.asarray(x), "y": jnp.asarray(x)})  # raw x: the scale fold is right
    assert abs(float(metrics["fvu"]) - meta["fvu"]) < 0.02


def test_train_cli_on_real_cache(smol_cache, tmp_path):
    """Both solvers through `dictlearn train` on real SmolLM2 mlp_hidden.10 activations, with W_out."""
    from dictlearn.cli.train import main

    config = tmp_path / "run.toml"
    config.write_text(f"""
out_dir = "{tmp_path / 'run'}"
[train]
cache = "{smol_cache.path}"
progress = false
[wandb]
mode = "disabled"
[[decomposers]]
name = "snmf-mem"
kind = "snmf"
hookpoint_in = "mlp_hidden.10"
n_features = 24
max_iters = 15
max_rows = 4096
progress = false
[[decomposers]]
name = "snmf-stream"
kind = "snmf"
hookpoint_in = "mlp_hidden.10"
n_features = 24
solver = "streaming"
batch_size = 2048
passes = 2
init_rows = 2048
init_iters = 5
progress = false
""")
    assert main([str(config)]) == 0
    for name in ("snmf-mem", "snmf-stream"):
        model = base.load(tmp_path / "run" / "decomposers" / name)
        assert model.features().shape == (24, 1536) and model.resid_features().shape == (24, 576)
        meta = json.loads((tmp_path / "run" / "decomposers" / name / "config.json").read_text())["extra"]["train"]
        assert 0.2 < meta["fvu"] < 0.95, meta
        # each feature keeps ceil(1% of 1536) = 16 neurons
        assert int(np.max(np.sum(np.asarray(model.features()) != 0, axis=1))) <= 16


def test_residual_directions_come_from_the_family_output_projection(tiny_gpt2, tmp_path):
    """Without stored directions, export maps F through the model's MLP output projection (GPT-2's Conv1D c_proj,
    stored (in, out)) and records where that output appears; with them stored, no model is needed."""
    from dictlearn.export.snmf_format import read_snmf, steering_directions, write_snmf

    d_mlp = tiny_gpt2.config.n_embd * 4
    model = base.build("snmf", SNMFConfig(d_in=d_mlp, n_features=6, hookpoint_in="mlp_hidden.1", encode_iters=20))
    model.set_features(np.random.default_rng(2).standard_normal((d_mlp, 6)).astype(np.float32))
    w_out = tiny_gpt2.transformer.h[1].mlp.c_proj.weight.detach().numpy()  # (d_mlp, d_model): hidden @ W
    hookpoint, dirs = steering_directions(model, tiny_gpt2)
    assert hookpoint == "mlp_out.1"
    np.testing.assert_allclose(dirs, np.asarray(model.F[...]).T @ w_out, rtol=1e-5, atol=1e-6)
    write_snmf(model, tmp_path / "e", model=tiny_gpt2)
    meta = json.loads((tmp_path / "e" / "snmf.json").read_text())
    assert (meta["resid_hookpoint"], meta["d_model"]) == ("mlp_out.1", tiny_gpt2.config.n_embd)
    back = read_snmf(tmp_path / "e")
    assert steering_directions(back)[0] == "mlp_out.1"  # stored: no model needed
    np.testing.assert_allclose(np.asarray(back.resid_features()), dirs, rtol=1e-6)
    with pytest.raises(Exception, match="not an MLP hidden site"):
        steering_directions(base.build("snmf", SNMFConfig(d_in=32, n_features=2, hookpoint_in="resid_post.1")), tiny_gpt2)
