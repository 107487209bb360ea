"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024; the Gemma Scope recipe).

z_i = pre_i * H(pre_i - theta_i) with a learned threshold theta_i = exp(log_threshold_i) per latent,
trained against mse + l0_coefficient * L0. The step function has no useful gradient, so both the
JumpReLU and the L0 term use straight-through pseudo-derivatives with respect to theta, built from
a rectangle kernel of width `bandwidth`:
  d z / d theta  = -(theta / bandwidth) * K((pre - theta) / bandwidth)
  d H / d theta  = -(1 / bandwidth) * K((pre - theta) / bandwidth),   K(u) = 1{|u| < 1/2}
(the L0 term passes no gradient to pre). The L0 coefficient ramps from 0 over `l0_warmup_steps`; with
`target_l0` a controller scales every threshold until the running L0 reaches the target
(dictlearn.decomposers.coefficient; the L0 coefficient alone moves thresholds too slowly).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.coefficient import START_ROWS, TargetL0Fields, check_target, penalty_coefficient, warmup
from dictlearn.decomposers.sae import Buffer, Codes, SparseCoder, SparseCoderConfig, Sparsity, check


@dataclasses.dataclass
class JumpReLUFields:
    """Hyper-parameters of JumpReLU (thresholds and bandwidth in training-scale units)."""

    l0_coefficient: float = 1e-3  # weight of the (straight-through) L0 penalty
    l0_warmup_steps: int = 1000  # linear ramp of the L0 coefficient from 0 (0: no warm-up)
    bandwidth: float = 1e-3  # width of the rectangle kernel of the straight-through estimator
    initial_threshold: float = 0.04  # every latent's threshold at the start (with target_l0: placed from data instead)


MIN_THRESHOLD = 1e-6  # the lowest starting threshold placed from data


def _rectangle(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """pre * H(pre - theta), with the straight-through gradient for theta."""
    return pre * (pre > theta).astype(pre.dtype)


def _jumprelu_fwd(pre, theta, bandwidth):
    return jumprelu(pre, theta, bandwidth), (pre, theta)


def _jumprelu_bwd(bandwidth, res, g):
    pre, theta = res
    d_pre = g * (pre > theta).astype(pre.dtype)
    d_theta = -(theta / bandwidth) * jnp.sum(g * _rectangle((pre - theta) / bandwidth), axis=0)
    return d_pre, d_theta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(pre - theta), with the straight-through gradient for theta only."""
    return (pre > theta).astype(pre.dtype)


def _heaviside_fwd(pre, theta, bandwidth):
    return heaviside(pre, theta, bandwidth), (pre, theta)


def _heaviside_bwd(bandwidth, res, g):
    pre, theta = res
    d_theta = -(1.0 / bandwidth) * jnp.sum(g * _rectangle((pre - theta) / bandwidth), axis=0)
    return jnp.zeros_like(pre), d_theta


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


class JumpReLUSparsity(Sparsity):
    name: ClassVar[str] = "jumprelu"
    fields: ClassVar[tuple[type, ...]] = (JumpReLUFields, TargetL0Fields)

    @classmethod
    def l0_target(cls, config) -> float | None:
        return config.target_l0  # None: a fixed coefficient, whatever L0 it reaches

    @classmethod
    def check_config(cls, config) -> None:
        check(config.l0_coefficient >= 0, f"l0_coefficient must be >= 0, got {config.l0_coefficient}")
        check(config.l0_warmup_steps >= 0, f"l0_warmup_steps must be >= 0, got {config.l0_warmup_steps}")
        check(config.bandwidth > 0, f"bandwidth must be positive, got {config.bandwidth}")
        check(config.initial_threshold > 0, f"initial_threshold must be positive, got {config.initial_threshold}")
        check_target(config)

    def linear_form(self, coder):
        return "jumprelu", self.threshold(), None

    def __init__(self, config: DecomposerConfig):
        self.l0_coefficient = config.l0_coefficient
        self.l0_warmup_steps = config.l0_warmup_steps
        self.bandwidth = config.bandwidth
        self.log_threshold = nnx.Param(jnp.full((config.n_features,), math.log(config.initial_threshold), jnp.float32))
        self.step = Buffer(jnp.zeros((), jnp.int32))
        self.control = penalty_coefficient(config)  # with target_l0: a scale on every threshold, adapted to the target

    def threshold(self) -> jax.Array:
        return jnp.exp(self.log_threshold[...]) * self.control.scale()

    def train_codes(self, coder, x, z0, batch) -> Codes:
        return jumprelu(coder.biased(z0), self.threshold(), self.bandwidth)

    def infer_codes(self, coder, x, z0, grad) -> Codes:
        pre = coder.biased(z0)
        return pre * (pre > self.threshold()).astype(pre.dtype)

    def init_from_data(self, coder, x, y) -> None:
        """With a target L0: thresholds where the sample fires target_l0 latents per row (thresholds are
        positive: a latent positive on fewer rows than its share starts at MIN_THRESHOLD)."""
        levels = self.control.start_levels(coder.preacts(x[:START_ROWS]))
        if levels is not None:
            self.log_threshold[...] = jnp.log(jnp.maximum(levels, MIN_THRESHOLD) / self.control.scale())

    def penalty(self, coder, x, z0, codes, err, optional=True):
        l0 = jnp.mean(jnp.sum(heaviside(coder.biased(z0), self.threshold(), self.bandwidth), axis=-1))
        coef = self.l0_coefficient * warmup(self.step[...], self.l0_warmup_steps)
        return coef * l0, {"l0_coefficient": coef, **self.control.metrics()}

    def after_step(self, metrics) -> None:
        self.control.update(metrics["l0"], self.step[...])
        self.step[...] = self.step[...] + 1

    def fold(self, code_scale: float) -> None:
        self.log_threshold[...] = self.log_threshold[...] + math.log(code_scale)


@dataclasses.dataclass
class JumpReLUConfig(JumpReLUFields, TargetL0Fields, SparseCoderConfig):
    mechanism_cls: ClassVar[type[Sparsity]] = JumpReLUSparsity


@register
class JumpReLUSAE(SparseCoder):
    """Sparse autoencoder with learned per-latent thresholds and an L0 penalty."""

    kind: ClassVar[str] = "jumprelu"
    config_cls: ClassVar[type[DecomposerConfig]] = JumpReLUConfig
    example: ClassVar[dict] = {"hookpoint_in": "resid_post", "expansion": 2, "initial_threshold": 0.05, "bandwidth": 0.1}
