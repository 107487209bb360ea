"""optax Adam with linear warm-up and an optional decay over the end of training.

The schedule is: linear warm-up from 0 to `lr` over `warmup_steps`, constant, then (decay = "linear"
or "cosine") a decay to `lr * final_lr_fraction` over the last `decay_fraction` of the steps.
Parameters and optimiser moments are float32 whatever the cache dtype (the trainer checks).
"""

from __future__ import annotations

import optax

DECAYS = ("none", "linear", "cosine")


def lr_schedule(
    lr: float,
    n_steps: int,
    warmup_steps: int = 0,
    decay: str = "linear",
    decay_fraction: float = 0.2,
    final_lr_fraction: float = 0.0,
) -> optax.Schedule:
    """Warm-up, constant, decay; step counts are optimiser updates."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must lie in [0, 1], got {decay_fraction}")
    warmup = max(0, min(warmup_steps, n_steps))
    decay_steps = 0 if decay == "none" else int(round(decay_fraction * n_steps))
    decay_steps = min(decay_steps, n_steps - warmup)
    flat_steps = n_steps - warmup - decay_steps
    end = lr * final_lr_fraction
    parts: list[optax.Schedule] = []
    boundaries: list[int] = []
    if warmup > 0:
        parts.append(optax.linear_schedule(0.0, lr, warmup))
        boundaries.append(warmup)
    parts.append(optax.constant_schedule(lr))
    if decay_steps > 0:
        boundaries.append(warmup + flat_steps)
        if decay == "linear":
            parts.append(optax.linear_schedule(lr, end, decay_steps))
        else:
            parts.append(optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_fraction))
    return optax.join_schedules(parts, boundaries) if boundaries else parts[0]


def adam(
    schedule: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """Adam on the schedule, with global-norm gradient clipping first when grad_clip > 0."""
    tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx
