"""The steered runs of one evaluation: every vector calibrated once (both signs, every KL target), and each
(vector, KL target, sign) generated and read back once, however many curves use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from dictlearn.activations.hookpoints import Hookpoint, n_layers, resolve
from dictlearn.eval.steering.config import SteeringConfig
from dictlearn.eval.steering.features import pooled_codes, steering_site, vocab_projections
from dictlearn.eval.steering.judges import distinct_bigram_share
from dictlearn.eval.steering.prompts import generate_continuations
from dictlearn.eval.steering.reading import read_sequences
from dictlearn.steering.calibrate import Calibration, KLCalibrator, unit
from dictlearn.steering.prompts import NEUTRAL_PROMPTS

VectorKey = tuple  # ("feature", decomposer, id) | ("diffmean", hookpoint, concept) | ("random", hookpoint, i)


@dataclass
class Generations:
    """Continuations and what the unsteered model reads in them."""

    continuations: list[list[int]]
    texts: list[str]
    loss: np.ndarray  # (N,) per-token loss of each continuation under the unsteered model
    bigram: np.ndarray  # (N,) distinct-bigram share of each continuation
    probe_x: np.ndarray | None  # (N, d) mean activation at the probe hookpoint
    feature_means: dict[str, np.ndarray]  # decomposer name -> (N, tracked features) mean codes
    calibration: Calibration | None = None


class SteeringRuns:
    """The model, the prompts and the sites of one evaluation, with its calibrated vectors and cached runs."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, decomposers: dict[str, Any], cfg: SteeringConfig,
                 log: Callable[[str], None]):
        self.model, self.tok, self.decs, self.cfg, self.log = model, tokenizer, decomposers, cfg, log
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sites = {n: steering_site(model, d) for n, d in decomposers.items()}
        self.hp_in = {n: resolve(model, d.config.hookpoint_in)[0] for n, d in decomposers.items()}
        steer_names = list(dict.fromkeys([hp.name for hp, _ in self.sites.values()] + list(cfg.hookpoints)))
        self.steer_hps: dict[str, Hookpoint] = {h.name: h for h in resolve(model, steer_names)} if steer_names else {}
        self.probe_hp = resolve(model, cfg.probe_hookpoint or f"resid_post.{n_layers(model) // 2}")[0]
        self.prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in NEUTRAL_PROMPTS[: cfg.n_prompts]]
        self.calibrators = {n: KLCalibrator(model, h, self.prompts) for n, h in self.steer_hps.items()}
        self.tracked: dict[str, np.ndarray] = {n: np.zeros(0, int) for n in decomposers}  # features read back
        self.feature_max: dict[str, np.ndarray] = {}
        self.vectors: dict[VectorKey, tuple[str, torch.Tensor]] = {}  # key -> (hookpoint, unit vector)
        self.cals: dict[VectorKey, dict[int, list[Calibration]]] = {}  # key -> sign -> one per KL target
        self._runs: dict[tuple, Generations] = {}
        self._vocab: dict[str, np.ndarray | None] = {}

    @property
    def repeated_prompts(self) -> list[list[int]]:
        """The neutral prompts, each repeated samples_per_prompt times (the continuations' order)."""
        return [p for p in self.prompts for _ in range(self.cfg.samples_per_prompt)]

    # -- generation and reading
    def generate(self, prompts: list[list[int]], n_samples: int, seed: int,
                 steer: tuple[Hookpoint, torch.Tensor, float] | None = None) -> list[list[int]]:
        c = self.cfg
        return generate_continuations(self.model, prompts, n_samples, c.max_new_tokens, c.temperature, c.top_p, seed,
                                      self.pad_id, steer, c.batch_size)

    def read_generations(self, conts: list[list[int]], prompts: list[list[int]], with_features: bool = True) -> Generations:
        """Read continuations (after their prompts) with the unsteered model: loss, probe activation and the
        tracked features' mean codes."""
        seqs = [p + c for p, c in zip(prompts, conts)]
        starts = [len(p) for p in prompts]
        hps = {self.probe_hp.name: self.probe_hp}
        if with_features:
            hps.update({h.name: h for h in self.hp_in.values()})
        read = read_sequences(self.model, seqs, starts, list(hps.values()),
                              keep_tokens=[h.name for h in self.hp_in.values()] if with_features else [],
                              with_loss=True, batch_size=max(1, self.cfg.batch_size // 2))
        means = {}
        if with_features:
            for n, d in self.decs.items():
                means[n] = pooled_codes(d, read.tokens[self.hp_in[n].name], self.tracked[n])[0]
        texts = [self.tok.decode(c, skip_special_tokens=True) for c in conts]
        return Generations(conts, texts, read.loss, np.array([distinct_bigram_share(c) for c in conts]),
                           read.pooled[self.probe_hp.name], means)

    # -- vectors and steered runs
    def add_vector(self, key: VectorKey, hp_name: str, vector: Any) -> None:
        """Calibrate a vector at every KL target and both signs (once per key)."""
        if key in self.vectors:
            return
        v = unit(vector)
        self.vectors[key] = (hp_name, v)
        cal = self.calibrators[hp_name]
        self.cals[key] = {s: cal.calibrate_targets(v, self.cfg.kl_targets, s, self.cfg.tol, self.cfg.max_forwards)
                          for s in (1, -1)}

    def calibration(self, key: VectorKey, target: float, sign: int) -> Calibration:
        return self.cals[key][sign][self.cfg.kl_targets.index(target)]

    def run(self, key: VectorKey, target: float, sign: int) -> Generations:
        """Continuations steered by the vector at its calibrated strength for (target, sign), read back."""
        rk = (key, target, sign)
        if rk not in self._runs:
            hp_name, v = self.vectors[key]
            cal = self.calibration(key, target, sign)
            conts = self.generate(self.prompts, self.cfg.samples_per_prompt, self.cfg.seed,
                                  (self.steer_hps[hp_name], v, cal.alpha))
            g = self.read_generations(conts, self.repeated_prompts)
            g.calibration = cal
            self._runs[rk] = g
        return self._runs[rk]

    def random_runs(self, hp_name: str, target: float, sign: int) -> list[Generations]:
        return [self.run(("random", hp_name, r), target, sign) for r in range(self.cfg.n_random)]

    def output_mass(self, key: VectorKey, tokens: np.ndarray, target: float, sign: int) -> float:
        """Probability the steered next-token distributions put on `tokens`, minus the unsteered ones'."""
        hp_name, v = self.vectors[key]
        calib = self.calibrators[hp_name]
        cal = self.calibration(key, target, sign)
        idx = torch.as_tensor(tokens, dtype=torch.long)
        steered = calib.steered_logprobs(v, cal.alpha)[:, idx].exp().sum(-1)
        base = calib.base_logprobs[:, idx].exp().sum(-1)
        return float((steered - base).mean())

    def vocab_projection(self, name: str, feature: int) -> np.ndarray | None:
        """A tracked feature's (vocab,) logit-lens projection (None where it does not reach the logits)."""
        if name not in self._vocab:
            hp, dirs = self.sites[name]
            self._vocab[name] = vocab_projections(self.model, hp.name, dirs[self.tracked[name]])
        proj = self._vocab[name]
        return None if proj is None else proj[int(np.flatnonzero(self.tracked[name] == feature)[0])]
