"""Matryoshka SAE: prefix validation, the summed prefix loss and its gradients against a dense reference,
the planted-hierarchy evidence (it keeps parent latents that BatchTopK absorbs), and SAELens reading its
export on real SmolLM2 activations. Training, save/load and folding run in test_decomposers (through the
kind's `example`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn.decomposers as D
from dictlearn.config import ConfigError
from dictlearn.decomposers import base
from dictlearn.decomposers.batchtopk import kth_largest_nonneg
from dictlearn.decomposers.matryoshka import grouped_decode, nested_decode, prefix_groups
from dictlearn.decomposers.sparse_ops import SparseCodes

D_IN, N = 12, 48


def build(**overrides):
    return D.build("matryoshka", {"d_in": D_IN, "n_features": N, "k": 4, "hookpoint_in": "resid_post.3", **overrides})


# ---- config ------------------------------------------------------------------------------------------


def test_prefix_widths_defaults_full_width_and_round_trip(tmp_path):
    assert build().config.prefix_widths == [3, 12, 48]  # n // 16, n // 4 (n // 64 = 0 left out), n
    m = build(prefix_widths=[6, 24], prefix_weights=[2, 1, 0.5])
    assert m.config.prefix_widths == [6, 24, 48]  # the full width is the last prefix, added when left out
    assert build(prefix_widths=[6, 48]).config.prefix_widths == [6, 48]
    base.save(m, tmp_path / "m")
    assert base.load(tmp_path / "m").config == m.config
    topk = build(selection="topk")
    assert type(topk.sparsity).name == "matryoshka_topk" and topk.sparsity.linear_form(topk) == ("topk", None, 4)
    form = m.sparsity.linear_form(m)
    assert form[0] == "jumprelu" and form[1].shape == (N,) and form[2] is None  # BatchTopK's global threshold


@pytest.mark.parametrize("bad,message", [
    ({"prefix_widths": [12, 6]}, "strictly increasing"),
    ({"prefix_widths": [0, 6]}, r"1\.\.n_features \(48\)"),
    ({"prefix_widths": [6, 60]}, r"1\.\.n_features \(48\)"),
    ({"prefix_widths": []}, "at least one width"),
    ({"prefix_widths": [6, 24], "prefix_weights": [1, 1]}, r"one weight per prefix, 3 for prefix_widths \[6, 24, 48\]"),
    ({"prefix_weights": [1, -1, 1]}, ">= 0 and not all zero"),
    ({"selection": "jumprelu"}, "selection must be one of batchtopk, topk"),
])
def test_bad_prefixes_are_clear_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        build(**bad)


# ---- the loss against a dense reference --------------------------------------------------------------


def test_grouped_decode_and_its_gradients_equal_dense_masks():
    rng = np.random.default_rng(0)
    widths = (5, 20, N)
    idx = jnp.asarray(np.argsort(rng.random((16, N)), axis=1)[:, :7].astype(np.int32))
    vals = jnp.asarray(rng.random((16, 7)).astype(np.float32) * (rng.random((16, 7)) < 0.7))
    w = jnp.asarray(rng.standard_normal((N, D_IN)).astype(np.float32))
    probe = jnp.asarray(rng.standard_normal((3, 16, D_IN)).astype(np.float32))
    dense = jnp.zeros((16, N)).at[jnp.arange(16)[:, None], idx].add(vals)

    def ours(v, w):
        return jnp.sum(probe * nested_decode(SparseCodes(v, idx), w, widths)[0])

    def reference(v, w):
        d = jnp.zeros((16, N)).at[jnp.arange(16)[:, None], idx].add(v)
        return jnp.sum(probe * jnp.stack([d[:, :wd] @ w[:wd] for wd in widths]))

    group = prefix_groups(idx, widths)
    parts = grouped_decode(vals, idx, group, 3, w)
    for g, (lo, hi) in enumerate(zip((0,) + widths[:-1], widths)):
        np.testing.assert_allclose(parts[:, g], dense[:, lo:hi] @ w[lo:hi], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(ours, argnums=(0, 1))(vals, w), jax.grad(reference, argnums=(0, 1))(vals, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    stacked, l0 = nested_decode(SparseCodes(vals, idx), w, widths)
    dense_stacked, dense_l0 = nested_decode(dense, w, widths)  # the dense-codes branch agrees
    np.testing.assert_allclose(stacked, dense_stacked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l0, dense_l0)
    np.testing.assert_allclose(l0[-1], np.mean(np.sum(np.asarray(dense) != 0, axis=1)))


def _reference_loss(params, x, config, batchtopk: bool):
    """sum_p weight_p * mean ||x - prefix_p reconstruction||^2 with dense codes (AuxK off)."""
    w_enc, b_enc, w_dec, b_dec = params
    pre = (x - b_dec) @ w_enc.T + b_enc
    z = jax.nn.relu(pre)
    if batchtopk:
        t = kth_largest_nonneg(jax.lax.stop_gradient(z), config.k * x.shape[0])
        codes = z * (jax.lax.stop_gradient(z) >= t)
    else:
        kth = jax.lax.top_k(jax.lax.stop_gradient(pre), config.k)[0][:, -1:]
        codes = z * (jax.lax.stop_gradient(pre) >= kth)
    weights = config.prefix_weights or [1.0] * len(config.prefix_widths)
    return sum(wt * jnp.mean(jnp.sum((x - codes[:, :wd] @ w_dec[:wd] - b_dec) ** 2, axis=1))
               for wt, wd in zip(weights, config.prefix_widths))


@pytest.mark.parametrize("selection,row_slots", [("batchtopk", None), ("batchtopk", 4), ("topk", None)])
def test_loss_and_gradients_are_the_summed_prefix_errors(selection, row_slots):
    """The training loss is exactly the weighted sum of every prefix's error, on BatchTopK's sparse path,
    on its dense fallback (row_slots = k forces it here) and with TopK; so are the parameter gradients."""
    m = build(selection=selection, row_slots=row_slots, prefix_widths=[4, 16], prefix_weights=[0.5, 2, 1],
              aux_coefficient=0.0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, D_IN)).astype(np.float32) + 0.3)
    m.init_from_data(x, x)
    m.b_enc[...] = jnp.asarray(rng.normal(0, 0.1, N).astype(np.float32))
    (loss, metrics), grads = m.loss_and_grads({"x": x, "y": x})
    params = (m.W_enc[...], m.b_enc[...], m.W_dec[...], m.b_dec[...])
    ref, ref_grads = jax.value_and_grad(_reference_loss)(params, x, m.config, selection == "batchtopk")
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for name, g in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ref_grads):
        np.testing.assert_allclose(grads[name][...], g, rtol=2e-4, atol=2e-5, err_msg=name)
    if selection == "batchtopk":
        assert float(metrics["dense_fallback"]) == (1.0 if row_slots else 0.0)
    # The metrics report each inner prefix (FVU falls and L0 grows with the width) and the full width.
    assert float(metrics["fvu_4"]) > float(metrics["fvu_16"]) > float(metrics["fvu"])
    assert float(metrics["l0_4"]) <= float(metrics["l0_16"]) <= float(metrics["l0"])


# ---- evidence: a planted hierarchy ---------------------------------------------------------------------

PARENTS, CHILDREN, D_H = 8, 8, 128


def hierarchy(rows: int = 16384, seed: int = 0):
    """Each parent is active with probability 1/4 (magnitude U(1, 2)); an active parent always brings exactly
    one of its 8 children (magnitude U(1, 2)), and a child never fires without its parent. An SAE can then
    replace a parent and its children by 8 "parent + child" latents, one active latent instead of two:
    feature absorption."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((PARENTS * (CHILDREN + 1), D_H))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    parents, children = dirs[:PARENTS], dirs[PARENTS:].reshape(PARENTS, CHILDREN, D_H)
    active = rng.random((rows, PARENTS)) < 0.25
    which = rng.integers(0, CHILDREN, (rows, PARENTS))
    x = (active * rng.uniform(1, 2, (rows, PARENTS))) @ parents
    x += np.einsum("rp,rpd->rd", active * rng.uniform(1, 2, (rows, PARENTS)), children[np.arange(PARENTS), which])
    return x.astype(np.float32), parents


def parent_cosines(model, parents) -> np.ndarray:
    w = np.asarray(model.features(), np.float64)
    return np.max(parents @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T, axis=1)


def test_matryoshka_keeps_parents_that_batchtopk_absorbs(train_steps):
    """Same data, width, k, steps and seed. Measured (seeds 0, 1, 2): parents with a latent of cosine > 0.9,
    Matryoshka 8, 7, 7 of 8 (mean best cosine 0.95, 0.92, 0.92), BatchTopK 3, 3, 2 (0.83, 0.85, 0.81): its
    best match to most parents is a parent + child mix (cosine about 0.7)."""
    x, parents = hierarchy()
    cos = {}
    for kind, extra in (("batchtopk", {}), ("matryoshka", {"prefix_widths": [PARENTS]})):
        model = D.build(kind, {"d_in": D_H, "n_features": 80, "k": 4, "dead_tokens": 20000, **extra})
        metrics = train_steps(model, {"x": x, "y": x}, steps=800, batch_size=512, lr=3e-3, decay=True)
        assert metrics["fvu"][-20:].mean() < 0.05, kind
        cos[kind] = parent_cosines(model, parents)
    assert (cos["matryoshka"] > 0.9).sum() >= 7, cos
    assert (cos["batchtopk"] > 0.9).sum() <= 4, cos
    assert cos["matryoshka"].mean() > cos["batchtopk"].mean() + 0.05, cos


# ---- SAELens reads the export: real SmolLM2 activations -------------------------------------------------


def test_saelens_encodes_smollm2_activations_as_dictlearn(smol_cache, train_steps, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
    torch = pytest.importorskip("torch")
    from dictlearn.export.saelens import export_saelens

    train_ids, eval_ids = smol_cache.shard_ids("train"), smol_cache.shard_ids("eval")
    x = np.concatenate([smol_cache.shard_arrays(i, ["resid_post.10"])["resid_post.10"] for i in train_ids]).astype(np.float32)
    held = smol_cache.shard_arrays(eval_ids[0], ["resid_post.10"])["resid_post.10"][:512].astype(np.float32)
    scale = float(1 / np.sqrt(np.mean(np.sum(x**2, axis=1))))
    model = D.build("matryoshka", {"d_in": x.shape[1], "n_features": 4 * x.shape[1], "k": 16,
                                   "hookpoint_in": "resid_post.10", "prefix_widths": [64, 512]})
    train_steps(model, {"x": x * scale, "y": x * scale}, steps=60, batch_size=512, lr=3e-3)
    model.fold_input_scale(scale, scale)  # the saved dictionary reads raw activations
    folder = export_saelens(model, tmp_path / "sae", metadata={"model_name": "SmolLM2-135M-Instruct"})
    sae = sae_lens.SAE.load_from_disk(str(folder))
    assert sae.cfg.architecture() == "jumprelu"  # how SAELens saves Matryoshka BatchTopK for inference

    ours = np.asarray(model.encode(jnp.asarray(held)))
    ours_out = np.asarray(model(jnp.asarray(held)))
    with torch.no_grad():
        theirs = sae.encode(torch.from_numpy(held)).numpy()
        theirs_out = sae(torch.from_numpy(held)).numpy()
    # Leave out rows with a pre-activation within float32 rounding (about 1e-6 |x| |w|, 10x here) of the
    # threshold: there JAX and torch may decide differently.
    centred = held - np.asarray(model.b_dec[...])
    pre = centred.astype(np.float64) @ np.asarray(model.W_enc[...], np.float64).T + np.asarray(model.b_enc[...])
    margin = 1e-5 * np.linalg.norm(centred, axis=1) * np.linalg.norm(np.asarray(model.W_enc[...]), axis=1).max()
    keep = np.min(np.abs(pre - float(model.sparsity.threshold[...])), axis=1) > margin
    assert keep.mean() > 0.5 and (ours[keep] > 0).sum(1).mean() > 2  # the comparison is not vacuous
    diff = np.abs(theirs[keep] - ours[keep]).max()
    print(f"SAELens vs dictlearn on {keep.sum()} SmolLM2 rows: max abs code difference {diff:.3g} "
          f"(codes up to {np.abs(ours).max():.3g}), output {np.abs(theirs_out[keep] - ours_out[keep]).max():.3g}")
    assert diff <= 1e-5 * np.abs(ours).max() + 1e-5, f"max abs code difference {diff}"
    np.testing.assert_allclose(theirs_out[keep], ours_out[keep], rtol=1e-4, atol=1e-4 * np.abs(held).max())


def test_a_prefix_is_a_batchtopk_sae_encoding_as_the_first_latents():
    m = build(prefix_widths=[6, 24])
    rng = np.random.default_rng(2)
    m.b_enc[...] = jnp.asarray(rng.normal(0, 0.3, N).astype(np.float32))
    m.b_dec[...] = jnp.asarray(rng.normal(0, 0.3, D_IN).astype(np.float32))
    m.sparsity.threshold[...] = jnp.asarray(0.2, jnp.float32)
    x = jnp.asarray(rng.standard_normal((32, D_IN)).astype(np.float32))
    codes = np.asarray(m.encode(x))
    small = m.prefix(24)
    assert small.kind == "batchtopk" and small.config.n_features == 24
    np.testing.assert_array_equal(np.asarray(small.encode(x)), codes[:, :24])
    np.testing.assert_allclose(np.asarray(small(x)), codes[:, :24] @ np.asarray(m.W_dec[...])[:24] + np.asarray(m.b_dec[...]),
                               rtol=1e-5, atol=1e-5)
    assert (codes[:, :24] != 0).any()
    with pytest.raises(ValueError, match="not a standalone SAE"):
        build(selection="topk").prefix(6)
    with pytest.raises(ValueError, match=r"1\.\.48"):
        m.prefix(49)
