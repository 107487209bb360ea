"""The automatic judges of steered text: concept presence and fluency (no language-model judge).

- `LinearProbe`: multinomial logistic regression on the unsteered model's mean activation over the
  continuation (read at one hookpoint). Trained on labelled corpus windows with diverse negatives: the
  corpus's other labels and the model's own unsteered generations (class "other"), so that neutral text
  is not called on-topic; its held-out accuracy and its base rate on unsteered text are reported.
- `NaiveBayesText`: naive Bayes over lowercase content words of the text (word presence per document, equal
  word mass per class, smoothing toward the pooled distribution): a lexical judge that shares nothing with
  the probe but the training labels.
- Fluency gates (a probe alone rates word salad and "the the the" on-topic): a continuation counts only if
  the unsteered model's per-token loss on it is within `loss_margin` nats of the unsteered continuations'
  mean, and its distinct-bigram share is at least `bigram_frac` of theirs (`FluencyReference`).
A continuation is on-topic for a concept only when both classifiers name that concept and it passes both
gates (`ConceptJudge.on_topic`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize

from dictlearn.eval.steering.records import Fluency, JudgeShares

OTHER = "other"


# ----------------------------------------------------------------------------- the two classifiers

class LinearProbe:
    """Multinomial logistic regression (standardised inputs, L2, class-balanced), fitted with L-BFGS."""

    def __init__(self, n_classes: int, l2: float = 1e-2):
        self.n_classes, self.l2 = n_classes, l2
        self.mean = self.scale = self.w = self.b = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearProbe":
        x, y = np.asarray(x, np.float64), np.asarray(y, int)
        if x.ndim != 2 or len(x) != len(y) or y.min() < 0 or y.max() >= self.n_classes:
            raise ValueError(f"probe needs x (N, d) and labels in 0..{self.n_classes - 1}")
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mean) / self.scale
        n, d = z.shape
        k = self.n_classes
        counts = np.bincount(y, minlength=k).astype(float)
        weight = (n / (k * np.maximum(counts, 1)))[y] / n  # each class counts equally
        onehot = np.eye(k)[y]

        def objective(theta):
            w, b = theta[: d * k].reshape(d, k), theta[d * k:]
            logits = z @ w + b
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            f = -(weight * (onehot * logp).sum(1)).sum() + 0.5 * self.l2 * (w * w).sum()
            g_logits = weight[:, None] * (np.exp(logp) - onehot)
            grad = np.concatenate([(z.T @ g_logits + self.l2 * w).ravel(), g_logits.sum(0)])
            return f, grad

        res = optimize.minimize(objective, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 500})
        self.w, self.b = res.x[: d * k].reshape(d, k), res.x[d * k:]
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.w is None:
            raise RuntimeError("fit the probe first")
        logits = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.w + self.b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(1)


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
# Function words carry style, not topic: without them the lexical judge looks at content words only.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off
on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves i'm i've i'd i'll you're you've it's
that's there's he's she's we're they're don't didn't doesn't isn't wasn't can't won't let's said says say one two
get got go going went like well just really much many even still back yes oh ok okay
""".split())


def words(text: str) -> list[str]:
    """Lowercase content words of a text (function words dropped)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1]


class NaiveBayesText:
    """Naive Bayes over lowercase content words, made robust to generic words and to class sizes.

    The plain multinomial form (word counts, add-one smoothing) let generic words decide short texts: BBC
    tech articles use "popular", "people", "use" far more than sport articles, and "popular" (69 times in
    tech, once in sport) weighed 3.3 nats toward tech, more than the word "sport" did, so "football is the
    most popular sport in the world" went to tech whenever the sport sample was thin. So:
    - each document counts a word once (presence): an article repeating a word is one piece of evidence;
    - every class has the same total word mass (documents reweighted), with a uniform class prior: a class
      with longer or more documents neither gains nor loses;
    - Dirichlet smoothing toward the pooled (class-balanced) word distribution, with `smoothing` times the
      class mass as prior mass (with equal masses: P(w | c) = (P_c(w) + smoothing * P_pooled(w)) /
      (1 + smoothing)): a word common everywhere but rarely seen in one class is shrunk toward "no
      evidence" instead of getting add-one's near-zero probability there."""

    def __init__(self, n_classes: int, smoothing: float = 0.25, min_count: int = 2):
        if smoothing <= 0:
            raise ValueError(f"naive Bayes smoothing must be positive, got {smoothing}")
        self.n_classes, self.smoothing, self.min_count = n_classes, smoothing, min_count
        self.vocab: dict[str, int] = {}
        self.log_p: np.ndarray | None = None

    def fit(self, texts: Sequence[str], y: Sequence[int]) -> "NaiveBayesText":
        y = np.asarray(y, int)
        if len(texts) != len(y) or len(y) == 0:
            raise ValueError("naive Bayes needs one label per text and at least one text")
        present = [set(words(t)) for t in texts]
        totals: dict[str, int] = {}
        for ws in present:
            for w in ws:
                totals[w] = totals.get(w, 0) + 1
        self.vocab = {w: i for i, w in enumerate(sorted(w for w, c in totals.items() if c >= self.min_count))}
        counts = np.zeros((self.n_classes, len(self.vocab)))
        for ws, c in zip(present, y):
            idx = [self.vocab[w] for w in ws if w in self.vocab]
            counts[c, idx] += 1
        mass = counts.sum(1, keepdims=True)
        dist = np.divide(counts, mass, out=np.zeros_like(counts), where=mass > 0)  # each class's word distribution
        seen = mass[:, 0] > 0
        if not seen.any():  # no word reaches min_count: every text will be "other"
            self.log_p = np.zeros((self.n_classes, 0))
            return self
        # every class at one word mass m with prior mass smoothing * m toward the pooled distribution
        self.log_p = np.log((dist + self.smoothing * dist[seen].mean(0)) / (1 + self.smoothing))
        return self

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(N, n_classes) log-likelihoods (uniform prior): words outside the vocabulary are ignored."""
        if self.log_p is None:
            raise RuntimeError("fit the classifier first")
        out = np.zeros((len(texts), self.n_classes))
        for i, t in enumerate(texts):
            idx = [self.vocab[w] for w in words(t) if w in self.vocab]
            if idx:
                out[i] = self.log_p[:, idx].sum(1)
        return out

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Most likely class; a text with no known word gets the last class (by convention "other")."""
        s = self.scores(texts)
        pred = s.argmax(1)
        pred[(s == 0).all(1)] = self.n_classes - 1
        return pred


# ----------------------------------------------------------------------------- fluency

def distinct_bigram_share(tokens: Sequence[int]) -> float:
    """Distinct bigrams / bigrams of a token sequence (1.0 for no repetition; "the the the" -> ~0)."""
    t = list(tokens)
    if len(t) < 2:
        return 1.0
    pairs = list(zip(t[:-1], t[1:]))
    return len(set(pairs)) / len(pairs)


@dataclass(frozen=True)
class FluencyReference:
    """Unsteered continuations' mean per-token loss and mean distinct-bigram share."""

    loss: float
    bigram_share: float
    loss_margin: float = 1.0  # a continuation is fluent if its loss <= reference + margin (nats)
    bigram_frac: float = 0.8  # ... and its distinct-bigram share >= frac * reference

    @classmethod
    def of(cls, losses: Sequence[float], shares: Sequence[float], loss_margin: float = 1.0,
           bigram_frac: float = 0.8) -> "FluencyReference":
        return cls(float(np.mean(losses)), float(np.mean(shares)), loss_margin, bigram_frac)

    def gate(self, losses, shares) -> np.ndarray:
        """Per continuation: passes both fluency gates."""
        losses, shares = np.asarray(losses, float), np.asarray(shares, float)
        return (losses <= self.loss + self.loss_margin) & (shares >= self.bigram_frac * self.bigram_share)

    def score(self, losses, shares) -> float:
        """Fluency in [0, 1] of a set of continuations: exp(-extra loss) (the inverse perplexity ratio,
        1 when no worse than unsteered) times min(1, bigram ratio / bigram_frac) (penalises repetition)."""
        extra = max(0.0, float(np.mean(losses)) - self.loss)
        ratio = float(np.mean(shares)) / self.bigram_share if self.bigram_share > 0 else 1.0
        return math.exp(-extra) * min(1.0, ratio / self.bigram_frac)

    def compare(self, losses, shares) -> Fluency:
        """Loss difference, bigram ratio and fluency score of a set of continuations against the reference."""
        ratio = float(np.mean(shares)) / self.bigram_share if self.bigram_share > 0 else 1.0
        return Fluency(float(np.mean(losses)) - self.loss, ratio, self.score(losses, shares))


# ----------------------------------------------------------------------------- the judge

@dataclass
class ConceptJudge:
    """Probe + lexical classifier over classes concepts + ("other",)."""

    classes: tuple[str, ...]
    probe_hookpoint: str
    probe: LinearProbe
    lexical: NaiveBayesText

    def index(self, concept: str) -> int:
        if concept not in self.classes[:-1]:
            raise ValueError(f"the judge knows concepts {self.classes[:-1]}, not {concept!r}")
        return self.classes.index(concept)

    def predict(self, probe_x: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probe class index, lexical class index) per text."""
        return self.probe.predict(probe_x), self.lexical.predict(texts)

    def on_topic(self, concept: str, probe_x: np.ndarray, texts: Sequence[str], fluent: np.ndarray | None = None) -> np.ndarray:
        """Both classifiers name `concept` and (when given) the continuation passed the fluency gates."""
        c = self.index(concept)
        p, l = self.predict(probe_x, texts)
        ok = (p == c) & (l == c)
        return ok if fluent is None else ok & np.asarray(fluent, bool)

    def shares(self, concept: str, probe_x: np.ndarray, texts: Sequence[str], fluent: np.ndarray) -> JudgeShares:
        """Share of the continuations that the probe, the lexical judge, both, and the fluency gates accept."""
        c = self.index(concept)
        p, l = self.predict(probe_x, texts)
        return JudgeShares(float((p == c).mean()), float((l == c).mean()), float(((p == c) & (l == c)).mean()),
                           float(np.asarray(fluent, bool).mean()))

    @classmethod
    def fit(cls, concepts: Sequence[str], probe_hookpoint: str, probe_x: np.ndarray, probe_labels: Sequence[str],
            lexical_texts: Sequence[str], lexical_labels: Sequence[str], l2: float = 1e-2) -> "ConceptJudge":
        """Train the probe on activations and the lexical classifier on texts (labels not among concepts
        become "other"); the two may use different text (the lexical one is cheap to give far more)."""
        classes = tuple(concepts) + (OTHER,)
        if len(set(classes)) != len(classes):
            raise ValueError(f"concepts must be distinct and not {OTHER!r}: {list(concepts)}")
        judge = cls(classes, probe_hookpoint, LinearProbe(len(classes), l2), NaiveBayesText(len(classes)))
        y_probe, y_lex = judge.targets(probe_labels), judge.targets(lexical_labels)
        for what, y in (("probe", y_probe), ("lexical classifier", y_lex)):
            missing = [c for i, c in enumerate(classes) if not (y == i).any()]
            if missing:
                raise ValueError(f"no training text for class(es) {missing} of the {what}")
        judge.probe.fit(probe_x, y_probe)
        judge.lexical.fit(list(lexical_texts), y_lex)
        return judge

    def targets(self, labels: Sequence[str]) -> np.ndarray:
        """Class index of each label (labels that are not concepts map to "other")."""
        return np.array([self.classes.index(l) if l in self.classes[:-1] else len(self.classes) - 1 for l in labels], int)

    def accuracy(self, x: np.ndarray, texts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
        """Held-out accuracy of each classifier and of their agreement, class-balanced (mean per-class recall)."""
        y = self.targets(labels)
        p, l = self.predict(x, texts)

        def balanced(pred):
            return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))

        both = np.where(p == l, p, -1)
        return {"probe": balanced(p), "lexical": balanced(l), "both_agree": balanced(both),
                "probe_raw": float((p == y).mean()), "lexical_raw": float((l == y).mean())}
