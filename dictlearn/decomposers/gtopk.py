"""Gradient TopK SAE (g-SAE; "Features that Make a Difference: Leveraging Gradients for Improved
Dictionary Learning").

Latents are ranked by z + beta * z * |W_dec g|, where z = relu(pre-activation) and g is the gradient
of the language model's next-token loss with respect to the hooked activation ("grad" in the batch,
in the units the module reads: a trainer that feeds scale * y passes g / scale); the kept values
are plain z. A latent whose direction matters to the model's output can so win a slot over a
slightly larger but inconsequential one. fold_input_scale records the gradient's scale factor,
so a saved module takes raw gradients.

Without "grad" (at inference, or `encode(x)` from the protocol) it encodes exactly like plain
TopK; `module(x, grad)` uses the gradient when given. The ranking costs one more dense matmul
(g @ W_dec.T) per step; everything else is the sparse TopK path, AuxK included.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.sae import Buffer, SparseCoder, SparseCoderConfig, Sparsity, check, select_codes
from dictlearn.decomposers.sparse_ops import SparseCodes, top_k
from dictlearn.decomposers.topk import TopKFields, TopKSparsity


@dataclasses.dataclass
class GTopKFields:
    beta: float = 1.0  # weight of the gradient term in the ranking score


def gradient_scores(z: jax.Array, grad: jax.Array, w_dec: jax.Array, beta: float) -> jax.Array:
    """z + beta * z * |W_dec g| per latent: (B, n)."""
    return z + beta * z * jnp.abs(grad.astype(jnp.float32) @ w_dec.T)


class GTopKSparsity(TopKSparsity):
    """TopK ranked by z + beta * z * |W_dec g|; exports as plain TopK (its encoding without gradients)."""

    name: ClassVar[str] = "gtopk"
    needs_grad: ClassVar[bool] = True
    fields: ClassVar[tuple[type, ...]] = (GTopKFields, TopKFields)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check(config.beta >= 0, f"beta must be >= 0, got {config.beta}")

    def __init__(self, config: DecomposerConfig):
        super().__init__(config)
        self.beta = config.beta
        self.grad_scale = Buffer(jnp.ones((), jnp.float32))  # multiplies "grad"; set by fold_input_scale

    def select(self, coder, x, z0, grad) -> SparseCodes:
        if grad is None:
            return super().select(coder, x, z0, grad)
        z0 = jax.lax.stop_gradient(z0)
        z = jax.nn.relu(z0 + jax.lax.stop_gradient(coder.b_enc[...]))
        scores = gradient_scores(z, grad * self.grad_scale[...], jax.lax.stop_gradient(coder.W_dec[...]), self.beta)
        _, idx = top_k(scores, self.k)
        return select_codes(coder, x, z0, idx)

    def fold(self, code_scale: float) -> None:
        # Training saw g / scale_out; a folded module sees raw g, so scale it by 1 / scale_out (= code_scale).
        self.grad_scale[...] = self.grad_scale[...] * code_scale


@dataclasses.dataclass
class GTopKConfig(GTopKFields, TopKFields, SparseCoderConfig):
    mechanism_cls: ClassVar[type[Sparsity]] = GTopKSparsity


@register
class GTopKSAE(SparseCoder):
    """TopK SAE whose selection also weighs each latent's effect on the model's loss."""

    kind: ClassVar[str] = "gtopk"
    config_cls: ClassVar[type[DecomposerConfig]] = GTopKConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 2, "k": 8, "beta": 1.0}
