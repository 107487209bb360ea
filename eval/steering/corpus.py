"""The labelled corpus: documents with a topic or source label, a split by document, and token windows read
by the model (the judges' training data, DiffMean's means, detection AUC and feature statistics)."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import Hookpoint
from dictlearn.eval.steering.reading import read_sequences

TOPICS = ("business", "entertainment", "politics", "sport", "tech")


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


def lexical_training_text(docs: Sequence[Document], per_label: int, max_chars: int = 3000) -> tuple[list[str], list[str]]:
    """Up to per_label documents of each label (first max_chars characters) with their labels: text is cheap,
    so the lexical judge sees far more of it than the probe's windows. Taken in a fixed pseudo-random order
    (hash of the id), not the file's: BBC files are sorted by sub-topic, and the first 300 sport articles
    had no tennis (the first 64, no football)."""
    texts, labels, count = [], [], {}
    for d in sorted(docs, key=lambda d: hashlib.sha256(f"lexical:{d.source}:{d.id}".encode()).hexdigest()):
        if count.get(d.label, 0) < per_label:
            count[d.label] = count.get(d.label, 0) + 1
            texts.append(d.text[:max_chars])
            labels.append(d.label)
    return texts, labels


@dataclass
class WindowSplit:
    """Token windows of one split and what the model reads in them."""

    seqs: list[list[int]]
    labels: np.ndarray  # (N,) str: each window's document label
    pooled: dict[str, np.ndarray]  # hookpoint -> (N, d) mean activation over the window (first token excluded)
    tokens: dict[str, list[np.ndarray]]  # decomposer input hookpoint -> per window (n_i, d) activations
    texts: list[str]


@dataclass
class LabelledWindows:
    train: WindowSplit
    test: WindowSplit
    train_docs: list[Document]  # the lexical judge's training text

    def diffmean(self, hookpoint: str, concept: str) -> np.ndarray:
        """Mean training activation on the concept's windows minus the mean on every other window."""
        x, on = self.train.pooled[hookpoint], self.train.labels == concept
        return x[on].mean(0) - x[~on].mean(0)


def labelled_windows(model: torch.nn.Module, tokenizer, corpus: str, concepts: Sequence[str], read_at: Sequence[Hookpoint],
                     keep_tokens: Sequence[str], window_tokens: int, windows_per_class: int, held_out_windows: int,
                     rng: np.random.Generator, seed: int = 0, batch_size: int = 16,
                     log: Callable[[str], None] = lambda msg: None) -> LabelledWindows:
    """Train / held-out token windows per class (each concept, and twice as many spread over the other
    labels), read at `read_at`, with per-token activations kept at `keep_tokens`."""
    if not corpus:
        raise ValueError("steering evaluation needs a labelled corpus: set eval.steering.corpus to a .jsonl(.gz) "
                         "file with source/id/text fields (e.g. ../shared/assets/english-corpus.jsonl.gz), "
                         "or set concepts = [] and pass an activation cache")
    docs = load_labelled_documents(corpus)
    labels = sorted({d.label for d in docs})
    unknown = [c for c in concepts if c not in labels]
    if unknown:
        raise ValueError(f"concept(s) {unknown} are not labels of {corpus}; its labels are {labels}")
    train_docs, test_docs = split_documents(docs, 0.25, seed)
    others = [lab for lab in labels if lab not in concepts]
    splits = {}
    for split, split_docs, per_class in (("train", train_docs, windows_per_class), ("test", test_docs, held_out_windows)):
        seqs, labs = [], []
        for c in concepts:
            w = sample_windows([d for d in split_docs if d.label == c], tokenizer, per_class, window_tokens, rng)
            seqs += w
            labs += [c] * len(w)
        n_other = 2 * per_class if concepts else per_class
        for i, o in enumerate(others):  # "other": spread evenly over every other label
            share = n_other // len(others) + (1 if i < n_other % len(others) else 0)
            w = sample_windows([d for d in split_docs if d.label == o], tokenizer, share, window_tokens, rng)
            seqs += w
            labs += [o] * len(w)
        log(f"steering: reading {len(seqs)} {split} windows of {window_tokens} tokens")
        read = read_sequences(model, seqs, [1] * len(seqs), list(read_at), keep_tokens=list(keep_tokens),
                              batch_size=batch_size)
        splits[split] = WindowSplit(seqs, np.array(labs), read.pooled, read.tokens,
                                    [tokenizer.decode(s[1:], skip_special_tokens=True) for s in seqs])
    return LabelledWindows(splits["train"], splits["test"], train_docs)
