"""Typed results of the steering evaluation. `SteeringResult.to_json()` is the shape of `steering.json`
(what eval/report.py reads): every dataclass becomes an object with its fields as keys, in this order.

Every record (a decomposer, "diffmean@<hp>", "random@<hp>") has the same keys; None or [] where a field does
not apply. Scores: fluency = exp(-max(0, loss_steered - loss_unsteered)) * min(1, bigram ratio / 0.8) in
[0, 1]; concept (features) = activation gain / max activation; concept (concepts, sign +1) = judged rate,
sign -1: suppression relative to the random direction; combined = harmonic mean(concept, fluency).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Fluency:
    """How a set of continuations compares with the unsteered ones."""

    loss_delta: float  # mean per-token loss (unsteered model) minus the unsteered continuations'
    bigram_ratio: float  # mean distinct-bigram share over the unsteered continuations'
    fluency: float  # the fluency score in [0, 1]


@dataclass(frozen=True)
class GateRemoved:
    """Share of a set of continuations each fluency gate rejects (whatever the judges say of them)."""

    loss: float  # loss more than loss_margin nats above the unsteered continuations' mean
    bigram: float  # distinct-bigram share under bigram_frac of the unsteered continuations'
    either: float  # rejected by at least one gate (1 - the fluent share)


@dataclass(frozen=True)
class JudgeShares:
    """Share of continuations each part of the judge accepts (to see which one limits the judged rate)."""

    probe_rate: float
    lexical_rate: float
    both_rate: float
    fluent_share: float


@dataclass(frozen=True)
class Detection:
    """A concept's detecting feature: chosen on training windows (auc_train), scored on held-out ones (auc).
    DiffMean: feature and auc_train None, auc of the projection on its direction."""

    feature: int | None
    auc_train: float | None
    auc: float | None
    # IO's (eval/steering/io_scores.py): the SNMF paper's scores of the feature; None for DiffMean / no feature
    input_score: float | None = None  # share of its top-activating held-out windows judged the concept
    output_score: float | None = None  # share of its vocabulary projection's top tokens judged the concept


@dataclass(frozen=True)
class CalibrationSummary:
    n_vectors: int
    n_forwards_mean: float | None
    rel_error_max: float | None
    converged_fraction: float | None
    alpha_over_norm: dict[str, dict[str, float | None]]  # KL target -> {"+", "-"}: mean |alpha| / activation norm


@dataclass(frozen=True)
class FeaturePoint:
    """One sampled feature at one (sign, KL target)."""

    feature: int
    kl: float
    concept: float  # activation gain / the feature's max activation, clipped to [0, 1]
    concept_raw: float  # sign * (steered - unsteered mean activation)
    concept_gain_over_random: float
    p_value: float  # Mann-Whitney, steered vs random-direction activations
    output_token_mass: float | None  # probability moved onto the top tokens of its vocabulary projection
    output_token_mass_random: float | None  # the same tokens under the random directions
    loss_delta: float
    bigram_ratio: float
    fluency: float
    combined: float


@dataclass(frozen=True)
class FeatureCurvePoint:
    """The sampled live features (unsupervised) at one (sign, KL target): means of their FeaturePoints."""

    sign: int
    kl_target: float
    kl: float | None
    concept: float | None
    concept_raw: float | None
    concept_gain_over_random: float | None
    output_token_mass: float | None
    output_token_mass_random: float | None
    loss_delta: float | None
    bigram_ratio: float | None
    fluency: float | None
    combined: float | None
    significant_fraction: float  # share of features with p < cfg.alpha
    n_features: int
    per_feature: list[FeaturePoint]
    gate_removed: GateRemoved | None = None  # over every sampled feature's continuations


@dataclass(frozen=True)
class ConceptScore:
    """One concept steered by its vector (a feature or DiffMean) at one (sign, KL target)."""

    rate: float  # judged on-topic share
    k: int
    n: int
    random_rate: float
    k_random: int
    n_random: int
    unsteered_rate: float
    gain_over_random: float
    p_value: float  # one-sided Fisher exact against the random directions
    kl: float
    loss_delta: float
    bigram_ratio: float
    fluency: float
    combined: float
    probe_rate: float
    lexical_rate: float
    both_rate: float
    fluent_share: float
    rate_ci: list[float] | None = None  # 95 % Wilson interval of rate over its n continuations
    gate_removed: GateRemoved | None = None


@dataclass(frozen=True)
class RandomConceptScore:
    """How often the random directions land on a concept (the chance level concept vectors must beat)."""

    rate: float
    k: int
    n: int
    unsteered_rate: float
    probe_rate: float | None
    lexical_rate: float | None
    both_rate: float | None
    fluent_share: float | None


@dataclass(frozen=True)
class ConceptCurvePoint:
    """The supervised concepts at one (sign, KL target); random directions fill it with their own rates."""

    sign: int
    kl_target: float
    kl: float | None
    concept_rate: float | None
    random_rate: float | None
    unsteered_rate: float | None
    gain_over_random: float | None
    p_value: float | None  # one-sided Fisher exact, pooled over concepts
    significant: bool | None
    loss_delta: float | None
    bigram_ratio: float | None
    fluency: float | None
    combined: float | None
    n: int
    per_concept: dict[str, ConceptScore] | dict[str, RandomConceptScore]
    concept_rate_ci: list[float] | None = None  # 95 % Wilson interval of concept_rate over n continuations
    gate_removed: GateRemoved | None = None  # over the n continuations


@dataclass(frozen=True)
class Summary:
    """The report's table row: at KL `summary_kl`, sign +1."""

    kl_target: float
    detection_auc: float | None
    concept_rate: float | None
    gain_over_random: float | None
    p_value: float | None
    fluency: float | None
    combined: float | None
    feature_concept: float | None
    feature_fluency: float | None
    feature_combined: float | None
    # IO's (eval/steering/io_scores.py), means over concepts of the best features' scores (None: no concept)
    input_score: float | None = None
    output_score: float | None = None
    concept_rate_ci: list[float] | None = None  # 95 % Wilson interval of concept_rate
    n_continuations: int | None = None  # continuations concept_rate is measured on (the concept curve's n)
    gate_removed: GateRemoved | None = None  # of those continuations (the sampled features' without concepts)

    @classmethod
    def at(cls, kl_target: float, detection_auc: float | None, feature_curve: list[FeatureCurvePoint],
           concept_curve: list[ConceptCurvePoint]) -> "Summary":
        fc = next((e for e in feature_curve if e.sign == 1 and e.kl_target == kl_target), None)
        cc = next((e for e in concept_curve if e.sign == 1 and e.kl_target == kl_target), None)
        return cls(kl_target, detection_auc,
                   concept_rate=cc.concept_rate if cc else None, gain_over_random=cc.gain_over_random if cc else None,
                   p_value=cc.p_value if cc else None, fluency=cc.fluency if cc else None,
                   combined=cc.combined if cc else None, feature_concept=fc.concept if fc else None,
                   feature_fluency=fc.fluency if fc else None, feature_combined=fc.combined if fc else None,
                   concept_rate_ci=cc.concept_rate_ci if cc else None, n_continuations=cc.n if cc else None,
                   gate_removed=cc.gate_removed if cc else (fc.gate_removed if fc else None))


@dataclass(frozen=True)
class Record:
    """One steering vector source: a decomposer, DiffMean or random directions at a hookpoint."""

    kind: str  # decomposer kind | "diffmean" | "random"
    hookpoint: str  # where it steers
    detection_auc: float | None  # mean held-out AUC over concepts
    detection: dict[str, Detection]
    calibration: CalibrationSummary
    feature_curve: list[FeatureCurvePoint]  # [] for DiffMean and random
    concept_curve: list[ConceptCurvePoint]
    summary: Summary


@dataclass(frozen=True)
class JudgesReport:
    """How good the concept judges are, and how often they fire on unsteered text."""

    classes: list[str]
    probe_hookpoint: str
    heldout_accuracy: dict[str, float]  # probe, lexical, both_agree (class-balanced), probe_raw, lexical_raw
    n_train: int
    n_heldout: int
    n_negative_generations: int
    base_rate: dict[str, dict[str, float]]  # concept -> {probe, lexical, both, judged} on unsteered continuations
    base_rate_any_concept: dict[str, float]  # {probe, lexical}


@dataclass(frozen=True)
class Unsteered:
    """The fluency reference: unsteered continuations' mean loss and distinct-bigram share."""

    loss: float
    bigram_share: float
    n: int


@dataclass(frozen=True)
class HumanTextGates:
    """The fluency gates applied to human text: held-out corpus windows of the concepts, read like a
    continuation (per-token loss under the model, distinct-bigram share). The gates are calibrated on the
    model's own samples (temperature < 1 text is far more predictable than human text), so they reject
    most human text: a steered continuation passes only by staying as predictable as the model's own."""

    n: int  # held-out on-topic windows
    window_tokens: int
    loss_mean: float
    bigram_share_mean: float
    reference_loss: float  # the unsteered continuations' (the gates' reference)
    reference_bigram_share: float
    rejected: GateRemoved  # share of the windows each gate rejects


@dataclass(frozen=True)
class SteeringResult:
    config: dict[str, Any]  # the SteeringConfig used, with the resolved probe hookpoint
    judges: JudgesReport | None  # None without concepts
    unsteered: Unsteered
    records: dict[str, Record] = field(default_factory=dict)
    features: dict[str, list[int]] = field(default_factory=dict)  # decomposer -> sampled feature ids
    human_text_gates: HumanTextGates | None = None  # None without concepts
    # every judged continuation (one dict each, continuations.jsonl's lines); not part of steering.json
    continuations: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, continuations=[]))
        del out["continuations"]
        return out
