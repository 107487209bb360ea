"""SAEBench-style sparse probing: can k latents of a dictionary tell labelled text apart as well as the
model's whole activation can?

Tasks come from labels we have offline: the five BBC topics, the corpus sources and chat vs news. Each
multi-class task is split into SAEBench's binary subtasks, one class against an equal number of windows of
the other classes (spread evenly over them), so chance is 0.5 everywhere; a task's accuracy is the mean over
its subtasks. A window's activation is the mean over its tokens (the first, the attention sink, excluded);
its code is the mean of the per-token codes. For each subtask the k latents with the largest absolute
difference of mean code between the two classes (training windows) feed a logistic probe, scored on
held-out windows of held-out documents; the probe on the whole activation is the reference."""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import HookpointError, resolve
from dictlearn.eval.report import json_safe
from dictlearn.eval.steering.corpus import TOPICS, Document, load_labelled_documents, sample_windows, split_documents
from dictlearn.eval.steering.judges import LinearProbe
from dictlearn.eval.steering.reading import read_sequences

TASKS = ("topics", "sources", "chat_vs_news")
NEWS_SOURCES = ("bbc", "abc")  # the news side of chat vs news


@dataclass
class ProbingConfig:
    """The `[eval.probing]` table."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10])  # latents per sparse probe
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # any of topics, sources, chat_vs_news
    docs_per_class: int = 24  # training windows per class (one per document where the class has enough)
    test_docs_per_class: int = 12  # held-out windows per class, from held-out documents
    window_tokens: int = 32  # tokens per window (the first is read but not pooled)
    held_out: float = 0.25  # share of documents held out (split by a hash of the document id)
    l2: float = 1e-2  # the logistic probes' L2 penalty (on standardised inputs)
    batch_size: int = 16  # windows per model forward
    encode_chunk: int = 1024  # token rows per encoder call (one fixed shape: one compile per decomposer)
    seed: int = 0  # window sampling, document split and subtask negatives

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"eval.probing.tasks: unknown task(s) {unknown}; choose from {list(TASKS)}")
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ValueError(f"eval.probing.ks must be positive latent counts, got {self.ks}")
        if self.docs_per_class < 2 or self.test_docs_per_class < 1 or self.window_tokens < 2:
            raise ValueError("eval.probing needs docs_per_class >= 2, test_docs_per_class >= 1 and window_tokens >= 2")
        if not 0 < self.held_out < 1:
            raise ValueError(f"eval.probing.held_out must be between 0 and 1, got {self.held_out}")


def probe_sites(model: torch.nn.Module, decomposers: dict[str, Any], stage: str) -> tuple[dict[str, Any], dict[str, str]]:
    """({name: Hookpoint at the decomposer's input}, {name: why skipped}): a site-axis decomposer reads
    several sites at once, so one probe place does not describe it; a hookpoint the model lacks is skipped."""
    sites, skipped = {}, {}
    for name, d in decomposers.items():
        if getattr(d, "site_axis", False):
            skipped[name] = f"{stage} reads one site; this decomposer reads {len(d.config.hookpoints_in())} sites at once"
            continue
        try:
            sites[name] = resolve(model, d.config.hookpoint_in)[0]
        except HookpointError as e:
            skipped[name] = f"its input hookpoint is not in the model: {e}"
    return sites, skipped


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Binary logistic regression for a few inputs (standardised, class-balanced, L2 on the weights), by
    Newton's method with step halving: (w, b, mean, scale); the score is ((x - mean) / scale) @ w + b.
    The same objective as LinearProbe, but milliseconds for k <= a few dozen inputs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y) or not np.isin(y, (0, 1)).all():
        raise ValueError("fit_logistic needs x (N, k) and 0/1 labels y (N,)")
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    n_pos = y.sum()
    sw = np.where(y == 1, 0.5 / max(n_pos, 1), 0.5 / max(len(y) - n_pos, 1))  # each class weighs 1/2
    reg = np.r_[np.full(x.shape[1], l2), 0.0]

    def loss(theta):
        m = z @ theta
        return float((sw * (np.logaddexp(0, m) - y * m)).sum() + 0.5 * (reg * theta * theta).sum())

    theta, f = np.zeros(z.shape[1]), loss(np.zeros(z.shape[1]))
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(z @ theta)))
        g = z.T @ (sw * (p - y)) + reg * theta
        h = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step, t = np.linalg.solve(h, g), 1.0
        while t > 1e-4:
            f_new = loss(theta - t * step)
            if f_new <= f:
                break
            t /= 2
        if t <= 1e-4:
            break
        theta, done, f = theta - t * step, f - f_new < 1e-10, f_new
        if done:
            break
    return theta[:-1], float(theta[-1]), mean, scale


def logistic_scores(fit: tuple[np.ndarray, float, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w, b, mean, scale = fit
    return ((np.asarray(x, np.float64) - mean) / scale) @ w + b


def sparse_probe_test_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                               l2: float = 1e-2) -> float:
    """Test accuracy of a binary logistic probe on a few inputs."""
    return float(((logistic_scores(fit_logistic(x_train, y_train, l2), x_test) > 0) == (y_test == 1)).mean())


def full_probe_test_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                             l2: float = 1e-2) -> float:
    """Test accuracy of the class-balanced logistic probe on every dimension (LinearProbe, L-BFGS)."""
    return float((LinearProbe(2, l2=l2).fit(x_train, y_train).predict(x_test) == y_test).mean())


def encode_rows(decomposer: Any, x: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """decomposer.encode in chunks of one fixed size (the last padded with repeated real rows, never zeros),
    so JAX compiles the encoder once per decomposer however many rows come; float32 numpy."""
    import jax.numpy as jnp

    n = len(x)
    if n == 0:
        return np.zeros((0, decomposer.config.n_features), np.float32)
    pad = (-n) % chunk
    xp = np.concatenate([x, x[np.arange(pad) % n]]) if pad else x
    out = [np.asarray(decomposer.encode(jnp.asarray(xp[i: i + chunk], jnp.float32)), np.float32)
           for i in range(0, len(xp), chunk)]
    return np.concatenate(out)[:n]


def mean_codes(decomposer: Any, token_acts: Sequence[np.ndarray], chunk: int = 1024) -> np.ndarray:
    """Per window mean code over its tokens (SAEBench: encode each token, then mean-pool)."""
    codes = encode_rows(decomposer, np.concatenate(token_acts), chunk)
    offs = np.cumsum([0] + [len(a) for a in token_acts])
    return np.stack([codes[offs[i]: offs[i + 1]].mean(0) for i in range(len(token_acts))])


def top_latents(codes: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k latents whose mean code differs most (in absolute value) between class 1 and class 0."""
    diff = np.abs(codes[y == 1].mean(0) - codes[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


@dataclass
class Subtask:
    """One binary subtask: window indices (into the train / test pools) and 0/1 labels."""

    name: str
    train: np.ndarray
    y_train: np.ndarray
    test: np.ndarray
    y_test: np.ndarray


def one_vs_rest(classes: Sequence[str], labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """For each class (just the first when there are two), its windows and as many of the other classes'
    windows, spread evenly over them: (indices, 0/1 labels) stacked as an (n, 2) array."""
    out = []
    for c in classes[:1] if len(classes) == 2 else classes:
        pos = np.flatnonzero(labels == c)
        others = [np.flatnonzero(labels == o) for o in classes if o != c]
        others = [rng.permutation(o) for o in others if len(o)]
        neg, i = [], 0
        while len(neg) < len(pos) and any(i < len(o) for o in others):
            neg += [int(o[i]) for o in others if i < len(o)]
            i += 1
        neg = np.array(neg[: len(pos)], int)
        out.append(np.stack([np.concatenate([pos, neg]), np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]], 1))
    return out


def chat_documents(path: str | Path, tokenizer, n: int) -> list[Document]:
    """The first n conversations of a chat `.jsonl[.gz]` file (`messages` lists), rendered with the model's
    chat template (plain "role: content" lines when it has none): the text a chat model actually reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat file {str(path)!r} does not exist; pass a .jsonl(.gz) file of "
                                "{\"messages\": [...]} conversations (e.g. ../shared/assets/chat-gsm8k-train.jsonl.gz) "
                                "or leave chat_vs_news out of eval.probing.tasks")
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if len(docs) >= n:
                break
            if not line.strip():
                continue
            rec = json.loads(line)
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{path} line {line_no + 1}: no 'messages' list; chat vs news needs conversations")
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(msgs, tokenize=False)
            else:
                text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
            docs.append(Document("chat", str(rec.get("id", line_no)), "chat", text))
    return docs


@dataclass
class Windows:
    """Token windows of one split with their class names per task."""

    seqs: list[list[int]]
    label: list[str]  # the document's label (BBC topic, else source; "chat")
    source: list[str]


def _windows(docs: Sequence[Document], tokenizer, per_label: int, n_tokens: int, rng: np.random.Generator) -> Windows:
    w = Windows([], [], [])
    for lab in sorted({d.label for d in docs}):
        group = [d for d in docs if d.label == lab]
        seqs = sample_windows(group, tokenizer, per_label, n_tokens, rng)
        w.seqs += seqs
        w.label += [lab] * len(seqs)
        w.source += [group[0].source] * len(seqs)
    return w


def task_labels(task: str, w: Windows) -> np.ndarray:
    """Each window's class in `task` ("" when the window is not part of it)."""
    if task == "topics":
        return np.array([lab if lab in TOPICS else "" for lab in w.label], dtype=object)
    if task == "sources":
        return np.array([s if s != "chat" else "" for s in w.source], dtype=object)
    return np.array(["chat" if s == "chat" else "news" if s in NEWS_SOURCES else "" for s in w.source], dtype=object)


def build_subtasks(tasks: Sequence[str], train: Windows, test: Windows, rng: np.random.Generator,
                   log: Callable[[str], None]) -> tuple[dict[str, list[Subtask]], dict[str, dict], dict[str, str]]:
    """Binary subtasks per task; classes lacking windows in either split are dropped (and said so)."""
    out, info, skipped = {}, {}, {}
    for task in tasks:
        ltr, lte = task_labels(task, train), task_labels(task, test)
        present = sorted({c for c in ltr if c} & {c for c in lte if c})
        dropped = sorted(({c for c in ltr if c} | {c for c in lte if c}) - set(present))
        if dropped:
            log(f"probing: {task}: class(es) {dropped} have no windows in one split (too few documents); left out")
        if len(present) < 2:
            skipped[task] = f"fewer than two classes with windows in both splits (have {present})"
            continue
        subs = []
        for tr, te in zip(one_vs_rest(present, ltr, rng), one_vs_rest(present, lte, rng)):
            name = present[0] if len(present) == 2 else present[len(subs)]
            subs.append(Subtask(name, tr[:, 0], tr[:, 1], te[:, 0], te[:, 1]))
        out[task] = subs
        info[task] = {"classes": present, "dropped_classes": dropped, "subtasks": [s.name for s in subs],
                      "n_train": int(sum(len(s.train) for s in subs)), "n_test": int(sum(len(s.test) for s in subs)),
                      "chance": 0.5}
    return out, info, skipped


def sparse_probe_accuracy(codes_train: np.ndarray, codes_test: np.ndarray, subtasks: Sequence[Subtask],
                          ks: Sequence[int], l2: float) -> dict[str, float]:
    """{str(k): mean test accuracy over the subtasks of a probe on the top-k latents (by mean difference)}."""
    acc = {str(k): [] for k in ks}
    for s in subtasks:
        xtr, xte = codes_train[s.train], codes_test[s.test]
        order = top_latents(xtr, s.y_train, max(ks))
        for k in ks:
            cols = order[:k]
            acc[str(k)].append(sparse_probe_test_accuracy(xtr[:, cols], s.y_train, xte[:, cols], s.y_test, l2=l2))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def run_probing(loaded: Any, decomposers: dict[str, Any], cfg: ProbingConfig, corpus_path: str | Path,
                chat_path: str | Path | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sparse probing of every decomposer (contract 1): one model read of the windows, shared by every
    decomposer with the same input hookpoint."""
    t0 = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    rng = np.random.default_rng(cfg.seed)
    sites, skipped = probe_sites(model, decomposers, "sparse probing")
    tasks, tasks_skipped = list(cfg.tasks), {}
    if "chat_vs_news" in tasks and not chat_path:
        tasks.remove("chat_vs_news")
        tasks_skipped["chat_vs_news"] = "no chat file given"
    docs = load_labelled_documents(corpus_path)
    if "chat_vs_news" in tasks:
        docs = docs + chat_documents(chat_path, tokenizer, 8 * (cfg.docs_per_class + cfg.test_docs_per_class))
    if "topics" not in tasks and "sources" not in tasks:  # chat vs news needs only news documents
        docs = [d for d in docs if d.source in NEWS_SOURCES + ("chat",)]
    train_docs, test_docs = split_documents(docs, cfg.held_out, cfg.seed)
    train = _windows(train_docs, tokenizer, cfg.docs_per_class, cfg.window_tokens, rng)
    test = _windows(test_docs, tokenizer, cfg.test_docs_per_class, cfg.window_tokens, rng)
    subtasks, info, more_skipped = build_subtasks(tasks, train, test, rng, log)
    tasks_skipped.update(more_skipped)

    hps = {h.name: h for h in sites.values()}
    log(f"probing: reading {len(train.seqs)} + {len(test.seqs)} windows of {cfg.window_tokens} tokens at {sorted(hps)}")
    reads = [read_sequences(model, w.seqs, [1] * len(w.seqs), list(hps.values()), keep_tokens=list(hps),
                            batch_size=cfg.batch_size) for w in (train, test)]
    log(f"probing: read in {time.perf_counter() - t0:.1f} s")
    for task, subs in subtasks.items():
        info[task]["full_accuracy"] = {
            hp: float(np.mean([full_probe_test_accuracy(reads[0].pooled[hp][s.train], s.y_train,
                                                       reads[1].pooled[hp][s.test], s.y_test, l2=cfg.l2) for s in subs]))
            for hp in hps}
    records = {}
    for name, hp in sites.items():
        t = time.perf_counter()
        d = decomposers[name]
        codes = mean_codes(d, reads[0].tokens[hp.name] + reads[1].tokens[hp.name], cfg.encode_chunk)
        codes_train, codes_test = codes[: len(train.seqs)], codes[len(train.seqs):]
        ks = [k for k in cfg.ks if k <= codes_train.shape[1]]
        acc = {task: sparse_probe_accuracy(codes_train, codes_test, subs, ks, cfg.l2) for task, subs in subtasks.items()}
        mean = {str(k): float(np.mean([a[str(k)] for a in acc.values()])) if acc else None for k in ks}
        full_mean = float(np.mean([info[t]["full_accuracy"][hp.name] for t in subtasks])) if subtasks else None
        records[name] = {"hookpoint": hp.name, "accuracy": acc, "mean": mean, "full_mean": full_mean}
        log(f"probing: {name} at {hp.name}: " + "  ".join(f"k={k} {v:.3f}" for k, v in mean.items() if v is not None)
            + (f"  (full {full_mean:.3f})" if full_mean is not None else "") + f"  ({time.perf_counter() - t:.1f} s)")
    return json_safe({"config": asdict(cfg), "tasks": info, "tasks_skipped": tasks_skipped, "records": records,
                      "skipped": skipped, "seconds": time.perf_counter() - t0})
