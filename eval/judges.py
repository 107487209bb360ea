"""Automatic judges of steered text: concept presence, fluency, and the statistics to compare rates.

No language-model judge: two independent concept classifiers that must agree, plus fluency gates.
- `LinearProbe`: multinomial logistic regression on the unsteered model's mean activation over the
  continuation (read at one hookpoint). Trained on labelled corpus windows with diverse negatives: the
  corpus's other labels and the model's own unsteered generations (class "other"), so that neutral text
  is not called on-topic; its held-out accuracy and its base rate on unsteered text are reported.
- `NaiveBayesText`: multinomial naive Bayes over lowercase words of the text: a lexical judge that shares
  nothing with the probe but the training labels.
- Fluency gates (a probe alone rates word salad and "the the the" on-topic): a continuation counts only if
  the unsteered model's per-token loss on it is within `loss_margin` nats of the unsteered continuations'
  mean, and its distinct-bigram share is at least `bigram_frac` of theirs.
A continuation is on-topic for a concept only when both classifiers name that concept and it passes both
gates (`ConceptJudge.on_topic`). `compare_rates` tests a steered rate against a random-direction rate.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import optimize, stats

from dictlearn.activations.hookpoints import Hookpoint, capture, run_forward

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
OTHER = "other"


# ----------------------------------------------------------------------------- labelled text

@dataclass(frozen=True)
class Document:
    source: str
    id: str
    label: str  # BBC topic for BBC articles (from the id, e.g. "sport/012.txt"), else the source name
    text: str


def label_of(source: str, doc_id: str) -> str:
    if source == "bbc":
        topic = doc_id.split("/", 1)[0]
        if topic in TOPICS:
            return topic
    return source


def load_labelled_documents(path: str | Path) -> list[Document]:
    """Documents of a `.jsonl[.gz]` corpus with `source`, `id`, `text` fields, labelled by `label_of`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled corpus {str(path)!r} does not exist; set eval.steering.corpus to a "
                                ".jsonl(.gz) file with source/id/text fields (e.g. ../shared/assets/english-corpus.jsonl.gz)")
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in ("source", "id", "text") if k not in rec]
            if missing:
                raise ValueError(f"{path} line {n + 1}: missing field(s) {missing}; labelled concepts need source, id and text")
            docs.append(Document(rec["source"], str(rec["id"]), label_of(rec["source"], str(rec["id"])), rec["text"]))
    return docs


def split_documents(docs: Sequence[Document], held_out: float = 0.25, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document (hash of id): no window of a held-out document is trained on."""
    train, test = [], []
    for d in docs:
        h = int(hashlib.sha256(f"{seed}:{d.source}:{d.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if h < held_out else train).append(d)
    return train, test


def sample_windows(docs: Sequence[Document], tokenizer, n: int, n_tokens: int, rng: np.random.Generator,
                   max_chars: int = 4000) -> list[list[int]]:
    """n token windows of n_tokens from distinct documents where possible (a random place in each)."""
    if not docs or n <= 0:
        return []
    order = rng.permutation(len(docs))
    out: list[list[int]] = []
    i = 0
    while len(out) < n and i < 4 * n + len(docs):
        d = docs[order[i % len(docs)]]
        i += 1
        text = d.text
        if len(text) > max_chars:
            start = int(rng.integers(0, len(text) - max_chars))
            text = text[start: start + max_chars]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < n_tokens // 2:
            continue
        s = int(rng.integers(0, max(1, len(ids) - n_tokens + 1)))
        out.append(list(ids[s: s + n_tokens]))
    return out


# ----------------------------------------------------------------------------- reading text with the model

@dataclass
class ReadOut:
    pooled: dict[str, np.ndarray]  # hookpoint -> (N, d): mean activation over each sequence's read positions
    tokens: dict[str, list[np.ndarray]]  # hookpoint -> per sequence (n_i, d) activations at read positions
    loss: np.ndarray | None  # (N,) mean next-token loss (nats) over the read positions


def read_sequences(model: torch.nn.Module, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                   hookpoints: Sequence[Hookpoint], keep_tokens: Sequence[str] = (), with_loss: bool = False,
                   batch_size: int = 16) -> ReadOut:
    """Run the (unsteered) model over token sequences and read positions [start, len) of each.

    Right-padded batches (exact under causal attention). Loss at position t is -log p(token_t | tokens_<t),
    so a start of at least 1 is needed with_loss. Stops after the last hooked block when no loss is needed."""
    if len(seqs) != len(starts):
        raise ValueError("need one start per sequence")
    for s, st in zip(seqs, starts):
        if not (0 <= st < len(s)) or (with_loss and st < 1):
            raise ValueError(f"read start {st} is out of range for a sequence of {len(s)} tokens")
    device = next(model.parameters()).device
    pooled = {h.name: [None] * len(seqs) for h in hookpoints}
    tokens = {name: [None] * len(seqs) for name in keep_tokens}
    loss = np.zeros(len(seqs)) if with_loss else None
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for b in range(0, len(seqs), batch_size):
        idx = order[b: b + batch_size]
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(list(seqs[i]))
        ids = ids.to(device)
        with torch.no_grad(), capture(model, list(hookpoints), stop_early=not with_loss) as acts:
            out = run_forward(model, ids)
        for r, i in enumerate(idx):
            st, n = int(starts[i]), len(seqs[i])
            for h in hookpoints:
                a = acts[h.name][r, st:n].float().cpu().numpy()
                pooled[h.name][i] = a.mean(0)
                if h.name in tokens:
                    tokens[h.name][i] = a
            if with_loss:
                loss[i] = float(torch.nn.functional.cross_entropy(out.logits[r, st - 1: n - 1].float(), ids[r, st:n]))
    return ReadOut({k: np.stack(v) for k, v in pooled.items()}, tokens, loss)


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
    """Multinomial naive Bayes over lowercase words (Laplace smoothing, uniform class prior)."""

    def __init__(self, n_classes: int, smoothing: float = 1.0, min_count: int = 2):
        self.n_classes, self.smoothing, self.min_count = n_classes, smoothing, min_count
        self.vocab: dict[str, int] = {}
        self.log_p: np.ndarray | None = None

    def fit(self, texts: Sequence[str], y: Sequence[int]) -> "NaiveBayesText":
        y = np.asarray(y, int)
        if len(texts) != len(y) or len(y) == 0:
            raise ValueError("naive Bayes needs one label per text and at least one text")
        totals: dict[str, int] = {}
        tokenised = [words(t) for t in texts]
        for ws in tokenised:
            for w in ws:
                totals[w] = totals.get(w, 0) + 1
        self.vocab = {w: i for i, w in enumerate(sorted(w for w, c in totals.items() if c >= self.min_count))}
        counts = np.zeros((self.n_classes, len(self.vocab)))
        for ws, c in zip(tokenised, y):
            for w in ws:
                j = self.vocab.get(w)
                if j is not None:
                    counts[c, j] += 1
        counts += self.smoothing
        self.log_p = np.log(counts / counts.sum(1, keepdims=True))
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


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two scores in [0, 1] (0 if either is 0: a method must do both)."""
    a, b = max(0.0, a), max(0.0, b)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


# ----------------------------------------------------------------------------- statistics

def compare_rates(k_a: int, n_a: int, k_b: int, n_b: int, alternative: str = "greater") -> dict[str, float]:
    """Is rate a = k_a/n_a larger than rate b (alternative "greater"; "less" for smaller)?

    Fisher's exact test on the 2x2 table (the p-value the suite reports) and the pooled two-proportion z test."""
    if not (0 <= k_a <= n_a and 0 <= k_b <= n_b and n_a > 0 and n_b > 0):
        raise ValueError(f"need 0 <= k <= n and n > 0, got {k_a}/{n_a} and {k_b}/{n_b}")
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    _, p_fisher = stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]], alternative=alternative)
    pa, pb = k_a / n_a, k_b / n_b
    pooled = (k_a + k_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = 0.0 if se == 0 else (pa - pb) / se
    p_z = float(stats.norm.sf(z) if alternative == "greater" else stats.norm.cdf(z)) if se > 0 else 1.0
    return {"rate_a": pa, "rate_b": pb, "diff": pa - pb, "p_fisher": float(p_fisher), "z": z, "p_z": p_z}


def detection_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of scores (N, F) for separating positive rows (N,) bool from the rest (ties 1/2)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if scores.ndim == 1:
        scores = scores[:, None]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("detection AUC needs both positive and negative examples")
    ranks = stats.rankdata(scores, axis=0)
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ----------------------------------------------------------------------------- the judge

@dataclass
class ConceptJudge:
    """Probe + lexical classifier over classes concepts + ("other",), and the report of how good they are."""

    classes: tuple[str, ...]
    probe_hookpoint: str
    probe: LinearProbe
    lexical: NaiveBayesText
    report: dict = field(default_factory=dict)

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
