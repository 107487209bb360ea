"""The SNMF paper's input and output scores with the steering judges, on constructed judges and data."""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.eval.steering.corpus import WindowSplit
from dictlearn.eval.steering.features import window_max_codes
from dictlearn.eval.steering.io_scores import (
    decomposer_io_scores,
    feature_io_scores,
    input_score,
    output_score,
    top_contexts,
    top_tokens,
    with_io_scores,
)
from dictlearn.eval.steering.judges import ConceptJudge
from dictlearn.eval.steering.records import CalibrationSummary, Detection, Record, Summary

SPORT = ["the striker scored a late goal in the match", "the coach praised the team after the cup final",
         "the champion won the title in the final set", "the goal keeper saved a penalty in the match"]
MONEY = ["the bank raised interest rates and shares fell", "profits at the firm rose as sales grew",
         "the market fell as investors sold shares", "the company reported higher profits and sales"]


@pytest.fixture(scope="module")
def judge() -> ConceptJudge:
    """Probe: x0 > 0 is sport; lexical judge: sport words against money words."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal((2, 0), 0.5, (30, 2)), rng.normal((-2, 0), 0.5, (30, 2))])
    return ConceptJudge.fit(["sport"], "resid_post.1", x, ["sport"] * 30 + ["business"] * 30,
                            SPORT + MONEY, ["sport"] * 4 + ["business"] * 4)


def test_top_contexts_ranks_firing_windows_only():
    a = np.array([0.0, 3.0, 1.0, 0.0, 5.0, 1.0])
    assert list(top_contexts(a, 3)) == [4, 1, 2]  # ties keep window order
    assert list(top_contexts(a, 10)) == [4, 1, 2, 5]  # windows where it never fires are not contexts
    assert len(top_contexts(np.zeros(4), 3)) == 0


def test_input_score_is_the_judged_share_of_the_top_windows():
    on = np.array([True, True, False, False, True, False])
    a = np.array([9.0, 8.0, 7.0, 0.5, 0.0, 0.2])
    assert input_score(on, a, 2) == 1.0
    assert input_score(on, a, 4) == pytest.approx(0.5)  # windows 0, 1, 2, 3
    assert input_score(on, a, 10) == pytest.approx(2 / 5)  # window 4 never fires: not counted
    assert input_score(on, np.zeros(6), 3) is None


def test_top_tokens_descending():
    assert list(top_tokens(np.array([0.1, 5.0, -2.0, 3.0, 4.0]), 3)) == [1, 4, 3]
    assert list(top_tokens(np.array([1.0, 2.0]), 5)) == [1, 0]


def test_output_score_reads_each_token_alone(judge):
    assert output_score(judge, "sport", [" goal", " match", "final", " shares"]) == pytest.approx(0.75)
    assert output_score(judge, "sport", [" profits", "ing", "@@"]) == 0.0  # unknown pieces are not the concept
    assert output_score(judge, "sport", []) is None
    with pytest.raises(ValueError, match="knows concepts"):
        output_score(judge, "tech", [" goal"])


def test_feature_io_scores_judge_only_the_top_contexts(judge):
    # windows: (probe activation, text); the judge calls a window sport only when probe and lexical agree
    probe_x = np.array([[2.0, 0], [2.0, 0], [-2.0, 0], [2.0, 0], [2.0, 0]])
    texts = ["the striker scored a goal", "the team won the match", "the striker scored a goal",
             "shares and profits fell", "a goal in the final"]
    acts = np.array([5.0, 4.0, 3.0, 2.0, 0.0])
    # top 4: sport (both), sport (both), probe says other, lexical says money -> 2 of 4; window 4 never fires
    i_s, o_s = feature_io_scores(judge, "sport", acts, probe_x, texts, [" goal", " sales"], n=10)
    assert i_s == pytest.approx(0.5) and o_s == pytest.approx(0.5)
    assert feature_io_scores(judge, "sport", acts, probe_x, texts, None, n=2) == (1.0, None)


def _record(detection: dict[str, Detection]) -> Record:
    return Record(kind="snmf", hookpoint="mlp_hidden.1", detection_auc=None, detection=detection,
                  calibration=CalibrationSummary(0, None, None, None, {}), feature_curve=[], concept_curve=[],
                  summary=Summary.at(0.5, None, [], []))


def test_with_io_scores_fills_detection_and_summary_means(judge):
    probe_x = np.array([[2.0, 0], [2.0, 0], [-2.0, 0]])
    texts = ["the striker scored a goal", "shares and profits fell", "the team won the match"]
    vocab = [" goal", " match", " shares", " sales"]
    rec = _record({"sport": Detection(7, 0.9, 0.8), "business": Detection(None, None, None)})
    out = with_io_scores(rec, judge, {7: np.array([3.0, 2.0, 1.0])}, probe_x, texts,
                         projection=lambda f: np.array([4.0, 3.0, 2.0, 1.0]), decode=lambda t: vocab[t], top_k=3, n=2)
    sport = out.detection["sport"]
    assert (sport.feature, sport.auc) == (7, 0.8)
    assert sport.input_score == pytest.approx(0.5) and sport.output_score == pytest.approx(2 / 3)
    assert out.detection["business"].input_score is None
    assert out.summary.input_score == pytest.approx(0.5) and out.summary.output_score == pytest.approx(2 / 3)
    none = with_io_scores(rec, judge, {7: np.zeros(3)}, probe_x, texts, lambda f: None, lambda t: "", 3)
    assert none.summary.input_score is None and none.summary.output_score is None
    assert rec.summary.input_score is None  # the record itself is unchanged
    empty = with_io_scores(_record({}), judge, {}, probe_x, texts, lambda f: None, lambda t: "", 3)
    assert empty.summary.input_score is None and empty.summary.output_score is None


class ReluDictionary:
    """Any kind: the scores ask only for encode (here relu(x W)), like a semi-NMF or SAE dictionary."""

    def __init__(self, w: np.ndarray):
        self.w = jnp.asarray(w, jnp.float32)
        self.config = SimpleNamespace(n_features=w.shape[1])

    def encode(self, x):
        return jnp.maximum(x @ self.w, 0.0)


def test_window_max_codes_and_the_scores_of_a_dictionary(judge):
    dec = ReluDictionary(np.array([[1.0, 0.0], [0.0, 1.0]]))  # feature 0 reads dim 0, feature 1 dim 1
    tokens = [np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 2.0]]), np.array([[-1.0, 0.5], [2.0, 0.0]])]
    got = window_max_codes(dec, tokens, np.array([1, 0]), chunk=2)
    assert np.allclose(got, [[0.0, 3.0], [2.0, 0.0], [0.5, 2.0]])
    test = WindowSplit(seqs=[[0]] * 3, labels=np.array(["sport", "business", "sport"]),
                       pooled={"resid_post.1": np.array([[2.0, 0], [-2.0, 0], [2.0, 0]])},
                       tokens={"mlp_hidden.1": tokens},
                       texts=["the striker scored a goal", "shares and profits fell", "the team won the match"])
    rec = _record({"sport": Detection(0, 0.9, 0.9)})
    vocab = [" goal", " shares", " sales"]
    out = decomposer_io_scores(rec, judge, dec, test, "mlp_hidden.1", "resid_post.1",
                               projection=lambda f: np.array([3.0, 2.0, 1.0]), decode=lambda t: vocab[t], top_k=2)
    # feature 0 fires in windows 0 (3.0) and 2 (2.0), both sport; its top 2 tokens: goal (sport), shares
    assert out.detection["sport"].input_score == 1.0 and out.detection["sport"].output_score == 0.5
