"""ReLU sparse autoencoder with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update).

The penalty is l1_coefficient * sum_i z_i * ||W_dec[i]||, so shrinking codes while growing decoder
rows cannot cheat it even when rows are not kept at unit norm. The coefficient ramps linearly from
0 over the first `l1_warmup_steps` steps, which keeps latents from dying early; with `target_l0` it is
adapted instead until the running L0 reaches the target (dictlearn.decomposers.coefficient).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.coefficient import START_ROWS, TargetL0Fields, check_target, penalty_coefficient, warmup  # noqa: F401 (warmup: clt imports it from here)
from dictlearn.decomposers.sae import Buffer, Codes, SparseCoder, SparseCoderConfig, Sparsity, check


@dataclasses.dataclass
class ReLUFields:
    """Hyper-parameters of the L1 penalty (in units of the training-scale activations)."""

    l1_coefficient: float = 0.1  # weight of the L1 penalty on codes times decoder-row norms
    l1_warmup_steps: int = 100  # linear ramp of the coefficient from 0 (0: no warm-up; ignored with target_l0)


class ReLUSparsity(Sparsity):
    name: ClassVar[str] = "relu"
    fields: ClassVar[tuple[type, ...]] = (ReLUFields, TargetL0Fields)

    @classmethod
    def l0_target(cls, config) -> float | None:
        return config.target_l0  # None: a fixed coefficient, whatever L0 it reaches

    @classmethod
    def check_config(cls, config) -> None:
        check(config.l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {config.l1_coefficient}")
        check(config.l1_warmup_steps >= 0, f"l1_warmup_steps must be >= 0, got {config.l1_warmup_steps}")
        check_target(config)
        check(config.target_l0 is None or config.l1_coefficient > 0,
              f"target_l0 scales l1_coefficient, so it must be positive, got {config.l1_coefficient}")

    def linear_form(self, coder):
        return "relu", None, None

    def __init__(self, config: DecomposerConfig):
        self.control = penalty_coefficient(config, config.l1_coefficient, config.l1_warmup_steps)  # ramped, or target_l0's controller
        self.step = Buffer(jnp.zeros((), jnp.int32))  # optimiser steps taken (drives the warm-up)

    def train_codes(self, coder, x, z0, batch) -> Codes:
        return jax.nn.relu(coder.biased(z0))

    def infer_codes(self, coder, x, z0, grad) -> Codes:
        return jax.nn.relu(coder.biased(z0))

    def init_from_data(self, coder, x, y) -> None:
        """With a target L0: shift b_enc so that the sample fires target_l0 latents per row from the start."""
        levels = self.control.start_levels(coder.preacts(x[:START_ROWS]))
        if levels is not None:
            coder.b_enc[...] = coder.b_enc[...] - levels

    def penalty(self, coder, x, z0, codes, err, optional=True):
        norms = jnp.linalg.norm(coder.W_dec[...], axis=1)
        l1 = jnp.mean(codes @ norms)
        coef = self.control.value(self.step[...])
        return coef * l1, {"l1": l1, "l1_coefficient": coef, **self.control.metrics()}

    def after_step(self, metrics) -> None:
        self.control.update(metrics["l0"], self.step[...])
        self.step[...] = self.step[...] + 1


@dataclasses.dataclass
class ReLUConfig(ReLUFields, TargetL0Fields, SparseCoderConfig):
    mechanism_cls: ClassVar[type[Sparsity]] = ReLUSparsity


@register
class ReLUSAE(SparseCoder):
    """Sparse autoencoder with ReLU codes and a decoder-norm-weighted L1 penalty."""

    kind: ClassVar[str] = "relu"
    config_cls: ClassVar[type[DecomposerConfig]] = ReLUConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 2, "l1_coefficient": 0.01, "l1_warmup_steps": 5}
