"""A minimal Adam loop over the decomposer protocol, for tests that must not depend on trainers/.

Same hook order as the SGD trainer: loss_and_grads, project_grads, Adam, after_step.
Steps run inside one jitted lax.scan, so a few hundred small steps cost well under a second."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def train(model, data: dict[str, np.ndarray], steps: int, batch_size: int, lr: float = 1e-3, seed: int = 0,
          init: bool = True, decay: bool = False) -> dict[str, np.ndarray]:
    """(Optionally) init from a data sample, then `steps` Adam steps on random minibatches, updating
    `model` in place; returns every step's metrics, stacked (index -1 for the last step).
    decay: the learning rate falls linearly to a tenth over the last 40% of the steps."""
    rows = next(iter(data.values())).shape[0]
    if init:
        model.init_from_data(jnp.asarray(data["x"][:2048]), jnp.asarray(data["y"][:2048]))
    schedule = lr
    if decay:
        hold = int(steps * 0.6)
        schedule = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, lr / 10, steps - hold)], [hold])
    opt = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    graph, state = nnx.split((model, opt))
    idx = np.random.default_rng(seed).integers(0, rows, (steps, batch_size))
    batches = {k: jnp.asarray(v[idx]) for k, v in data.items()}

    def one(state, batch):
        model, opt = nnx.merge(graph, state)
        (loss, metrics), grads = model.loss_and_grads(batch)
        opt.update(model, model.project_grads(grads))
        model.after_step(metrics)
        return nnx.state((model, opt)), {**metrics, "loss": loss}

    state, metrics = jax.jit(lambda s, b: jax.lax.scan(one, s, b))(state, batches)
    nnx.update((model, opt), state)
    return jax.device_get(metrics)
