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

    def default_encoder_init_norm(self) -> float:
        # 1/sqrt(3): where a PyTorch nn.Linear row starts (sparsify's start). Measured on SmolLM2 resid_post.10
        # (16x, k 32, 195 steps): held-out FVU 0.445 at norm 1.0, 0.381 at 1/sqrt(3), 0.390 at 0.3, 0.416 at
        # 0.15, sparsify 0.381 (bench/fvu_vs_sparsify.py). BatchTopK and gradient TopK inherit it.
        return 3**-0.5

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


def auxk_loss(coder: SparseCoder, x: jax.Array, z0: jax.Array, err: jax.Array, dead: jax.Array, k_aux: int) -> jax.Array:
    """AuxK: the top-k_aux dead latents reconstruct the detached residual, as a fraction of its variance.

    Scaled by min(n_dead / k_aux, 1). Only the parameters get gradients (the residual is detached), all
    of them sparse (gather_encode / gather_decode). The training step computes it only when some latent
    is dead (`TopKSparsity.optional_term_needed`)."""
    z0 = jax.lax.stop_gradient(z0)
    resid = -jax.lax.stop_gradient(err)  # y - y_hat
    b_enc = coder.b_enc[...]
    _, idx = top_k(jnp.where(dead, z0 + jax.lax.stop_gradient(b_enc), -jnp.inf), k_aux)
    vals = jax.nn.relu(gather_encode(x.astype(jnp.float32), coder.input_bias(), coder.W_enc[...], b_enc, z0, idx))
    vals = vals * jnp.take(dead, idx).astype(vals.dtype)  # fewer dead than k_aux: ignore the live ones
    resid_hat = gather_decode(vals, idx, coder.W_dec[...])
    denom = jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-12)
    scale = jnp.minimum(jnp.sum(dead) / k_aux, 1.0)
    return scale * jnp.sum((resid_hat - resid) ** 2) / denom


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

    def select(self, coder: SparseCoder, x: jax.Array, z0: jax.Array, grad: jax.Array | None) -> SparseCodes:
        z0 = jax.lax.stop_gradient(z0)
        _, idx = top_k(z0, self.k, jax.lax.stop_gradient(coder.b_enc[...]))
        return select_codes(coder, x, z0, idx)

    def train_codes(self, coder, x, z0, batch) -> Codes:
        return self.select(coder, x, z0, batch.get("grad"))

    def infer_codes(self, coder, x, z0, grad) -> Codes:
        return self.select(coder, x, z0, grad)

    def dead_mask(self) -> jax.Array:
        return self.tokens_since_fired[...] >= self.dead_tokens

    def optional_term_needed(self) -> jax.Array | None:
        return jnp.any(self.dead_mask()) if self.aux_coefficient else None

    def penalty(self, coder, x, z0, codes, err, optional=True):
        dead = self.dead_mask()
        metrics = {"dead_frac": jnp.mean(dead.astype(jnp.float32))}
        if self.aux_coefficient == 0:
            return jnp.zeros((), jnp.float32), metrics
        # loss() called directly computes AuxK every time (0 without dead latents); loss_and_grads skips it then.
        aux = auxk_loss(coder, x, z0, err, dead, self.k_aux) if optional else jnp.zeros((), jnp.float32)
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
