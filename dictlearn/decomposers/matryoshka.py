"""Matryoshka sparse autoencoder (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
SAEs"; Nabeshima 2024).

The latents are ordered, and every prefix of the widths in `prefix_widths` (the full width last) must
reconstruct the input on its own: the loss sums the squared error of each prefix's reconstruction
(b_dec plus the decoded codes of latents 0..width-1), optionally weighted per prefix. A general feature
then has to live in the early latents, where it cannot be absorbed into more specific later latents
that always fire with it; that is what keeps parent features whole in a hierarchy.

Selection is the TopK family's, unchanged: BatchTopK by default (`selection = "batchtopk"`: a global
inference threshold, exported like BatchTopK as a JumpReLU, which is how SAELens saves its Matryoshka
BatchTopK SAEs), or per-token TopK (`selection = "topk"`). AuxK, the unit-norm decoder, scale folding and
resume state are the SparseCoder's and the mechanism's own.

Speed: the mechanisms' training forward runs as it is, on a view of the coder whose `reconstruct` returns
every prefix's reconstruction. For sparse codes each slot is decoded into its own prefix group
(`grouped_decode`; never a dense (B, n) array); dense codes (BatchTopK's rare exact fallback) decode by
column blocks. On a single CPU device the grouped decode and its backward are dictlearn's row-selecting C++
kernels (scatter_rows / gather_dots with `row_of`), which skip the unselected slots (BatchTopK keeps 4k
candidates per row, about k of them selected), so a Matryoshka step costs about a BatchTopK step
(docs/kernels.md has the figures; `bench/matryoshka.py throughput` measures it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.batchtopk import BatchTopKFields, BatchTopKSparsity
from dictlearn.decomposers.sae import Codes, SparseCoder, SparseCoderConfig, Sparsity, check
from dictlearn.decomposers.sparse_ops import CHUNK_MIN_ELEMENTS, SparseCodes, _chunks, _take_rows, scatter_rows
from dictlearn.decomposers.topk import TopKFields, TopKSparsity
from dictlearn.kernels import cpu as cpu_kernels

SELECTIONS = ("batchtopk", "topk")


@dataclasses.dataclass
class MatryoshkaFields:
    """The nested prefixes and how their errors are weighed."""

    # Increasing widths of the nested prefixes; the full width (n_features) is the last prefix and is added
    # when left out. None: n_features // 64, // 16, // 4 (those >= 1), then n_features, filled in here so
    # saved configs record them.
    prefix_widths: list[int] | None = None
    prefix_weights: list[float] | None = None  # one per prefix, full width included (None: all 1)
    selection: str = "batchtopk"  # how latents are chosen: "batchtopk" (exports as JumpReLU) | "topk"


def default_widths(n_features: int) -> list[int]:
    """n // 64, n // 16, n // 4 (each >= 1, distinct) and n: prefixes growing 4x, as in the literature."""
    return sorted({w for w in (n_features // 64, n_features // 16, n_features // 4) if 1 <= w < n_features}) + [n_features]


def check_prefixes(config: Any) -> None:
    """Fill in and validate prefix_widths / prefix_weights; every message names the fix."""
    n = config.n_features
    if config.prefix_widths is None:
        config.prefix_widths = default_widths(n)
    widths = list(config.prefix_widths)
    check(len(widths) > 0, "prefix_widths must list at least one width (or be left out for n_features // 64, // 16, // 4)")
    check(all(isinstance(w, int) and not isinstance(w, bool) for w in widths),
          f"prefix_widths must be whole numbers of latents, got {widths}")
    check(all(1 <= w <= n for w in widths), f"prefix_widths must lie in 1..n_features ({n}), got {widths}")
    check(all(a < b for a, b in zip(widths, widths[1:])), f"prefix_widths must be strictly increasing, got {widths}")
    if widths[-1] != n:
        widths.append(n)  # the full width is always the last prefix
    config.prefix_widths = widths
    weights = config.prefix_weights
    if weights is not None:
        check(len(weights) == len(widths),
              f"prefix_weights needs one weight per prefix, {len(widths)} for prefix_widths {widths} (the full "
              f"width {n} included), got {len(weights)}")
        check(all(w >= 0 for w in weights) and sum(weights) > 0,
              f"prefix_weights must be >= 0 and not all zero, got {weights}")
        config.prefix_weights = [float(w) for w in weights]
    check(config.selection in SELECTIONS, f"selection must be one of {', '.join(SELECTIONS)}, got {config.selection!r}")


def prefix_groups(indices: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """Which prefix group each latent index opens in: 0 for i < widths[0], g for widths[g-1] <= i < widths[g]."""
    return sum((indices >= w).astype(jnp.int32) for w in widths[:-1])


def _by_chunks(fn, *arrays: jax.Array) -> jax.Array:
    """fn over token chunks of the arrays (leading axis) with lax.scan, results concatenated; small
    problems in one piece. Bounds the (chunk, slots, d) gathered-row temporaries."""
    batch, c = arrays[0].shape[0], _chunks(arrays[0].shape[0])
    if c == batch or arrays[0].size * arrays[-1].shape[-1] <= CHUNK_MIN_ELEMENTS:
        return fn(*arrays)
    _, out = jax.lax.scan(lambda _, chunk: (None, fn(*chunk)), None,
                          tuple(a.reshape(batch // c, c, *a.shape[1:]) for a in arrays))
    return out.reshape(batch, *out.shape[2:])


def _group_onehot(values: jax.Array, group: jax.Array, n_groups: int) -> jax.Array:
    """(B, m) values -> (B, G, m): each slot's value in its own group's row, zero in the others."""
    return (group[:, None, :] == jnp.arange(n_groups)[None, :, None]).astype(values.dtype) * values[:, None, :]


def _group_rows(group: jax.Array, n_groups: int) -> jax.Array:
    """(B, m) prefix groups -> each slot's row b * G + group in a (B * G, d) array of per-group rows."""
    return jnp.arange(group.shape[0], dtype=jnp.int32)[:, None] * n_groups + group.astype(jnp.int32)


def grouped_decode(values: jax.Array, indices: jax.Array, group: jax.Array, n_groups: int, w_dec: jax.Array,
                   zero_is_unselected: bool = False) -> jax.Array:
    """out[b, g] = sum of values[b, j] * w_dec[indices[b, j]] over the slots j with group[b, j] == g: (B, G, d).

    On a single CPU device, dictlearn's C++ kernels do it, forward and backward, in bucketed passes over
    the slots that skip zero values, at about the cost of one ungrouped decode; elsewhere each decoder row
    is gathered once per slot (not once per group), the backward reads each slot's gradient from its own
    group's row and scatters decoder gradients group by group. Never a dense (B, n) array.

    zero_is_unselected: a zero value marks a slot that was not selected, so its value gradient is 0 (and
    costs nothing). True in the TopK family's training forward, where a zero comes from the relu or from
    BatchTopK's batch mask, both of which pass no gradient, so the parameters' gradients are unchanged;
    False (exact for every slot) otherwise."""
    return _grouped_decode(values, indices, group, n_groups, w_dec, zero_is_unselected)


def _group_rows(group: jax.Array, n_groups: int) -> jax.Array:
    """(B, m) prefix groups -> each slot's row b * G + group in a (B * G, d) array of per-group rows."""
    return jnp.arange(group.shape[0], dtype=jnp.int32)[:, None] * n_groups + group.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 5))
def _grouped_decode(values, indices, group, n_groups, w_dec, zero_is_unselected):
    batch, d = values.shape[0], w_dec.shape[1]
    fast = cpu_kernels.scatter_rows(values, _group_rows(group, n_groups), w_dec, batch * n_groups, row_of=indices)
    if fast is not None:
        return fast.reshape(batch, n_groups, d)
    return _by_chunks(lambda v, i, g: jnp.einsum("bgm,bmd->bgd", _group_onehot(v, g, n_groups), _take_rows(w_dec, i)),
                      values, indices, group)


def _grouped_decode_fwd(values, indices, group, n_groups, w_dec, zero_is_unselected):
    return _grouped_decode(values, indices, group, n_groups, w_dec, zero_is_unselected), (values, indices, group, w_dec)


def _grouped_decode_bwd(n_groups, zero_is_unselected, res, d_out):
    values, indices, group, w_dec = res
    rows, flat = _group_rows(group, n_groups), d_out.reshape(-1, d_out.shape[-1])
    live = values != 0
    d_values = cpu_kernels.gather_dots(flat, indices, w_dec, row_of=jnp.where(live, rows, -1) if zero_is_unselected else rows)
    if d_values is None:
        d_values = _by_chunks(lambda i, g, u: jnp.sum(jnp.take_along_axis(u, g[:, :, None], axis=1) * _take_rows(w_dec, i), -1),
                              indices, group, d_out)
        if zero_is_unselected:
            d_values = d_values * live.astype(d_values.dtype)
    d_w_dec = cpu_kernels.scatter_rows(values, indices, flat, w_dec.shape[0], row_of=rows)
    if d_w_dec is None:
        d_w_dec = sum(scatter_rows(values * (group == g).astype(values.dtype), indices, d_out[:, g], w_dec.shape[0])
                      for g in range(n_groups))
    return d_values, None, None, d_w_dec


_grouped_decode.defvjp(_grouped_decode_fwd, _grouped_decode_bwd)


def nested_decode(codes: Codes, w_dec: jax.Array, widths: tuple[int, ...],
                  zero_is_unselected: bool = False) -> tuple[jax.Array, jax.Array]:
    """Every prefix's decoded codes (no bias), stacked (G, B, d), and its L0 (G,).

    Sparse codes: each slot decoded into its prefix group (`grouped_decode`, which explains
    zero_is_unselected), then a running sum over the groups. Dense codes (BatchTopK's exact fallback): one
    matmul per column block of the decoder."""
    n_groups = len(widths)
    if isinstance(codes, SparseCodes):
        group = prefix_groups(codes.indices, widths)
        parts = jnp.moveaxis(grouped_decode(codes.values, codes.indices, group, n_groups, w_dec, zero_is_unselected), 1, 0)
        active = codes.values != 0
        l0 = jnp.stack([jnp.mean(jnp.sum(active & (group <= g), axis=-1).astype(jnp.float32)) for g in range(n_groups)])
    else:
        starts = (0,) + widths[:-1]
        parts = jnp.stack([codes[:, s:e] @ w_dec[s:e] for s, e in zip(starts, widths)])
        l0 = jnp.stack([jnp.mean(jnp.sum(codes[:, :w] != 0, axis=-1).astype(jnp.float32)) for w in widths])
    return jnp.cumsum(parts, axis=0), l0


class NestedView:
    """The coder as a TopK-family training forward sees it, except that `reconstruct` returns every
    prefix's reconstruction (stacked (G, B, d)) with each prefix's L0: the mechanisms' own selection
    (BatchTopK's sparse path and its dense fallback, TopK's) runs unchanged and decodes all prefixes."""

    def __init__(self, coder: SparseCoder, widths: tuple[int, ...]):
        self._coder, self._widths = coder, widths

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coder, name)

    def reconstruct(self, codes: Codes, x: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        # The mechanisms' zero code values are unselected slots (relu or batch mask: no gradient).
        stacked, l0 = nested_decode(codes, self._coder.W_dec[...], self._widths, zero_is_unselected=True)
        return stacked + self._coder.b_dec[...], l0


class PrefixLosses:
    """Mixin for a TopK-family mechanism: train on every prefix. The stats carry each inner prefix's FVU and
    L0 ("fvu_<width>", "l0_<width>") and "inner_loss": what the prefixes add to the full width's error
    (sum of weight * mse over inner prefixes, plus (weight - 1) * mse of the full width), which
    MatryoshkaSAE.loss adds to the loss."""

    def init_prefixes(self, config: DecomposerConfig) -> None:
        self.widths = tuple(config.prefix_widths)
        self.weights = tuple(config.prefix_weights or [1.0] * len(self.widths))

    def train_forward(self, coder, x, z0, batch):
        (stacked, l0), codes, stats = super().train_forward(NestedView(coder, self.widths), x, z0, batch)
        y = batch["y"].astype(jnp.float32)
        mse = jnp.mean(jnp.sum((stacked - y) ** 2, axis=-1), axis=-1)  # (G,)
        total_var = jnp.maximum(jnp.mean(jnp.sum((y - y.mean(0)) ** 2, axis=-1)), 1e-12)
        weights = jnp.asarray(self.weights, jnp.float32)
        stats = {**stats, "inner_loss": jnp.sum(weights * mse) - mse[-1]}
        for i, w in enumerate(self.widths[:-1]):
            stats[f"fvu_{w}"], stats[f"l0_{w}"] = mse[i] / total_var, l0[i]
        return stacked[-1], codes, stats


class MatryoshkaBatchTopKSparsity(PrefixLosses, BatchTopKSparsity):
    """BatchTopK selection, every prefix trained; inference and export as BatchTopK (a global threshold)."""

    name: ClassVar[str] = "matryoshka_batchtopk"
    fields: ClassVar[tuple[type, ...]] = (MatryoshkaFields, BatchTopKFields, TopKFields)

    def __init__(self, config: DecomposerConfig):
        super().__init__(config)
        self.init_prefixes(config)


class MatryoshkaTopKSparsity(PrefixLosses, TopKSparsity):
    """Per-token TopK selection, every prefix trained; inference and export as TopK."""

    name: ClassVar[str] = "matryoshka_topk"
    fields: ClassVar[tuple[type, ...]] = (MatryoshkaFields, TopKFields)

    def __init__(self, config: DecomposerConfig):
        super().__init__(config)
        self.init_prefixes(config)


MECHANISMS: dict[str, type[Sparsity]] = {"batchtopk": MatryoshkaBatchTopKSparsity, "topk": MatryoshkaTopKSparsity}


@dataclasses.dataclass
class MatryoshkaConfig(MatryoshkaFields, BatchTopKFields, TopKFields, SparseCoderConfig):
    """A Matryoshka SAE: `selection` picks the mechanism (BatchTopK's fields are unused under "topk")."""

    mechanism_cls: ClassVar[type[Sparsity]] = MatryoshkaBatchTopKSparsity

    def mechanism(self) -> type[Sparsity]:
        check(self.selection in SELECTIONS, f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        return MECHANISMS[self.selection]

    def validate(self) -> None:
        check_prefixes(self)


@register
class MatryoshkaSAE(SparseCoder):
    """SAE whose nested prefixes of latents each reconstruct the input: the loss sums their errors."""

    kind: ClassVar[str] = "matryoshka"
    config_cls: ClassVar[type[DecomposerConfig]] = MatryoshkaConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 4, "k": 8}

    def loss(self, batch: dict[str, jax.Array], optional: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        total, metrics = super().loss(batch, optional)
        return total + metrics["inner_loss"], metrics

    def prefix(self, width: int) -> SparseCoder:
        """The first `width` latents as a BatchTopK SAE of that width: with BatchTopK selection a latent's
        inference code depends only on itself (one global threshold), so it encodes exactly as the first
        `width` codes of this SAE and reconstructs that prefix. TopK selection has no such form (its top k
        are chosen among all latents)."""
        check(self.config.selection == "batchtopk", "a prefix of a Matryoshka SAE with selection \"topk\" is not a "
              "standalone SAE (its top k are chosen among all latents); train with selection = \"batchtopk\" to use "
              "prefixes alone")
        return first_latents(self, width)


def first_latents(coder: SparseCoder, width: int) -> SparseCoder:
    """A BatchTopK SAE made of the first `width` latents of a SAE with a global inference threshold (BatchTopK or
    Matryoshka with BatchTopK selection): same weights, bias, threshold and dead-latent counters."""
    from dictlearn.decomposers.base import build

    cfg = coder.config
    check(isinstance(coder.sparsity, BatchTopKSparsity), f"first_latents needs a global-threshold (BatchTopK) SAE, got {coder.kind}")
    check(1 <= width <= cfg.n_features, f"prefix width must be in 1..{cfg.n_features}, got {width}")
    small = build("batchtopk", {"d_in": cfg.d_in, "n_features": width, "k": min(cfg.k, width), "seed": cfg.seed,
                                "hookpoint_in": cfg.hookpoint_in, "hookpoint_out": cfg.hookpoint_out})
    for name in ("W_enc", "b_enc", "W_dec", "tokens_since_fired"):
        getattr(small, name)[...] = getattr(coder, name)[...][:width]
    small.b_dec[...] = coder.b_dec[...]
    small.sparsity.threshold[...] = coder.sparsity.threshold[...]
    small.sparsity.threshold_updates[...] = coder.sparsity.threshold_updates[...]
    return small
