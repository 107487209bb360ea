"""Curves over (sign, KL target): the sampled features (unsupervised), the concepts (judged), and the random
directions they are compared with."""

from __future__ import annotations

import numpy as np

from dictlearn.eval.steering.judges import ConceptJudge, FluencyReference
from dictlearn.eval.steering.records import (
    ConceptCurvePoint,
    ConceptScore,
    FeatureCurvePoint,
    FeaturePoint,
    GateRemoved,
    RandomConceptScore,
)
from dictlearn.eval.steering.runs import Generations, SteeringRuns, VectorKey
from dictlearn.eval.steering.stats import compare_rates, harmonic_mean, mean_or_none, shift_p_value, wilson_interval

_FEATURE_MEANS = ("kl", "concept", "concept_raw", "concept_gain_over_random", "output_token_mass",
                  "output_token_mass_random", "loss_delta", "bigram_ratio", "fluency", "combined")


def gate_verdicts(ref: FluencyReference, losses, shares) -> tuple[np.ndarray, np.ndarray]:
    """Per continuation: (passes the loss gate, passes the bigram gate), each asked of `ref.gate` alone
    (the other value set so that its gate always passes)."""
    losses, shares = np.asarray(losses, float), np.asarray(shares, float)
    return ref.gate(losses, np.full(shares.shape, np.inf)), ref.gate(np.full(losses.shape, -np.inf), shares)


def gate_removed(ref: FluencyReference, gens: list[Generations]) -> GateRemoved:
    """Share of these continuations each fluency gate rejects."""
    loss_ok, bigram_ok = gate_verdicts(ref, np.concatenate([g.loss for g in gens]), np.concatenate([g.bigram for g in gens]))
    return GateRemoved(float((~loss_ok).mean()), float((~bigram_ok).mean()), float((~(loss_ok & bigram_ok)).mean()))


def _ci(rate: float | None, n: int) -> list[float] | None:
    return list(wilson_interval(rate * n, n)) if rate is not None and n > 0 else None


def feature_curve(runs: SteeringRuns, name: str, features: list[int], ref: FluencyReference,
                  base: Generations) -> list[FeatureCurvePoint]:
    """Per (sign, KL target): how much steering by each sampled feature raises (sign +1) or lowers its own
    activation, relative to its max activation and to random directions, and what it costs in fluency."""
    cfg = runs.cfg
    if not features:
        return []
    hp_name = runs.sites[name][0].name
    col = {int(f): i for i, f in enumerate(runs.tracked[name])}
    fmax = runs.feature_max[name]
    curve = []
    for s in cfg.signs:
        for t in cfg.kl_targets:
            runs.log(f"steering: {name} features {features} at KL {t} sign {s:+d}")
            rand = runs.random_runs(hp_name, t, s)
            per, gens = [], []
            for f in features:
                g = runs.run(("feature", name, f), t, s)
                gens.append(g)
                a_s = g.feature_means[name][:, col[f]]
                a_b = base.feature_means[name][:, col[f]]
                a_r = np.concatenate([r.feature_means[name][:, col[f]] for r in rand])
                scale = float(fmax[f]) if fmax[f] > 0 else 1.0
                raw = s * float(a_s.mean() - a_b.mean())
                proj = runs.vocab_projection(name, f)
                mass = mass_r = None
                if proj is not None:
                    top = np.argsort(-s * proj)[: cfg.output_top_k]
                    mass = runs.output_mass(("feature", name, f), top, t, s)
                    mass_r = mean_or_none(runs.output_mass(("random", hp_name, r), top, t, s) for r in range(cfg.n_random))
                flu = ref.compare(g.loss, g.bigram)
                concept = min(1.0, max(0.0, raw / scale))
                per.append(FeaturePoint(
                    feature=f, kl=g.calibration.kl, concept=concept, concept_raw=raw,
                    concept_gain_over_random=s * float(a_s.mean() - a_r.mean()) / scale,
                    p_value=shift_p_value(a_s, a_r, s), output_token_mass=mass, output_token_mass_random=mass_r,
                    loss_delta=flu.loss_delta, bigram_ratio=flu.bigram_ratio, fluency=flu.fluency,
                    combined=harmonic_mean(concept, flu.fluency)))
            means = {k: mean_or_none(getattr(q, k) for q in per) for k in _FEATURE_MEANS}
            curve.append(FeatureCurvePoint(sign=s, kl_target=t, **means,
                                           significant_fraction=float(np.mean([q.p_value < cfg.alpha for q in per])),
                                           n_features=len(per), per_feature=per, gate_removed=gate_removed(ref, gens)))
    return curve


def _judged(judge: ConceptJudge, ref: FluencyReference, g: Generations, concept: str) -> int:
    return int(judge.on_topic(concept, g.probe_x, g.texts, ref.gate(g.loss, g.bigram)).sum())


def _shares(judge: ConceptJudge, ref: FluencyReference, g: Generations, concept: str):
    return judge.shares(concept, g.probe_x, g.texts, ref.gate(g.loss, g.bigram))


def concept_curve(runs: SteeringRuns, judge: ConceptJudge | None, ref: FluencyReference, base: Generations,
                  hp_name: str, keys: dict[str, VectorKey]) -> list[ConceptCurvePoint]:
    """Per (sign, KL target): the judged on-topic rate of each concept's vector against random directions at
    the same KL (Fisher exact per concept and pooled over concepts), and its fluency."""
    cfg = runs.cfg
    if judge is None or not keys:
        return []
    curve = []
    for s in cfg.signs:
        alternative = "greater" if s > 0 else "less"
        for t in cfg.kl_targets:
            rand = runs.random_runs(hp_name, t, s)
            per: dict[str, ConceptScore] = {}
            for c, key in keys.items():
                runs.log(f"steering: {key} at KL {t} sign {s:+d}")
                g = runs.run(key, t, s)
                k, n = _judged(judge, ref, g, c), len(g.texts)
                kr, nr = sum(_judged(judge, ref, r, c) for r in rand), sum(len(r.texts) for r in rand)
                flu = ref.compare(g.loss, g.bigram)
                rate, rrate = k / n, kr / nr
                concept = rate if s > 0 else (max(0.0, (rrate - rate) / rrate) if rrate > 0 else 0.0)
                shares = _shares(judge, ref, g, c)
                per[c] = ConceptScore(
                    rate=rate, k=k, n=n, random_rate=rrate, k_random=kr, n_random=nr,
                    unsteered_rate=_judged(judge, ref, base, c) / len(base.texts), gain_over_random=rate - rrate,
                    p_value=compare_rates(k, n, kr, nr, alternative)["p_fisher"], kl=g.calibration.kl,
                    loss_delta=flu.loss_delta, bigram_ratio=flu.bigram_ratio, fluency=flu.fluency,
                    combined=harmonic_mean(concept, flu.fluency), probe_rate=shares.probe_rate,
                    lexical_rate=shares.lexical_rate, both_rate=shares.both_rate, fluent_share=shares.fluent_share,
                    rate_ci=_ci(rate, n), gate_removed=gate_removed(ref, [g]))
            vs = list(per.values())
            rate = mean_or_none(v.rate for v in vs)
            n = sum(v.n for v in vs)
            pooled = compare_rates(sum(v.k for v in vs), sum(v.n for v in vs), sum(v.k_random for v in vs),
                                   sum(v.n_random for v in vs), alternative)["p_fisher"]
            curve.append(ConceptCurvePoint(
                sign=s, kl_target=t, kl=mean_or_none(v.kl for v in vs), concept_rate=rate,
                random_rate=mean_or_none(v.random_rate for v in vs),
                unsteered_rate=mean_or_none(v.unsteered_rate for v in vs),
                gain_over_random=mean_or_none(v.gain_over_random for v in vs), p_value=pooled,
                significant=pooled < cfg.alpha, loss_delta=mean_or_none(v.loss_delta for v in vs),
                bigram_ratio=mean_or_none(v.bigram_ratio for v in vs), fluency=mean_or_none(v.fluency for v in vs),
                combined=mean_or_none(v.combined for v in vs), n=n, per_concept=per, concept_rate_ci=_ci(rate, n),
                gate_removed=gate_removed(ref, [runs.run(key, t, s) for key in keys.values()])))
    return curve


def random_curve(runs: SteeringRuns, judge: ConceptJudge | None, ref: FluencyReference, base: Generations,
                 hp_name: str) -> list[ConceptCurvePoint]:
    """Per (sign, KL target): how often random directions land on each concept, and their fluency."""
    cfg = runs.cfg
    curve = []
    for s in cfg.signs:
        for t in cfg.kl_targets:
            rand = runs.random_runs(hp_name, t, s)
            flu = ref.compare(np.concatenate([r.loss for r in rand]), np.concatenate([r.bigram for r in rand]))
            per: dict[str, RandomConceptScore] = {}
            if judge is not None:
                n = sum(len(r.texts) for r in rand)
                for c in cfg.concepts:
                    k = sum(_judged(judge, ref, r, c) for r in rand)
                    shares = [_shares(judge, ref, r, c) for r in rand]
                    per[c] = RandomConceptScore(
                        rate=k / n, k=k, n=n, unsteered_rate=_judged(judge, ref, base, c) / len(base.texts),
                        probe_rate=mean_or_none(x.probe_rate for x in shares),
                        lexical_rate=mean_or_none(x.lexical_rate for x in shares),
                        both_rate=mean_or_none(x.both_rate for x in shares),
                        fluent_share=mean_or_none(x.fluent_share for x in shares))
            rate = mean_or_none(v.rate for v in per.values())
            n = sum(len(r.loss) for r in rand)
            curve.append(ConceptCurvePoint(
                sign=s, kl_target=t, kl=mean_or_none(r.calibration.kl for r in rand), concept_rate=rate,
                random_rate=rate, unsteered_rate=mean_or_none(v.unsteered_rate for v in per.values()),
                gain_over_random=None, p_value=None, significant=None, loss_delta=flu.loss_delta,
                bigram_ratio=flu.bigram_ratio, fluency=flu.fluency,
                combined=harmonic_mean(rate, flu.fluency) if rate is not None else None,
                n=n, per_concept=per, concept_rate_ci=_ci(rate, n), gate_removed=gate_removed(ref, rand)))
    return curve
