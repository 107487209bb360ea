"""Concept judges, fluency gates and the statistics of steering, on constructed data (no model)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from scipy import stats

from dictlearn.eval.steering.corpus import (
    TOPICS,
    Document,
    label_of,
    lexical_training_text,
    load_labelled_documents,
    split_documents,
)
from dictlearn.eval.steering.judges import (
    ConceptJudge,
    FluencyReference,
    LinearProbe,
    NaiveBayesText,
    distinct_bigram_share,
    words,
)
from dictlearn.eval.steering.stats import compare_rates, detection_auc, harmonic_mean, shift_p_value


def blobs(n_per_class: int, d: int = 20, k: int = 3, sep: float = 3.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * sep
    y = np.repeat(np.arange(k), n_per_class)
    return centres[y] + rng.standard_normal((len(y), d)), y


def test_probe_separates_blobs_and_generalises():
    x, y = blobs(60)
    xt, yt = blobs(30, seed=0)  # same centres (same seed), fresh noise below
    xt = xt + np.random.default_rng(1).standard_normal(xt.shape) * 0.1
    probe = LinearProbe(3).fit(x, y)
    assert (probe.predict(xt) == yt).mean() > 0.95
    p = probe.predict_proba(xt)
    assert np.allclose(p.sum(1), 1.0)


def test_probe_is_class_balanced():
    # 95% of the data is class 1; an unweighted fit would lean to it on the ambiguous middle
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 1, (20, 1)), rng.normal(1, 1, (380, 1))])
    y = np.r_[np.zeros(20, int), np.ones(380, int)]
    probe = LinearProbe(2, l2=1e-4).fit(x, y)
    boundary = np.linspace(-3, 3, 601)[np.argmax(probe.predict(np.linspace(-3, 3, 601)[:, None]) == 1)]
    assert abs(boundary) < 0.4  # balanced: the decision boundary sits near the midpoint 0


def test_probe_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        LinearProbe(2).fit(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(RuntimeError, match="fit"):
        LinearProbe(2).predict(np.zeros((1, 2)))


def test_words_drop_function_words():
    assert words("The striker SCORED a goal, and I'm happy!") == ["striker", "scored", "goal", "happy"]


SPORT = ["the striker scored a late goal in the match", "the coach praised the team after the cup final",
         "the champion won the title in the final set", "the goal keeper saved a penalty in the match"]
MONEY = ["the bank raised interest rates and shares fell", "profits at the firm rose as sales grew",
         "the market fell as investors sold shares", "the company reported higher profits and sales"]


def test_naive_bayes_classifies_by_topic_words():
    nb = NaiveBayesText(2, min_count=1).fit(SPORT + MONEY, [0] * 4 + [1] * 4)
    assert list(nb.predict(["a goal in the final match", "shares and profits rose", "zzz qqq"])) == [0, 1, 1]


def test_naive_bayes_uniform_prior_ignores_class_sizes():
    # 1 sport text against 8 money texts: a word seen only in sport still decides
    nb = NaiveBayesText(2, min_count=1).fit(SPORT[:1] + MONEY * 2, [0] + [1] * 8)
    assert nb.predict(["striker goal"])[0] == 0


def generic_word_corpus(seed: int = 0) -> tuple[list[str], list[int]]:
    """Sport (0) and tech (1) documents over a shared filler vocabulary: "football" in 20 sport and 3 tech
    documents, "sport" in 20 and 3, and a generic word, "popular", in no sport document but repeated six
    times in 45 tech articles (as BBC tech uses "popular", "people", "use")."""
    rng = np.random.default_rng(seed)
    filler = [f"filler{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(400)]

    def doc(extra: list[str], n: int) -> str:
        return " ".join(list(rng.choice(filler, n)) + extra)

    sport = [doc(["football"] * (i < 20) + ["sport"] * (10 <= i < 30), 30) for i in range(50)]
    tech = [doc(["football"] * (i < 3) + ["sport"] * (3 <= i < 6) + ["popular"] * (6 * (i < 45)), 60) for i in range(50)]
    return sport + tech, [0] * 50 + [1] * 50


def test_naive_bayes_a_repeated_generic_word_does_not_outvote_topic_words():
    # Word counts with add-one smoothing called this tech (-16.26 against -16.63): 270 "popular"s in tech,
    # none in sport, outweighed "football" and "sport". Presence per document and smoothing toward the
    # pooled distribution leave the two topic words in charge.
    texts, y = generic_word_corpus()
    nb = NaiveBayesText(2).fit(texts, y)
    s = nb.scores(["football is the most popular sport in the world"])[0]
    assert s[0] - s[1] > 0.5
    assert nb.predict(["popular popular filleraa"])[0] == 1  # the generic word is still (weak) evidence


def test_naive_bayes_counts_presence_and_equalises_class_mass():
    nb = NaiveBayesText(2, min_count=1).fit(SPORT + MONEY, [0] * 4 + [1] * 4)
    repeated = NaiveBayesText(2, min_count=1).fit([SPORT[0] + " goal goal goal"] + SPORT[1:] + MONEY, [0] * 4 + [1] * 4)
    assert np.allclose(nb.log_p, repeated.log_p)  # "goal" once or four times in a document: one piece of evidence
    doubled = NaiveBayesText(2, min_count=1).fit(SPORT * 3 + MONEY, [0] * 12 + [1] * 4)
    assert np.allclose(nb.log_p, doubled.log_p)  # three copies of a class's text: same word distribution
    assert np.allclose(np.exp(nb.log_p).sum(1), 1.0)
    with pytest.raises(ValueError, match="smoothing"):
        NaiveBayesText(2, smoothing=0.0)
    empty = NaiveBayesText(2, min_count=5).fit(SPORT, [0] * 4)  # no word in 5 documents: everything is "other"
    assert list(empty.predict(["goal match"])) == [1]


def test_lexical_training_text_samples_across_the_file_order():
    # BBC files are sorted by sub-topic (athletics ... tennis): the first n documents are not a sample
    docs = [Document("bbc", f"sport/{i:03d}.txt", "sport", ("athletics" if i < 50 else "tennis") + f" text {i}")
            for i in range(100)] + [Document("brown", f"c{i}", "brown", "words") for i in range(5)]
    texts, labels = lexical_training_text(docs, 20)
    assert labels.count("sport") == 20 and labels.count("brown") == 5
    tennis = sum(t.startswith("tennis") for t in texts)
    assert 4 <= tennis <= 16, tennis  # about half of a fair sample; first-20 gave none
    assert lexical_training_text(docs, 20) == (texts, labels)  # deterministic


# Short clear sentences per BBC topic (written for this test, not taken from the corpus).
TOPIC_SENTENCES = {
    "sport": ["football is the most popular sport in the world",
              "the striker scored twice as united beat chelsea in the league",
              "she won the tennis final in straight sets at wimbledon",
              "the england rugby coach named his squad for the six nations",
              "the sprinter broke the world record at the olympic games",
              "the team lost the match after a late penalty"],
    "tech": ["the new phone lets users download music and play games",
             "hackers used a virus to attack computers over the internet",
             "the software company released a new version of its web browser",
             "broadband and mobile networks are growing fast",
             "gamers can play online with the new console"],
    "business": ["shares in the bank fell after profits dropped",
                 "the economy grew faster than analysts expected last quarter",
                 "the firm agreed to buy its rival in a billion dollar deal",
                 "oil prices rose and the dollar fell against the euro",
                 "the company cut jobs to reduce costs"],
    "politics": ["the prime minister called a general election",
                 "labour and the tories clashed over tax plans in parliament",
                 "the home secretary defended the new terror laws",
                 "voters will choose a new government in may",
                 "the minister said the party would win the vote"],
    "entertainment": ["the film won best picture at the oscars",
                      "the band released a new album and went on tour",
                      "the actress starred in a hit comedy show on television",
                      "the singer topped the music charts with her latest single",
                      "the director's new movie opened at the box office"],
}


def test_lexical_judge_trained_on_the_corpus_names_each_bbc_topic(assets):
    """The lexical judge as the steering evaluation trains it (training documents of the split, up to 300 per
    label, BBC topics as concepts, every other source "other") on short sentences of each topic (~3 s)."""
    docs = load_labelled_documents(assets / "english-corpus.jsonl.gz")
    texts, labels = lexical_training_text(split_documents(docs, 0.25, seed=0)[0], 300)
    classes = list(TOPICS) + ["other"]
    nb = NaiveBayesText(len(classes)).fit(texts, [classes.index(l) if l in TOPICS else len(TOPICS) for l in labels])
    called = {t: [classes[i] for i in nb.predict(s)] for t, s in TOPIC_SENTENCES.items()}
    assert called == {t: [t] * len(s) for t, s in TOPIC_SENTENCES.items()}, called


def test_distinct_bigram_share():
    assert distinct_bigram_share([1, 2, 3, 4]) == 1.0
    assert distinct_bigram_share([5, 5, 5, 5]) == pytest.approx(1 / 3)
    assert distinct_bigram_share([1, 2, 1, 2, 1]) == pytest.approx(2 / 4)
    assert distinct_bigram_share([7]) == 1.0


def test_fluency_compare_reports_the_differences():
    ref = FluencyReference.of([2.0, 2.0], [1.0, 1.0])
    flu = ref.compare([2.5, 3.5], [0.6, 0.4])
    assert flu.loss_delta == pytest.approx(1.0) and flu.bigram_ratio == pytest.approx(0.5)
    assert flu.fluency == pytest.approx(math.exp(-1.0) * 0.5 / 0.8)


def test_fluency_gates_and_score():
    ref = FluencyReference.of([2.0, 2.0], [0.9, 1.0], loss_margin=1.0, bigram_frac=0.8)
    assert ref.loss == 2.0 and ref.bigram_share == pytest.approx(0.95)
    gate = ref.gate([2.5, 3.2, 2.0, 2.0], [0.95, 0.95, 0.7, 0.77])
    assert list(gate) == [True, False, False, True]  # 0.77 >= 0.8 * 0.95 = 0.76
    assert ref.score([1.5], [0.95]) == 1.0  # lower loss than unsteered is not rewarded above 1
    assert ref.score([3.0], [0.95]) == pytest.approx(math.exp(-1.0))
    assert ref.score([2.0], [0.38]) == pytest.approx(0.5)  # ratio 0.4 of the reference / 0.8


def test_word_salad_and_repetition_fail_the_gates():
    ref = FluencyReference.of([2.5] * 4, [1.0] * 4)
    repetition = [11] * 24  # "the the the ...": low loss but no distinct bigrams
    salad_loss = 7.0  # content words in no sentence: the unsteered model finds them very unlikely
    assert not ref.gate([1.0], [distinct_bigram_share(repetition)])[0]
    assert not ref.gate([salad_loss], [1.0])[0]


def test_harmonic_mean():
    assert harmonic_mean(1.0, 1.0) == 1.0
    assert harmonic_mean(0.0, 1.0) == 0.0
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(-0.2, 1.0) == 0.0


def test_compare_rates_matches_hypergeometric_tail():
    res = compare_rates(9, 24, 0, 24)
    # P(X >= 9) for X ~ Hypergeom(total 48, 9 successes, 24 draws)
    assert res["p_fisher"] == pytest.approx(stats.hypergeom.sf(8, 48, 9, 24))
    assert res["p_fisher"] < 0.01 and res["p_z"] < 0.01 and res["diff"] == pytest.approx(9 / 24)
    assert compare_rates(1, 24, 0, 24)["p_fisher"] > 0.4
    assert compare_rates(0, 24, 0, 24)["p_fisher"] == pytest.approx(1.0)
    assert compare_rates(0, 24, 12, 24, alternative="less")["p_fisher"] < 0.001
    with pytest.raises(ValueError, match="k <= n"):
        compare_rates(5, 4, 0, 4)


def test_shift_p_value_is_one_sided_and_safe_on_ties():
    low, high = np.arange(10.0), np.arange(10.0) + 20
    assert shift_p_value(high, low, +1) < 0.001 and shift_p_value(high, low, -1) > 0.99
    assert shift_p_value(low, high, -1) < 0.001
    assert shift_p_value(np.ones(5), np.ones(5), +1) == 1.0  # no spread: no evidence


def test_detection_auc_known_answers_and_brute_force():
    pos = np.array([True, True, False, False])
    assert detection_auc(np.array([3.0, 2.0, 1.0, 0.0]), pos)[0] == 1.0
    assert detection_auc(np.array([0.0, 1.0, 2.0, 3.0]), pos)[0] == 0.0
    assert detection_auc(np.zeros(4), pos)[0] == 0.5
    rng = np.random.default_rng(0)
    s, lab = rng.integers(0, 5, (40, 3)).astype(float), rng.random(40) < 0.4
    brute = [np.mean([(a > b) + 0.5 * (a == b) for a in s[lab, j] for b in s[~lab, j]]) for j in range(3)]
    assert np.allclose(detection_auc(s, lab), brute)
    with pytest.raises(ValueError, match="positive and negative"):
        detection_auc(np.zeros(3), np.ones(3, bool))


def fitted_judge():
    """Probe on a 2-d toy activation (x0 > 0: sport) and lexical judge on toy texts."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal((2, 0), 0.5, (30, 2)), rng.normal((-2, 0), 0.5, (30, 2))])
    labels = ["sport"] * 30 + ["brown"] * 30
    return ConceptJudge.fit(["sport"], "resid_post.1", x, labels, SPORT + MONEY, ["sport"] * 4 + ["bbc_money"] * 4)


def test_judge_needs_both_classifiers_and_fluency():
    judge = fitted_judge()
    assert judge.classes == ("sport", "other")
    x = np.array([[2.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [2.0, 0.0]])
    texts = ["the striker scored a goal", "shares and profits fell", "the striker scored a goal", "the striker scored a goal"]
    fluent = np.array([True, True, True, False])
    # agree+fluent | probe only | lexical only | agree but not fluent
    assert list(judge.on_topic("sport", x, texts, fluent)) == [True, False, False, False]
    acc = judge.accuracy(x[:3], texts[:3], ["sport", "x", "sport"])
    # probe: sport recall 1/2, other recall 0/1 -> 0.25; lexical: all right
    assert acc["probe"] == pytest.approx(0.25) and acc["lexical"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="knows concepts"):
        judge.on_topic("tech", x, texts)
    shares = judge.shares("sport", x, texts, fluent)
    assert (shares.probe_rate, shares.lexical_rate, shares.both_rate, shares.fluent_share) == (0.75, 0.75, 0.5, 0.75)


def test_judge_refuses_missing_classes():
    with pytest.raises(ValueError, match="no training text"):
        ConceptJudge.fit(["sport", "tech"], "h", np.zeros((2, 2)), ["sport", "brown"], ["a b"], ["sport"])


def test_labelled_corpus_reading_and_split(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    recs = [{"source": "bbc", "id": f"sport/{i:03d}.txt", "text": "goal"} for i in range(40)]
    recs += [{"source": "brown", "id": f"ca{i:02d}", "text": "words"} for i in range(40)]
    recs += [{"source": "bbc", "id": "weird/001.txt", "text": "x"}]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n")
    docs = load_labelled_documents(path)
    assert [d.label for d in docs[:1] + docs[40:41] + docs[-1:]] == ["sport", "brown", "bbc"]
    train, test = split_documents(docs, 0.25, seed=0)
    assert {d.id for d in train}.isdisjoint({d.id for d in test}) and len(train) + len(test) == len(docs)
    assert 5 < len(test) < 40
    assert [d.id for d in split_documents(docs, 0.25, seed=0)[1]] == [d.id for d in test]
    assert label_of("abc", "rural.txt:3") == "abc"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "bbc", "text": "no id"}) + "\n")
    with pytest.raises(ValueError, match="missing field"):
        load_labelled_documents(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled_documents(tmp_path / "nope.jsonl")
