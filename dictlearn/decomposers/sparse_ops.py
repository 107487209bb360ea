"""Sparse kernels for the TopK family: exact top-k, gathered decode, sparse-backward encoder.

A TopK step must not pay for dense work beyond the one encoder matmul that every latent needs.
With k active latents per token, everything else is O(batch * k * d):

  decode      y[b]  = sum_j v[b,j] * W_dec[i[b,j]]           gather k decoder rows per token
  decode VJP  dv    = <dy[b], W_dec[i[b,j]]>,  dW_dec rows += v[b,j] * dy[b]   (scatter-add)
  encode VJP  dW_enc rows += dv[b,j] * x[b],  db_enc += dv,  db_in = -db_enc @ W_enc

Encoder and decoder weights are stored row-major by latent, (n_features, d), so every gather and
scatter moves whole contiguous rows. The scatter-adds run over the batch in chunks, so the
(chunk * k, d) update block stays small instead of materialising a (batch * k, d) array.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dictlearn.kernels import cpu as cpu_kernels

# Tokens per chunk of the gathered decode and the scatter-adds: bounds the (chunk, k, d) temporaries.
CHUNK_TOKENS = 64
# Below this many (B * k * d) elements, work in one piece: a loop would only cost compile time.
CHUNK_MIN_ELEMENTS = 1 << 22


class SparseCodes(NamedTuple):
    """Codes with a fixed number of slots per row: values (B, m) and latent indices (B, m), int32.

    A slot with value 0 contributes nothing (in the TopK family it was not selected: see gather_decode's
    zero_is_unselected); indices within a row are distinct."""

    values: jax.Array
    indices: jax.Array


# Group size of the two-stage top-k (see `top_k`); used when k * TOPK_GROUP <= n / 4.
TOPK_GROUP = 16


def top_k(x: jax.Array, k: int, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Exact top-k of x (+ bias, broadcast on the last axis): (values, indices) sorted by decreasing
    value, like lax.top_k(x + bias, k), without writing x + bias to memory.

    Two stages, both exact: split each row into groups of TOPK_GROUP, take the k groups with the
    largest maxima, then the top k among those k * TOPK_GROUP candidates. Every one of the k largest
    values lies in one of those groups (the k-th largest group maximum is a lower bound on the k-th
    largest value), so the values equal lax.top_k's; so do the indices, except that among exactly
    equal values a different one may be chosen. On CPU this is about 1.7x faster than lax.top_k on
    (4096, 16384) with k 32: one fused max-reduction plus two small selections. On a single CPU device
    dictlearn's C++ kernel (dictlearn/kernels) replaces both.

    The optimisation barrier keeps XLA from fusing the consumers into the selection: on CPU, slicing
    the indices column by column otherwise turns XLA's TopK into a full sort of every row (30x slower)."""
    n = x.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"top_k needs 0 < k <= {n} (the last axis), got k={k}")
    fast = cpu_kernels.top_k_rows(x, k, bias)  # a single CPU device: the threaded C++ selection
    if fast is not None:
        return fast
    g = TOPK_GROUP
    if n % g or k * g * 4 > n:
        return jax.lax.optimization_barrier(jax.lax.top_k(x if bias is None else x + bias, k))
    lead = x.shape[:-1]
    xg = x.reshape(-1, n // g, g)
    bg = None if bias is None else bias.reshape(n // g, g)
    _, groups = jax.lax.top_k(jnp.max(xg if bg is None else xg + bg, axis=-1), k)
    groups = jnp.sort(groups, axis=-1)  # candidates keep their original order, so ties break as in lax.top_k
    cand = jnp.take_along_axis(xg, groups[:, :, None], axis=1)
    if bg is not None:
        cand = cand + bg[groups]
    vals, pos = jax.lax.top_k(cand.reshape(-1, k * g), k)
    idx = jnp.take_along_axis(groups, pos // g, axis=1) * g + pos % g
    return jax.lax.optimization_barrier((vals.reshape(*lead, k), idx.reshape(*lead, k)))


def densify(codes: SparseCodes, n_features: int) -> jax.Array:
    """(B, m) sparse codes -> (B, n_features) dense codes."""
    rows = jnp.arange(codes.values.shape[0])[:, None]
    return jnp.zeros((codes.values.shape[0], n_features), codes.values.dtype).at[rows, codes.indices].add(codes.values)


def fired_mask(codes: SparseCodes, n_features: int) -> jax.Array:
    """(n_features,) bool: which latents have a nonzero value somewhere in the batch."""
    hits = (codes.values != 0).astype(jnp.int32).reshape(-1)
    return jnp.zeros((n_features,), jnp.int32).at[codes.indices.reshape(-1)].add(hits) > 0


# ---- chunked helpers -------------------------------------------------------------------------


def _chunks(batch: int) -> int:
    """Chunk size that divides the batch (falls back to the whole batch for awkward sizes)."""
    c = min(CHUNK_TOKENS, batch)
    while batch % c:
        c -= 1
    return c if c >= 16 or c == batch else batch


# Up to this many slots, gathers are unrolled slot by slot (fastest on CPU); beyond, token chunks.
UNROLL_SLOTS = 64


def _take_rows(table: jax.Array, indices: jax.Array) -> jax.Array:
    return jnp.asarray(table).at[indices].get(mode="promise_in_bounds")


def _over_chunks(fn, *arrays: jax.Array, width: int) -> jax.Array:
    """Apply fn to token chunks of the arrays (leading axis) with lax.scan; concatenate the results.

    `width` is the per-token size of fn's temporaries (k * d); small problems run in one piece."""
    batch = arrays[0].shape[0]
    c = _chunks(batch)
    if c == batch or batch * width <= CHUNK_MIN_ELEMENTS:
        return fn(*arrays)

    def body(_, chunk):
        return None, fn(*chunk)

    _, out = jax.lax.scan(body, None, tuple(a.reshape(batch // c, c, *a.shape[1:]) for a in arrays))
    return out.reshape(batch, *out.shape[2:])


def gather_combine(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]]   ->  (B, d).

    For small k, loops over the slots so no (B, k, d) temporary is built: each slot is one row
    gather and a fused multiply-add into the (B, d) accumulator."""
    if indices.shape[1] <= UNROLL_SLOTS:
        out = jnp.zeros((weights.shape[0], table.shape[1]), table.dtype)
        for j in range(weights.shape[1]):
            out = out + weights[:, j : j + 1] * _take_rows(table, indices[:, j])
        return out
    return _over_chunks(lambda w, i: jnp.einsum("bk,bkd->bd", w, _take_rows(table, i)), weights, indices,
                        width=indices.shape[1] * table.shape[1])


def gather_dot(rows: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
    """out[b, j] = <rows[b], table[indices[b, j]]>   ->  (B, k), as batched dots over token chunks."""
    fast = cpu_kernels.gather_dots(rows, indices, table)  # a single CPU device: bucketed C++ kernel
    if fast is not None:
        return fast
    return _over_chunks(lambda r, i: jnp.einsum("bd,bkd->bk", r, _take_rows(table, i)), rows, indices,
                        width=indices.shape[1] * table.shape[1])


def scatter_rows(weights: jax.Array, indices: jax.Array, rows: jax.Array, n: int) -> jax.Array:
    """out[i] = sum over (b, j) with indices[b, j] == i of weights[b, j] * rows[b]   ->  (n, d).

    The transpose of `gather_combine`. Scans over token chunks so each scatter moves a
    (chunk * k, d) block."""
    fast = cpu_kernels.scatter_rows(weights, indices, rows, n)  # a single CPU device: bucketed C++ scatter
    if fast is not None:
        return fast
    batch, k = weights.shape
    d = rows.shape[1]
    c = _chunks(batch)
    if c == batch or batch * k * d <= CHUNK_MIN_ELEMENTS:
        upd = (weights[:, :, None] * rows[:, None, :]).reshape(batch * k, d)
        return jnp.zeros((n, d), rows.dtype).at[indices.reshape(-1)].add(upd, mode="promise_in_bounds")

    def body(acc, chunk):
        w, i, r = chunk
        upd = (w[:, :, None] * r[:, None, :]).reshape(c * k, d)
        return acc.at[i.reshape(-1)].add(upd, mode="promise_in_bounds"), None

    init = jnp.zeros((n, d), rows.dtype)
    acc, _ = jax.lax.scan(body, init, (weights.reshape(-1, c, k), indices.reshape(-1, c, k), rows.reshape(-1, c, d)))
    return acc


def scatter_values(weights: jax.Array, indices: jax.Array, n: int) -> jax.Array:
    """out[i] = sum of weights[b, j] with indices[b, j] == i   ->  (n,)."""
    return jnp.zeros((n,), weights.dtype).at[indices.reshape(-1)].add(weights.reshape(-1))


# ---- gathered decode with a sparse backward ---------------------------------------------------


def gather_decode(values: jax.Array, indices: jax.Array, w_dec: jax.Array, zero_is_unselected: bool = False) -> jax.Array:
    """sum_j values[b, j] * w_dec[indices[b, j]]: (B, k), (B, k), (n, d) -> (B, d), no bias.

    Equal to densify(values, indices) @ w_dec, at O(B k d) cost forward and backward. On a single CPU
    device dictlearn's row-selecting C++ kernels run the forward for more than UNROLL_SLOTS slots, the value
    gradients and the decoder gradient (slots of value 0 cost nothing in the kernels' forward and decoder
    gradient); elsewhere XLA's gathers and scatters do.

    zero_is_unselected: a zero value marks a slot that was not selected, so its value gradient is 0 (and
    costs nothing). Exact for the parameters' and the input's gradients whenever a zero value comes from a
    relu or a selection mask, which pass no gradient at zero (the TopK family's codes: BatchTopK keeps 4k
    candidates per row, about k of them selected); False gives every slot its exact value gradient."""
    return _gather_decode(values, indices, w_dec, zero_is_unselected)


def _own_rows(shape: tuple[int, int]) -> jax.Array:
    """(B, m) int32: each slot's own row b."""
    return jnp.broadcast_to(jnp.arange(shape[0], dtype=jnp.int32)[:, None], shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_decode(values, indices, w_dec, zero_is_unselected):
    # Up to UNROLL_SLOTS slots XLA's unrolled gathers are faster than the kernel (TopK's 32 slots at
    # 4096 x 768 -> 16384: 0.04 s against 0.15 s); beyond, its chunked gathers are slower (BatchTopK's 128
    # candidates: 0.64 s against 0.12 s). The kernel is the scatter with the roles swapped: slot (b, j)
    # adds values[b, j] * w_dec[indices[b, j]] to row b, skipping zero values.
    fast = None
    if values.shape[1] > UNROLL_SLOTS:
        fast = cpu_kernels.scatter_rows(values, _own_rows(values.shape), w_dec, values.shape[0], row_of=indices)
    return gather_combine(values, indices, w_dec) if fast is None else fast


def _gather_decode_fwd(values, indices, w_dec, zero_is_unselected):
    return _gather_decode(values, indices, w_dec, zero_is_unselected), (values, indices, w_dec)


def _gather_decode_bwd(zero_is_unselected, res, dy):
    values, indices, w_dec = res
    if zero_is_unselected:
        live = values != 0
        d_values = cpu_kernels.gather_dots(dy, indices, w_dec, row_of=jnp.where(live, _own_rows(values.shape), -1))
        if d_values is None:
            d_values = gather_dot(dy, indices, w_dec) * live.astype(dy.dtype)
    else:
        d_values = gather_dot(dy, indices, w_dec)
    d_w_dec = scatter_rows(values, indices, dy, w_dec.shape[0])
    return d_values, None, d_w_dec


_gather_decode.defvjp(_gather_decode_fwd, _gather_decode_bwd)


# ---- encoder values at selected latents, with a sparse backward --------------------------------


@jax.custom_vjp
def gather_encode(x: jax.Array, b_in: jax.Array, w_enc: jax.Array, b_enc: jax.Array, z0: jax.Array,
                  indices: jax.Array) -> jax.Array:
    """Pre-activations at the selected latents: z0[b, indices[b, j]] + b_enc[indices[b, j]]  ->  (B, k).

    `z0` must be (x - b_in) @ w_enc.T, computed once densely by the caller (for the selection); the
    forward reads the values from it, so they equal the dense computation bit for bit. The backward
    treats each value as <x[b] - b_in, w_enc[i]> + b_enc[i] for the selected i only, so gradients
    reach x, b_in, w_enc and b_enc at O(B k d) cost and never form a dense (B, n) gradient. The
    input-bias gradient is -(d b_enc) @ w_enc, one matrix-vector product. `z0` and `indices` get no
    gradient (pass `z0` through lax.stop_gradient)."""
    return jnp.take_along_axis(z0, indices, axis=1) + jnp.take(b_enc, indices)


def _gather_encode_fwd(x, b_in, w_enc, b_enc, z0, indices):
    return gather_encode(x, b_in, w_enc, b_enc, z0, indices), (x, b_in, w_enc, indices)


def _gather_encode_bwd(res, dv):
    x, b_in, w_enc, indices = res
    n = w_enc.shape[0]
    d_b_enc = scatter_values(dv, indices, n)
    d_w_enc = scatter_rows(dv, indices, x - b_in, n)
    d_b_in = -(d_b_enc @ w_enc)
    d_x = gather_combine(dv, indices, w_enc)  # dead code (removed by XLA) unless x needs a gradient
    return d_x, d_b_in, d_w_enc, d_b_enc, None, None


gather_encode.defvjp(_gather_encode_fwd, _gather_encode_bwd)
