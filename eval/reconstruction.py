"""Reconstruction and sparsity metrics, streamed over held-out batches of the cache.

One jitted function per decomposer turns a batch (x, y) into sums; `ReconstructionAccumulator` adds
the sums up in float64 on the host, so memory stays flat however many rows are evaluated and the
result does not depend on the batch size (except where SAEBench's own definition does: see
`explained_variance`). Definitions follow SAEBench's core eval (sae_bench/evals/core/main.py), with
x the target activation (the decomposer's `y`; equal to its input for an SAE), x_hat = decomposer(x_in)
(decode(encode(x_in)), plus the linear skip path of a skip transcoder), f = encode(x_in) the codes, and t
running over the N evaluated tokens:

  mse                 = mean_t ||x_t - x_hat_t||^2                         (squared error summed over dims;
                        the project's convention, as in Decomposer.loss. SAEBench additionally divides
                        by its batch's token count; multiply ours back if you compare raw numbers)
  fvu                 = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2   (mean over all N tokens)
  explained_variance  = mean_t [1 - ||x_t - x_hat_t||^2 / ||x_t - m||^2]   (SAEBench's per-token form; it
                        differs from 1 - fvu in general. m is the mean over all evaluated tokens when the
                        caller passes it (the suite does: one cheap pass over the targets), otherwise the
                        mean of token t's batch, exactly as SAEBench computes it; a zero denominator counts as 1)
  cossim              = mean_t <x_t, x_hat_t> / (||x_t|| ||x_hat_t||)      (0 where either norm is 0)
  l2_norm_in, l2_norm_out = mean_t ||x_t||, mean_t ||x_hat_t||
  l2_ratio            = mean_t ||x_hat_t|| / ||x_t||                       (||x_t|| < 1e-4 counts as 1)
  relative_reconstruction_bias = mean_t ||x_hat_t||^2 / mean_t <x_t, x_hat_t>   (Rajamanoharan et al. 2024,
                        eq. 10; 1 = unbiased, < 1 = shrinkage. SAEBench averages per-batch ratios; we take
                        the ratio of the global means, which is what the batch ratios estimate)
  l0                  = mean_t #{i : f_ti != 0}
  l1                  = mean_t sum_i |f_ti|
  feature density     p_i = #{t : f_ti != 0} / N
  dead_fraction       = #{i : p_i = 0} / n_features   (never fired on the evaluated tokens)
  dense_fraction      = #{i : p_i > 0.1} / n_features
  frequency histogram = counts of log10(p_i) over fixed bins FREQ_BIN_EDGES, dead latents counted apart.

Several sites. A decomposer with `site_axis` (a cross-layer transcoder) reads x (B, S, d_in) and writes
(B, S, d_out), one slot per site in its hookpoints order, with codes (B, S, F). The overall metrics treat a
token's S outputs as one concatenated vector and its S*F latents as one dictionary (so fvu is the pooled
sum_sites SSE / sum_sites variance, l0 counts the active latents of every site); `site_metrics` gives the
same fvu, l0 and dead fraction per site (fvu of output site s; l0 and dead fraction of the latents that
site s's encoder reads). A single-site kind is the case S = 1, with the same numbers as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DENSE_THRESHOLD = 0.1
NORM_FLOOR = 1e-4  # SAEBench: inputs with a smaller norm divide the L2 ratio by 1 instead
# log10(firing frequency) bins: 1e-7 .. 1 in steps of 0.25 decades; the same for every decomposer
FREQ_BIN_EDGES = np.round(np.arange(-7.0, 0.0001, 0.25), 4)
# log10(|activation|) bins of the feature cards' histograms: 1e-3 .. 1e3 in steps of 0.1 decade; the first bin
# also counts nonzero activations below 1e-3, the last those above 1e3 (so every firing is counted once)
ACT_BIN_EDGES = np.round(np.arange(-3.0, 3.0001, 0.1), 4)

BatchStatsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def has_site_axis(decomposer: nnx.Module) -> bool:
    """Whether the decomposer's batches carry a site axis ((B, S, d): one slot per hookpoint it reads)."""
    return bool(decomposer.site_axis)


def site_hookpoints(decomposer: nnx.Module) -> tuple[list[str], list[str]]:
    """(hookpoints read, hookpoints written), in site order: one of each for a single-site kind."""
    return list(decomposer.config.hookpoints_in()), list(decomposer.config.hookpoints_out())


def n_sites(decomposer: nnx.Module) -> int:
    """How many sites the decomposer's latents are split over (1 unless it has a site axis)."""
    return len(site_hookpoints(decomposer)[0]) if has_site_axis(decomposer) else 1


def n_latents(decomposer: nnx.Module) -> int:
    """Every latent of the decomposer: n_features per site."""
    return int(decomposer.config.n_features) * n_sites(decomposer)


def make_batch_stats_fn(decomposer: nnx.Module, top_k: int = 0, target_mean: np.ndarray | None = None) -> BatchStatsFn:
    """A jitted `(x, y, weight) -> sums` for one decomposer.

    weight (B,) is 1 for real rows and 0 for padding (so every batch has one shape and compiles once).
    With top_k > 0 it also returns each feature's top_k activations in the batch and their row indices and each
    the codes themselves, from which the accumulator adds up each feature's histogram of nonzero activations over
    ACT_BIN_EDGES (for the feature cards), at the cost of one top_k over (n_latents, B) and a pass over the codes. target_mean: the reference
    mean of the per-token explained variance ((d_out,), or (S, d_out) with a site axis; None: each batch's
    own mean). x and y are (B, d) or, for a site-axis kind, (B, S, d)."""
    graphdef, state = nnx.split(decomposer)
    sited = has_site_axis(decomposer)
    ref = None if target_mean is None else jnp.asarray(target_mean, jnp.float32).reshape((-1, np.shape(target_mean)[-1]))

    @jax.jit
    def stats(state, x, y, w):
        model = nnx.merge(graphdef, state)
        codes = model.encode(x)
        y_hat = reconstruct(model, x, codes)
        if not sited:  # one site: the same sums with a site axis of length 1
            codes, y, y_hat = codes[:, None], y[:, None], y_hat[:, None]
        return _batch_sums(codes, y, y_hat, w, top_k, ref)

    return lambda x, y, w: jax.device_get(stats(state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))


def reconstruct(model: nnx.Module, x: jax.Array, codes: jax.Array | None = None) -> jax.Array:
    """The decomposer's reconstruction of x, inside a jitted function.

    decode(encode(x)) reuses the codes and is a dense matmul; a decomposer with a linear skip path
    (`skip = True`, e.g. a skip transcoder) is called instead, since decode leaves the skip term out.
    (SparseCoder.__call__'s sparse decode is the same sum but measured 5x slower under jit on the CPU.)"""
    if getattr(model, "skip", False):
        return model(x)
    return model.decode(model.encode(x) if codes is None else codes)


def _batch_sums(codes: jax.Array, y: jax.Array, y_hat: jax.Array, w: jax.Array, top_k: int,
                ref_mean: jax.Array | None) -> dict[str, jax.Array]:
    """Per-batch sums of everything the metrics need (weighted by w: padding rows count for nothing).

    codes (B, S, F), y and y_hat (B, S, d): a token's S outputs count as one vector, its S*F latents as one
    dictionary (latent s*F + f is latent f of site s); the *_site sums keep the sites apart."""
    y, y_hat, codes = y.astype(jnp.float32), y_hat.astype(jnp.float32), codes.astype(jnp.float32)
    b = codes.shape[0]
    n = w.sum()
    err2_site = jnp.sum((y - y_hat) ** 2, axis=-1)  # (B, S)
    err2 = err2_site.sum(1)
    mean = (w[:, None, None] * y).sum(0) / jnp.maximum(n, 1.0)  # (S, d)
    centred2_site = jnp.sum((y - mean) ** 2, axis=-1)
    centred2 = centred2_site.sum(1)
    ev_centred2 = centred2 if ref_mean is None else jnp.sum((y - ref_mean) ** 2, axis=(1, 2))
    norm_in = jnp.sqrt(jnp.sum(y**2, axis=(1, 2)))
    norm_out = jnp.sqrt(jnp.sum(y_hat**2, axis=(1, 2)))
    dot = jnp.sum(y * y_hat, axis=(1, 2))
    denom = norm_in * norm_out
    cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
    ratio = norm_out / jnp.where(norm_in < NORM_FLOOR, 1.0, norm_in)
    ev = 1.0 - err2 / jnp.where(ev_centred2 > 0, ev_centred2, 1.0)
    fired_site = (codes != 0) & (w[:, None, None] > 0)  # (B, S, F)
    fired = fired_site.reshape(b, -1)
    flat = codes.reshape(b, -1)
    out = {
        "n": n,
        "sse": (w * err2).sum(),
        "mean": mean,
        "m2": (w * centred2).sum(),  # sum of squared deviations from the batch mean
        "ev_sum": (w * ev).sum(),
        "cos_sum": (w * cos).sum(),
        "norm_in_sum": (w * norm_in).sum(),
        "norm_out_sum": (w * norm_out).sum(),
        "ratio_sum": (w * ratio).sum(),
        "xhat2_sum": (w * norm_out**2).sum(),
        "dot_sum": (w * dot).sum(),
        "l0_sum": fired.sum(dtype=jnp.float32),
        "l1_sum": (w[:, None] * jnp.abs(flat)).sum(),
        "fire_count": fired.sum(0, dtype=jnp.int32),
        "act_sum": (w[:, None] * flat).sum(0),
        "act_max": jnp.where(w[:, None] > 0, flat, -jnp.inf).max(0),
        "sse_site": (w[:, None] * err2_site).sum(0),
        "m2_site": (w[:, None] * centred2_site).sum(0),
    }
    if top_k:
        k = min(top_k, b)
        vals, idx = jax.lax.top_k(jnp.where(w[:, None] > 0, flat, -jnp.inf).T, k)
        out["top_vals"], out["top_rows"] = vals, idx
        out["codes"], out["weight"] = flat, w  # for the histograms (activation_histogram, on the host)
    return out


def activation_histogram(codes: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(F, len(ACT_BIN_EDGES) - 1) counts of each feature's nonzero |activation| per log10 bin, rows with w > 0.

    On the host from the nonzero entries only (codes are sparse; measured 4x faster than any jitted
    histogram of the dense (B, F) codes on a CPU)."""
    n_bins = len(ACT_BIN_EDGES) - 1
    rows, feats = np.nonzero(codes)
    keep = np.asarray(w)[rows] > 0
    rows, feats = rows[keep], feats[keep]
    level = np.log10(np.abs(codes[rows, feats]).astype(np.float64))
    bins = np.clip(np.searchsorted(ACT_BIN_EDGES, level, side="right") - 1, 0, n_bins - 1)  # [edge_i, edge_i+1)
    return np.bincount(feats * n_bins + bins, minlength=codes.shape[1] * n_bins).reshape(-1, n_bins)


@dataclass
class ReconstructionAccumulator:
    """Adds up batch sums in float64 (Chan et al.'s pairwise merge for the total variance).

    n_features counts every latent (n_sites x the decomposer's n_features for a site-axis kind)."""

    n_features: int
    top_k: int = 0
    n_sites: int = 1
    n: float = 0.0
    mean: np.ndarray | None = None  # (n_sites, d) running mean of the targets
    m2: float = 0.0
    m2_site: np.ndarray | None = None  # (n_sites,) squared deviations from the mean, per site
    sse_site: np.ndarray | None = None  # (n_sites,) squared reconstruction error, per site
    sums: dict[str, float] = field(default_factory=dict)
    fire_count: np.ndarray | None = None
    act_sum: np.ndarray | None = None
    act_max: np.ndarray | None = None
    top_vals: np.ndarray | None = None  # (n_features, top_k) running best activations
    top_rows: np.ndarray | None = None  # (n_features, top_k) their global row numbers (-1: none yet)
    act_hist: np.ndarray | None = None  # (n_features, len(ACT_BIN_EDGES) - 1) nonzero activations per bin (with top_k)

    def __post_init__(self) -> None:
        if self.n_sites < 1 or self.n_features % self.n_sites:
            raise ValueError(f"n_features ({self.n_features}) must be a multiple of n_sites ({self.n_sites})")
        self.m2_site = np.zeros(self.n_sites, np.float64)
        self.sse_site = np.zeros(self.n_sites, np.float64)
        self.fire_count = np.zeros(self.n_features, np.int64)
        self.act_sum = np.zeros(self.n_features, np.float64)
        self.act_max = np.full(self.n_features, -np.inf)
        if self.top_k:
            self.top_vals = np.full((self.n_features, self.top_k), -np.inf, np.float32)
            self.top_rows = np.full((self.n_features, self.top_k), -1, np.int64)
            self.act_hist = np.zeros((self.n_features, len(ACT_BIN_EDGES) - 1), np.int64)

    def add(self, s: dict[str, np.ndarray], row_offset: int = 0) -> None:
        """Merge one batch's sums; row_offset is the global row number of the batch's first row."""
        nb = float(s["n"])
        if nb == 0:
            return
        mb = np.asarray(s["mean"], np.float64).reshape(self.n_sites, -1)
        m2b = np.asarray(s["m2_site"], np.float64).reshape(self.n_sites)
        if self.mean is None:
            self.mean, self.m2_site = mb, m2b
        else:
            total = self.n + nb
            delta = mb - self.mean
            self.m2_site = self.m2_site + m2b + (delta * delta).sum(1) * self.n * nb / total
            self.mean = self.mean + delta * nb / total
        self.m2 = float(self.m2_site.sum())
        self.sse_site = self.sse_site + np.asarray(s["sse_site"], np.float64).reshape(self.n_sites)
        self.n += nb
        for key in ("sse", "ev_sum", "cos_sum", "norm_in_sum", "norm_out_sum", "ratio_sum", "xhat2_sum", "dot_sum",
                    "l0_sum", "l1_sum"):
            self.sums[key] = self.sums.get(key, 0.0) + float(s[key])
        self.fire_count += np.asarray(s["fire_count"], np.int64)
        self.act_sum += np.asarray(s["act_sum"], np.float64)
        self.act_max = np.maximum(self.act_max, np.asarray(s["act_max"], np.float64))
        if self.top_k and "top_vals" in s:
            vals = np.concatenate([self.top_vals, np.asarray(s["top_vals"], np.float32)], axis=1)
            rows = np.concatenate([self.top_rows, np.asarray(s["top_rows"], np.int64) + row_offset], axis=1)
            order = np.argsort(-vals, axis=1, kind="stable")[:, : self.top_k]
            self.top_vals = np.take_along_axis(vals, order, axis=1)
            self.top_rows = np.take_along_axis(rows, order, axis=1)
        if self.act_hist is not None and "codes" in s:
            self.act_hist += activation_histogram(np.asarray(s["codes"]), np.asarray(s["weight"]))

    def density(self) -> np.ndarray:
        """(n_features,) fraction of evaluated tokens on which each feature fired."""
        return self.fire_count / max(self.n, 1.0)

    def metrics(self) -> dict[str, Any]:
        """The scalar metrics and the frequency histogram (see the module docstring for formulas)."""
        if self.n == 0:
            raise ValueError("no rows were evaluated: the eval split is empty or n_eval_rows is 0")
        n, s = self.n, self.sums
        p = self.density()
        live = p[p > 0]
        counts, _ = np.histogram(np.log10(live), bins=FREQ_BIN_EDGES) if live.size else (np.zeros(len(FREQ_BIN_EDGES) - 1, int), None)
        # frequencies below the first edge (rarer than 1e-7) land in the first bin
        counts[0] += int((live < 10 ** FREQ_BIN_EDGES[0]).sum())
        return {
            "n_tokens": int(n),
            "mse": s["sse"] / n,
            "fvu": s["sse"] / self.m2 if self.m2 > 0 else float("nan"),
            "explained_variance": s["ev_sum"] / n,
            "cossim": s["cos_sum"] / n,
            "l2_norm_in": s["norm_in_sum"] / n,
            "l2_norm_out": s["norm_out_sum"] / n,
            "l2_ratio": s["ratio_sum"] / n,
            "relative_reconstruction_bias": s["xhat2_sum"] / s["dot_sum"] if s["dot_sum"] != 0 else float("nan"),
            "l0": s["l0_sum"] / n,
            "l1": s["l1_sum"] / n,
            "dead_fraction": float((p == 0).mean()),
            "dense_fraction": float((p > DENSE_THRESHOLD).mean()),
            "freq_hist": {"log10_edges": FREQ_BIN_EDGES.tolist(), "counts": [int(c) for c in counts],
                          "dead": int((p == 0).sum())},
        }

    def site_metrics(self) -> dict[str, list[float]]:
        """fvu, l0 and dead_fraction of each site, in site order (see the module docstring)."""
        if self.n == 0:
            raise ValueError("no rows were evaluated: the eval split is empty or n_eval_rows is 0")
        fired = self.fire_count.reshape(self.n_sites, -1)
        fvu = [float(e / v) if v > 0 else float("nan") for e, v in zip(self.sse_site, self.m2_site)]
        return {"fvu": fvu, "l0": (fired.sum(1) / self.n).tolist(), "dead_fraction": (fired == 0).mean(1).tolist()}

    def feature_stats(self) -> dict[str, np.ndarray]:
        """Per feature: firing frequency, mean activation when firing, max activation (0 if never fired)."""
        fired = self.fire_count > 0
        mean = np.where(fired, self.act_sum / np.maximum(self.fire_count, 1), 0.0)
        return {"frequency": self.density(), "mean_activation": mean,
                "max_activation": np.where(fired, self.act_max, 0.0)}


def evaluate_reconstruction(
    decomposer: nnx.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    batch_size: int,
    top_k: int = 0,
    target_mean: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReconstructionAccumulator:
    """Stream (x, y) batches (each at most batch_size rows; (B, S, d) for a site-axis kind) through the
    decomposer and accumulate.

    Rows are numbered in the order they arrive (the accumulator's top_rows refer to these numbers).
    target_mean: mean of y over the evaluated rows (see `explained_variance`); `mean_of` computes it."""
    fn = make_batch_stats_fn(decomposer, top_k=top_k, target_mean=target_mean)
    acc = ReconstructionAccumulator(n_latents(decomposer), top_k=top_k, n_sites=n_sites(decomposer))
    offset = 0
    for x, y in batches:
        b = x.shape[0]
        if b > batch_size:
            raise ValueError(f"a batch has {b} rows, more than batch_size={batch_size}")
        if b == 0:
            continue
        w = np.zeros(batch_size, np.float32)
        w[:b] = 1.0
        x, y = pad_rows(x, batch_size), pad_rows(y, batch_size)  # one shape: a single compile
        acc.add(fn(x.astype(np.float32), y.astype(np.float32), w), row_offset=offset)
        offset += b
        if progress is not None:
            progress(b)
    return acc


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """a with zero rows appended up to n rows."""
    return a if len(a) == n else np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def mean_of(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Mean over rows of a stream of (B, ...) arrays, in float64 (the reference mean of explained_variance)."""
    total, n = None, 0
    for a in arrays:
        s = np.asarray(a, np.float64).sum(0)
        total = s if total is None else total + s
        n += a.shape[0]
    if total is None:
        raise ValueError("mean_of: no rows")
    return total / n
