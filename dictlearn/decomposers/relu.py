"""ReLU sparse autoencoder with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update).

The penalty is l1_coefficient * sum_i z_i * ||W_dec[i]||, so shrinking codes while growing decoder
rows cannot cheat it even when rows are not kept at unit norm. The coefficient ramps linearly from
0 over the first `l1_warmup_steps` steps, which keeps latents from dying early.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.sae import Buffer, Codes, SparseCoder, SparseCoderConfig, Sparsity, check


@dataclasses.dataclass
class ReLUFields:
    """Hyper-parameters of the L1 penalty (in units of the training-scale activations)."""

    l1_coefficient: float = 0.1  # weight of the L1 penalty on codes times decoder-row norms
    l1_warmup_steps: int = 1000  # linear ramp of the coefficient from 0 (0: no warm-up)


def warmup(step: jax.Array, steps: int) -> jax.Array:
    """Linear ramp from 0 to 1 over `steps` optimiser steps (1 throughout when steps == 0)."""
    if steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(step.astype(jnp.float32) / steps, 1.0)


class ReLUSparsity(Sparsity):
    name: ClassVar[str] = "relu"
    fields: ClassVar[tuple[type, ...]] = (ReLUFields,)

    @classmethod
    def check_config(cls, config) -> None:
        check(config.l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {config.l1_coefficient}")
        check(config.l1_warmup_steps >= 0, f"l1_warmup_steps must be >= 0, got {config.l1_warmup_steps}")

    def linear_form(self, coder):
        return "relu", None, None

    def __init__(self, config: DecomposerConfig):
        self.l1_coefficient = config.l1_coefficient
        self.l1_warmup_steps = config.l1_warmup_steps
        self.step = Buffer(jnp.zeros((), jnp.int32))  # optimiser steps taken (drives the warm-up)

    def train_codes(self, coder, x, z0, batch) -> Codes:
        return jax.nn.relu(coder.biased(z0))

    def infer_codes(self, coder, x, z0, grad) -> Codes:
        return jax.nn.relu(coder.biased(z0))

    def penalty(self, coder, x, z0, codes, err, optional=True):
        norms = jnp.linalg.norm(coder.W_dec[...], axis=1)
        l1 = jnp.mean(codes @ norms)
        coef = self.l1_coefficient * warmup(self.step[...], self.l1_warmup_steps)
        return coef * l1, {"l1": l1, "l1_coefficient": coef}

    def after_step(self, metrics) -> None:
        self.step[...] = self.step[...] + 1


@dataclasses.dataclass
class ReLUConfig(ReLUFields, SparseCoderConfig):
    mechanism_cls: ClassVar[type[Sparsity]] = ReLUSparsity


@register
class ReLUSAE(SparseCoder):
    """Sparse autoencoder with ReLU codes and a decoder-norm-weighted L1 penalty."""

    kind: ClassVar[str] = "relu"
    config_cls: ClassVar[type[DecomposerConfig]] = ReLUConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 2, "l1_coefficient": 0.01, "l1_warmup_steps": 5}
