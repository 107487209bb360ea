"""Sparse kernels equal their dense references, in values and in gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dictlearn.decomposers import sparse_ops as so
from dictlearn.decomposers.batchtopk import kth_largest_nonneg
from dictlearn.kernels import cpu as cpu_kernels

B, N, D, K = 64, 96, 12, 5


def _problem(seed=0, b=B, n=N, d=D, k=K):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (b, d))
    w_enc = jax.random.normal(keys[1], (n, d)) / np.sqrt(d)
    b_enc = 0.1 * jax.random.normal(keys[2], (n,))
    w_dec = jax.random.normal(keys[3], (n, d))
    pre = x @ w_enc.T + b_enc
    _, idx = jax.lax.top_k(pre, k)
    return x, w_enc, b_enc, w_dec, pre, idx


@pytest.mark.parametrize("shape,k", [((7, 300), 32), ((64, 96), 5), ((3, 40), 40), ((2, 5, 33), 4),
                                     ((33, 4096), 32), ((2, 3, 2048), 8), ((16, 1024), 16)])
def test_top_k_equals_lax_top_k(shape, k):
    x = jax.random.normal(jax.random.key(1), shape)
    v, i = so.top_k(x, k)
    rv, ri = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


@pytest.mark.parametrize("n", [200, 4096])  # lax.top_k path and two-stage path
def test_top_k_with_ties_selects_the_same_values(n):
    x = jnp.round(jax.random.normal(jax.random.key(2), (16, n)) * 2) / 2  # many ties
    v, i = so.top_k(x, 20)
    rv, _ = jax.lax.top_k(x, 20)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
    np.testing.assert_array_equal(np.asarray(jnp.take_along_axis(x, i, axis=1)), np.asarray(v))
    assert all(len(set(row)) == 20 for row in np.asarray(i).tolist())  # distinct indices


@pytest.mark.parametrize("n", [300, 4096])
def test_top_k_with_bias_equals_top_k_of_the_sum(n):
    x = jax.random.normal(jax.random.key(4), (40, n))
    bias = jax.random.normal(jax.random.key(5), (n,))
    v, i = so.top_k(x, 16, bias)
    rv, ri = jax.lax.top_k(x + bias, 16)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


def test_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k must|0 < k"):
        so.top_k(jnp.zeros((2, 4)), 5)


def test_densify_and_fired_mask():
    codes = so.SparseCodes(jnp.array([[1.0, 0.0], [2.0, 3.0]]), jnp.array([[4, 1], [0, 4]]))
    dense = so.densify(codes, 6)
    np.testing.assert_array_equal(np.asarray(dense), [[0, 0, 0, 0, 1, 0], [2, 0, 0, 0, 3, 0]])
    np.testing.assert_array_equal(np.asarray(so.fired_mask(codes, 6)), [True, False, False, False, True, False])


@pytest.mark.parametrize("k", [K, 80])  # 80 > UNROLL_SLOTS: the chunked path
def test_gather_decode_matches_dense(k):
    x, _, _, w_dec, pre, _ = _problem()
    vals, idx = jax.lax.top_k(pre, k)

    def sparse(v, w):
        return jnp.sum(jnp.sin(so.gather_decode(v, idx, w)))

    def dense(v, w):
        return jnp.sum(jnp.sin(so.densify(so.SparseCodes(v, idx), N) @ w))

    np.testing.assert_allclose(sparse(vals, w_dec), dense(vals, w_dec), rtol=1e-5)
    gs, gd = jax.grad(sparse, (0, 1))(vals, w_dec), jax.grad(dense, (0, 1))(vals, w_dec)
    for a, b in zip(gs, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_gather_encode_matches_dense():
    x, w_enc, b_enc, _, _, idx = _problem()
    b_in = 0.3 * jax.random.normal(jax.random.key(9), (D,))

    def sparse(x, b_in, w, b):
        z0 = jax.lax.stop_gradient((x - b_in) @ w.T)  # the caller's dense product, without b_enc
        return jnp.sum(jnp.cos(so.gather_encode(x, b_in, w, b, z0, idx)))

    def dense(x, b_in, w, b):
        return jnp.sum(jnp.cos(jnp.take_along_axis((x - b_in) @ w.T + b, idx, axis=1)))

    np.testing.assert_allclose(sparse(x, b_in, w_enc, b_enc), dense(x, b_in, w_enc, b_enc), rtol=1e-6)
    gs = jax.grad(sparse, (0, 1, 2, 3))(x, b_in, w_enc, b_enc)
    gd = jax.grad(dense, (0, 1, 2, 3))(x, b_in, w_enc, b_enc)
    for a, b in zip(gs, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_custom_vjps_pass_numerical_gradient_check():
    x, w_enc, b_enc, w_dec, pre, idx = _problem(b=8, n=20, d=6, k=3)
    b_in = 0.3 * jax.random.normal(jax.random.key(9), (6,))

    def enc(x, b_in, w, b):
        return so.gather_encode(x, b_in, w, b, jax.lax.stop_gradient((x - b_in) @ w.T), idx)

    check_grads(enc, (x, b_in, w_enc, b_enc), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)
    vals = jnp.take_along_axis(pre, idx, axis=1)
    check_grads(lambda v, w: so.gather_decode(v, idx, w), (vals, w_dec), order=1, modes=["rev"],
                atol=2e-2, rtol=2e-2, eps=1e-2)


def test_scatter_rows_is_the_transpose_of_gather_combine():
    x, _, _, _, pre, idx = _problem()
    vals = jnp.take_along_axis(pre, idx, axis=1)
    got = so.scatter_rows(vals, idx, x, N)
    want = so.densify(so.SparseCodes(vals, idx), N).T @ x
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_sparse_step_has_no_dense_backward():
    """The jitted gradient of a TopK reconstruction contains exactly one (B, n) x (n, d)-sized dot:
    the forward encoder matmul. The backward adds none."""
    x, w_enc, b_enc, w_dec, _, _ = _problem(b=64, n=512, d=16)

    b_in = jnp.zeros((16,))

    def loss(w_enc, w_dec):
        z0 = jax.lax.stop_gradient(x @ w_enc.T)
        _, idx = so.top_k(z0, 4, b_enc)
        v = jax.nn.relu(so.gather_encode(x, b_in, w_enc, b_enc, z0, idx))
        return jnp.sum((so.gather_decode(v, idx, w_dec) - x) ** 2)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(w_enc, w_dec).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line and "64x512" in line]
    assert len(dots) == 1, dots  # the forward x @ w_enc.T; a dense backward would add two more


def test_kth_largest_nonneg_is_exact():
    z = jax.nn.relu(jax.random.normal(jax.random.key(3), (50, 70)))
    flat = np.sort(np.asarray(z).ravel())[::-1]
    for kth in (1, 7, 100, 1234, 3500):
        assert float(kth_largest_nonneg(z, kth)) == flat[kth - 1]


# ---- the decode on dictlearn's CPU kernels equals XLA's ------------------------------------------------

needs_kernels = pytest.mark.skipif(not cpu_kernels.enabled(), reason="dictlearn's CPU kernels are not available here")


def _zeroed_problem(seed=6, b=48, m=80, n=200, d=16):
    """Sparse codes with about 40% zero slots (BatchTopK's unselected candidates; more slots than
    UNROLL_SLOTS, so the forward runs on the kernel), a decoder and a probe."""
    rng = np.random.default_rng(seed)
    idx = jnp.asarray(np.stack([rng.choice(n, m, replace=False) for _ in range(b)]).astype(np.int32))
    vals = jnp.asarray((rng.random((b, m)) * (rng.random((b, m)) < 0.6)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((n, d)).astype(np.float32))
    probe = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
    return vals, idx, w, probe


@needs_kernels
def test_gather_decode_on_the_kernels_equals_xla_and_dense(monkeypatch):
    """Forward, value and decoder gradients equal on the kernels, on XLA's ops and on the dense product;
    zero_is_unselected zeroes exactly the zero slots' value gradients and changes nothing else."""
    vals, idx, w, probe = _zeroed_problem()

    def run(unselected):
        f = lambda v, w: jnp.sum(probe * so.gather_decode(v, idx, w, unselected))  # noqa: E731
        return (so.gather_decode(vals, idx, w, unselected), *jax.grad(f, argnums=(0, 1))(vals, w))

    forward = jax.jit(lambda v: so.gather_decode(v, idx, w, True)).lower(vals).as_text()
    backward = jax.jit(jax.grad(lambda v, w: jnp.sum(probe * so.gather_decode(v, idx, w, True)), (0, 1))).lower(vals, w)
    assert cpu_kernels.SCATTER_ROWS_AT_TARGET in forward  # forward on the kernel
    assert cpu_kernels.GATHER_DOTS_AT_TARGET in backward.as_text()  # the selected slots' value gradients
    fast = {u: run(u) for u in (False, True)}
    monkeypatch.setenv("DICTLEARN_CPU_KERNELS", "0")
    assert cpu_kernels.SCATTER_ROWS_AT_TARGET not in jax.jit(lambda v: so.gather_decode(v, idx, w)).lower(vals).as_text()
    slow = {u: run(u) for u in (False, True)}
    dense = lambda v, w: jnp.sum(probe * (so.densify(so.SparseCodes(v, idx), w.shape[0]) @ w))  # noqa: E731
    ref = (so.densify(so.SparseCodes(vals, idx), w.shape[0]) @ w, *jax.grad(dense, argnums=(0, 1))(vals, w))
    for u in (False, True):
        for a, b in zip(fast[u], slow[u]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast[False], ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    zero = np.asarray(vals) == 0
    assert zero.any() and (np.asarray(fast[False][1])[zero] != 0).all()  # exact: zero slots have a gradient
    assert (np.asarray(fast[True][1])[zero] == 0).all() and (np.asarray(slow[True][1])[zero] == 0).all()
    np.testing.assert_array_equal(np.asarray(fast[True][1])[~zero], np.asarray(fast[False][1])[~zero])
    np.testing.assert_array_equal(fast[True][2], fast[False][2])


def _old_xla_decode(monkeypatch):
    """The decode as it was before the kernels took it over: XLA's ops, every slot's exact value gradient."""
    from dictlearn.decomposers import sae, topk

    exact = lambda v, i, w, zero_is_unselected=False: so.gather_decode(v, i, w)  # noqa: E731
    monkeypatch.setattr(sae, "gather_decode", exact)
    monkeypatch.setattr(topk, "gather_decode", exact)
    monkeypatch.setenv("DICTLEARN_CPU_KERNELS", "0")


@needs_kernels
@pytest.mark.parametrize("kind,low_bias", [("topk", -2.0), ("batchtopk", -0.3)])
def test_topk_family_loss_and_gradients_equal_the_old_xla_path(kind, low_bias, monkeypatch):
    """A TopK / BatchTopK loss (AuxK on, with dead latents) and every parameter's gradient are the same on
    the kernels' decode (zero slots skipped) as on XLA's exact one. The batch has zero slots of every
    origin: BatchTopK's unselected candidates (80 per row, more than UNROLL_SLOTS: the kernels' forward),
    TopK slots whose pre-activation the relu zeroes, AuxK's live latents masked out (70 slots)."""
    import dictlearn.decomposers as D
    from flax import nnx

    n, d, k = 256, 12, 20
    model = D.build(kind, {"d_in": d, "n_features": n, "hookpoint_in": "resid_post.3", "k": k, "k_aux": 70,
                           "dead_tokens": 10, "aux_coefficient": 0.5})
    rng = np.random.default_rng(4)
    # Most latents start below zero: TopK's top k reach negative pre-activations (relu zeros).
    model.b_enc[...] = jnp.asarray(np.where(np.arange(n) < 6, 0.2, low_bias).astype(np.float32))
    model.tokens_since_fired[...] = jnp.asarray(np.where(np.arange(n) % 2, 100, 0).astype(np.int32))  # half dead
    x = jnp.asarray(rng.standard_normal((96, d)).astype(np.float32))
    batch = {"x": x, "y": x}

    def loss_and_grads():
        (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
        return float(loss), metrics, grads

    new = loss_and_grads()
    with monkeypatch.context() as patch:
        _old_xla_decode(patch)
        old = loss_and_grads()
    assert float(new[1]["auxk"]) > 0  # AuxK ran
    if kind == "batchtopk":  # the sparse path, k of the 4k candidates selected per row on average
        assert float(new[1]["dense_fallback"]) == 0.0 and float(new[1]["l0"]) == pytest.approx(k)
    else:
        assert float(new[1]["l0"]) < k  # some selected slots are relu zeros
    assert new[0] == pytest.approx(old[0], rel=1e-5)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_allclose(np.asarray(new[2][key][...]), np.asarray(old[2][key][...]), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
