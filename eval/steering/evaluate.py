"""The steering evaluation's orchestration: every decomposer's features, DiffMean and random directions,
calibrated to the same KL budget, generated from (all conditions in shared batches), read back and judged;
every judged continuation kept (continuations.jsonl and the side-by-side page, `page.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dictlearn.eval.steering.config import SteeringConfig
from dictlearn.eval.steering.corpus import LabelledWindows, labelled_windows, lexical_training_text
from dictlearn.eval.steering.curves import concept_curve, feature_curve, gate_removed, gate_verdicts, random_curve
from dictlearn.eval.steering.features import best_feature_per_concept, cache_feature_stats, token_feature_stats
from dictlearn.eval.steering.io_scores import decomposer_io_scores
from dictlearn.eval.steering.judges import OTHER, ConceptJudge, FluencyReference, distinct_bigram_share
from dictlearn.eval.steering.prompts import JUDGE_PROMPTS
from dictlearn.eval.steering.reading import read_sequences
from dictlearn.eval.steering.records import (
    CalibrationSummary,
    ConceptCurvePoint,
    Detection,
    FeatureCurvePoint,
    HumanTextGates,
    JudgesReport,
    Record,
    SteeringResult,
    Summary,
    Unsteered,
)
from dictlearn.eval.steering.runs import UNSTEERED, Generations, SteeringRuns, VectorKey
from dictlearn.eval.steering.stats import detection_auc, mean_or_none


NOT_STEERED = ("its latents write to several layers at once, and steering adds one vector at one hookpoint, so "
               "this version does not steer decomposers with a site axis (cross-layer transcoders)")


def evaluate_steering(model: torch.nn.Module, tokenizer: Any, decomposers: dict[str, Any], cache: Any = None,
                      cfg: SteeringConfig | None = None, log: Callable[[str], None] | None = None,
                      out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score steering by every decomposer, DiffMean and random directions at equal KL: the JSON form of
    `run_steering` (what steering.json holds and the report reads), with `skipped` ({name: why}) naming the
    decomposers left out (those with a site axis). With `out_dir` (the run's eval/steering/), every judged
    continuation goes to out_dir/continuations.jsonl and the side-by-side page to out_dir/index.html."""
    from dictlearn.eval.steering.page import write_continuations, write_page

    steerable = {n: d for n, d in decomposers.items() if not d.site_axis}
    skipped = {n: NOT_STEERED for n in decomposers if n not in steerable}
    if not steerable and skipped and not (cfg and cfg.hookpoints):
        return {"records": {}, "skipped": skipped}
    result = run_steering(model, tokenizer, steerable, cache, cfg, log)
    if out_dir is not None:
        write_continuations(out_dir, result)
        write_page(out_dir, result)
    return {**result.to_json(), "skipped": skipped}


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
        runs.sampled[n] = sampled[n]
        runs.feature_max[n] = fmax
        log(f"steering: {n}: {len(live)}/{d.config.n_features} features live on {n_tok} tokens; sampled {sampled[n]}")

    # 3. vectors: decomposer features, DiffMean per (hookpoint, concept), random per hookpoint
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
    log(f"steering: {len(runs.vectors)} vectors calibrated at KL {cfg.kl_targets} (signs {cfg.signs})")

    # 4. every condition and the unsteered reference, generated and read back in shared batches
    runs.generate_all()
    base = runs.base
    ref = FluencyReference.of(base.loss, base.bigram, cfg.loss_margin, cfg.bigram_frac)

    # 5. judges
    judge, judges_report = None, None
    if cfg.concepts:
        judge, judges_report = _train_judge(runs, windows, base, ref)
        log(f"steering: judges trained: {judges_report.heldout_accuracy}")

    # 6. records
    records: dict[str, Record] = {}
    for n, d in decomposers.items():
        hp_name = runs.sites[n][0].name
        records[n] = _record(
            runs, d.kind, hp_name, [("feature", n, int(f)) for f in runs.tracked[n]], detection[n],
            feature_curve(runs, n, sampled[n], ref, base),
            concept_curve(runs, judge, ref, base, hp_name,
                          {c: ("feature", n, v.feature) for c, v in detection[n].items() if v.feature is not None}))
    if judge is not None:  # IO: the SNMF paper's input/output scores of each decomposer's best features (io_scores.py)
        for n, d in decomposers.items():
            records[n] = decomposer_io_scores(records[n], judge, d, windows.test, runs.hp_in[n].name, runs.probe_hp.name,
                                              lambda f, n=n: runs.vocab_projection(n, f), lambda t: runs.tok.decode([t]),
                                              cfg.output_top_k)
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
    human = _human_text_gates(runs, windows, ref) if cfg.concepts else None
    if human is not None:
        log(f"steering: the fluency gates reject {human.rejected.either:.0%} of {human.n} held-out on-topic "
            f"human windows (loss {human.rejected.loss:.0%}, bigram {human.rejected.bigram:.0%})")
    return SteeringResult(config, judges_report, Unsteered(ref.loss, ref.bigram_share, len(base.loss)), records, sampled,
                          human, judged_continuations(runs, judge, ref, detection, sampled))


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
    runs.log(f"steering: {len(jp) * cfg.judge_samples_per_prompt} unsteered continuations of judge prompts as negatives")
    neg = runs.judge_negatives(jp, cfg.judge_samples_per_prompt, cfg.seed + 1)
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


def _human_text_gates(runs: SteeringRuns, windows: LabelledWindows, ref: FluencyReference) -> HumanTextGates:
    """The fluency gates on the held-out windows of the concepts (human text), read like continuations."""
    test = windows.test
    seqs = [s for s, lab in zip(test.seqs, test.labels) if lab in runs.cfg.concepts and len(s) > 1]
    read = read_sequences(runs.model, seqs, [1] * len(seqs), [runs.probe_hp], with_loss=True,
                          batch_size=max(1, runs.cfg.batch_size // 2))
    bigram = np.array([distinct_bigram_share(s[1:]) for s in seqs])
    gens = [Generations([], [], read.loss, bigram, None, {})]
    return HumanTextGates(n=len(seqs), window_tokens=runs.cfg.window_tokens, loss_mean=float(read.loss.mean()),
                          bigram_share_mean=float(bigram.mean()), reference_loss=ref.loss,
                          reference_bigram_share=ref.bigram_share, rejected=gate_removed(ref, gens))


def _vector_label(runs: SteeringRuns, key: VectorKey, detection: dict[str, dict[str, Detection]],
                  sampled: dict[str, list[int]]) -> dict[str, Any]:
    """Which record a vector belongs to and what it is (for the stored continuations)."""
    if key == UNSTEERED:
        return {"record": "unsteered", "kind": "unsteered", "hookpoint": None, "vector": "unsteered",
                "feature": None, "concepts": [], "sampled": False}
    what, owner, ident = key
    if what == "feature":
        concepts = [c for c, d in detection[owner].items() if d.feature == ident]
        return {"record": owner, "kind": runs.decs[owner].kind, "hookpoint": runs.sites[owner][0].name,
                "vector": f"feature {ident}", "feature": int(ident), "concepts": concepts,
                "sampled": int(ident) in sampled[owner]}
    return {"record": f"{what}@{owner}", "kind": what, "hookpoint": owner, "feature": None,
            "vector": f"{what} {ident}", "concepts": [ident] if what == "diffmean" else [], "sampled": False}


def judged_continuations(runs: SteeringRuns, judge: ConceptJudge | None, ref: FluencyReference,
                         detection: dict[str, dict[str, Detection]], sampled: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Every generated continuation with its condition, each judge's verdict and each gate's value and verdict.
    "judged": the concept both judges name when it passes both gates (else None); "on_topic": judged is one of
    the vector's own concepts (any concept for vectors without one)."""
    out = []
    spp = runs.cfg.samples_per_prompt
    for (key, target, sign), g in runs.runs().items():
        label = _vector_label(runs, key, detection, sampled)
        loss_ok, bigram_ok = gate_verdicts(ref, g.loss, g.bigram)
        probe = lexical = None
        if judge is not None:
            probe, lexical = judge.predict(g.probe_x, g.texts)
        for r, text in enumerate(g.texts):
            verdicts = {"probe": None, "lexical": None, "judged": None, "on_topic": None}
            if judge is not None:
                p, lx = judge.classes[int(probe[r])], judge.classes[int(lexical[r])]
                fluent = bool(loss_ok[r] and bigram_ok[r])
                judged = p if (p == lx and p in runs.cfg.concepts and fluent) else None
                on_topic = judged is not None and (judged in label["concepts"] or not label["concepts"])
                verdicts = {"probe": p, "lexical": lx, "judged": judged, "on_topic": on_topic}
            out.append({**label, "kl_target": target, "kl": g.calibration.kl if g.calibration else None,
                        "alpha": g.calibration.alpha if g.calibration else None, "sign": sign,
                        "prompt_index": r // spp, "sample": r % spp, "prompt": runs.prompt_texts[r // spp],
                        "text": text, "loss": float(g.loss[r]), "loss_ok": bool(loss_ok[r]),
                        "bigram_share": float(g.bigram[r]), "bigram_ok": bool(bigram_ok[r]), **verdicts})
    return out


def _calibration_summary(runs: SteeringRuns, keys: list[VectorKey]) -> CalibrationSummary:
    cals = [c for k in keys for s in runs.cfg.signs for c in runs.cals[k][s]]

    def alpha_over_norm(t: float, s: int) -> float | None:
        if s not in runs.cfg.signs:
            return None
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
