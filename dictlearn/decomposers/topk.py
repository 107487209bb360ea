"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (after ReLU); no sparsity penalty is needed. Latents
that have not fired for `dead_tokens` tokens (the SparseCoder counts them) are revived by the AuxK loss:
the top `k_aux` dead latents try to reconstruct the (detached) residual error, scaled by aux_coefficient.

The whole step is sparse except the one encoder matmul: selection by exact top-k, values and their
gradients through `gather_encode`, reconstruction through `gather_decode` (see sparse_ops).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.sae import Codes, SparseCoder, SparseCoderConfig, Sparsity, check, select_codes
from dictlearn.decomposers.sparse_ops import SparseCodes, gather_decode, gather_encode, top_k


@dataclasses.dataclass
class TopKFields:
    """Hyper-parameters of top-k selection and the AuxK dead-latent loss (dead: see `dead_tokens`)."""

    k: int = 32  # active latents per token
    k_aux: int | None = None  # dead latents used by AuxK (None: d_in // 2, as in sparsify)
    aux_coefficient: float = 1 / 32  # weight of the AuxK loss (0 disables it)


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
    resid_hat = gather_decode(vals, idx, coder.W_dec[...], zero_is_unselected=True)  # zeros: relu or live mask
    denom = jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-12)
    scale = jnp.minimum(jnp.sum(dead) / k_aux, 1.0)
    return scale * jnp.sum((resid_hat - resid) ** 2) / denom


class TopKSparsity(Sparsity):
    """Per-token top-k, with AuxK reviving the coder's dead latents."""

    name: ClassVar[str] = "topk"
    fields: ClassVar[tuple[type, ...]] = (TopKFields,)
    # 1/sqrt(3): where a PyTorch nn.Linear row starts (sparsify's start). Measured on SmolLM2 resid_post.10
    # (16x, k 32, 195 steps): held-out FVU 0.445 at norm 1.0, 0.381 at 1/sqrt(3), 0.390 at 0.3, 0.416 at
    # 0.15, sparsify 0.381 (bench/fvu_vs_sparsify.py). BatchTopK and gradient TopK inherit it.
    encoder_init_norm: ClassVar[float] = 3**-0.5

    @classmethod
    def l0_target(cls, config) -> float | None:
        return float(config.k)  # per token (BatchTopK, Matryoshka: on average over the batch)

    @classmethod
    def check_config(cls, config) -> None:
        check(0 < config.k <= config.n_features, f"k must be in 1..n_features ({config.n_features}), got {config.k}")
        check(config.k_aux is None or config.k_aux > 0, f"k_aux must be positive (or unset for d_in // 2), got {config.k_aux}")
        check(config.aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {config.aux_coefficient}")

    def __init__(self, config: DecomposerConfig):
        self.k = config.k
        self.k_aux = min(config.k_aux or max(config.d_in // 2, 1), config.n_features)
        self.aux_coefficient = config.aux_coefficient

    def linear_form(self, coder):
        return "topk", None, int(self.k)

    def select(self, coder: SparseCoder, x: jax.Array, z0: jax.Array, grad: jax.Array | None) -> SparseCodes:
        z0 = jax.lax.stop_gradient(z0)
        _, idx = top_k(z0, self.k, jax.lax.stop_gradient(coder.b_enc[...]))
        return select_codes(coder, x, z0, idx)

    def train_codes(self, coder, x, z0, batch) -> Codes:
        return self.select(coder, x, z0, batch.get("grad"))

    def infer_codes(self, coder, x, z0, grad) -> Codes:
        return self.select(coder, x, z0, grad)

    def optional_term_needed(self, coder) -> jax.Array | None:
        return jnp.any(coder.dead_mask()) if self.aux_coefficient else None

    def penalty(self, coder, x, z0, codes, err, optional=True):
        if self.aux_coefficient == 0:
            return jnp.zeros((), jnp.float32), {}
        # loss() called directly computes AuxK every time (0 without dead latents); loss_and_grads skips it then.
        aux = auxk_loss(coder, x, z0, err, coder.dead_mask(), self.k_aux) if optional else jnp.zeros((), jnp.float32)
        return self.aux_coefficient * aux, {"auxk": aux}


@dataclasses.dataclass
class TopKConfig(TopKFields, SparseCoderConfig):
    mechanism_cls: ClassVar[type[Sparsity]] = TopKSparsity


@register
class TopKSAE(SparseCoder):
    """Sparse autoencoder with per-token TopK activation and AuxK."""

    kind: ClassVar[str] = "topk"
    config_cls: ClassVar[type[DecomposerConfig]] = TopKConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 2, "k": 8}
