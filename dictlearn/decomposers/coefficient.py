"""Matched sparsity: a controller that scales a penalty mechanism's sparsity pressure until the running L0
reaches `target_l0` (docs/training.md, "Matched sparsity (target_l0)").

Papers compare dictionaries at matched L0, but a penalty kind's L0 is a consequence of its coefficient, the
data and the training budget. With `target_l0` set, a scale s = exp(log_scale) becomes training state (a
Buffer: saved, checkpointed, restored on resume), updated once per optimiser step, inside the jitted step:

  l0_ema    <- l0_ema + w * (l0 - l0_ema),   w = max(1 - EMA_DECAY, 1 / steps_taken)   (first step: l0)
  error      = log(l0_ema / target_l0) + HORIZON * (change of log l0_ema over the step)
  log_scale <- log_scale + gain * clip(error, -1, 1),   kept within +-log(1e4)

so the pressure rises while the running L0 is above the target and not already falling towards it at the
pace of HORIZON steps, and falls in the mirror case; by at most a factor exp(gain) per step. What the scale
multiplies is the mechanism's choice: ReLU's L1 coefficient (in place of its warm-up ramp), JumpReLU's
thresholds (its L0 coefficient cannot move them fast enough: with Adam a log-threshold moves about lr per
step whatever the coefficient). Without a target the coefficient follows its warm-up ramp and has no state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dictlearn.decomposers.sae import Buffer, check

EMA_DECAY = 0.9  # running L0: an exponential average over about 10 steps
HORIZON = 50.0  # steps: the pressure holds while log L0 approaches the target at this pace
SCALE_RANGE = math.log(1e4)  # the scale stays within 1e-4 .. 1e4
FLOOR = 1e-3  # L0 floor inside the logarithms (a dictionary with no active latent)
START_ROWS = 4096  # sample rows used to place the starting firing levels


@dataclasses.dataclass
class TargetL0Fields:
    """Matched sparsity for the penalty mechanisms."""

    target_l0: float | None = None  # active latents per token to reach by adapting the sparsity pressure; None: fixed coefficient
    target_l0_gain: float = 0.05  # controller gain: the log of the pressure moves by at most this much per step


def check_target(config) -> None:
    """Validate the target fields (ValueError naming the bad value)."""
    if config.target_l0 is None:
        return
    target = config.target_l0
    check(not isinstance(target, bool) and 0 < target <= config.n_features,
          f"target_l0 must be in (0, n_features = {config.n_features}] (active latents per token), got {target!r}")
    check(config.target_l0_gain > 0, f"target_l0_gain must be positive, got {config.target_l0_gain}")


def warmup(step: jax.Array, steps: int) -> jax.Array:
    """Linear ramp from 0 to 1 over `steps` optimiser steps (1 throughout when steps == 0)."""
    if steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(step.astype(jnp.float32) / steps, 1.0)


class RampedCoefficient(nnx.Module):
    """No target: the coefficient follows its linear warm-up ramp; no state of its own."""

    def __init__(self, value: float, warmup_steps: int):
        self.start = float(value)
        self.warmup_steps = warmup_steps

    def value(self, step: jax.Array) -> jax.Array:
        return self.start * warmup(step, self.warmup_steps)

    def scale(self) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def metrics(self) -> dict[str, jax.Array]:
        return {}

    def start_levels(self, pre: jax.Array) -> jax.Array | None:
        """No target, no data-dependent start."""
        return None

    def update(self, l0: jax.Array, step: jax.Array) -> None:
        """Nothing to adapt."""


class TargetedCoefficient(nnx.Module):
    """value * scale, the scale adapted each step until the running L0 reaches `target` (the module
    docstring's law); the controller's gradual change replaces the warm-up ramp."""

    def __init__(self, value: float, target: float, gain: float):
        self.start = float(value)
        self.target = float(target)
        self.gain = float(gain)
        self.log_scale = Buffer(jnp.zeros((), jnp.float32))
        self.l0_ema = Buffer(jnp.zeros((), jnp.float32))

    def value(self, step: jax.Array) -> jax.Array:
        return self.start * self.scale()

    def scale(self) -> jax.Array:
        return jnp.exp(self.log_scale[...])

    def metrics(self) -> dict[str, jax.Array]:
        """Logged each step: the running L0 and the controller's scale."""
        return {"l0_ema": self.l0_ema[...], "sparsity_scale": self.scale()}

    def start_levels(self, pre: jax.Array) -> jax.Array:
        """(n_features,) per-latent levels that `target` of the pre-activations pre (rows, n_features) exceed
        per row on average: each latent's largest rows * target / n_features values lie above its level.
        A mechanism starts firing there, so training begins at the target L0 instead of travelling to it."""
        rows, n = pre.shape
        k = max(1, min(rows - 1, round(rows * self.target / n)))
        top = jax.lax.top_k(jax.lax.stop_gradient(pre).T, k + 1)[0]
        return 0.5 * (top[:, k - 1] + top[:, k])

    def update(self, l0: jax.Array, step: jax.Array) -> None:
        """One controller step after an optimiser step; `step` counts the steps before this one."""
        old = self.l0_ema[...]
        weight = jnp.maximum(1.0 - EMA_DECAY, 1.0 / (step.astype(jnp.float32) + 1.0))
        ema = old + weight * (jax.lax.stop_gradient(l0).astype(jnp.float32) - old)
        log_ema = jnp.log(jnp.maximum(ema, FLOOR))
        rate = jnp.where(step > 0, log_ema - jnp.log(jnp.maximum(old, FLOOR)), 0.0)
        error = jnp.clip(log_ema - math.log(self.target) + HORIZON * rate, -1.0, 1.0)
        self.l0_ema[...] = ema
        self.log_scale[...] = jnp.clip(self.log_scale[...] + self.gain * error, -SCALE_RANGE, SCALE_RANGE)


def penalty_coefficient(config, value: float = 1.0, warmup_steps: int = 0) -> RampedCoefficient | TargetedCoefficient:
    """A mechanism's sparsity pressure `value` (a coefficient, or 1 for a scale on thresholds): adapted to
    config.target_l0 when it is set, else ramped over `warmup_steps` and fixed."""
    if config.target_l0 is None:
        return RampedCoefficient(value, warmup_steps)
    return TargetedCoefficient(value, config.target_l0, config.target_l0_gain)
