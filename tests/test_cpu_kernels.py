"""The C++ CPU kernels (dictlearn/kernels): same answers as XLA's ops, used by the TopK step, clean fallback."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dictlearn.decomposers as D
from dictlearn.decomposers import sparse_ops
from dictlearn.kernels import cpu

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels")


@pytest.fixture
def kernels():
    if not cpu.enabled():
        pytest.fail("the CPU kernels should build here (a compiler is present); see the warning above")


@needs_compiler
def test_matmul_nt_equals_xla_with_gradients(kernels):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((300, 77), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((50, 77), dtype=np.float32))
    np.testing.assert_allclose(cpu.matmul_nt(a, w), a @ w.T, rtol=1e-5, atol=1e-4)
    loss = lambda mm: lambda a, w: jnp.sum(jnp.sin(mm(a, w)))  # noqa: E731
    ga = jax.grad(loss(cpu.matmul_nt), argnums=(0, 1))(a, w)
    gb = jax.grad(loss(lambda a, w: a @ w.T), argnums=(0, 1))(a, w)
    for p, q in zip(ga, gb):
        np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-4)
    # Inside jit too, and the lowered program really calls the kernel.
    assert cpu.MATMUL_TARGET in jax.jit(cpu.matmul_nt).lower(a, w).as_text()


@needs_compiler
@pytest.mark.parametrize("shape,k", [((257, 1000), 7), ((64, 16384), 32), ((3, 5, 40), 40), ((9, 100), 1)])
def test_top_k_rows_equals_lax_top_k(kernels, shape, k):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    bias = jnp.asarray(rng.standard_normal(shape[-1], dtype=np.float32))
    vals, idx = cpu.top_k_rows(x, k, bias)
    ref_v, ref_i = jax.lax.top_k(x + bias, k)
    np.testing.assert_array_equal(vals, ref_v)
    np.testing.assert_array_equal(idx, ref_i)
    assert idx.dtype == jnp.int32 and vals.shape == (*shape[:-1], k)


@needs_compiler
def test_top_k_rows_ties_and_masked_entries_as_lax(kernels):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(0, 3, (64, 100)).astype(np.float32))  # many exact ties
    for k in (10, 50):
        np.testing.assert_array_equal(cpu.top_k_rows(x, k)[1], jax.lax.top_k(x, k)[1])
    # AuxK masks live latents with -inf; fewer finite entries than k must still give k distinct indices.
    masked = jnp.where(x > 0, -jnp.inf, x)
    vals, idx = cpu.top_k_rows(masked, 90)
    np.testing.assert_array_equal(idx, jax.lax.top_k(masked, 90)[1])
    assert all(len(set(row)) == 90 for row in np.asarray(idx))


@needs_compiler
def test_row_dots_equals_the_sum_of_products(kernels):
    rng = np.random.default_rng(4)
    for shape in [(1000, 77), (16384, 64), (3, 1)]:
        a = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        b = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        np.testing.assert_allclose(cpu.row_dots(a, b), jnp.sum(a * b, axis=1), rtol=1e-5, atol=1e-5)
    assert cpu.ROW_DOTS_TARGET in jax.jit(cpu.row_dots).lower(a, b).as_text()


@needs_compiler
def test_scatter_rows_equals_xla_scatter_add(kernels):
    rng = np.random.default_rng(5)
    for batch, k, d, n in [(512, 8, 33, 100), (64, 32, 768, 16384), (7, 3, 5, 4)]:
        w = jnp.asarray(rng.standard_normal((batch, k), dtype=np.float32))
        idx = jnp.asarray(np.stack([rng.choice(n, k, replace=False) for _ in range(batch)]).astype(np.int32))
        rows = jnp.asarray(rng.standard_normal((batch, d), dtype=np.float32))
        ref = jnp.zeros((n, d)).at[idx.reshape(-1)].add((w[:, :, None] * rows[:, None, :]).reshape(-1, d))
        np.testing.assert_allclose(cpu.scatter_rows(w, idx, rows, n), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sparse_ops.scatter_rows(w, idx, rows, n), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(cpu.scatter_rows(w, idx.at[0, 0].set(n), rows, n))


@needs_compiler
def test_gather_dots_equals_xla_gather(kernels):
    rng = np.random.default_rng(6)
    for batch, k, d, n in [(512, 8, 33, 100), (64, 32, 768, 16384), (7, 3, 5, 4)]:
        idx = jnp.asarray(np.stack([rng.choice(n, k, replace=False) for _ in range(batch)]).astype(np.int32))
        rows = jnp.asarray(rng.standard_normal((batch, d), dtype=np.float32))
        table = jnp.asarray(rng.standard_normal((n, d), dtype=np.float32))
        ref = jnp.einsum("bd,bkd->bk", rows, table[idx])
        np.testing.assert_allclose(cpu.gather_dots(rows, idx, table), ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(sparse_ops.gather_dot(rows, idx, table), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(cpu.gather_dots(rows, idx.at[0, 0].set(-1), table))


@needs_compiler
def test_topk_step_uses_the_kernels_and_matches_the_xla_step(kernels, monkeypatch):
    """One TopK training step with and without the kernels: the same selection and nearly the same weights."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((512, 32), dtype=np.float32))

    def one_step():
        model = D.build("topk", {"d_in": 32, "n_features": 256, "k": 8, "seed": 0})
        model.init_from_data(x, x)
        opt = nnx.Optimizer(model, __import__("optax").adam(1e-3), wrt=nnx.Param)
        (loss, metrics), grads = model.loss_and_grads({"x": x, "y": x})
        opt.update(model, model.project_grads(grads))
        model.after_step(metrics)
        return float(loss), np.asarray(metrics["fired"]), np.asarray(model.W_dec[...]), np.asarray(model.W_enc[...])

    text = jax.jit(lambda x: sparse_ops.top_k(x, 8)).lower(x).as_text()
    assert cpu.TOPK_TARGET in text
    with_kernels = one_step()
    monkeypatch.setenv("DICTLEARN_CPU_KERNELS", "0")
    assert not cpu.enabled()
    assert cpu.TOPK_TARGET not in jax.jit(lambda x: sparse_ops.top_k(x, 8)).lower(x).as_text()
    without = one_step()
    assert with_kernels[0] == pytest.approx(without[0], rel=1e-5)
    np.testing.assert_array_equal(with_kernels[1], without[1])
    np.testing.assert_allclose(with_kernels[2], without[2], atol=1e-5)
    np.testing.assert_allclose(with_kernels[3], without[3], atol=1e-5)


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("DICTLEARN_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(cpu.KernelBuildError, match="no C\\+\\+ compiler.*no-such-compiler-xyz.*install g\\+\\+ or set CXX"):
        cpu.build()
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the cache


def test_kernels_stay_off_on_a_mesh_of_several_devices(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda *a: 4)
    assert not cpu.enabled()
    x = jnp.ones((4, 8), jnp.float32)
    assert cpu.top_k_rows(x, 2) is None
    assert cpu.MATMUL_TARGET not in jax.jit(cpu.matmul_nt).lower(x, x).as_text()
    assert cpu.ROW_DOTS_TARGET not in jax.jit(cpu.row_dots).lower(x, x).as_text()
    assert cpu.scatter_rows(x, jnp.zeros((4, 8), jnp.int32), x, 3) is None
    assert cpu.gather_dots(x, jnp.zeros((4, 2), jnp.int32), x) is None


# ---- row-selecting variants (Matryoshka's grouped decode) -------------------------------------------------


@needs_compiler
def test_scatter_rows_and_gather_dots_with_a_row_selector_equal_xla(kernels):
    rng = np.random.default_rng(7)
    batch, k, d, n, r = 96, 12, 40, 300, 384
    idx = jnp.asarray(np.stack([rng.choice(n, k, replace=False) for _ in range(batch)]).astype(np.int32))
    w = jnp.asarray(rng.standard_normal((batch, k)).astype(np.float32) * (rng.random((batch, k)) < 0.4))  # many zeros
    rows = jnp.asarray(rng.standard_normal((r, d), dtype=np.float32))
    table = jnp.asarray(rng.standard_normal((n, d), dtype=np.float32))
    row_of = jnp.asarray(rng.integers(0, r, (batch, k)).astype(np.int32))
    ref = jnp.zeros((n, d)).at[idx.reshape(-1)].add((w[:, :, None] * rows[row_of]).reshape(-1, d))
    np.testing.assert_allclose(cpu.scatter_rows(w, idx, rows, n, row_of=row_of), ref, rtol=1e-5, atol=1e-5)
    dots = jnp.einsum("bkd,bkd->bk", rows[row_of], table[idx])
    np.testing.assert_allclose(cpu.gather_dots(rows, idx, table, row_of=row_of), dots, rtol=1e-5, atol=1e-4)
    # A selector of -1 means "no row": that slot's dot is 0 and the others are unchanged.
    skip = rng.random((batch, k)) < 0.5
    out = np.asarray(cpu.gather_dots(rows, idx, table, row_of=jnp.where(skip, -1, row_of)))
    assert (out[skip] == 0).all()
    np.testing.assert_allclose(out[~skip], np.asarray(dots)[~skip], rtol=1e-5, atol=1e-4)
    # The plain scatter with zero weights (BatchTopK's unselected slots, now skipped) still sums the rest.
    tok_rows = jnp.asarray(rng.standard_normal((batch, d), dtype=np.float32))
    ref = jnp.zeros((n, d)).at[idx.reshape(-1)].add((w[:, :, None] * tok_rows[:, None, :]).reshape(-1, d))
    np.testing.assert_allclose(cpu.scatter_rows(w, idx, tok_rows, n), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="row selector is outside"):
        jax.block_until_ready(cpu.scatter_rows(w, idx, rows, n, row_of=row_of.at[0, 0].set(r)))
    with pytest.raises(Exception, match="row selector is outside"):
        jax.block_until_ready(cpu.gather_dots(rows, idx, table, row_of=row_of.at[0, 0].set(-2)))


@needs_compiler
def test_grouped_decode_kernels_equal_the_xla_path(kernels, monkeypatch):
    """Matryoshka's grouped decode and its gradients, on the kernels and on XLA's ops; zero_is_unselected
    zeroes exactly the zero slots' value gradients and changes nothing else."""
    from dictlearn.decomposers.matryoshka import grouped_decode, prefix_groups

    rng = np.random.default_rng(8)
    batch, m, d, n, widths = 64, 10, 24, 80, (5, 20, 80)
    idx = jnp.asarray(np.stack([rng.choice(n, m, replace=False) for _ in range(batch)]).astype(np.int32))
    vals = jnp.asarray(rng.random((batch, m)).astype(np.float32) * (rng.random((batch, m)) < 0.6))
    w = jnp.asarray(rng.standard_normal((n, d)).astype(np.float32))
    probe = jnp.asarray(rng.standard_normal((batch, len(widths), d)).astype(np.float32))
    group = prefix_groups(idx, widths)

    def run(unselected):
        f = lambda v, w: jnp.sum(probe * grouped_decode(v, idx, group, len(widths), w, unselected))  # noqa: E731
        out = grouped_decode(vals, idx, group, len(widths), w, unselected)
        return (out, *jax.grad(f, argnums=(0, 1))(vals, w))

    assert cpu.SCATTER_ROWS_AT_TARGET in jax.jit(lambda v: grouped_decode(v, idx, group, 3, w)).lower(vals).as_text()
    fast = {u: run(u) for u in (False, True)}
    monkeypatch.setenv("DICTLEARN_CPU_KERNELS", "0")
    slow = {u: run(u) for u in (False, True)}
    for u in (False, True):
        for a, b in zip(fast[u], slow[u]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    zero = np.asarray(vals) == 0
    assert zero.any() and (np.asarray(fast[False][1])[zero] != 0).all()  # exact: zero slots have a gradient
    assert (np.asarray(fast[True][1])[zero] == 0).all()
    np.testing.assert_array_equal(np.asarray(fast[True][1])[~zero], np.asarray(fast[False][1])[~zero])
    np.testing.assert_array_equal(fast[True][2], fast[False][2])
