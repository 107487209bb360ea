"""Calibrate a steering strength by the KL divergence it causes, so different vectors compare fairly.

Usage (what `dictlearn steer` and the evaluation suite call):

    from dictlearn.steering.calibrate import calibrate_alpha, Calibration
    cal = calibrate_alpha(model, "resid_post.10", vector, prompt_ids, target_kl=0.5, sign=+1)
    # cal.alpha: signed strength; steer with  h + cal.alpha * vector / |vector|  at every position
    # cal.kl: the mean last-token KL(base || steered) it reaches; cal.n_forwards: steered forward passes used

- `vector` (d,) torch tensor or array in the hookpoint's space; it is normalised, so `alpha` is in units of
  the activation norm (`cal.activation_norm` is the mean norm of the activation on the prompts, for scale).
- `prompt_ids`: a list of token-id lists (any lengths) or a (B, T) tensor without padding.
- Steering adds to the real activation (h + alpha * v at every position): nothing is reconstructed or replaced.
- KL is the mean over prompts of KL(p_base || p_steered) of the next-token distribution after the
  last prompt token. The search brackets the target and interpolates in log(alpha)-log(KL) space (near
  zero KL grows as alpha^2), so it lands within `tol` (relative) of the target in a few forward passes.
  `converged` is False when `max_forwards` ran out or the KL saturated below the target (`saturated`: 16 times
  the strength gave under 5% more KL, as when a norm after the hookpoint renormalises what is added, e.g.
  `mlp_out_pre_norm` in Gemma / OLMo 2); the closest point found is returned then. Callers must report it.

To calibrate many vectors or targets on the same prompts, build one `KLCalibrator` (it caches the base
logits) and call `calibrate` / `calibrate_targets` on it; targets of one vector share their evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import Hookpoint, capture, intervene, resolve


@dataclass(frozen=True)
class Calibration:
    alpha: float  # signed strength applied to the unit vector: h + alpha * v / |v|
    kl: float  # mean last-token KL(base || steered) reached
    n_forwards: int  # steered forward passes this calibration used (the cached base pass not counted)
    target_kl: float
    sign: int
    converged: bool  # |kl - target| <= tol * target; when False, the closest point found is returned
    activation_norm: float  # mean norm of the hookpoint activation on the prompts (alpha's natural scale)
    saturated: bool = False  # the KL stopped growing with the strength below the target (e.g. a later norm
    # renormalises what is added), so the search stopped early: the target cannot be reached here

    @property
    def relative_error(self) -> float:
        return abs(self.kl - self.target_kl) / self.target_kl

    @property
    def warning(self) -> str | None:
        """The sentence every caller shows when the target was not reached (None when it was)."""
        if self.converged:
            return None
        reached = f"the closest strength reaches KL {self.kl:.3g}, {self.relative_error:.0%} away from the target {self.target_kl:g}"
        if self.saturated:
            return (f"KL calibration cannot reach its target: {reached}, and more strength barely moves it (what is "
                    "added at this hookpoint is renormalised downstream, e.g. by a post-norm); steer where the block "
                    "adds to the residual stream (attn_out / mlp_out / resid_*) or pick a lower target")
        return (f"KL calibration did not converge in {self.n_forwards} forward passes: {reached}; "
                "allow more forward passes or pick another target")


def unit(vector) -> torch.Tensor:
    """The vector as a float32 torch unit vector; ValueError for a zero or non-finite one."""
    v = vector if isinstance(vector, torch.Tensor) else torch.from_numpy(np.array(vector, dtype=np.float32))
    v = v.detach().float().reshape(-1)
    n = float(v.norm())
    if not math.isfinite(n) or n == 0.0:
        raise ValueError("the steering vector is zero or not finite; pick a feature with a non-zero direction")
    return v / n


def add_vector(vector: torch.Tensor, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn for `hookpoints.intervene`: adds alpha * vector to the activation at every position."""
    delta = alpha * vector

    def fn(h: torch.Tensor) -> torch.Tensor:
        return h + delta.to(device=h.device, dtype=h.dtype)

    return fn


def pad_right(prompts, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded ids and (B,) lengths. With causal attention, right padding changes nothing at
    the real positions, so no attention mask or position ids are needed to read the last real token."""
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompt_ids must be (B, T) with T > 0, got shape {tuple(prompts.shape)}")
        return prompts.long(), torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.long)
    seqs = [list(map(int, p)) for p in prompts]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token-id lists")
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, lengths


def kl_divergence(base_logprobs: torch.Tensor, steered_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities (B, V) -> (B,)."""
    return (base_logprobs.exp() * (base_logprobs - steered_logprobs)).sum(-1)


@dataclass
class _Point:
    alpha: float  # magnitude (>= 0)
    kl: float


class KLCalibrator:
    """Caches the base next-token distributions of a fixed prompt set at one hookpoint of one model."""

    def __init__(self, model: torch.nn.Module, hookpoint: str | Hookpoint, prompt_ids, pad_id: int = 0):
        self.model = model
        self.hookpoint = resolve(model, hookpoint, probe_widths=False)[0] if isinstance(hookpoint, str) else hookpoint
        device = next(model.parameters()).device
        self.ids, self.lengths = pad_right(prompt_ids, pad_id)
        self.ids, self.lengths = self.ids.to(device), self.lengths.to(device)
        with torch.no_grad(), capture(model, [self.hookpoint]) as acts:
            self.base_logprobs = self._last_logprobs(model(input_ids=self.ids, use_cache=False).logits)
        act = acts[self.hookpoint.name].float()
        T = act.shape[1]
        # mean activation norm over real tokens, leaving out position 0 (its norm is an outlier)
        mask = (torch.arange(T, device=device)[None, :] < self.lengths[:, None]) & (torch.arange(T, device=device)[None, :] > 0)
        if not bool(mask.any()):
            mask = torch.arange(T, device=device)[None, :] < self.lengths[:, None]
        self.activation_norm = float(act.norm(dim=-1)[mask].mean())
        self.width = int(act.shape[-1])
        self.forwards = 0  # steered forward passes run so far
        self._last: tuple[torch.Tensor, float, torch.Tensor] | None = None  # the latest steered pass

    def _last_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return torch.log_softmax(logits[rows, self.lengths - 1].float(), dim=-1)

    def steered_logprobs(self, direction: torch.Tensor, alpha: float) -> torch.Tensor:
        """(B, V) next-token log-probs after the last prompt token with h + alpha * direction everywhere."""
        if direction.shape != (self.width,):
            raise ValueError(f"steering vector has shape {tuple(direction.shape)}; "
                             f"hookpoint {self.hookpoint.name} has width {self.width}")
        if self._last is not None and self._last[0] is direction and self._last[1] == float(alpha):
            return self._last[2]
        with torch.no_grad(), intervene(self.model, self.hookpoint, add_vector(direction, alpha)):
            out = self._last_logprobs(self.model(input_ids=self.ids, use_cache=False).logits)
        self.forwards += 1
        self._last = (direction, float(alpha), out)
        return out

    def kl(self, direction: torch.Tensor, alpha: float) -> float:
        """Mean last-token KL(base || steered) at strength alpha along a unit direction (one forward)."""
        if alpha == 0.0:
            return 0.0
        return float(kl_divergence(self.base_logprobs, self.steered_logprobs(direction, alpha)).mean())

    def calibrate(self, vector, target_kl: float, sign: int = 1, tol: float = 0.02, max_forwards: int = 16) -> Calibration:
        return self.calibrate_targets(vector, [target_kl], sign, tol, max_forwards)[0]

    def calibrate_targets(
        self, vector, targets: Sequence[float], sign: int = 1, tol: float = 0.02, max_forwards: int = 16
    ) -> list[Calibration]:
        """One Calibration per target for one vector and sign; evaluations are shared between targets."""
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        if tol <= 0 or max_forwards < 1:
            raise ValueError(f"need tol > 0 and max_forwards >= 1, got tol={tol}, max_forwards={max_forwards}")
        for t in targets:
            if not (t > 0 and math.isfinite(t)):
                raise ValueError(f"KL targets must be positive, got {t}")
        direction = unit(vector).to(self.base_logprobs.device)
        points: list[_Point] = []
        return [self._search(direction, float(t), sign, tol, max_forwards, points) for t in targets]

    def _search(self, direction, target, sign, tol, max_forwards, points: list[_Point]) -> Calibration:
        used = 0
        while True:
            hit = [p for p in points if abs(p.kl - target) <= tol * target]
            saturated = not hit and _saturated(points, target)
            if hit or saturated or used >= max_forwards:
                pool = hit or points
                best = min(pool, key=lambda p: abs(p.kl - target))
                return Calibration(sign * best.alpha, best.kl, used, target, sign, bool(hit), self.activation_norm,
                                   saturated)
            alpha = self._next_alpha(points, target)
            points.append(_Point(alpha, self.kl(direction, sign * alpha)))
            used += 1

    def _next_alpha(self, points: list[_Point], target: float) -> float:
        below = [p for p in points if p.kl < target]
        above = [p for p in points if p.kl > target]
        lo = max(below, key=lambda p: p.alpha) if below else None
        hi = min(above, key=lambda p: p.alpha) if above else None
        if lo is not None and hi is not None and lo.alpha < hi.alpha:
            if lo.kl <= 0.0:  # cannot interpolate in log space from a zero KL
                return math.sqrt(lo.alpha * hi.alpha) if lo.alpha > 0 else hi.alpha / 4
            la, ha = math.log(lo.alpha), math.log(hi.alpha)
            lk, hk, t = math.log(lo.kl), math.log(hi.kl), math.log(target)
            x = la + (t - lk) * (ha - la) / (hk - lk)
            margin = 0.1 * (ha - la)  # keep clear of the bracket ends (a plain bisection step in the worst case)
            return math.exp(min(max(x, la + margin), ha - margin))
        if lo is not None and hi is not None:  # not monotone here: bisect between them
            return 0.5 * (lo.alpha + hi.alpha)
        if lo is not None:  # below target only: extrapolate with KL ~ alpha^2, at most 4x per step
            return lo.alpha * (4.0 if lo.kl <= 0 else min(4.0, math.sqrt(target / lo.kl)))
        if hi is not None:
            return hi.alpha * max(0.25, math.sqrt(target / hi.kl))
        # first guess: on SmolLM2's residual stream KL 0.5 needs about 0.3 of the activation norm
        return 0.3 * self.activation_norm * math.sqrt(target / 0.5)


def _saturated(points: list[_Point], target: float) -> bool:
    """True when every point is below the target and 16x the strength of one gave under 5% more KL (where KL
    grows like alpha^2 that would be 256x): more strength will not reach the target."""
    if not points or any(p.kl >= target for p in points):
        return False
    top = max(points, key=lambda p: p.alpha)
    return any(p.alpha > 0 and top.alpha >= 16 * p.alpha and top.kl <= 1.05 * p.kl for p in points)


def calibrate_alpha(
    model: torch.nn.Module,
    hookpoint: str | Hookpoint,
    vector,
    prompt_ids,
    target_kl: float,
    sign: int = 1,
    tol: float = 0.02,
    max_forwards: int = 16,
) -> Calibration:
    """Signed alpha so that h + alpha * v/|v| at `hookpoint` gives mean last-token KL(base||steered) ~= target_kl."""
    return KLCalibrator(model, hookpoint, prompt_ids).calibrate(vector, target_kl, sign, tol, max_forwards)
