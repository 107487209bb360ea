"""The steering evaluation's orchestration: every decomposer's features, DiffMean and random directions,
calibrated to the same KL budget, generated from, read back and judged."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from dictlearn.eval.steering.config import SteeringConfig
from dictlearn.eval.steering.corpus import LabelledWindows, labelled_windows, lexical_training_text
from dictlearn.eval.steering.curves import concept_curve, feature_curve, random_curve
from dictlearn.eval.steering.features import best_feature_per_concept, cache_feature_stats, token_feature_stats
from dictlearn.eval.steering.judges import OTHER, ConceptJudge, FluencyReference
from dictlearn.eval.steering.prompts import JUDGE_PROMPTS
from dictlearn.eval.steering.records import (
    CalibrationSummary,
    ConceptCurvePoint,
    Detection,
    FeatureCurvePoint,
    JudgesReport,
    Record,
    SteeringResult,
    Summary,
    Unsteered,
)
from dictlearn.eval.steering.runs import Generations, SteeringRuns, VectorKey
from dictlearn.eval.steering.stats import detection_auc, mean_or_none


NOT_STEERED = ("its latents write to several layers at once, and steering adds one vector at one hookpoint, so "
               "this version does not steer decomposers with a site axis (cross-layer transcoders)")


def evaluate_steering(model: torch.nn.Module, tokenizer: Any, decomposers: dict[str, Any], cache: Any = None,
                      cfg: SteeringConfig | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score steering by every decomposer, DiffMean and random directions at equal KL: the JSON form of
    `run_steering` (what steering.json holds and the report reads), with `skipped` ({name: why}) naming the
    decomposers left out (those with a site axis)."""
    steerable = {n: d for n, d in decomposers.items() if not d.site_axis}
    skipped = {n: NOT_STEERED for n in decomposers if n not in steerable}
    if not steerable and skipped and not (cfg and cfg.hookpoints):
        return {"records": {}, "skipped": skipped}
    return {**run_steering(model, tokenizer, steerable, cache, cfg, log).to_json(), "skipped": skipped}


def run_steering(model: torch.nn.Module, tokenizer: Any, decomposers: dict[str, Any], cache: Any = None,
                 cfg: SteeringConfig | None = None, log: Callable[[str], None] | None = None) -> SteeringResult:
    """Score steering by every decomposer, DiffMean and random directions at equal KL.

    decomposers: {name: Decomposer}; each steers along the rows of `features()` at `config.hookpoint_out` and is
    re-read with `encode` at `config.hookpoint_in`. cache: an ActivationCache or None; its eval shards (when they
    hold a decomposer's hookpoint_in) give each feature's firing frequency and max activation, else the labelled
    corpus windows do. `cfg.corpus` must name the labelled corpus when `cfg.concepts` is non-empty."""
    cfg = cfg or SteeringConfig()
    log = log or (lambda msg: None)
    runs = SteeringRuns(model, tokenizer, decomposers, cfg, log)
    if not runs.steer_hps:
        raise ValueError("nothing to steer: give decomposers or cfg.hookpoints")
    rng = np.random.default_rng(cfg.seed)

    # 1. labelled windows: judges, DiffMean, detection AUC, feature statistics
    need_windows = bool(cfg.concepts) or any(
        cache is None or d.config.hookpoint_in not in getattr(cache, "hookpoints", {}) for d in decomposers.values())
    windows = None
    if need_windows:
        read_at = {runs.probe_hp.name: runs.probe_hp, **runs.steer_hps, **{h.name: h for h in runs.hp_in.values()}}
        windows = labelled_windows(model, tokenizer, cfg.corpus, cfg.concepts, list(read_at.values()),
                                   [h.name for h in runs.hp_in.values()], cfg.window_tokens, cfg.windows_per_class,
                                   cfg.held_out_windows, rng, cfg.seed, max(1, cfg.batch_size // 2), log)

    # 2. feature statistics, sampled live features and each decomposer's best feature per concept
    detection: dict[str, dict[str, Detection]] = {}
    sampled: dict[str, list[int]] = {}
    for n, d in decomposers.items():
        fmax, fired, n_tok = _feature_stats(runs, n, d, cache, windows)
        live = np.flatnonzero(fired > 0)
        k = min(cfg.n_features, len(live))
        sampled[n] = sorted(int(i) for i in rng.choice(live, size=k, replace=False)) if k else []
        detection[n] = {}
        if cfg.concepts:
            tr, te, hp = windows.train, windows.test, runs.hp_in[n].name
            detection[n] = best_feature_per_concept(d, tr.tokens[hp], tr.labels, te.tokens[hp], te.labels,
                                                    cfg.concepts, live)
        best = [v.feature for v in detection[n].values() if v.feature is not None]
        runs.tracked[n] = np.array(sorted(set(sampled[n]) | set(best)), int)
        runs.feature_max[n] = fmax
        log(f"steering: {n}: {len(live)}/{d.config.n_features} features live on {n_tok} tokens; sampled {sampled[n]}")

    # 3. unsteered reference continuations
    log(f"steering: unsteered continuations ({len(runs.repeated_prompts)})")
    base = runs.read_generations(runs.generate(runs.prompts, cfg.samples_per_prompt, cfg.seed), runs.repeated_prompts)
    ref = FluencyReference.of(base.loss, base.bigram, cfg.loss_margin, cfg.bigram_frac)

    # 4. judges
    judge, judges_report = None, None
    if cfg.concepts:
        judge, judges_report = _train_judge(runs, windows, base, ref)
        log(f"steering: judges trained: {judges_report.heldout_accuracy}")

    # 5. vectors: decomposer features, DiffMean per (hookpoint, concept), random per hookpoint
    for n in decomposers:
        hp, dirs = runs.sites[n]
        for f in runs.tracked[n]:
            runs.add_vector(("feature", n, int(f)), hp.name, dirs[f])
    if cfg.concepts:
        for hp_name in runs.steer_hps:
            for c in cfg.concepts:
                runs.add_vector(("diffmean", hp_name, c), hp_name, windows.diffmean(hp_name, c))
    for hp_name, hp in runs.steer_hps.items():
        for r in range(cfg.n_random):
            direction = np.random.default_rng([cfg.seed, 7919, r]).standard_normal(hp.width)
            runs.add_vector(("random", hp_name, r), hp_name, direction)
    log(f"steering: {len(runs.vectors)} vectors calibrated at KL {cfg.kl_targets} (both signs)")

    # 6. records
    records: dict[str, Record] = {}
    for n, d in decomposers.items():
        hp_name = runs.sites[n][0].name
        records[n] = _record(
            runs, d.kind, hp_name, [("feature", n, int(f)) for f in runs.tracked[n]], detection[n],
            feature_curve(runs, n, sampled[n], ref, base),
            concept_curve(runs, judge, ref, base, hp_name,
                          {c: ("feature", n, v.feature) for c, v in detection[n].items() if v.feature is not None}))
    for hp_name in runs.steer_hps:
        if cfg.concepts:
            det = {c: Detection(None, None, float(detection_auc(windows.test.pooled[hp_name] @ windows.diffmean(hp_name, c),
                                                                windows.test.labels == c)[0]))
                   for c in cfg.concepts}
            records[f"diffmean@{hp_name}"] = _record(
                runs, "diffmean", hp_name, [("diffmean", hp_name, c) for c in cfg.concepts], det, [],
                concept_curve(runs, judge, ref, base, hp_name, {c: ("diffmean", hp_name, c) for c in cfg.concepts}))
        records[f"random@{hp_name}"] = _record(
            runs, "random", hp_name, [("random", hp_name, r) for r in range(cfg.n_random)], {}, [],
            random_curve(runs, judge, ref, base, hp_name))

    config = dataclasses.asdict(cfg)
    config["probe_hookpoint"] = runs.probe_hp.name
    return SteeringResult(config, judges_report, Unsteered(ref.loss, ref.bigram_share, len(base.loss)), records, sampled)


def _feature_stats(runs: SteeringRuns, name: str, dec: Any, cache: Any,
                   windows: LabelledWindows | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Max activation, firing count and tokens read per feature: from the cache's eval shards when it holds
    the decomposer's input, else from the labelled training windows."""
    found = cache_feature_stats(dec, cache, runs.cfg.cache_rows) if cache is not None else None
    if found is not None:
        return found
    if windows is None:
        raise ValueError(f"no activations to find live features of {name}: pass a cache holding "
                         f"{dec.config.hookpoint_in} or a labelled corpus")
    return token_feature_stats(dec, windows.train.tokens[runs.hp_in[name].name])


def _train_judge(runs: SteeringRuns, windows: LabelledWindows, base: Generations,
                 ref: FluencyReference) -> tuple[ConceptJudge, JudgesReport]:
    """Fit the judges on the training windows (probe) and documents (lexical), with unsteered continuations
    of the judge prompts as extra "other" negatives; report their held-out accuracy and unsteered base rate."""
    cfg = runs.cfg
    jp = [runs.tok(p, add_special_tokens=False)["input_ids"] for p in JUDGE_PROMPTS]
    rep = [p for p in jp for _ in range(cfg.judge_samples_per_prompt)]
    runs.log(f"steering: {len(rep)} unsteered continuations of judge prompts as negatives")
    neg = runs.read_generations(runs.generate(jp, cfg.judge_samples_per_prompt, cfg.seed + 1), rep, with_features=False)
    tr, te, probe = windows.train, windows.test, runs.probe_hp.name
    x = np.concatenate([tr.pooled[probe], neg.probe_x])
    labels = list(tr.labels) + [OTHER] * len(neg.texts)
    lex_texts, lex_labels = lexical_training_text(windows.train_docs, cfg.lexical_docs_per_label)
    judge = ConceptJudge.fit(cfg.concepts, probe, x, labels, lex_texts + neg.texts,
                             lex_labels + [OTHER] * len(neg.texts), l2=cfg.probe_l2)
    acc = judge.accuracy(te.pooled[probe], te.texts, te.labels)
    p, l = judge.predict(base.probe_x, base.texts)
    fluent = ref.gate(base.loss, base.bigram)
    base_rate = {}
    for c in cfg.concepts:
        i = judge.index(c)
        base_rate[c] = {"probe": float((p == i).mean()), "lexical": float((l == i).mean()),
                        "both": float(((p == i) & (l == i)).mean()),
                        "judged": float(((p == i) & (l == i) & fluent).mean())}
    report = JudgesReport(classes=list(judge.classes), probe_hookpoint=probe, heldout_accuracy=acc, n_train=len(labels),
                          n_heldout=len(te.labels), n_negative_generations=len(neg.texts), base_rate=base_rate,
                          base_rate_any_concept={"probe": float((p < len(cfg.concepts)).mean()),
                                                 "lexical": float((l < len(cfg.concepts)).mean())})
    return judge, report


def _calibration_summary(runs: SteeringRuns, keys: list[VectorKey]) -> CalibrationSummary:
    cals = [c for k in keys for s in (1, -1) for c in runs.cals[k][s]]

    def alpha_over_norm(t: float, s: int) -> float | None:
        return mean_or_none(abs(c.alpha) / c.activation_norm for c in (runs.calibration(k, t, s) for k in keys))

    return CalibrationSummary(
        n_vectors=len(keys), n_forwards_mean=mean_or_none(c.n_forwards for c in cals),
        rel_error_max=max((c.relative_error for c in cals), default=None),
        converged_fraction=mean_or_none(float(c.converged) for c in cals),
        alpha_over_norm={str(t): {"+": alpha_over_norm(t, 1), "-": alpha_over_norm(t, -1)} for t in runs.cfg.kl_targets})


def _record(runs: SteeringRuns, kind: str, hp_name: str, keys: list[VectorKey], detection: dict[str, Detection],
            features: list[FeatureCurvePoint], concepts: list[ConceptCurvePoint]) -> Record:
    auc = mean_or_none(v.auc for v in detection.values())
    return Record(kind=kind, hookpoint=hp_name, detection_auc=auc, detection=detection,
                  calibration=_calibration_summary(runs, keys), feature_curve=features, concept_curve=concepts,
                  summary=Summary.at(runs.cfg.summary_kl, auc, features, concepts))
