"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (after ReLU); no sparsity penalty is needed. Latents
that have not fired for `dead_tokens` tokens are revived by the AuxK loss: the top `k_aux` dead
latents try to reconstruct the (detached) residual error, scaled by aux_coefficient.

The whole step is sparse except the one encoder matmul: selection by exact top-k, values and their
gradients through `gather_encode`, reconstruction through `gather_decode` (see sparse_ops).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.sae import Buffer, Codes, SparseCoder, SparseCoderConfig, Sparsity, check, select_codes
from dictlearn.decomposers.sparse_ops import SparseCodes, gather_decode, gather_encode, top_k


@dataclasses.dataclass
class TopKFields:
    """Hyper-parameters of top-k selection and the AuxK dead-latent loss."""

    k: int = 32  # active latents per token
    k_aux: int | None = None  # dead latents used by AuxK (None: d_in // 2, as in sparsify)
    aux_coefficient: float = 1 / 32  # weight of the AuxK loss (0 disables it)
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing

    def validate_topk(self) -> None:
        check(0 < self.k <= self.n_features, f"k must be in 1..n_features ({self.n_features}), got {self.k}")
        check(self.k_aux is None or self.k_aux > 0, f"k_aux must be positive (or unset for d_in // 2), got {self.k_aux}")
        check(self.aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {self.aux_coefficient}")
        check(self.dead_tokens > 0, f"dead_tokens must be positive, got {self.dead_tokens}")


@dataclasses.dataclass
class TopKConfig(TopKFields, SparseCoderConfig):
    def validate(self) -> None:
        super().validate()
        self.validate_topk()


def auxk_loss(coder: SparseCoder, x: jax.Array, pre: jax.Array, err: jax.Array, dead: jax.Array, k_aux: int) -> jax.Array:
    """AuxK: the top-k_aux dead latents reconstruct the detached residual, as a fraction of its variance.

    Scaled by min(n_dead / k_aux, 1). Runs only when some latent is dead (lax.cond), so a healthy
    dictionary pays nothing for it."""
    b_in, w_enc, b_enc, w_dec = coder.input_bias(), coder.W_enc[...], coder.b_enc[...], coder.W_dec[...]

    def on(x, pre, err, dead, b_in, w_enc, b_enc, w_dec):
        _, idx = top_k(jnp.where(dead, pre, -jnp.inf), k_aux)
        vals = jax.nn.relu(gather_encode(x.astype(jnp.float32), b_in, w_enc, b_enc, pre, idx))
        vals = vals * jnp.take(dead, idx).astype(vals.dtype)  # fewer dead than k_aux: ignore the live ones
        resid = -jax.lax.stop_gradient(err)  # y - y_hat
        resid_hat = gather_decode(vals, idx, w_dec)
        denom = jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-12)
        scale = jnp.minimum(jnp.sum(dead) / k_aux, 1.0)
        return scale * jnp.sum((resid_hat - resid) ** 2) / denom

    def off(*_):
        return jnp.zeros((), jnp.float32)

    # pre enters without a gradient path: otherwise the cond's VJP would hand the encoder matmul a dense
    # (B, n) cotangent, and the backward would pay two dense matmuls even when no latent is dead.
    pre = jax.lax.stop_gradient(pre)
    return jax.lax.cond(jnp.any(dead), on, off, x, pre, err, dead, b_in, w_enc, b_enc, w_dec)


class TopKSparsity(Sparsity):
    """Per-token top-k, with dead-latent tracking and AuxK."""

    name: ClassVar[str] = "topk"

    def __init__(self, config: DecomposerConfig):
        n = config.n_features
        self.k = config.k
        self.k_aux = min(config.k_aux or max(config.d_in // 2, 1), n)
        self.aux_coefficient = config.aux_coefficient
        self.dead_tokens = config.dead_tokens
        # Tokens seen since each latent last fired (saturates at 2**30 to stay within int32).
        self.tokens_since_fired = Buffer(jnp.zeros((n,), jnp.int32))

    def select(self, coder: SparseCoder, x: jax.Array, pre: jax.Array, grad: jax.Array | None) -> SparseCodes:
        _, idx = top_k(jax.lax.stop_gradient(pre), self.k)
        return select_codes(coder, x, pre, idx)

    def train_codes(self, coder, x, pre, batch) -> Codes:
        return self.select(coder, x, pre, batch.get("grad"))

    def infer_codes(self, coder, x, pre, grad) -> Codes:
        return self.select(coder, x, pre, grad)

    def dead_mask(self) -> jax.Array:
        return self.tokens_since_fired[...] >= self.dead_tokens

    def penalty(self, coder, x, pre, codes, err):
        dead = self.dead_mask()
        metrics = {"dead_frac": jnp.mean(dead.astype(jnp.float32))}
        if self.aux_coefficient == 0:
            return jnp.zeros((), jnp.float32), metrics
        aux = auxk_loss(coder, x, pre, err, dead, self.k_aux)
        metrics["auxk"] = aux
        return self.aux_coefficient * aux, metrics

    def after_step(self, metrics) -> None:
        seen = jnp.minimum(self.tokens_since_fired[...] + metrics["n_tokens"].astype(jnp.int32), 2**30)
        self.tokens_since_fired[...] = jnp.where(metrics["fired"], 0, seen)


@register
class TopKSAE(SparseCoder):
    """Sparse autoencoder with per-token TopK activation and AuxK."""

    kind: ClassVar[str] = "topk"
    config_cls: ClassVar[type[DecomposerConfig]] = TopKConfig

    def make_sparsity(self, config) -> Sparsity:
        return TopKSparsity(config)
