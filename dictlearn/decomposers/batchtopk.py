"""BatchTopK sparse autoencoder (Bussmann et al. 2024).

In training the batch keeps its k * B largest activations overall, so busy tokens may use more
latents than quiet ones while the batch averages k. Inference cannot depend on the batch, so a
global threshold is estimated during training (an exponential moving average of each batch's
selection threshold) and applied per token: z = pre * (pre > threshold).

Speed, exactly: each row's top `row_slots` candidates (default 4k) are taken with top-k and the
batch threshold is found among them. If no row has all its candidates above the threshold, the
candidates hold every selected latent and the step runs on the sparse path (gathered decode,
sparse encoder backward). Otherwise (a row wants more than row_slots latents) that batch falls back
to the exact dense computation. The metric "dense_fallback" says which path ran.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.sae import Buffer, Codes, SparseCoder, SparseCoderConfig, Sparsity, check, code_stats, select_codes
from dictlearn.decomposers.sparse_ops import SparseCodes, top_k
from dictlearn.decomposers.topk import TopKFields, TopKSparsity


@dataclasses.dataclass
class BatchTopKFields:
    threshold_momentum: float = 0.99  # EMA momentum of the inference threshold
    row_slots: int | None = None  # per-row candidates for the sparse path (None: 4 * k)


def kth_largest_nonneg(z: jax.Array, kth: int) -> jax.Array:
    """Exact kth largest entry of a non-negative float32 array, by bisection on its bit pattern.

    Non-negative floats order like their int32 bit patterns, so 32 counting passes pin the value."""
    as_float = lambda b: jax.lax.bitcast_convert_type(b, jnp.float32)  # noqa: E731
    hi0 = jax.lax.bitcast_convert_type(jnp.max(z).astype(jnp.float32), jnp.int32)

    def body(_, lohi):
        lo, hi = lohi  # invariant: count(z >= as_float(lo)) >= kth
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(z >= as_float(mid)) >= kth
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros((), jnp.int32), hi0))
    t = as_float(lo)
    # CPUs flush subnormals to zero in comparisons, so a zero answer can surface as one: snap it back.
    return jnp.where(t < jnp.finfo(jnp.float32).tiny, 0.0, t)


class BatchTopKSparsity(TopKSparsity):
    """Batch-level top-k in training; at inference a JumpReLU with one global threshold on every latent."""

    name: ClassVar[str] = "batchtopk"
    fields: ClassVar[tuple[type, ...]] = (BatchTopKFields, TopKFields)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check(0 <= config.threshold_momentum < 1, f"threshold_momentum must be in [0, 1), got {config.threshold_momentum}")
        check(config.row_slots is None or config.row_slots >= config.k,
              f"row_slots must be >= k ({config.k}) (or unset for 4 * k), got {config.row_slots}")

    def linear_form(self, coder):
        return "jumprelu", jnp.full((coder.config.n_features,), self.threshold[...], jnp.float32), None

    def __init__(self, config: DecomposerConfig):
        super().__init__(config)
        self.threshold_momentum = config.threshold_momentum
        self.row_slots = min(config.row_slots or 4 * config.k, config.n_features)
        self.threshold = Buffer(jnp.zeros((), jnp.float32))  # inference threshold (0 until estimated)
        self.threshold_updates = Buffer(jnp.zeros((), jnp.int32))

    def train_forward(self, coder, x, z0, batch):
        n, batch_size = coder.config.n_features, z0.shape[0]
        kth = min(self.k * batch_size, batch_size * n)
        z0 = jax.lax.stop_gradient(z0)  # no gradient path through z0: the sparse branch stays sparse
        b_enc = jax.lax.stop_gradient(coder.b_enc[...])
        cand_v, cand_i = top_k(z0, self.row_slots, b_enc)
        cand_v = jax.nn.relu(cand_v)
        t_cand = kth_largest_nonneg(cand_v, kth)
        last = cand_v[:, -1]
        saturated = jnp.any((last >= t_cand) & (last > 0)) if self.row_slots < n else jnp.array(False)

        def sparse_path(x, z0):
            codes = select_codes(coder, x, z0, cand_i)
            codes = SparseCodes(codes.values * (cand_v >= t_cand).astype(z0.dtype), cand_i)
            stats = code_stats(codes, n)
            return coder.reconstruct(codes, x), stats["l0"], stats["fired"], t_cand

        def dense_path(x, z0):
            z = jax.nn.relu(coder.preacts(x))  # recomputed here, so only this branch differentiates densely
            t = kth_largest_nonneg(jax.nn.relu(z0 + b_enc), kth)
            codes = z * (jax.lax.stop_gradient(z) >= t).astype(z.dtype)
            stats = code_stats(codes, n)
            return coder.reconstruct(codes, x), stats["l0"], stats["fired"], t

        y_hat, l0, fired, t = jax.lax.cond(saturated, dense_path, sparse_path, x, z0)
        stats = {"l0": l0, "fired": fired, "batch_threshold": t, "dense_fallback": saturated.astype(jnp.float32)}
        return y_hat, None, stats

    def infer_codes(self, coder, x, z0, grad) -> Codes:
        pre = coder.biased(z0)
        return pre * (pre > self.threshold[...]).astype(pre.dtype)

    def after_step(self, metrics) -> None:
        super().after_step(metrics)
        t, m = metrics["batch_threshold"], self.threshold_momentum
        first = self.threshold_updates[...] == 0
        self.threshold[...] = jnp.where(first, t, m * self.threshold[...] + (1 - m) * t)
        self.threshold_updates[...] = self.threshold_updates[...] + 1

    def fold(self, code_scale: float) -> None:
        self.threshold[...] = self.threshold[...] * code_scale


@dataclasses.dataclass
class BatchTopKConfig(BatchTopKFields, TopKFields, SparseCoderConfig):
    mechanism_cls: ClassVar[type[Sparsity]] = BatchTopKSparsity


@register
class BatchTopKSAE(SparseCoder):
    """Sparse autoencoder with batch-level TopK in training and a learned global threshold at inference."""

    kind: ClassVar[str] = "batchtopk"
    config_cls: ClassVar[type[DecomposerConfig]] = BatchTopKConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 2, "k": 8}
