"""The SAE family and transcoders: configs, save/load, scale folding, training hooks, each mechanism."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dictlearn.decomposers as D
from dictlearn.config import ConfigError
from dictlearn.decomposers import base
from dictlearn.decomposers.sae import SparseCoder, geometric_median
from dictlearn.decomposers.transcoder import SPARSITIES

D_IN, D_OUT, N, B = 8, 6, 32, 64
TABLE_KEYS = ("hookpoint_in", "hookpoint_out", "expansion", "n_features")  # an example's keys that _config sets
SPARSE_CODERS = sorted(k for k, cls in base.REGISTRY.items() if issubclass(cls, SparseCoder))
# Mechanism settings for these tiny sizes (keys a mechanism does not read are left out by _case).
MECHANISM_SETTINGS = {"k": 4, "dead_tokens": 128, "beta": 2.0, "initial_threshold": 0.05, "bandwidth": 0.1,
                      "l0_coefficient": 0.01, "l1_coefficient": 0.01, "l1_warmup_steps": 3}


def _mechanism(cls, overrides: dict):
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    if "sparsity" in fields:
        return SPARSITIES[overrides.get("sparsity", fields["sparsity"].default)]
    return cls.config_cls.mechanism_cls


def _case(kind: str, sparsity: str | None = None) -> tuple[str, dict]:
    """(kind, config overrides): the kind's example (or, given `sparsity`, that mechanism) at this file's sizes."""
    cls = base.REGISTRY[kind]
    overrides = {"sparsity": sparsity} if sparsity else {k: v for k, v in cls.example.items() if k not in TABLE_KEYS}
    wanted = {f.name for mixin in _mechanism(cls, overrides).fields for f in dataclasses.fields(mixin)} | {"dead_tokens"}
    overrides.update({k: v for k, v in MECHANISM_SETTINGS.items() if k in wanted})
    return kind, overrides


# Every registered SAE/transcoder kind with its own example, and each mechanism once on a kind that picks its
# mechanism by a `sparsity` field: nothing here is a hand-kept list of kinds.
CASES = [_case(kind) for kind in SPARSE_CODERS]
_PICKERS = [k for k in SPARSE_CODERS if "sparsity" in {f.name for f in dataclasses.fields(base.REGISTRY[k].config_cls)}]
_SEEN = {(k, _mechanism(base.REGISTRY[k], o)) for k, o in CASES}
CASES += [_case(kind, name) for i, name in enumerate(sorted(SPARSITIES)) if _PICKERS
          for kind in [_PICKERS[i % len(_PICKERS)]] if (kind, SPARSITIES[name]) not in _SEEN]
IDS = [f"{k}-{o.get('sparsity', '')}".rstrip("-") for k, o in CASES]


def _is_transcoder(kind: str) -> bool:
    return base.REGISTRY[kind].transcoder


def _config(kind: str, overrides: dict) -> dict:
    cfg = {"d_in": D_IN, "n_features": N, "hookpoint_in": "resid_post.3"}
    if _is_transcoder(kind):
        cfg.update(d_out=D_OUT, hookpoint_in="mlp_in.3", hookpoint_out="mlp_out.3")
    return {**cfg, **overrides}


def _data(kind: str, rows: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, D_IN)).astype(np.float32) + 0.5
    data = {"x": x}
    if _is_transcoder(kind):
        data["y"] = np.tanh(x @ rng.standard_normal((D_IN, D_OUT)).astype(np.float32)) + 0.2
    else:
        data["y"] = x
    data["grad"] = rng.standard_normal((rows, data["y"].shape[1])).astype(np.float32)
    return data


def _batch(model, data: dict[str, np.ndarray], rows: slice = slice(0, B)) -> dict[str, jax.Array]:
    out = {"x": jnp.asarray(data["x"][rows]), "y": jnp.asarray(data["y"][rows])}
    if model.needs_grad:
        out["grad"] = jnp.asarray(data["grad"][rows])
    return out


def _arrays(model) -> dict[str, np.ndarray]:
    return base.state_arrays(model)


# ---- registry and configs ----------------------------------------------------------------------


def test_every_kind_in_the_package_is_registered():
    """Discovery: every Decomposer subclass with a kind defined in a module of dictlearn/decomposers is registered."""
    import importlib
    import inspect
    import pkgutil

    defined = {}
    for info in pkgutil.iter_modules(D.__path__):
        module = importlib.import_module(f"{D.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, base.Decomposer) and cls.__module__ == module.__name__ and cls.kind:
                defined[cls.kind] = cls
    assert defined and all(base.REGISTRY.get(kind) is cls for kind, cls in defined.items())
    assert {k for k, cls in base.REGISTRY.items() if cls.__module__.startswith(D.__name__)} == set(defined)
    cfg = _config("topk", {"k": 4})
    assert D.build("gtopk", cfg).needs_grad and not D.build("topk", cfg).needs_grad
    assert D.build("gtopk", cfg).config.needs_grad and not D.build("topk", cfg).config.needs_grad


@pytest.mark.parametrize("kind,overrides", CASES, ids=IDS)
def test_config_json_round_trip(kind, overrides):
    model = D.build(kind, _config(kind, overrides))
    text = json.dumps(base.config_to_json(kind, model.config))
    cls, config = base.config_from_json(json.loads(text))
    assert cls is type(model) and config == model.config
    assert dataclasses.asdict(config)["d_out"] == (D_OUT if _is_transcoder(kind) else D_IN)


@pytest.mark.parametrize("kind,bad,message", [
    ("topk", {"k": 0}, "k must be"),
    ("topk", {"k": N + 1}, "k must be"),
    ("topk", {"kk": 3}, "unknown key"),
    ("relu", {"l1_coefficient": -1.0}, "l1_coefficient"),
    ("jumprelu", {"bandwidth": 0.0}, "bandwidth"),
    ("batchtopk", {"k": 4, "row_slots": 2}, "row_slots"),
    ("gtopk", {"beta": -1.0}, "beta"),
    ("topk", {"encoder_init_norm": 0.0}, "encoder_init_norm"),
    ("transcoder", {"sparsity": "topq"}, "unknown sparsity"),
    ("transcoder", {"sparsity": "jumprelu", "initial_threshold": -1.0}, "initial_threshold"),
    ("topk", {"k": "32"}, "expected int"),
    ("topk", {"n_features": -4}, "positive"),
])
def test_bad_config_is_a_clear_error(kind, bad, message):
    with pytest.raises(ConfigError, match=message):
        D.build(kind, _config(kind, bad))


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="known kinds: .*batchtopk.*topk"):
        D.build("topK", _config("topk", {}))


# ---- structure and initialisation ----------------------------------------------------------------


def test_shapes_tied_init_and_skip_path_at_zero():
    sae = D.build("topk", _config("topk", {"k": 4}))
    assert sae.W_enc.shape == (N, D_IN) and sae.W_dec.shape == (N, D_IN) and not hasattr(sae, "b_in")
    enc, dec = np.asarray(sae.W_enc[...]), np.asarray(sae.W_dec[...])
    np.testing.assert_allclose(enc, dec * 3**-0.5, rtol=1e-6)  # encoder = decoder^T, rows of norm 1/sqrt(3)
    for unit in (D.build("topk", _config("topk", {"k": 4, "encoder_init_norm": 1.0})), D.build("relu", _config("relu", {})),
                 D.build("jumprelu", _config("jumprelu", {}))):  # set explicitly; the penalty mechanisms' default
        np.testing.assert_array_equal(np.asarray(unit.W_enc[...]), np.asarray(unit.W_dec[...]))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec[...]), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(sae.features()), np.asarray(sae.W_dec[...]))

    tc = D.build("transcoder", _config("transcoder", {"k": 4}))
    assert tc.W_enc.shape == (N, D_IN) and tc.W_dec.shape == (N, D_OUT) and tc.b_in.shape == (D_IN,)
    assert not hasattr(tc, "W_skip") and tc.features().shape == (N, D_OUT)

    skip = D.build("skip_transcoder", _config("skip_transcoder", {"k": 4}))
    assert skip.W_skip.shape == (D_IN, D_OUT)
    assert not np.any(np.asarray(skip.W_skip[...]))


def test_geometric_median_initialises_the_decoder_bias():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((300, 5)).astype(np.float32)
    pts[:20] += 50.0  # outliers drag the mean, not the median
    sae = D.build("topk", _config("topk", {"k": 4}) | {"d_in": 5, "median_iters": 50})
    sae.init_from_data(jnp.asarray(pts), jnp.asarray(pts))
    med = np.asarray(sae.b_dec[...])
    # Weiszfeld's fixed point: the unit vectors from the median to the points sum to (almost) zero.
    diffs = pts - med
    assert np.linalg.norm((diffs / np.linalg.norm(diffs, axis=1, keepdims=True)).sum(0)) < 0.5
    assert np.linalg.norm(med) < 1.0 < np.linalg.norm(pts.mean(0))
    np.testing.assert_allclose(np.asarray(geometric_median(jnp.asarray(pts), 0)), pts.mean(0), rtol=1e-5)

    tc = D.build("transcoder", _config("transcoder", {"k": 4}))
    data = _data("transcoder")
    tc.init_from_data(jnp.asarray(data["x"]), jnp.asarray(data["y"]))
    iters = tc.config.median_iters
    np.testing.assert_allclose(np.asarray(tc.b_in[...]), np.asarray(geometric_median(jnp.asarray(data["x"]), iters)))
    np.testing.assert_allclose(np.asarray(tc.b_dec[...]), np.asarray(geometric_median(jnp.asarray(data["y"]), iters)))


def test_gradient_projection_and_renormalisation():
    model = D.build("topk", _config("topk", {"k": 4}))
    batch = _batch(model, _data("topk"))
    grads = nnx.grad(lambda m: m.loss(batch)[0])(model)
    raw = np.asarray(grads["W_dec"][...]).copy()
    projected = np.asarray(model.project_grads(grads)["W_dec"][...])
    w = np.asarray(model.W_dec[...])
    assert np.abs(np.sum(raw * w, axis=1)).max() > 1e-3
    np.testing.assert_allclose(np.sum(projected * w, axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(projected, raw - np.sum(raw * w, 1, keepdims=True) * w, atol=1e-6)
    model.W_dec[...] = model.W_dec[...] * 3.0
    _, metrics = model.loss(batch)
    model.after_step(metrics)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(model.W_dec[...]), axis=1), 1.0, rtol=1e-5)


# ---- every kind: training, save/load, folding ------------------------------------------------------


@pytest.mark.parametrize("kind,overrides", CASES, ids=IDS)
def test_trains_saves_loads_and_folds(kind, overrides, tmp_path, train_steps):
    """A few Adam steps on scaled data reduce the loss; save/load is exact; after folding the
    scales, reconstruction of raw data equals the in-training reconstruction / scale_out."""
    s_in, s_out = 0.37, (2.3 if _is_transcoder(kind) else 0.37)
    model = D.build(kind, _config(kind, overrides))
    data = _data(kind)
    scaled = {"x": data["x"] * s_in, "y": data["y"] * s_out, "grad": data["grad"] / s_out}
    if not model.needs_grad:
        del scaled["grad"]
    metrics = train_steps(model, scaled, steps=40, batch_size=B, lr=1e-2)
    assert np.all(np.isfinite(metrics["loss"])) and metrics["mse"][-5:].mean() < metrics["mse"][:5].mean()
    assert metrics["fired"].shape == (40, N) and metrics["fired"].dtype == bool
    if model.skip:
        assert np.any(np.asarray(model.W_skip[...]))

    # Save / load round trip: every variable and the output.
    x = jnp.asarray(data["x"][:B])
    grad = jnp.asarray(data["grad"][:B]) if model.needs_grad else None
    base.save(model, tmp_path / "m")
    loaded = base.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    for k, v in _arrays(model).items():
        np.testing.assert_array_equal(_arrays(loaded)[k], v, err_msg=k)
    np.testing.assert_array_equal(np.asarray(loaded(x, grad)), np.asarray(model(x, grad)))

    # Fold: raw in, raw out.
    trained_recon = np.asarray(model(x * s_in, None if grad is None else grad / s_out)) / s_out
    trained_codes = np.asarray(model.encode(x * s_in)) / s_out
    model.fold_input_scale(s_in, s_out)
    np.testing.assert_allclose(np.asarray(model(x, grad)), trained_recon, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.encode(x)), trained_codes, rtol=1e-4, atol=1e-5)
    assert np.mean(np.asarray(model.encode(x)) != 0) < 0.99  # the sparsity rule really acted
    np.testing.assert_allclose(np.linalg.norm(np.asarray(model.features()), axis=1), 1.0, rtol=1e-5)
    # ... it survives save/load, and folding the inverse scales undoes it.
    base.save(model, tmp_path / "folded")
    np.testing.assert_allclose(np.asarray(base.load(tmp_path / "folded")(x, grad)), trained_recon, rtol=1e-4, atol=1e-5)
    model.fold_input_scale(1 / s_in, 1 / s_out)
    np.testing.assert_allclose(np.asarray(model(x * s_in, None if grad is None else grad / s_out)) / s_out,
                               trained_recon, rtol=1e-4, atol=1e-5)


def test_fold_rejects_bad_scales():
    model = D.build("topk", _config("topk", {"k": 4}))
    with pytest.raises(ValueError, match="positive"):
        model.fold_input_scale(0.0, 1.0)


def test_load_rejects_a_mismatched_folder(tmp_path):
    model = D.build("topk", _config("topk", {"k": 4}))
    base.save(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["n_features"] = N * 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has shape .* the config implies"):
        base.load(tmp_path / "m")


# ---- mechanism specifics ----------------------------------------------------------------------------


def test_sparse_call_equals_dense_decode_of_encode():
    for kind in ("topk", "gtopk", "batchtopk"):
        model = D.build(kind, _config(kind, {"k": 4}))
        x = jnp.asarray(_data(kind)["x"][:B])
        np.testing.assert_allclose(np.asarray(model(x)), np.asarray(model.decode(model.encode(x))), rtol=1e-5, atol=1e-5)
    model = D.build("topk", _config("topk", {"k": 4}))
    codes = np.asarray(model.encode(x))
    assert np.all(np.sum(codes != 0, axis=1) <= 4) and np.all(codes >= 0)


def test_gtopk_uses_the_gradient_and_equals_topk_without_it():
    cfg = _config("topk", {"k": 4})
    topk, gtopk = D.build("topk", cfg), D.build("gtopk", cfg | {"beta": 5.0})
    data = _data("topk")
    x, g = jnp.asarray(data["x"][:B]), jnp.asarray(data["grad"][:B]) * 3.0
    np.testing.assert_array_equal(np.asarray(gtopk.encode(x)), np.asarray(topk.encode(x)))
    batch = {"x": x, "y": x}
    np.testing.assert_array_equal(np.asarray(gtopk.loss(batch)[0]), np.asarray(topk.loss(batch)[0]))
    with_grad = np.asarray(gtopk.sparsity.select(gtopk, x, gtopk.preacts(x), g).indices)
    without = np.asarray(gtopk.sparsity.select(gtopk, x, gtopk.preacts(x), None).indices)
    changed = np.mean([set(a) != set(b) for a, b in zip(with_grad, without)])
    assert changed > 0.2
    # Kept values are plain relu(pre-activations) at the chosen latents.
    pre = np.asarray(gtopk.preacts(x))
    vals = np.asarray(gtopk.sparsity.select(gtopk, x, gtopk.preacts(x), g).values)
    np.testing.assert_allclose(vals, np.maximum(np.take_along_axis(pre, with_grad, 1), 0), rtol=1e-6)
    # The loss with "grad" differs from the loss without.
    assert float(gtopk.loss({**batch, "grad": g})[0]) != float(gtopk.loss(batch)[0])


def test_topk_dead_latents_counter_and_auxk():
    model = D.build("topk", _config("topk", {"k": 2, "dead_tokens": 100, "aux_coefficient": 1.0}))
    model.b_enc[...] = model.b_enc[...].at[:5].set(10.0)  # latents 0-4 win every slot: the rest never fire
    batch = _batch(model, _data("topk"))
    _, metrics = model.loss(batch)
    fired = np.asarray(metrics["fired"])
    assert fired.sum() <= 5 and float(metrics["auxk"]) == 0.0  # nobody dead yet: AuxK is off
    model.after_step(metrics)
    counter = np.asarray(model.tokens_since_fired[...])
    np.testing.assert_array_equal(counter, np.where(fired, 0, B))
    model.after_step(metrics)  # 2 * B = 128 tokens > 100: the never-firing latents are now dead
    assert np.asarray(model.dead_mask()).sum() == N - fired.sum()
    (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
    assert float(metrics["auxk"]) > 0 and float(metrics["dead_frac"]) == pytest.approx(1 - fired.mean())
    # AuxK is what gives the dead latents' encoder rows a gradient.
    g_enc = np.abs(np.asarray(grads["W_enc"][...])).sum(1)
    assert g_enc[~fired].max() > 0


def test_batchtopk_selects_k_per_row_on_average_and_matches_the_dense_path():
    cfg = _config("batchtopk", {"k": 3})
    data = _data("batchtopk", seed=3)
    fast = D.build("batchtopk", cfg)
    full = D.build("batchtopk", cfg | {"row_slots": N})  # every latent a candidate: the sparse path, exactly
    tiny = D.build("batchtopk", cfg | {"row_slots": 3})  # some row wants more than 3: dense fallback
    batch = _batch(fast, data)
    out = {}
    for name, m in (("fast", fast), ("full", full), ("tiny", tiny)):
        (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(m)
        out[name] = (float(loss), metrics, grads)
    assert float(out["fast"][1]["dense_fallback"]) == 0.0 and float(out["tiny"][1]["dense_fallback"]) == 1.0
    assert float(out["fast"][1]["l0"]) == pytest.approx(3.0)  # k * B selected over the batch
    for name in ("fast", "tiny"):
        assert out[name][0] == pytest.approx(out["full"][0], rel=1e-5)
        assert float(out[name][1]["batch_threshold"]) == float(out["full"][1]["batch_threshold"])
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            np.testing.assert_allclose(np.asarray(out[name][2][key][...]), np.asarray(out["full"][2][key][...]),
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")
    # Rows differ in how many latents they use; the batch averages k.
    codes = np.asarray(fast.encode(batch["x"]))  # threshold not estimated yet: 0, so ReLU
    assert np.all(codes >= 0)


def test_batchtopk_inference_threshold_is_a_running_estimate():
    model = D.build("batchtopk", _config("batchtopk", {"k": 3, "threshold_momentum": 0.5}))
    batch = _batch(model, _data("batchtopk"))
    ts = []
    for rows in (slice(0, B), slice(B, 2 * B)):
        _, metrics = model.loss(_batch(model, _data("batchtopk"), rows))
        ts.append(float(metrics["batch_threshold"]))
        model.after_step(metrics)
    assert float(model.sparsity.threshold[...]) == pytest.approx(0.5 * ts[0] + 0.5 * ts[1])
    pre = np.asarray(model.preacts(batch["x"]))
    np.testing.assert_allclose(np.asarray(model.encode(batch["x"])), np.where(pre > model.sparsity.threshold[...], pre, 0))


def test_jumprelu_straight_through_gradients():
    from dictlearn.decomposers.jumprelu import heaviside, jumprelu

    pre = jnp.array([[0.10, 0.52, 0.90], [0.49, 0.30, 1.20]])
    theta, eps = jnp.array([0.5, 0.5, 0.93]), 0.1
    np.testing.assert_allclose(np.asarray(jumprelu(pre, theta, eps)), [[0, 0.52, 0], [0, 0, 1.2]], rtol=1e-6)
    g_pre, g_theta = jax.grad(lambda p, t: jumprelu(p, t, eps).sum(), (0, 1))(pre, theta)
    np.testing.assert_array_equal(np.asarray(g_pre), [[0, 1, 0], [0, 0, 1]])
    # Only pre within eps/2 of theta counts: 0.49 for latent 0, 0.52 for latent 1, 0.90 for latent 2.
    np.testing.assert_allclose(np.asarray(g_theta), [-0.5 / eps, -0.5 / eps, -0.93 / eps], rtol=1e-5)
    g_pre, g_theta = jax.grad(lambda p, t: heaviside(p, t, eps).sum(), (0, 1))(pre, theta)
    assert not np.any(np.asarray(g_pre))
    np.testing.assert_allclose(np.asarray(g_theta), [-1 / eps, -1 / eps, -1 / eps], rtol=1e-6)


def test_l1_and_l0_coefficients_warm_up():
    relu = D.build("relu", _config("relu", {"l1_coefficient": 0.4, "l1_warmup_steps": 4}))
    jump = D.build("jumprelu", _config("jumprelu", {"l0_coefficient": 0.2, "l0_warmup_steps": 2}))
    batch = _batch(relu, _data("relu"))
    seen = {"relu": [], "jumprelu": []}
    for _ in range(6):
        for name, m, key in (("relu", relu, "l1_coefficient"), ("jumprelu", jump, "l0_coefficient")):
            _, metrics = m.loss(batch)
            seen[name].append(float(metrics[key]))
            m.after_step(metrics)
    np.testing.assert_allclose(seen["relu"], [0, 0.1, 0.2, 0.3, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(seen["jumprelu"], [0, 0.1, 0.2, 0.2, 0.2, 0.2], rtol=1e-6)
    # The L1 term is weighted by decoder norms.
    relu.W_dec[...] = relu.W_dec[...] * 2.0
    _, m2 = relu.loss(batch)
    relu.W_dec[...] = relu.W_dec[...] / 2.0
    _, m1 = relu.loss(batch)
    assert float(m2["l1"]) == pytest.approx(2 * float(m1["l1"]), rel=1e-5)


def test_transcoder_with_gtopk_needs_grad():
    tc = D.build("transcoder", _config("transcoder", {"sparsity": "gtopk", "k": 4}))
    assert tc.needs_grad and not D.build("transcoder", _config("transcoder", {"k": 4})).needs_grad


@pytest.mark.parametrize("name,damage", [
    ("params.safetensors", lambda b: b[: len(b) // 2]),  # truncated
    ("params.safetensors", lambda b: b"\xff" * 64),  # garbage: "header too large" inside safetensors
    ("config.json", lambda b: b[:-10]),  # truncated JSON
    ("config.json", lambda b: b"\x00\x01garbage"),
    ("config.json", lambda b: b"[1, 2]"),  # JSON, but not a decomposer config
])
def test_load_of_a_damaged_folder_names_the_file_and_the_fix(tmp_path, name, damage):
    base.save(D.build("topk", _config("topk", {"k": 4})), tmp_path / "m")
    path = tmp_path / "m" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(base.LoadError) as err:
        base.load(tmp_path / "m")
    message = str(err.value)
    assert str(path) in message and "delete that folder and train again" in message, message


def test_load_reads_a_folder_saved_before_the_dead_latent_counter_moved(tmp_path):
    """Folders saved when TopK kept its counter under `sparsity.` (and ReLU had none) still load."""
    from safetensors.numpy import load_file, save_file

    for kind, overrides in (("topk", {"k": 4}), ("relu", {})):
        model = D.build(kind, _config(kind, overrides))
        model.tokens_since_fired[...] = model.tokens_since_fired[...] + 7
        base.save(model, tmp_path / kind)
        params = tmp_path / kind / "params.safetensors"
        arrays = load_file(str(params))
        old = arrays.pop("tokens_since_fired")
        if kind == "topk":
            arrays["sparsity.tokens_since_fired"] = old
        save_file(arrays, str(params))
        loaded = base.load(tmp_path / kind)
        np.testing.assert_array_equal(np.asarray(loaded.tokens_since_fired[...]), old if kind == "topk" else 0 * old)
        np.testing.assert_array_equal(np.asarray(loaded.W_dec[...]), np.asarray(model.W_dec[...]))
