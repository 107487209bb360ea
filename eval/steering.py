"""Steering effectiveness, judged without a language-model judge: every vector at the same KL budget.

Entry point (called by eval/suite.py)::

    from dictlearn.eval.steering import SteeringConfig, evaluate_steering
    result = evaluate_steering(model, tokenizer, decomposers, cache, cfg)

Inputs
- model: the torch causal LM (`LoadedModel.model`); tokenizer: its tokenizer.
- decomposers: {name: Decomposer}. A decomposer steers at `config.hookpoint_out` along rows of
  `features()` (a decomposer may instead offer `steering_directions() -> (hookpoint, (n, d) array)`),
  and is re-read with `encode` on the activation at `config.hookpoint_in`.
- cache: an `ActivationCache` or None. Its eval shards (when they hold a decomposer's hookpoint_in) give
  each feature's firing frequency and max activation; otherwise labelled corpus windows do.
- cfg: `SteeringConfig` (below). `cfg.corpus` must name the labelled `.jsonl(.gz)` corpus when
  `cfg.concepts` is non-empty; `cfg.hookpoints` adds DiffMean/random sites when no decomposer steers there.

Output: a JSON-able dict
- "config": the config used (with the resolved probe hookpoint).
- "judges": {"classes", "probe_hookpoint", "heldout_accuracy": {probe, lexical, both_agree, ...},
  "n_train", "n_heldout", "base_rate": {concept: {probe, lexical, both, judged}} on unsteered continuations
  (judged = both agree and fluent)} or None without concepts.
- "unsteered": {"loss", "bigram_share", "n"}: the fluency reference.
- "records": {name: record} for every decomposer, plus "diffmean@<hp>" and "random@<hp>" per steering
  hookpoint. Every record has the same keys (None or [] where a field does not apply):
  - "kind" (decomposer kind | "diffmean" | "random"), "hookpoint" (where it steers)
  - "detection_auc": mean held-out AUC over concepts of the chosen feature (DiffMean: its projection)
  - "detection": {concept: {"feature", "auc_train", "auc"}}
  - "calibration": {"n_vectors", "n_forwards_mean", "rel_error_max", "converged_fraction",
    "alpha_over_norm": {target: {"+": mean |alpha|/activation norm, "-": ...}}} (both signs always)
  - "feature_curve": one entry per (sign, KL target) for the sampled live features (unsupervised):
    {"sign", "kl_target", "kl", "concept" (feature activation gain / its max activation, clipped to [0,1]),
    "concept_raw", "concept_gain_over_random", "significant_fraction" (Mann-Whitney vs random, p < cfg.alpha),
    "output_token_mass", "output_token_mass_random" (probability moved onto the top tokens of the
    feature's vocabulary projection, steered minus base), "loss_delta", "bigram_ratio", "fluency", "combined",
    "n_features"}; [] for DiffMean and random.
  - "concept_curve": one entry per (sign, KL target) for the supervised concepts:
    {"sign", "kl_target", "kl", "concept_rate" (judged on-topic share), "random_rate", "unsteered_rate",
    "gain_over_random", "p_value" (one-sided Fisher exact, pooled over concepts), "significant",
    "loss_delta", "bigram_ratio", "fluency", "combined", "n", "per_concept": {concept: {"rate", "k", "n",
    "random_rate", "k_random", "n_random", "unsteered_rate", "gain_over_random", "p_value", "kl", "loss_delta",
    "bigram_ratio", "fluency", "combined", "probe_rate", "lexical_rate", "both_rate", "fluent_share"}}}
    (the last four: the share each judge / the gates accept, to see which limits the judged rate)
  - "summary": the report's table row at KL `cfg.summary_kl` and sign +1: {"kl_target", "detection_auc",
    "concept_rate", "gain_over_random", "p_value", "fluency", "combined", "feature_concept",
    "feature_fluency", "feature_combined"}.
- "features": {name: [sampled feature ids]}.

For the report: per decomposer and per KL target plot concept / fluency / combined from "feature_curve"
(unsupervised) and "concept_curve" (supervised); tabulate "summary".

Scores. Fluency = exp(-max(0, loss_steered - loss_unsteered)) * min(1, bigram ratio / 0.8), in [0, 1];
concept (features) = activation gain / max activation; concept (supervised, sign +1) = judged rate;
sign -1: suppression relative to the random direction; combined = harmonic mean(concept, fluency).

Cost (generation dominates): per decomposer (n_features + len(concepts)) x len(kl_targets) x len(signs)
generation runs of n_prompts x samples_per_prompt continuations, plus the same per DiffMean and n_random
per hookpoint. A run of 32 continuations x 32 tokens (generate + re-read) costs about 15 CPU-seconds on
this 2-core machine (use one torch thread when the CPU is shared). Measured: 32 prompts x 4 samples x 32
tokens, 5 BBC topics, one hookpoint: about 9 CPU-minutes (32 minutes wall on the shared machine).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats

from dictlearn.activations.hookpoints import Hookpoint, intervene, n_layers, resolve
from dictlearn.steering.calibrate import Calibration, KLCalibrator, add_vector, unit
from dictlearn.eval.judges import (
    TOPICS,
    ConceptJudge,
    FluencyReference,
    compare_rates,
    detection_auc,
    distinct_bigram_share,
    harmonic_mean,
    load_labelled_documents,
    read_sequences,
    sample_windows,
    split_documents,
)

# Topic-neutral openings: steering is measured on what the model writes after them.
NEUTRAL_PROMPTS = (
    "I think that", "The best thing about", "Yesterday, I", "Here is what happened:", "In my opinion,",
    "She looked at the", "When I was young,", "The most important thing is", "Let me tell you about",
    "It was a", "We decided to", "There is something", "My favourite", "He said that", "This morning",
    "The problem with", "After a long day,", "Everyone knows that", "One of the", "I have always",
    "The story begins", "Last week,", "People often", "It is clear that", "At the end of the day,",
    "They told me", "I remember when", "The reason is", "If you want to", "Today we", "What I like most is",
    "The new",
)
# A disjoint set: unsteered continuations of these are the judges' "other" negatives.
JUDGE_PROMPTS = (
    "So", "Well,", "Once upon a time", "You know,", "The first", "It seems that", "As I", "There was a",
    "I would like to", "Many years ago,", "Note that", "Our", "Then", "A few", "Sometimes", "The following",
)


@dataclass
class SteeringConfig:
    """The `[eval.steering]` options."""

    kl_targets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    signs: list[int] = field(default_factory=lambda: [1])  # generation-scored signs (calibration: both)
    summary_kl: float = 0.5  # the KL target of the summary row (must be one of kl_targets)
    n_prompts: int = 16  # neutral prompts (first n of NEUTRAL_PROMPTS) for calibration and generation
    samples_per_prompt: int = 2
    max_new_tokens: int = 32
    temperature: float = 0.7  # sampled, not greedy (greedy continuations repeat)
    top_p: float = 1.0
    n_features: int = 4  # live features sampled per decomposer (unsupervised part; 0 skips it)
    output_top_k: int = 10  # top tokens of a feature's vocabulary projection
    concepts: list[str] = field(default_factory=lambda: list(TOPICS))  # [] skips the supervised part
    corpus: str = ""  # labelled .jsonl(.gz) corpus (source/id/text); needed for concepts
    hookpoints: list[str] = field(default_factory=list)  # extra DiffMean/random sites
    probe_hookpoint: str = ""  # "" : resid_post at half depth
    window_tokens: int = 32
    windows_per_class: int = 64  # training windows per concept (and 2x for "other")
    held_out_windows: int = 24  # held-out windows per class
    judge_samples_per_prompt: int = 2  # unsteered continuations of JUDGE_PROMPTS as negatives
    lexical_docs_per_label: int = 300  # training documents per label for the lexical judge
    probe_l2: float = 1.0
    n_random: int = 1  # random directions per hookpoint
    loss_margin: float = 1.0  # fluency gate: loss within this many nats of unsteered
    bigram_frac: float = 0.8  # fluency gate: distinct-bigram share at least this fraction of unsteered
    alpha: float = 0.05  # significance level
    tol: float = 0.02  # calibration: relative KL tolerance
    max_forwards: int = 16  # calibration: forward passes per target at most
    cache_rows: int = 20000  # eval-split cache rows for feature firing statistics
    batch_size: int = 32  # generation batch (reading uses half)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.kl_targets or any(not (t > 0) for t in self.kl_targets):
            raise ValueError(f"kl_targets must be positive numbers, got {self.kl_targets}")
        if self.summary_kl not in self.kl_targets:
            raise ValueError(f"summary_kl {self.summary_kl} must be one of kl_targets {self.kl_targets}")
        if not self.signs or any(s not in (1, -1) for s in self.signs):
            raise ValueError(f"signs must be a non-empty list of 1 and/or -1, got {self.signs}")
        if not 1 <= self.n_prompts <= len(NEUTRAL_PROMPTS):
            raise ValueError(f"n_prompts must be in 1..{len(NEUTRAL_PROMPTS)}, got {self.n_prompts}")
        for name in ("samples_per_prompt", "max_new_tokens", "window_tokens", "batch_size", "n_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.window_tokens < 4:
            raise ValueError(f"window_tokens must be at least 4, got {self.window_tokens}")
        if len(set(self.concepts)) != len(self.concepts) or "other" in self.concepts:
            raise ValueError(f"concepts must be distinct labels (not 'other'), got {self.concepts}")


# ----------------------------------------------------------------------------- generation

def generate_continuations(model: torch.nn.Module, prompt_ids: list[list[int]], n_samples: int, max_new_tokens: int,
                           temperature: float, top_p: float, seed: int, pad_id: int,
                           steer: tuple[Hookpoint, torch.Tensor, float] | None = None,
                           batch_size: int = 16) -> list[list[int]]:
    """Sampled continuations (exactly max_new_tokens each; end-of-text suppressed), prompt-major order.

    The same seed gives every condition the same random stream (common random numbers), so steered and
    unsteered runs differ by the steering only. `steer` = (hookpoint, unit vector, alpha) adds alpha * v at
    every position through `hookpoints.intervene`. The caller's torch RNG state is left untouched."""
    device = next(model.parameters()).device
    rows = [p for p in prompt_ids for _ in range(n_samples)]
    out: list[list[int]] = []
    ctx = intervene(model, steer[0], add_vector(steer[1], steer[2])) if steer else _null()
    with ctx, torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for b in range(0, len(rows), batch_size):
            batch = rows[b: b + batch_size]
            T = max(len(p) for p in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, p in enumerate(batch):  # left padding: generation continues from the right end
                ids[r, T - len(p):] = torch.tensor(p)
                mask[r, T - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=0, pad_token_id=pad_id)
            out.extend(gen[:, T:].cpu().tolist())
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------------------- helpers

def steering_site(model: torch.nn.Module, decomposer) -> tuple[Hookpoint, np.ndarray]:
    """Where a decomposer steers and its (n_features, width) directions there.

    Default: rows of `features()` at `hookpoint_out`. A decomposer may override with
    `steering_directions() -> (hookpoint, directions)`. Semi-NMF of `mlp_hidden.L` with stored residual
    directions steers at `mlp_out.L` along F^T W_out (`resid_features()`): the same change to the model as
    adding F's columns to the hidden activation, but in the residual space (so it has a vocabulary projection)."""
    hp_out = decomposer.config.hookpoint_out
    if hasattr(decomposer, "steering_directions"):
        hp_name, dirs = decomposer.steering_directions()
    elif (m := re.fullmatch(r"mlp_hidden\.(\d+)", hp_out)) and getattr(decomposer.config, "d_model", 0) > 0 \
            and hasattr(decomposer, "resid_features"):
        hp_name, dirs = f"mlp_out.{m.group(1)}", decomposer.resid_features()
    else:
        hp_name, dirs = hp_out, decomposer.features()
    hp = resolve(model, hp_name)[0]
    dirs = np.array(dirs, np.float32)
    if dirs.ndim != 2 or dirs.shape[1] != hp.width:
        raise ValueError(f"steering directions of shape {dirs.shape} do not fit hookpoint {hp.name} (width {hp.width})")
    return hp, dirs


def encode_np(decomposer, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """decomposer.encode on a numpy array, in batches, as float32 numpy."""
    import jax.numpy as jnp

    if len(x) == 0:
        return np.zeros((0, decomposer.config.n_features), np.float32)
    return np.concatenate([np.asarray(decomposer.encode(jnp.asarray(x[i: i + batch])), np.float32)
                           for i in range(0, len(x), batch)])


def pooled_codes(decomposer, token_acts: list[np.ndarray], cols: np.ndarray | None = None,
                 chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence mean code (N, F or len(cols)), plus per-feature max code and firing count over all tokens."""
    n_feat = decomposer.config.n_features
    width = n_feat if cols is None else len(cols)
    means = np.zeros((len(token_acts), width), np.float32)
    fmax, fired = np.zeros(n_feat, np.float32), np.zeros(n_feat, np.int64)
    i = 0
    while i < len(token_acts):
        j, rows = i, 0
        while j < len(token_acts) and (rows == 0 or rows + len(token_acts[j]) <= chunk_rows):
            rows += len(token_acts[j])
            j += 1
        codes = encode_np(decomposer, np.concatenate(token_acts[i:j]))
        fmax = np.maximum(fmax, codes.max(0))
        fired += (codes > 0).sum(0)
        sel = codes if cols is None else codes[:, cols]
        offs = np.cumsum([0] + [len(a) for a in token_acts[i:j]])
        for k in range(j - i):
            means[i + k] = sel[offs[k]: offs[k + 1]].mean(0)
        i = j
    return means, fmax, fired


def vocab_projection(model: torch.nn.Module, direction: np.ndarray) -> np.ndarray | None:
    """Logit-lens projection of a residual-stream direction (final norm gain, then unembedding); None if
    the direction does not live in the residual stream."""
    emb = model.get_output_embeddings()
    if emb is None or emb.weight.shape[1] != direction.shape[0]:
        return None
    modules = dict(model.named_modules())
    d = torch.as_tensor(direction, dtype=torch.float32)
    for name in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"):
        w = getattr(modules.get(name), "weight", None)
        if w is not None and w.shape == d.shape:
            d = d * w.detach().float().cpu()
            break
    return (emb.weight.detach().float().cpu() @ d).numpy()


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


@dataclass
class Generations:
    """Continuations and what the unsteered model reads in them."""

    continuations: list[list[int]]
    texts: list[str]
    loss: np.ndarray
    bigram: np.ndarray
    probe_x: np.ndarray | None
    feature_means: dict[str, np.ndarray]  # decomposer name -> (N, tracked features)
    calibration: Calibration | None = None


# ----------------------------------------------------------------------------- the evaluation

class _Evaluation:
    """State shared by the stages of one `evaluate_steering` call."""

    def __init__(self, model, tokenizer, decomposers, cache, cfg: SteeringConfig, log: Callable[[str], None]):
        self.model, self.tok, self.decs, self.cache, self.cfg, self.log = model, tokenizer, decomposers, cache, cfg, log
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sites = {n: steering_site(model, d) for n, d in decomposers.items()}
        self.hp_in = {n: resolve(model, d.config.hookpoint_in)[0] for n, d in decomposers.items()}
        steer_names = list(dict.fromkeys([hp.name for hp, _ in self.sites.values()] + list(cfg.hookpoints)))
        self.steer_hps = {h.name: h for h in resolve(model, steer_names)} if steer_names else {}
        self.probe_hp = resolve(model, cfg.probe_hookpoint or f"resid_post.{n_layers(model) // 2}")[0]
        self.prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in NEUTRAL_PROMPTS[: cfg.n_prompts]]
        self.calibrators = {n: KLCalibrator(model, h, self.prompts) for n, h in self.steer_hps.items()}
        self.tracked: dict[str, np.ndarray] = {n: np.zeros(0, int) for n in decomposers}
        self.vectors: dict[tuple, tuple[str, torch.Tensor]] = {}  # key -> (hookpoint, unit vector)
        self.cals: dict[tuple, dict[int, list[Calibration]]] = {}
        self.runs: dict[tuple, Generations] = {}
        self.feature_max: dict[str, np.ndarray] = {}

    # -- reading
    def read_generations(self, conts: list[list[int]], prompts: list[list[int]], with_features: bool = True) -> Generations:
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

    def generate(self, prompts, n_samples, seed, steer=None) -> list[list[int]]:
        c = self.cfg
        return generate_continuations(self.model, prompts, n_samples, c.max_new_tokens, c.temperature, c.top_p, seed,
                                      self.pad_id, steer, c.batch_size)

    # -- steering runs
    def add_vector(self, key: tuple, hp_name: str, vector) -> None:
        if key in self.vectors:
            return
        v = unit(vector)
        self.vectors[key] = (hp_name, v)
        cal = self.calibrators[hp_name]
        self.cals[key] = {s: cal.calibrate_targets(v, self.cfg.kl_targets, s, self.cfg.tol, self.cfg.max_forwards)
                          for s in (1, -1)}

    def run(self, key: tuple, target: float, sign: int) -> Generations:
        rk = (key, target, sign)
        if rk not in self.runs:
            hp_name, v = self.vectors[key]
            cal = self.cals[key][sign][self.cfg.kl_targets.index(target)]
            conts = self.generate(self.prompts, self.cfg.samples_per_prompt, self.cfg.seed,
                                  (self.steer_hps[hp_name], v, cal.alpha))
            g = self.read_generations(conts, [p for p in self.prompts for _ in range(self.cfg.samples_per_prompt)])
            g.calibration = cal
            self.runs[rk] = g
        return self.runs[rk]

    def random_runs(self, hp_name: str, target: float, sign: int) -> list[Generations]:
        return [self.run(("random", hp_name, r), target, sign) for r in range(self.cfg.n_random)]

    def output_mass(self, key: tuple, tokens: np.ndarray, target: float, sign: int) -> float:
        hp_name, v = self.vectors[key]
        calib = self.calibrators[hp_name]
        cal = self.cals[key][sign][self.cfg.kl_targets.index(target)]
        idx = torch.as_tensor(tokens, dtype=torch.long)
        steered = calib.steered_logprobs(v, cal.alpha)[:, idx].exp().sum(-1)
        base = calib.base_logprobs[:, idx].exp().sum(-1)
        return float((steered - base).mean())


def evaluate_steering(model: torch.nn.Module, tokenizer, decomposers: dict, cache=None,
                      cfg: SteeringConfig | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score steering by every decomposer, DiffMean and random directions at equal KL (see the module doc)."""
    cfg = cfg or SteeringConfig()
    log = log or (lambda msg: None)
    ev = _Evaluation(model, tokenizer, decomposers, cache, cfg, log)
    if not ev.steer_hps:
        raise ValueError("nothing to steer: give decomposers or cfg.hookpoints")
    rng = np.random.default_rng(cfg.seed)
    spp = cfg.samples_per_prompt
    rep_prompts = [p for p in ev.prompts for _ in range(spp)]

    # 1. labelled windows: judges, DiffMean, detection AUC, feature statistics
    need_windows = bool(cfg.concepts) or any(
        cache is None or d.config.hookpoint_in not in getattr(cache, "hookpoints", {}) for d in decomposers.values())
    windows = _labelled_windows(ev, rng) if need_windows else None

    # 2. feature statistics, sampled live features and each decomposer's best feature per concept
    detection: dict[str, dict] = {}
    sampled: dict[str, list[int]] = {}
    for n, d in decomposers.items():
        fmax, fired, n_tok = _feature_stats(ev, n, d, windows)
        live = np.flatnonzero(fired > 0)
        k = min(cfg.n_features, len(live))
        sampled[n] = sorted(int(i) for i in rng.choice(live, size=k, replace=False)) if k else []
        detection[n] = _best_features(ev, n, d, windows, live) if cfg.concepts else {}
        best = [v["feature"] for v in detection[n].values() if v["feature"] is not None]
        ev.tracked[n] = np.array(sorted(set(sampled[n]) | set(best)), int)
        ev.feature_max[n] = fmax
        log(f"steering: {n}: {len(live)}/{d.config.n_features} features live on {n_tok} tokens; "
            f"sampled {sampled[n]}")

    # 3. unsteered reference continuations
    log(f"steering: unsteered continuations ({len(rep_prompts)})")
    base = ev.read_generations(ev.generate(ev.prompts, spp, cfg.seed), rep_prompts)
    ref = FluencyReference.of(base.loss, base.bigram, cfg.loss_margin, cfg.bigram_frac)

    # 4. judges
    judge = None
    judges_report = None
    if cfg.concepts:
        judge, judges_report = _train_judge(ev, windows, base, ref)
        log(f"steering: judges trained: {judges_report['heldout_accuracy']}")

    # 5. vectors: decomposer features, DiffMean per (hookpoint, concept), random per hookpoint
    for n in decomposers:
        hp, dirs = ev.sites[n]
        for f in ev.tracked[n]:
            ev.add_vector(("feature", n, int(f)), hp.name, dirs[f])
    diffmeans = {}
    if cfg.concepts:
        for hp_name in ev.steer_hps:
            for c in cfg.concepts:
                vec = windows["train"]["pooled"][hp_name][windows["train"]["labels"] == c].mean(0) - \
                    windows["train"]["pooled"][hp_name][windows["train"]["labels"] != c].mean(0)
                diffmeans[(hp_name, c)] = vec
                ev.add_vector(("diffmean", hp_name, c), hp_name, vec)
    for hp_name, hp in ev.steer_hps.items():
        for r in range(cfg.n_random):
            g = np.random.default_rng([cfg.seed, 7919, r]).standard_normal(hp.width)
            ev.add_vector(("random", hp_name, r), hp_name, g)
    log(f"steering: {len(ev.vectors)} vectors calibrated at KL {cfg.kl_targets} (both signs)")

    # 6. records
    records: dict[str, dict] = {}
    for n, d in decomposers.items():
        hp = ev.sites[n][0]
        keys = [("feature", n, int(f)) for f in ev.tracked[n]]
        det = detection[n]
        records[n] = _record(
            kind=d.kind, hp=hp.name, ev=ev, vector_keys=keys,
            detection={c: {"feature": v["feature"], "auc_train": v["auc_train"], "auc": v["auc"]} for c, v in det.items()},
            feature_curve=_feature_curve(ev, n, sampled[n], base, log),
            concept_curve=_concept_curve(ev, judge, ref, base, hp.name,
                                         {c: ("feature", n, v["feature"]) for c, v in det.items()
                                          if v["feature"] is not None}, log),
        )
    for hp_name in ev.steer_hps:
        if cfg.concepts:
            test, det = windows["test"], {}
            for c in cfg.concepts:
                proj = test["pooled"][hp_name] @ diffmeans[(hp_name, c)]
                det[c] = {"feature": None, "auc_train": None, "auc": float(detection_auc(proj, test["labels"] == c)[0])}
            records[f"diffmean@{hp_name}"] = _record(
                kind="diffmean", hp=hp_name, ev=ev, vector_keys=[("diffmean", hp_name, c) for c in cfg.concepts],
                detection=det, feature_curve=[],
                concept_curve=_concept_curve(ev, judge, ref, base, hp_name,
                                             {c: ("diffmean", hp_name, c) for c in cfg.concepts}, log))
        records[f"random@{hp_name}"] = _record(
            kind="random", hp=hp_name, ev=ev, vector_keys=[("random", hp_name, r) for r in range(cfg.n_random)],
            detection={}, feature_curve=[], concept_curve=_random_curve(ev, judge, ref, base, hp_name))

    config = dataclasses.asdict(cfg)
    config["probe_hookpoint"] = ev.probe_hp.name
    return {
        "config": config,
        "judges": judges_report,
        "unsteered": {"loss": ref.loss, "bigram_share": ref.bigram_share, "n": len(base.loss)},
        "records": records,
        "features": sampled,
    }


# ----------------------------------------------------------------------------- stages

def _labelled_windows(ev: _Evaluation, rng: np.random.Generator) -> dict:
    """Train / held-out token windows per class, read at the probe, steering and decomposer-input hookpoints."""
    cfg = ev.cfg
    if not cfg.corpus:
        raise ValueError("steering evaluation needs a labelled corpus: set eval.steering.corpus to a .jsonl(.gz) "
                         "file with source/id/text fields (e.g. ../shared/assets/english-corpus.jsonl.gz), "
                         "or set concepts = [] and pass an activation cache")
    docs = load_labelled_documents(cfg.corpus)
    labels = sorted({d.label for d in docs})
    unknown = [c for c in cfg.concepts if c not in labels]
    if unknown:
        raise ValueError(f"concept(s) {unknown} are not labels of {cfg.corpus}; its labels are {labels}")
    train_docs, test_docs = split_documents(docs, 0.25, cfg.seed)
    hps = {ev.probe_hp.name: ev.probe_hp, **ev.steer_hps, **{h.name: h for h in ev.hp_in.values()}}
    out = {"train_docs": train_docs}
    for split, split_docs, per_class in (("train", train_docs, cfg.windows_per_class), ("test", test_docs, cfg.held_out_windows)):
        seqs, labs = [], []
        others = [l for l in labels if l not in cfg.concepts]
        for c in cfg.concepts:
            w = sample_windows([d for d in split_docs if d.label == c], ev.tok, per_class, cfg.window_tokens, rng)
            seqs += w
            labs += [c] * len(w)
        n_other = 2 * per_class if cfg.concepts else per_class
        for i, o in enumerate(others):  # "other": spread evenly over every other label
            share = n_other // len(others) + (1 if i < n_other % len(others) else 0)
            w = sample_windows([d for d in split_docs if d.label == o], ev.tok, share, cfg.window_tokens, rng)
            seqs += w
            labs += [o] * len(w)
        ev.log(f"steering: reading {len(seqs)} {split} windows of {cfg.window_tokens} tokens")
        read = read_sequences(ev.model, seqs, [1] * len(seqs), list(hps.values()),
                              keep_tokens=[h.name for h in ev.hp_in.values()], batch_size=max(1, ev.cfg.batch_size // 2))
        out[split] = {"seqs": seqs, "labels": np.array(labs), "pooled": read.pooled, "tokens": read.tokens,
                      "texts": [ev.tok.decode(s[1:], skip_special_tokens=True) for s in seqs]}
    return out


def _feature_stats(ev: _Evaluation, name: str, dec, windows) -> tuple[np.ndarray, np.ndarray, int]:
    stats_ = cache_feature_stats(dec, ev.cache, ev.cfg.cache_rows) if ev.cache is not None else None
    if stats_ is not None:
        return stats_
    if windows is None:
        raise ValueError(f"no activations to find live features of {name}: pass a cache holding "
                         f"{dec.config.hookpoint_in} or a labelled corpus")
    toks = windows["train"]["tokens"][ev.hp_in[name].name]
    _, fmax, fired = pooled_codes(dec, toks, np.zeros(0, int))
    return fmax, fired, int(sum(len(t) for t in toks))


def cache_feature_stats(dec, cache, max_rows: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(max activation, firing count, rows read) per feature over up to max_rows rows of the cache's eval
    shards (all shards if it has none); None when the cache lacks the decomposer's input hookpoint."""
    from dictlearn.activations.cache import to_float32

    hp = dec.config.hookpoint_in
    if hp not in getattr(cache, "hookpoints", {}):
        return None
    n_feat = dec.config.n_features
    fmax, fired, n = np.zeros(n_feat, np.float32), np.zeros(n_feat, np.int64), 0
    for sid in cache.shard_ids("eval") or cache.shard_ids("all"):
        x = to_float32(np.asarray(cache.shard_arrays(sid, keys=[hp])[hp][: max_rows - n]))
        if len(x):
            _, m, f = pooled_codes(dec, [x], np.zeros(0, int))
            fmax, fired, n = np.maximum(fmax, m), fired + f, n + len(x)
        if n >= max_rows:
            break
    return (fmax, fired, n) if n > 0 else None


def _best_features(ev: _Evaluation, name: str, dec, windows, live: np.ndarray) -> dict[str, dict]:
    hp = ev.hp_in[name].name
    return best_feature_per_concept(dec, windows["train"]["tokens"][hp], windows["train"]["labels"],
                                    windows["test"]["tokens"][hp], windows["test"]["labels"], ev.cfg.concepts, live)


def best_feature_per_concept(dec, train_tokens: list[np.ndarray], train_labels: np.ndarray,
                             test_tokens: list[np.ndarray], test_labels: np.ndarray, concepts: list[str],
                             live: np.ndarray) -> dict[str, dict]:
    """Per concept: the live feature whose mean code over a window best detects the concept on training
    windows (ROC AUC), and that feature's AUC on held-out windows (chosen on one split, scored on another)."""
    train_codes = pooled_codes(dec, train_tokens)[0]
    test_codes = pooled_codes(dec, test_tokens)[0]
    out = {}
    live = np.asarray(live, int)
    for c in concepts:
        if len(live) == 0:  # nothing fires: no feature to steer with
            out[c] = {"feature": None, "auc_train": None, "auc": None}
            continue
        auc = detection_auc(train_codes[:, live], np.asarray(train_labels) == c)
        f = int(live[np.argmax(auc)])
        out[c] = {"feature": f, "auc_train": float(auc.max()),
                  "auc": float(detection_auc(test_codes[:, f], np.asarray(test_labels) == c)[0])}
    return out


def _train_judge(ev: _Evaluation, windows, base: Generations, ref: FluencyReference) -> tuple[ConceptJudge, dict]:
    cfg = ev.cfg
    jp = [ev.tok(p, add_special_tokens=False)["input_ids"] for p in JUDGE_PROMPTS]
    rep = [p for p in jp for _ in range(cfg.judge_samples_per_prompt)]
    ev.log(f"steering: {len(rep)} unsteered continuations of judge prompts as negatives")
    neg = ev.read_generations(ev.generate(jp, cfg.judge_samples_per_prompt, cfg.seed + 1), rep, with_features=False)
    tr, te = windows["train"], windows["test"]
    x = np.concatenate([tr["pooled"][ev.probe_hp.name], neg.probe_x])
    labels = list(tr["labels"]) + ["other"] * len(neg.texts)
    lex_texts, lex_labels = _lexical_training_text(windows["train_docs"], cfg.lexical_docs_per_label)
    judge = ConceptJudge.fit(cfg.concepts, ev.probe_hp.name, x, labels, lex_texts + neg.texts,
                             lex_labels + ["other"] * len(neg.texts), l2=cfg.probe_l2)
    acc = judge.accuracy(te["pooled"][ev.probe_hp.name], te["texts"], te["labels"])
    p, l = judge.predict(base.probe_x, base.texts)
    fluent = ref.gate(base.loss, base.bigram)
    base_rate = {}
    for c in cfg.concepts:
        i = judge.index(c)
        base_rate[c] = {"probe": float((p == i).mean()), "lexical": float((l == i).mean()),
                        "both": float(((p == i) & (l == i)).mean()),
                        "judged": float(((p == i) & (l == i) & fluent).mean())}
    report = {"classes": list(judge.classes), "probe_hookpoint": ev.probe_hp.name, "heldout_accuracy": acc,
              "n_train": len(labels), "n_heldout": len(te["labels"]), "n_negative_generations": len(neg.texts),
              "base_rate": base_rate,
              "base_rate_any_concept": {"probe": float((p < len(cfg.concepts)).mean()),
                                        "lexical": float((l < len(cfg.concepts)).mean())}}
    return judge, report


def _lexical_training_text(docs, per_label: int, max_chars: int = 3000) -> tuple[list[str], list[str]]:
    """Up to per_label training documents of each label (first max_chars characters): text is cheap, so
    the lexical judge sees far more of it than the probe's windows."""
    texts, labels, count = [], [], {}
    for d in docs:
        if count.get(d.label, 0) < per_label:
            count[d.label] = count.get(d.label, 0) + 1
            texts.append(d.text[:max_chars])
            labels.append(d.label)
    return texts, labels


def _fluency(ref: FluencyReference, g: Generations) -> dict[str, float]:
    return {"loss_delta": float(np.mean(g.loss) - ref.loss),
            "bigram_ratio": float(np.mean(g.bigram) / ref.bigram_share) if ref.bigram_share > 0 else 1.0,
            "fluency": ref.score(g.loss, g.bigram)}


def _feature_curve(ev: _Evaluation, name: str, features: list[int], base: Generations, log) -> list[dict]:
    cfg = ev.cfg
    if not features:
        return []
    ref = FluencyReference.of(base.loss, base.bigram, cfg.loss_margin, cfg.bigram_frac)
    hp_name, dirs = ev.sites[name][0].name, ev.sites[name][1]
    col = {int(f): i for i, f in enumerate(ev.tracked[name])}
    fmax = ev.feature_max[name]
    curve = []
    for s in cfg.signs:
        for t in cfg.kl_targets:
            log(f"steering: {name} features {features} at KL {t} sign {s:+d}")
            rand = ev.random_runs(hp_name, t, s)
            per = []
            for f in features:
                g = ev.run(("feature", name, f), t, s)
                a_s = g.feature_means[name][:, col[f]]
                a_b = base.feature_means[name][:, col[f]]
                a_r = np.concatenate([r.feature_means[name][:, col[f]] for r in rand])
                scale = float(fmax[f]) if fmax[f] > 0 else 1.0
                raw = s * float(a_s.mean() - a_b.mean())
                alt = "greater" if s > 0 else "less"
                p = float(stats.mannwhitneyu(a_s, a_r, alternative=alt).pvalue) if np.ptp(np.r_[a_s, a_r]) > 0 else 1.0
                proj = vocab_projection(ev.model, dirs[f])
                mass = mass_r = None
                if proj is not None:
                    top = np.argsort(-s * proj)[: cfg.output_top_k]
                    mass = ev.output_mass(("feature", name, f), top, t, s)
                    mass_r = _mean(ev.output_mass(("random", hp_name, r), top, t, s) for r in range(cfg.n_random))
                flu = _fluency(ref, g)
                concept = min(1.0, max(0.0, raw / scale))
                per.append({"feature": f, "kl": g.calibration.kl, "concept": concept, "concept_raw": raw,
                            "concept_gain_over_random": s * float(a_s.mean() - a_r.mean()) / scale, "p_value": p,
                            "output_token_mass": mass, "output_token_mass_random": mass_r, **flu,
                            "combined": harmonic_mean(concept, flu["fluency"])})
            entry = {"sign": s, "kl_target": t}
            for key in ("kl", "concept", "concept_raw", "concept_gain_over_random", "output_token_mass",
                        "output_token_mass_random", "loss_delta", "bigram_ratio", "fluency", "combined"):
                entry[key] = _mean(q[key] for q in per)
            entry["significant_fraction"] = float(np.mean([q["p_value"] < cfg.alpha for q in per]))
            entry["n_features"] = len(per)
            entry["per_feature"] = per
            curve.append(entry)
    return curve


def _judged(ev: _Evaluation, judge: ConceptJudge, ref: FluencyReference, g: Generations, concept: str) -> int:
    return int(judge.on_topic(concept, g.probe_x, g.texts, ref.gate(g.loss, g.bigram)).sum())


def _judge_breakdown(judge: ConceptJudge, ref: FluencyReference, g: Generations, concept: str) -> dict[str, float]:
    """Share of continuations each part of the judge accepts (to see which one limits the judged rate)."""
    i = judge.index(concept)
    p, l = judge.predict(g.probe_x, g.texts)
    return {"probe_rate": float((p == i).mean()), "lexical_rate": float((l == i).mean()),
            "both_rate": float(((p == i) & (l == i)).mean()), "fluent_share": float(ref.gate(g.loss, g.bigram).mean())}


def _concept_curve(ev: _Evaluation, judge, ref, base: Generations, hp_name: str, keys: dict[str, tuple], log) -> list[dict]:
    cfg = ev.cfg
    if judge is None or not keys:
        return []
    curve = []
    for s in cfg.signs:
        for t in cfg.kl_targets:
            rand = ev.random_runs(hp_name, t, s)
            per, tot = {}, {"k": 0, "n": 0, "kr": 0, "nr": 0}
            kls = []
            for c, key in keys.items():
                log(f"steering: {key} at KL {t} sign {s:+d}")
                g = ev.run(key, t, s)
                kls.append(g.calibration.kl)
                k, n = _judged(ev, judge, ref, g, c), len(g.texts)
                kr, nr = sum(_judged(ev, judge, ref, r, c) for r in rand), sum(len(r.texts) for r in rand)
                ku = _judged(ev, judge, ref, base, c)
                test = compare_rates(k, n, kr, nr, "greater" if s > 0 else "less")
                flu = _fluency(ref, g)
                rate, rrate = k / n, kr / nr
                concept = rate if s > 0 else (max(0.0, (rrate - rate) / rrate) if rrate > 0 else 0.0)
                per[c] = {"rate": rate, "k": k, "n": n, "random_rate": rrate, "k_random": kr, "n_random": nr,
                          "unsteered_rate": ku / len(base.texts),
                          "gain_over_random": rate - rrate, "p_value": test["p_fisher"], "kl": g.calibration.kl,
                          **flu, "combined": harmonic_mean(concept, flu["fluency"]),
                          **_judge_breakdown(judge, ref, g, c)}
                tot["k"], tot["n"], tot["kr"], tot["nr"] = tot["k"] + k, tot["n"] + n, tot["kr"] + kr, tot["nr"] + nr
            pooled = compare_rates(tot["k"], tot["n"], tot["kr"], tot["nr"], "greater" if s > 0 else "less")
            entry = {"sign": s, "kl_target": t, "kl": _mean(kls),
                     "concept_rate": _mean(v["rate"] for v in per.values()),
                     "random_rate": _mean(v["random_rate"] for v in per.values()),
                     "unsteered_rate": _mean(v["unsteered_rate"] for v in per.values()),
                     "gain_over_random": _mean(v["gain_over_random"] for v in per.values()),
                     "p_value": pooled["p_fisher"], "significant": pooled["p_fisher"] < cfg.alpha}
            for key in ("loss_delta", "bigram_ratio", "fluency", "combined"):
                entry[key] = _mean(v[key] for v in per.values())
            entry["n"] = tot["n"]
            entry["per_concept"] = per
            curve.append(entry)
    return curve


def _random_curve(ev: _Evaluation, judge, ref, base: Generations, hp_name: str) -> list[dict]:
    cfg = ev.cfg
    curve = []
    for s in cfg.signs:
        for t in cfg.kl_targets:
            rand = ev.random_runs(hp_name, t, s)
            flu = _fluency(ref, Generations([], [], np.concatenate([r.loss for r in rand]),
                                            np.concatenate([r.bigram for r in rand]), None, {}))
            per = {}
            if judge is not None:
                n = sum(len(r.texts) for r in rand)
                for c in cfg.concepts:
                    k = sum(_judged(ev, judge, ref, r, c) for r in rand)
                    per[c] = {"rate": k / n, "k": k, "n": n,
                              "unsteered_rate": _judged(ev, judge, ref, base, c) / len(base.texts)}
                    for key in ("probe_rate", "lexical_rate", "both_rate", "fluent_share"):
                        per[c][key] = _mean(_judge_breakdown(judge, ref, r, c)[key] for r in rand)
            rate = _mean(v["rate"] for v in per.values())
            curve.append({"sign": s, "kl_target": t, "kl": _mean(r.calibration.kl for r in rand),
                          "concept_rate": rate, "random_rate": rate,
                          "unsteered_rate": _mean(v["unsteered_rate"] for v in per.values()),
                          "gain_over_random": None, "p_value": None, "significant": None, **flu,
                          "combined": harmonic_mean(rate, flu["fluency"]) if rate is not None else None,
                          "n": sum(len(r.loss) for r in rand), "per_concept": per})
    return curve


def _record(kind: str, hp: str, ev: _Evaluation, vector_keys: list[tuple], detection: dict,
            feature_curve: list[dict], concept_curve: list[dict]) -> dict:
    cfg = ev.cfg
    cals = [c for k in vector_keys for s in (1, -1) for c in ev.cals[k][s]]
    calibration = {
        "n_vectors": len(vector_keys),
        "n_forwards_mean": _mean(c.n_forwards for c in cals),
        "rel_error_max": max((c.relative_error for c in cals), default=None),
        "converged_fraction": _mean(float(c.converged) for c in cals),
        "alpha_over_norm": {str(t): {sign: _mean(abs(ev.cals[k][s][i].alpha) / ev.cals[k][s][i].activation_norm
                                                 for k in vector_keys)
                                     for s, sign in ((1, "+"), (-1, "-"))}
                            for i, t in enumerate(cfg.kl_targets)},
    }
    aucs = [v["auc"] for v in detection.values()]
    fc = next((e for e in feature_curve if e["sign"] == 1 and e["kl_target"] == cfg.summary_kl), None)
    cc = next((e for e in concept_curve if e["sign"] == 1 and e["kl_target"] == cfg.summary_kl), None)
    summary = {"kl_target": cfg.summary_kl, "detection_auc": _mean(aucs),
               "concept_rate": cc["concept_rate"] if cc else None,
               "gain_over_random": cc["gain_over_random"] if cc else None,
               "p_value": cc["p_value"] if cc else None,
               "fluency": cc["fluency"] if cc else None, "combined": cc["combined"] if cc else None,
               "feature_concept": fc["concept"] if fc else None, "feature_fluency": fc["fluency"] if fc else None,
               "feature_combined": fc["combined"] if fc else None}
    return {"kind": kind, "hookpoint": hp, "detection_auc": _mean(aucs), "detection": detection,
            "calibration": calibration, "feature_curve": feature_curve, "concept_curve": concept_curve,
            "summary": summary}
