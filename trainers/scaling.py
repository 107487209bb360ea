"""Input scaling: train on activations rescaled to unit mean squared norm.

Residual streams of different models and layers differ in norm by orders of magnitude (SmolLM2 layer 10:
about 145); scaling them to E||s x||^2 = 1 lets one learning rate and one set of sparsity coefficients
work everywhere. The scale is folded back into the weights at save time (`Decomposer.fold_input_scale`).
"""

from __future__ import annotations

import numpy as np


def input_scale(sample: np.ndarray) -> float:
    """The factor s with mean over rows of ||s * x||^2 equal to 1, from a (rows, d) sample."""
    sample = np.asarray(sample)
    if sample.ndim != 2 or sample.shape[0] == 0:
        raise ValueError(f"need a non-empty (rows, d) sample to estimate the input scale, got shape {sample.shape}")
    mean_sq = float(np.mean(np.sum(np.square(sample, dtype=np.float64), axis=1)))
    if not np.isfinite(mean_sq):
        raise ValueError("the activation sample holds non-finite values (inf or nan); the cache is unusable for training")
    if mean_sq <= 0.0:
        raise ValueError("the activation sample is all zeros; cannot scale it to unit mean squared norm")
    return float(1.0 / np.sqrt(mean_sq))


def input_scales(sample: dict[str, np.ndarray], keys: list[str], enabled: bool = True) -> dict[str, float]:
    """One scale per activation key (1.0 for every key when scaling is disabled)."""
    return {k: input_scale(sample[k]) if enabled else 1.0 for k in keys}
