"""The SNMF paper's input and output scores of a feature (Shafran et al.), with the steering evaluation's own
judges instead of a language-model judge.

- input score: the share of the feature's top-activating held-out labelled windows (ranked by the feature's
  largest code in the window; windows where it never fires are not counted) that the concept judge calls
  the concept: probe and lexical classifier agree (`ConceptJudge.on_topic` without the fluency gate: these
  are human-written corpus windows, which the gate, calibrated on the model's own samples, would reject).
  It asks "does the feature read the concept?"; chance is the concept's share of the held-out windows.
- output score: the share of the top tokens of the feature's logit-lens vocabulary projection that the
  lexical judge, reading each token alone, assigns to the concept (a token with no word the judge knows
  counts as not the concept). It asks "does the feature write the concept?". A share, not the posterior
  of the tokens joined into one text: naive Bayes is overconfident, so one strong token would decide a
  joined text's posterior. None where the projection does not reach the logits linearly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from dictlearn.eval.steering.corpus import WindowSplit
from dictlearn.eval.steering.features import window_max_codes
from dictlearn.eval.steering.judges import ConceptJudge
from dictlearn.eval.steering.records import Record
from dictlearn.eval.steering.stats import mean_or_none

TOP_CONTEXTS = 10  # top-activating held-out windows judged per feature


def top_contexts(activations: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n windows with the largest activation, descending, among windows where it is > 0."""
    a = np.asarray(activations, float)
    firing = np.flatnonzero(a > 0)
    return firing[np.argsort(-a[firing], kind="stable")][:n]


def input_score(on_concept: np.ndarray, activations: np.ndarray, n: int = TOP_CONTEXTS) -> float | None:
    """Share of the top-n activating windows judged on the concept (`on_concept`: the judge's verdict per
    window); None when the feature fires on no window."""
    top = top_contexts(activations, n)
    return float(np.asarray(on_concept, bool)[top].mean()) if len(top) else None


def top_tokens(projection: np.ndarray, k: int) -> np.ndarray:
    """Token ids of the k largest logits of a (vocab,) projection, descending."""
    p = np.asarray(projection, float)
    k = min(k, len(p))
    top = np.argpartition(-p, k - 1)[:k]
    return top[np.argsort(-p[top], kind="stable")]


def output_score(judge: ConceptJudge, concept: str, token_texts: Sequence[str]) -> float | None:
    """Share of the token strings that the lexical judge, reading each alone, assigns to the concept."""
    if not len(token_texts):
        return None
    return float((judge.lexical.predict(list(token_texts)) == judge.index(concept)).mean())


def feature_io_scores(judge: ConceptJudge, concept: str, activations: np.ndarray, probe_x: np.ndarray,
                      texts: Sequence[str], token_texts: Sequence[str] | None,
                      n: int = TOP_CONTEXTS) -> tuple[float | None, float | None]:
    """(input score, output score) of one feature for one concept: activations, probe_x and texts are per
    held-out window; token_texts the decoded top tokens of its projection (None: no projection)."""
    top = top_contexts(activations, n)
    on = np.zeros(len(texts), bool)
    if len(top):
        on[top] = judge.on_topic(concept, np.asarray(probe_x)[top], [texts[i] for i in top])
    return input_score(on, activations, n), None if token_texts is None else output_score(judge, concept, token_texts)


def with_io_scores(record: Record, judge: ConceptJudge, window_max: dict[int, np.ndarray], probe_x: np.ndarray,
                   texts: Sequence[str], projection: Callable[[int], np.ndarray | None], decode: Callable[[int], str],
                   top_k: int, n: int = TOP_CONTEXTS) -> Record:
    """A decomposer's record with input/output scores on each concept's best feature (`detection`) and their
    means over concepts in the summary (None where no concept has a feature).
    window_max[f]: feature f's largest code per held-out window; projection(f): its (vocab,) logit-lens
    projection or None; decode(token id): the token's text."""
    detection = {}
    for concept, det in record.detection.items():
        if det.feature is None:
            detection[concept] = det
            continue
        proj = projection(det.feature)
        tokens = None if proj is None else [decode(int(t)) for t in top_tokens(proj, top_k)]
        i_s, o_s = feature_io_scores(judge, concept, window_max[det.feature], probe_x, texts, tokens, n)
        detection[concept] = dataclasses.replace(det, input_score=i_s, output_score=o_s)
    summary = dataclasses.replace(record.summary, input_score=mean_or_none(d.input_score for d in detection.values()),
                                  output_score=mean_or_none(d.output_score for d in detection.values()))
    return dataclasses.replace(record, detection=detection, summary=summary)


def decomposer_io_scores(record: Record, judge: ConceptJudge, decomposer: Any, test: WindowSplit, hookpoint_in: str,
                         probe_hookpoint: str, projection: Callable[[int], np.ndarray | None],
                         decode: Callable[[int], str], top_k: int) -> Record:
    """`with_io_scores` on the held-out labelled windows: the decomposer's codes read at hookpoint_in, the
    judge's probe at probe_hookpoint (any kind: only `encode` and the projection are asked for)."""
    feats = sorted({d.feature for d in record.detection.values() if d.feature is not None})
    codes = window_max_codes(decomposer, test.tokens[hookpoint_in], np.array(feats, int))
    return with_io_scores(record, judge, {f: codes[:, i] for i, f in enumerate(feats)}, test.pooled[probe_hookpoint],
                          test.texts, projection, decode, top_k)
