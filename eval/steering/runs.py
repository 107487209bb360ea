"""The steered runs of one evaluation: every vector calibrated once (each scored sign, every KL target), and
each (vector, KL target, sign) generated and read back once, however many curves use it.

`generate_all` generates many conditions in shared batches (each row carries its own steering and random
stream, `prompts.generate_rows`) and reads them back in shared batches, so a condition's continuations are
the same whether it is generated alone (`run`) or with all the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import Hookpoint, n_layers, resolve
from dictlearn.eval.steering.config import SteeringConfig
from dictlearn.eval.steering.features import pooled_codes, steering_site, vocab_projections
from dictlearn.eval.steering.judges import distinct_bigram_share
from dictlearn.eval.steering.prompts import Row, generate_rows, sample_rows
from dictlearn.eval.steering.reading import read_sequences
from dictlearn.steering.calibrate import Calibration, KLCalibrator, unit
from dictlearn.steering.prompts import NEUTRAL_PROMPTS

VectorKey = tuple  # ("feature", decomposer, id) | ("diffmean", hookpoint, concept) | ("random", hookpoint, i)
UNSTEERED: VectorKey = ("unsteered",)  # the unsteered model (no vector; KL target None, sign 0)
Condition = tuple  # (VectorKey, KL target, sign)
BASE: Condition = (UNSTEERED, None, 0)
READ_CHUNK = 256  # continuations read back per chunk (their per-token activations are dropped after each)
READ_BATCH = 16  # sequences per reading forward: bigger batches only grow the (B, T, vocab) logits, no faster


@dataclass
class Generations:
    """Continuations and what the unsteered model reads in them (prompt-major: row r is prompt
    r // samples_per_prompt, sample r % samples_per_prompt)."""

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
        self.prompt_texts = list(NEUTRAL_PROMPTS[: cfg.n_prompts])
        self.prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in self.prompt_texts]
        self.calibrators = {n: KLCalibrator(model, h, self.prompts) for n, h in self.steer_hps.items()}
        self.tracked: dict[str, np.ndarray] = {n: np.zeros(0, int) for n in decomposers}  # features read back
        self.sampled: dict[str, list[int]] = {n: [] for n in decomposers}  # the feature curve's features
        self.feature_max: dict[str, np.ndarray] = {}
        self.vectors: dict[VectorKey, tuple[str, torch.Tensor]] = {}  # key -> (hookpoint, unit vector)
        self.cals: dict[VectorKey, dict[int, list[Calibration]]] = {}  # key -> sign -> one per KL target
        self._runs: dict[Condition, Generations] = {}
        self._vocab: dict[str, np.ndarray | None] = {}

    @property
    def repeated_prompts(self) -> list[list[int]]:
        """The neutral prompts, each repeated samples_per_prompt times (the continuations' order)."""
        return [p for p in self.prompts for _ in range(self.cfg.samples_per_prompt)]

    # -- generation and reading
    def generate(self, rows: Sequence[Row]) -> list[list[int]]:
        c = self.cfg
        return generate_rows(self.model, rows, c.max_new_tokens, c.temperature, c.top_p, self.pad_id, c.batch_size)

    def read_generations(self, conts: list[list[int]], prompts: list[list[int]],
                         code_rows: dict[str, np.ndarray] | None = None) -> Generations:
        """Read continuations (after their prompts) with the unsteered model, READ_CHUNK at a time: loss, probe
        activation and, for the rows code_rows[name] selects (bool (N,)), decomposer `name`'s tracked features'
        mean codes (feature_means[name] holds those rows only, in order)."""
        code_rows = {n: np.asarray(m, bool) for n, m in (code_rows or {}).items() if np.any(m)}
        keep = list(dict.fromkeys(self.hp_in[n].name for n in code_rows))
        hps = {self.probe_hp.name: self.probe_hp, **{self.hp_in[n].name: self.hp_in[n] for n in code_rows}}
        loss, probe_x, means = [], [], {n: [] for n in code_rows}
        for a in range(0, len(conts), READ_CHUNK):
            b = min(len(conts), a + READ_CHUNK)
            seqs = [p + c for p, c in zip(prompts[a:b], conts[a:b])]
            read = read_sequences(self.model, seqs, [len(p) for p in prompts[a:b]], list(hps.values()),
                                  keep_tokens=keep, with_loss=True, batch_size=min(READ_BATCH, self.cfg.batch_size))
            loss.append(read.loss)
            probe_x.append(read.pooled[self.probe_hp.name])
            for n, rows in code_rows.items():
                sel = np.flatnonzero(rows[a:b])
                if len(sel):
                    toks = read.tokens[self.hp_in[n].name]
                    means[n].append(pooled_codes(self.decs[n], [toks[i] for i in sel], self.tracked[n])[0])
        texts = [self.tok.decode(c, skip_special_tokens=True) for c in conts]
        return Generations(conts, texts, np.concatenate(loss), np.array([distinct_bigram_share(c) for c in conts]),
                           np.concatenate(probe_x), {n: np.concatenate(v) for n, v in means.items()})

    def judge_negatives(self, prompts: list[list[int]], n_samples: int, seed: int) -> Generations:
        """Unsteered continuations of other prompts, read at the probe hookpoint only."""
        conts = self.generate(sample_rows(prompts, n_samples, seed))
        return self.read_generations(conts, [p for p in prompts for _ in range(n_samples)])

    # -- vectors and steered runs
    def add_vector(self, key: VectorKey, hp_name: str, vector: Any) -> None:
        """Calibrate a vector at every KL target and each scored sign (once per key)."""
        if key in self.vectors:
            return
        v = unit(vector)
        self.vectors[key] = (hp_name, v)
        cal = self.calibrators[hp_name]
        self.cals[key] = {s: cal.calibrate_targets(v, self.cfg.kl_targets, s, self.cfg.tol, self.cfg.max_forwards)
                          for s in self.cfg.signs}

    def calibration(self, key: VectorKey, target: float, sign: int) -> Calibration:
        return self.cals[key][sign][self.cfg.kl_targets.index(target)]

    def conditions(self) -> list[Condition]:
        """The unsteered run and every vector at every (KL target, scored sign)."""
        return [BASE] + [(k, t, s) for k in self.vectors for s in self.cfg.signs for t in self.cfg.kl_targets]

    def _rows(self, cond: Condition) -> list[Row]:
        key, target, sign = cond
        steer = None
        if key != UNSTEERED:
            hp_name, v = self.vectors[key]
            steer = (self.steer_hps[hp_name], float(self.calibration(key, target, sign).alpha) * v)
        return sample_rows(self.prompts, self.cfg.samples_per_prompt, self.cfg.seed, steer)

    def _reads_codes(self, cond: Condition, name: str) -> bool:
        """Whether decomposer `name`'s feature curve (when it has sampled features) reads its codes in this
        condition's continuations: its own features, the random directions at its site, and the unsteered run."""
        key = cond[0]
        if not self.sampled[name]:
            return False
        if key == UNSTEERED:
            return True
        if key[0] == "feature":
            return key[1] == name
        return key[0] == "random" and key[1] == self.sites[name][0].name

    def generate_all(self, conds: Sequence[Condition] | None = None) -> None:
        """Generate and read back every condition not yet run (default: all), in shared batches."""
        todo = [c for c in dict.fromkeys(conds if conds is not None else self.conditions()) if c not in self._runs]
        if not todo:
            return
        per = len(self.prompts) * self.cfg.samples_per_prompt
        rows = [r for c in todo for r in self._rows(c)]
        self.log(f"steering: generating {len(todo)} conditions x {per} continuations of {self.cfg.max_new_tokens} "
                 f"tokens in batches of {self.cfg.batch_size}")
        conts = self.generate(rows)
        self.log(f"steering: reading back {len(rows)} continuations")
        code_rows = {n: np.repeat([self._reads_codes(c, n) for c in todo], per) for n in self.decs}
        g = self.read_generations(conts, self.repeated_prompts * len(todo), code_rows)
        offsets = {n: np.concatenate([[0], np.cumsum(np.repeat([self._reads_codes(c, n) for c in todo], per))])
                   for n in code_rows}
        for i, c in enumerate(todo):
            a, b = i * per, (i + 1) * per
            means = {n: g.feature_means[n][offsets[n][a]: offsets[n][b]] for n in g.feature_means
                     if self._reads_codes(c, n)}
            self._runs[c] = Generations(conts[a:b], g.texts[a:b], g.loss[a:b], g.bigram[a:b], g.probe_x[a:b], means,
                                        None if c == BASE else self.calibration(*c))

    def run(self, key: VectorKey, target: float | None, sign: int) -> Generations:
        """Continuations steered by the vector at its calibrated strength for (target, sign), read back
        (UNSTEERED, None, 0: the unsteered ones); generated alone unless `generate_all` did it already."""
        cond = (key, target, sign)
        self.generate_all([cond])
        return self._runs[cond]

    @property
    def base(self) -> Generations:
        return self.run(*BASE)

    def runs(self) -> dict[Condition, Generations]:
        """Every condition run so far."""
        return dict(self._runs)

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
