"""Semi-NMF solver math, pure JAX: X ~= G F^T with F signed (d, K) and G >= 0 (n, K).

Rows are tokens, so X (n, d) is the paper's A (d x n) transposed: its A G is X^T G and its A^T F is X F.
One in-memory iteration, in the paper's order (Shafran et al. 2025; Ding, Li and Jordan 2010):

  F <- X^T G (G^T G + ridge I)^-1            least squares
  F <- keep the largest-|value| entries of each column of F, zero the rest   (winner-take-all)
  [beyond the paper, optional] refit F by least squares on the kept support
  G <- G / |G|_col,  F <- F * |G|_col        unit-norm code columns, product unchanged
  G <- G * sqrt((P+ + G Q-) / (P- + G Q+ + eps))   P = X F, Q = F^T F  (`inner` times: P, Q are reused)

The loss ||X - G F^T||^2 is computed from P, Q and G^T G (no (n, d) residual is formed).
Everything here is jittable; the loops around it (chunks, logging, stopping) live in trainers/snmf.py.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

RIDGE = 1e-6  # (G^T G + ridge I): keeps the least-squares solve defined when a code column dies
EPS = 1e-12  # multiplicative-update denominator guard (0 * sqrt(x / 0) would be nan)
NORM_FLOOR = 1e-8  # column norms below this are treated as this (a dead column stays dead, finite)


class SolverOptions(NamedTuple):
    """Static options of one solver iteration (hashable: they key the jit cache)."""

    keep: int  # entries kept per column of F; >= d means no sparsity step
    inner: int = 1  # multiplicative G updates per F update (the paper: 1)
    refit: int = 0  # masked conjugate-gradient steps refitting F on its support (the paper: 0)
    reseed_every: int = 0  # every this many iterations, restart duplicate or dead features (0: never)
    reseed_cos: float = 0.95  # two features with cosine above this are duplicates
    ridge: float = RIDGE
    eps: float = EPS


def keep_count(d: int, keep_fraction: float) -> int:
    """Entries kept per feature column: ceil(fraction * d), at least 1 (as the reference code does)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    return max(1, min(d, math.ceil(keep_fraction * d - 1e-9)))


def positive_part(x: jax.Array) -> jax.Array:
    return (jnp.abs(x) + x) * 0.5


def negative_part(x: jax.Array) -> jax.Array:
    return (jnp.abs(x) - x) * 0.5


def least_squares_f(xtg: jax.Array, gtg: jax.Array, ridge: float) -> jax.Array:
    """argmin_F ||X - G F^T||^2 + ridge |F|^2 given X^T G (d, K) and G^T G (K, K)."""
    k = gtg.shape[0]
    h = gtg + ridge * jnp.eye(k, dtype=gtg.dtype)
    return jnp.linalg.solve(h, xtg.T).T


def support_mask(f: jax.Array, keep: int) -> jax.Array:
    """(d, K) bool: the `keep` largest-|value| entries of each column (ties at the threshold kept)."""
    mag = jnp.abs(f)
    thresh = jax.lax.top_k(mag.T, keep)[0][:, -1]
    return mag >= thresh[None, :]


def refit_on_support(f: jax.Array, mask: jax.Array, xtg: jax.Array, gtg: jax.Array, steps: int, ridge: float) -> jax.Array:
    """Least squares for F restricted to `mask`, by conjugate gradients on every row at once.

    Rows of F decouple: row i solves (G^T G) f_i = (X^T G)_i over the features whose support holds
    neuron i. Warm-started from the thresholded F, a handful of steps reach the restricted optimum
    (each row has only a few free entries). Cost: d K^2 per step, nothing of size n."""
    h = gtg + ridge * jnp.eye(gtg.shape[0], dtype=gtg.dtype)
    m = mask.astype(f.dtype)
    x = f * m
    r = (xtg - x @ h) * m
    p = r
    rs = jnp.sum(r * r, axis=1, keepdims=True)

    def body(_, carry):
        x, r, p, rs = carry
        hp = (p @ h) * m
        den = jnp.sum(p * hp, axis=1, keepdims=True)
        alpha = jnp.where(den > 0, rs / jnp.where(den > 0, den, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = jnp.sum(r * r, axis=1, keepdims=True)
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        return x, r, r + beta * p, rs_new

    x, *_ = jax.lax.fori_loop(0, steps, body, (x, r, p, rs))
    return x


def sparsify_f(f: jax.Array, xtg: jax.Array, gtg: jax.Array, opts: SolverOptions) -> jax.Array:
    """The winner-take-all step (and the optional refit); identity when keep >= d."""
    if opts.keep >= f.shape[0]:
        return f
    mask = support_mask(f, opts.keep)
    if opts.refit > 0:
        return refit_on_support(f, mask, xtg, gtg, opts.refit, opts.ridge)
    return f * mask


def mu_steps(g: jax.Array, p: jax.Array, q: jax.Array, steps: int, eps: float) -> jax.Array:
    """`steps` multiplicative updates of G >= 0 for min ||X - G F^T|| with P = X F, Q = F^T F fixed."""
    p_pos, p_neg = positive_part(p), negative_part(p)
    q_negpos = jnp.concatenate([negative_part(q), positive_part(q)], axis=1)  # one (n,K)x(K,2K) product
    k = q.shape[0]

    def body(_, g):
        gq = g @ q_negpos
        return g * jnp.sqrt((p_pos + gq[:, :k]) / (p_neg + gq[:, k:] + eps))

    return jax.lax.fori_loop(0, steps, body, g)


def loss_from_stats(sq_x: jax.Array, p: jax.Array, g: jax.Array, q: jax.Array, gtg: jax.Array) -> jax.Array:
    """||X - G F^T||^2 = |X|^2 - 2 <X F, G> + <F^T F, G^T G>: no (n, d) residual needed."""
    return sq_x - 2.0 * jnp.vdot(p, g) + jnp.vdot(q, gtg)


# ----------------------------------------------------------------------------------------------
# In-memory solver


class MemoryState(NamedTuple):
    f: jax.Array  # (d, K)
    g: jax.Array  # (n, K)
    gtg: jax.Array  # (K, K) = g^T g
    loss: jax.Array  # loss of (f, g)
    best_f: jax.Array
    best_g: jax.Array
    best_loss: jax.Array
    best_iter: jax.Array  # int32, -1 before the first iteration
    it: jax.Array  # int32, iterations done


def memory_state(x: jax.Array, g0: jax.Array) -> MemoryState:
    """Start from codes G0 (the paper's first step computes F from G, so an init is a G)."""
    d, k = x.shape[1], g0.shape[1]
    g = jnp.array(g0, jnp.float32, copy=True)  # fresh buffers: memory_chunk donates the state
    zeros, inf = (lambda: jnp.zeros((d, k), jnp.float32)), (lambda: jnp.array(jnp.inf, jnp.float32))
    return MemoryState(zeros(), g, g.T @ g, inf(), zeros(), jnp.array(g0, jnp.float32, copy=True), inf(),
                       jnp.array(-1, jnp.int32), jnp.array(0, jnp.int32))


def memory_iteration(x: jax.Array, sq_x: jax.Array, f: jax.Array, g: jax.Array, gtg: jax.Array, opts: SolverOptions):
    """One iteration in the paper's order; returns (f, g, g^T g, loss). Two (n x d x K) products."""
    xtg = x.T @ g
    f = least_squares_f(xtg, gtg, opts.ridge)
    f = sparsify_f(f, xtg, gtg, opts)
    norms = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diag(gtg), 0.0)), NORM_FLOOR)
    g = g / norms
    f = f * norms
    p = x @ f
    q = f.T @ f
    g = mu_steps(g, p, q, opts.inner, opts.eps)
    gtg = g.T @ g
    return f, g, gtg, loss_from_stats(sq_x, p, g, q, gtg)


def flagged_features(f: jax.Array, gtg: jax.Array, max_cos: float) -> jax.Array:
    """(K,) bool: features that duplicate an earlier one (cosine > max_cos) or are dead (zero column or
    codes that never fire)."""
    fnorm = jnp.linalg.norm(f, axis=0)
    fn = f / jnp.maximum(fnorm, NORM_FLOOR)
    cos = jnp.triu(fn.T @ fn, k=1)
    return (jnp.max(cos, axis=0) > max_cos) | (fnorm <= NORM_FLOOR) | (jnp.diag(gtg) <= NORM_FLOOR**2)


def reseed_features(x: jax.Array, sq_rows: jax.Array, f: jax.Array, g: jax.Array, gtg: jax.Array, opts: SolverOptions):
    """Restart features that duplicate an earlier one or died, from the worst-reconstructed rows.

    Alternating solvers settle in local minima where two features share one direction and a true
    direction is left unexplained. A flagged feature gets the codes relu(R u), R the current residual
    and u the residual of one of the worst-reconstructed rows (a different row per flagged feature),
    so the next F update turns it toward what is missing. Costs nothing unless a feature is flagged."""
    k = f.shape[1]
    flag = flagged_features(f, gtg, opts.reseed_cos)

    def restart(_):
        q = f.T @ f
        p = x @ f
        res_sq = sq_rows - 2.0 * jnp.sum(p * g, axis=1) + jnp.sum((g @ q) * g, axis=1)
        worst = jax.lax.top_k(res_sq, k)[1]
        rows = worst[jnp.clip(jnp.cumsum(flag) - 1, 0, k - 1)]  # the i-th flagged feature takes the i-th worst row
        u = x[rows] - g[rows] @ f.T  # (K, d) residuals of those rows
        u = u / jnp.maximum(jnp.linalg.norm(u, axis=1, keepdims=True), NORM_FLOOR)
        codes = jnp.maximum(x @ u.T - g @ (f.T @ u.T), 0.0)
        codes = codes + 1e-3 * jnp.max(codes, axis=0, keepdims=True) + 1e-12  # multiplicative updates need > 0
        g_new = jnp.where(flag[None, :], codes, g)
        return g_new, g_new.T @ g_new

    return jax.lax.cond(jnp.any(flag), restart, lambda _: (g, gtg), None)


@partial(jax.jit, static_argnames=("n_iters", "opts"), donate_argnames=("state",))
def memory_chunk(
    x: jax.Array,
    sq_x: jax.Array,
    state: MemoryState,
    n_iters: int,
    opts: SolverOptions,
    patience: jax.Array,
    rel_tol: jax.Array,
    target: jax.Array,
) -> tuple[MemoryState, jax.Array]:
    """Up to `n_iters` iterations in one dispatch, keeping the best (F, G).

    Stops inside the chunk once `patience` iterations in a row failed to beat the best by a relative
    `rel_tol`, or once the best loss is <= `target`. Returns the state and the (n_iters,) losses
    (nan for iterations not run)."""

    def cond(c):
        j, s, _ = c
        return (j < n_iters) & (s.it - 1 - s.best_iter < patience) & (s.best_loss > target)

    def body(c):
        j, s, losses = c
        g, gtg = s.g, s.gtg
        if opts.reseed_every > 0:
            g, gtg = jax.lax.cond((s.it > 0) & (s.it % opts.reseed_every == 0),
                                  lambda: reseed_features(x, sq_rows, s.f, s.g, s.gtg, opts), lambda: (s.g, s.gtg))
        f, g, gtg, loss = memory_iteration(x, sq_x, s.f, g, gtg, opts)
        better = loss < s.best_loss * (1.0 - rel_tol)
        best_f, best_g = jax.lax.cond(better, lambda: (f, g), lambda: (s.best_f, s.best_g))
        s = MemoryState(
            f, g, gtg, loss, best_f, best_g,
            jnp.where(better, loss, s.best_loss),
            jnp.where(better, s.it, s.best_iter),
            s.it + 1,
        )
        return j + 1, s, losses.at[j].set(loss)

    sq_rows = jnp.sum(x * x, axis=1) if opts.reseed_every > 0 else None
    losses = jnp.full((n_iters,), jnp.nan, jnp.float32)
    _, state, losses = jax.lax.while_loop(cond, body, (jnp.array(0, jnp.int32), state, losses))
    return state, losses


# ----------------------------------------------------------------------------------------------
# Initialisations (each returns G0 (n, K) > 0)


def init_random(key: jax.Array, n: int, k: int) -> jax.Array:
    """The reference code's init: uniform [0, 1) codes, floored at 1e-6."""
    return jnp.maximum(jax.random.uniform(key, (n, k), jnp.float32), 1e-6)


@partial(jax.jit, static_argnames=("rank", "power_iters", "oversample"))
def randomized_svd(x: jax.Array, key: jax.Array, rank: int, power_iters: int = 2, oversample: int = 10):
    """Top-`rank` SVD of x (n, d) by a randomized range finder: (U (n, r), S (r,), Vt (r, d))."""
    n, d = x.shape
    width = min(rank + oversample, n, d)
    y = x @ jax.random.normal(key, (d, width), jnp.float32)
    for _ in range(power_iters):
        y, _ = jnp.linalg.qr(y)
        y = x @ (x.T @ y)
    qmat, _ = jnp.linalg.qr(y)
    ub, s, vt = jnp.linalg.svd(qmat.T @ x, full_matrices=False)
    return (qmat @ ub)[:, :rank], s[:rank], vt[:rank]


def init_svd(x: jax.Array, key: jax.Array, k: int, floor: float = 0.01) -> jax.Array:
    """Codes from the rank-K SVD: each component U_j S_j signed so that its positive part holds
    more mass, then clipped at zero (Ding et al.'s SVD start; the reference code clips unsigned).

    The floor, relative to each column's largest entry, lets multiplicative updates revive zeros."""
    u, s, _ = randomized_svd(x, key, k)
    us = u * s
    sign = jnp.where(jnp.sum(positive_part(us), axis=0) >= jnp.sum(negative_part(us), axis=0), 1.0, -1.0)
    g = positive_part(us * sign)
    return g + floor * jnp.max(g, axis=0, keepdims=True) + 1e-6


@partial(jax.jit, static_argnames=("k", "iters"))
def kmeans_centroids(sample: jax.Array, key: jax.Array, k: int, iters: int) -> jax.Array:
    """Lloyd's k-means on a sample (m, d) from k random rows; empty clusters keep their centroid."""
    m = sample.shape[0]
    cents = sample[jax.random.choice(key, m, (k,), replace=False)]
    sq = jnp.sum(sample * sample, axis=1, keepdims=True)

    def body(_, c):
        dist = sq - 2.0 * sample @ c.T + jnp.sum(c * c, axis=1)[None, :]
        onehot = jax.nn.one_hot(jnp.argmin(dist, axis=1), k, dtype=sample.dtype)
        counts = jnp.sum(onehot, axis=0)[:, None]
        sums = onehot.T @ sample
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

    return jax.lax.fori_loop(0, iters, body, cents)


def init_kmeans(x: jax.Array, key: jax.Array, k: int, iters: int = 15, sample_rows: int = 20000, offset: float = 0.2) -> jax.Array:
    """Ding et al.'s k-means init: G = one-hot cluster assignment + offset (centroids from a sample)."""
    n = x.shape[0]
    k1, k2 = jax.random.split(key)
    m = min(n, max(sample_rows, k))
    idx = jax.random.choice(k1, n, (m,), replace=False) if m < n else jnp.arange(n)
    cents = kmeans_centroids(x[idx], k2, k, iters)
    dist = -2.0 * x @ cents.T + jnp.sum(cents * cents, axis=1)[None, :]
    return jax.nn.one_hot(jnp.argmin(dist, axis=1), k, dtype=jnp.float32) + offset


# ----------------------------------------------------------------------------------------------
# Codes for fixed features (encode, and the streaming solver's per-batch step)


def initial_codes(p: jax.Array, q: jax.Array, ridge: float = RIDGE) -> jax.Array:
    """max(0, unconstrained least-squares codes): a starting point for the non-negative solve."""
    k = q.shape[0]
    return jnp.maximum(jnp.linalg.solve(q + ridge * jnp.eye(k, dtype=q.dtype), p.T).T, 0.0)


def solve_codes(p: jax.Array, q: jax.Array, iters: int, method: str = "pgd", eps: float = EPS) -> jax.Array:
    """argmin_{G >= 0} ||X - G F^T||^2 with P = X F, Q = F^T F, in a fixed number of steps.

    "pgd": accelerated projected gradient (FISTA, step 1/lambda_max(Q)) from the clipped
    least-squares codes; it lands on exact zeros. "mu": the multiplicative rule from the same start
    (floored, since multiplicative updates cannot leave zero)."""
    g0 = initial_codes(p, q)
    if method == "mu":
        g0 = g0 + 1e-3 * jnp.maximum(jnp.max(g0, axis=0, keepdims=True), eps)
        return mu_steps(g0, p, q, iters, eps)
    if method != "pgd":
        raise ValueError(f"unknown code solver {method!r}; use 'pgd' or 'mu'")
    return pgd_steps(g0, p, q, iters, eps)


def pgd_steps(g: jax.Array, p: jax.Array, q: jax.Array, steps: int, eps: float = EPS) -> jax.Array:
    """`steps` of accelerated projected gradient (FISTA, step 1/lambda_max(Q)) from G, for
    min_{G >= 0} ||X - G F^T||^2 with P = X F and Q = F^T F fixed. Rows are separate problems, so
    each row restarts its momentum on its own when it stops descending (O'Donoghue and Candes 2015):
    this keeps the linear convergence of the strongly convex case and lets iterates settle on zeros."""
    lip = jnp.maximum(jnp.linalg.eigvalsh(q)[-1], eps)

    def body(_, c):
        g, y, t = c
        g_new = jnp.maximum(y - (y @ q - p) / lip, 0.0)
        restart = jnp.sum((y - g_new) * (g_new - g), axis=1, keepdims=True) > 0
        t = jnp.where(restart, 1.0, t)
        t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = jnp.where(restart, g_new, g_new + ((t - 1.0) / t_new) * (g_new - g))
        return g_new, y, t_new

    t0 = jnp.ones((g.shape[0], 1), g.dtype)
    g, _, _ = jax.lax.fori_loop(0, steps, body, (g, g, t0))
    return g


# ----------------------------------------------------------------------------------------------
# Streaming solver: sufficient statistics X^T G and G^T G with a forgetting factor


class StreamState(NamedTuple):
    f: jax.Array  # (d, K), unit-norm columns
    xtg: jax.Array  # (d, K) decayed sum of X_b^T G_b
    gtg: jax.Array  # (K, K) decayed sum of G_b^T G_b


def stream_state(f0: jax.Array, x0: jax.Array | None = None, code_iters: int = 100) -> StreamState:
    """Start from F0 (columns normalised). With rows x0 (the sample F0 was fitted on), the statistics
    start as theirs, so the first minibatches refine F0 instead of replacing it."""
    d, k = f0.shape
    f0 = (f0 / jnp.maximum(jnp.linalg.norm(f0, axis=0, keepdims=True), NORM_FLOOR)).astype(jnp.float32)
    if x0 is None:
        return StreamState(f0, jnp.zeros((d, k), jnp.float32), jnp.zeros((k, k), jnp.float32))
    x0 = jnp.asarray(x0, jnp.float32)
    g = solve_codes(x0 @ f0, f0.T @ f0, code_iters)
    return StreamState(f0, x0.T @ g, g.T @ g)


def reseed_streaming(state: StreamState, xb: jax.Array, g: jax.Array, f_used: jax.Array, opts: SolverOptions) -> StreamState:
    """The streaming form of `reseed_features`: a duplicate or dead feature becomes the (sparsified)
    residual of one of the batch's worst-reconstructed rows, and its statistics start afresh."""
    f, k = state.f, state.f.shape[1]
    flag = flagged_features(f, state.gtg, opts.reseed_cos)

    def restart(_):
        res = xb - g @ f_used.T
        worst = jax.lax.top_k(jnp.sum(res * res, axis=1), min(k, xb.shape[0]))[1]
        rows = worst[jnp.clip(jnp.cumsum(flag) - 1, 0, worst.shape[0] - 1)]
        u = res[rows].T  # (d, K)
        if opts.keep < u.shape[0]:
            u = u * support_mask(u, opts.keep)
        u = u / jnp.maximum(jnp.linalg.norm(u, axis=0, keepdims=True), NORM_FLOOR)
        live = (~flag).astype(f.dtype)
        return StreamState(jnp.where(flag[None, :], u, f), state.xtg * live[None, :], state.gtg * live[:, None] * live[None, :])

    return jax.lax.cond(jnp.any(flag), restart, lambda _: state, None)


@partial(jax.jit, static_argnames=("opts", "code_iters", "code_method"), donate_argnames=("state",))
def stream_step(
    state: StreamState, xb: jax.Array, forgetting: jax.Array, opts: SolverOptions, code_iters: int, code_method: str,
    reseed: jax.Array | bool = False,
) -> tuple[StreamState, jax.Array]:
    """One minibatch: codes with F fixed, decayed statistics, F from the statistics (sparsified,
    column-normalised with the statistics rescaled to match), and when `reseed`, duplicate or dead
    features restarted. Returns (state, the batch's loss under the F it was encoded with)."""
    f_used = state.f
    p = xb @ f_used
    q = f_used.T @ f_used
    g = solve_codes(p, q, code_iters, code_method, opts.eps)
    gtg_b = g.T @ g
    loss = loss_from_stats(jnp.vdot(xb, xb), p, g, q, gtg_b)
    xtg = forgetting * state.xtg + xb.T @ g
    gtg = forgetting * state.gtg + gtg_b
    f = least_squares_f(xtg, gtg, opts.ridge * jnp.maximum(jnp.trace(gtg) / gtg.shape[0], 1.0))
    f = sparsify_f(f, xtg, gtg, opts)
    c = jnp.maximum(jnp.linalg.norm(f, axis=0), NORM_FLOOR)
    state = StreamState(f / c, xtg * c, gtg * c[:, None] * c[None, :])
    if opts.reseed_every > 0:
        state = jax.lax.cond(reseed, lambda: reseed_streaming(state, xb, g, f_used, opts), lambda: state)
    return state, loss


@partial(jax.jit, static_argnames=("code_iters", "code_method"))
def batch_loss(f: jax.Array, xb: jax.Array, code_iters: int, code_method: str) -> tuple[jax.Array, jax.Array]:
    """(loss, |X_b|^2) of a batch with F fixed and codes solved for it: the evaluation pass."""
    p = xb @ f
    q = f.T @ f
    g = solve_codes(p, q, code_iters, code_method)
    sq = jnp.vdot(xb, xb)
    return loss_from_stats(sq, p, g, q, g.T @ g), sq
