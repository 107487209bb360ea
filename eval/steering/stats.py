"""Statistics of steering: rate comparisons and intervals, detection AUC, the combined score and a
None-tolerant mean."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy import stats


def compare_rates(k_a: int, n_a: int, k_b: int, n_b: int, alternative: str = "greater") -> dict[str, float]:
    """Is rate a = k_a/n_a larger than rate b (alternative "greater"; "less" for smaller)?

    Fisher's exact test on the 2x2 table (the p-value the suite reports) and the pooled two-proportion z test."""
    if not (0 <= k_a <= n_a and 0 <= k_b <= n_b and n_a > 0 and n_b > 0):
        raise ValueError(f"need 0 <= k <= n and n > 0, got {k_a}/{n_a} and {k_b}/{n_b}")
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    _, p_fisher = stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]], alternative=alternative)
    pa, pb = k_a / n_a, k_b / n_b
    pooled = (k_a + k_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = 0.0 if se == 0 else (pa - pb) / se
    p_z = float(stats.norm.sf(z) if alternative == "greater" else stats.norm.cdf(z)) if se > 0 else 1.0
    return {"rate_a": pa, "rate_b": pb, "diff": pa - pb, "p_fisher": float(p_fisher), "z": z, "p_z": p_z}


def wilson_interval(k: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a rate k/n: unlike the normal approximation it stays inside [0, 1] and is
    not empty at k = 0 or k = n (0 of 16 on-topic is not a rate of exactly 0). k may be fractional (a mean of
    rates over n continuations)."""
    if not (n > 0 and 0 <= k <= n and 0 < confidence < 1):
        raise ValueError(f"need n > 0, 0 <= k <= n and 0 < confidence < 1, got k={k}, n={n}, confidence={confidence}")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p, z2 = k / n, z * z / n
    centre = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n)) / (1 + z2)
    lo, hi = (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
    return lo, hi


def shift_p_value(steered: np.ndarray, reference: np.ndarray, sign: int) -> float:
    """One-sided Mann-Whitney p-value that `steered` is shifted in the direction of `sign` from `reference`
    (1.0 when every value is equal: no evidence either way)."""
    if np.ptp(np.r_[steered, reference]) == 0:
        return 1.0
    return float(stats.mannwhitneyu(steered, reference, alternative="greater" if sign > 0 else "less").pvalue)


def detection_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of scores (N, F) for separating positive rows (N,) bool from the rest (ties 1/2)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if scores.ndim == 1:
        scores = scores[:, None]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("detection AUC needs both positive and negative examples")
    ranks = stats.rankdata(scores, axis=0)
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two scores in [0, 1] (0 if either is 0: a method must do both)."""
    a, b = max(0.0, a), max(0.0, b)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def mean_or_none(xs: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none (a score that does not apply)."""
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None
