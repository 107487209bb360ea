"""Sparse probing: known answers on constructed codes (a planted latent reads its label at k = 1, random
latents sit at chance), the balanced one-vs-rest subtasks, the small logistic fit, error paths, and one cheap
end-to-end run on the tiny random GPT-2 that checks contract 1's keys and the skips."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import numpy as np
import pytest

from dictlearn.eval.probing import (ProbingConfig, Windows, build_subtasks, chat_documents, fit_logistic,
                                    logistic_scores, one_vs_rest, run_probing, sparse_probe_accuracy, top_latents)
from dictlearn.eval.steering.judges import LinearProbe

from conftest import CORPUS, SplitIdentity

CLASSES = ["a", "b", "c"]


def constructed(n_per_class: int, n_latents: int, planted: dict[str, int], rng) -> tuple[np.ndarray, np.ndarray]:
    """Codes of windows of three classes: latent planted[c] fires (about 1) exactly on class c, the rest is noise."""
    labels = np.repeat(CLASSES, n_per_class).astype(object)
    codes = np.abs(rng.normal(0, 0.3, size=(len(labels), n_latents)))
    for c, j in planted.items():
        codes[:, j] = np.where(labels == c, 1.0 + 0.1 * rng.random(len(labels)), 0.0)
    return codes, labels


def subtasks_for(labels_train, labels_test, rng):
    train = Windows([[0]] * len(labels_train), list(labels_train), ["s"] * len(labels_train))
    test = Windows([[0]] * len(labels_test), list(labels_test), ["s"] * len(labels_test))
    # "topics" keeps only BBC topic names: relabel the constructed classes as three topics
    rename = dict(zip(CLASSES, ["business", "sport", "tech"]))
    train.label = [rename[x] for x in train.label]
    test.label = [rename[x] for x in test.label]
    subs, info, skipped = build_subtasks(["topics"], train, test, rng, lambda m: None)
    return subs["topics"], info["topics"]


def test_planted_latent_reads_its_label_and_random_latents_sit_at_chance():
    rng = np.random.default_rng(0)
    planted = {"a": 3, "b": 11, "c": 17}
    tr, ltr = constructed(60, 40, planted, rng)
    te, lte = constructed(60, 40, planted, rng)
    subs, info = subtasks_for(ltr, lte, rng)
    assert info["classes"] == ["business", "sport", "tech"] and info["chance"] == 0.5
    acc = sparse_probe_accuracy(tr, te, subs, [1, 2, 5], l2=1e-2)
    assert acc["1"] >= 0.97 and acc["5"] >= 0.95
    for s, c in zip(subs, CLASSES):  # the top latent by mean difference is the planted one
        assert top_latents(tr[s.train], s.y_train, 1)[0] == planted[c]
    tr0, te0 = tr.copy(), te.copy()
    for j in planted.values():  # no latent carries the label: chance
        tr0[:, j], te0[:, j] = rng.random(len(tr)), rng.random(len(te))
    acc0 = sparse_probe_accuracy(tr0, te0, subs, [1, 5], l2=1e-2)
    assert 0.3 <= acc0["1"] <= 0.7 and 0.3 <= acc0["5"] <= 0.7


def test_one_vs_rest_is_balanced_and_spreads_the_negatives():
    labels = np.array(["a"] * 10 + ["b"] * 30 + ["c"] * 4, dtype=object)
    subs = one_vs_rest(["a", "b", "c"], labels, np.random.default_rng(0))
    assert len(subs) == 3
    a = subs[0]
    assert (a[:, 1] == 1).sum() == (a[:, 1] == 0).sum() == 10
    neg = labels[a[a[:, 1] == 0, 0]]
    assert set(neg) == {"b", "c"} and (neg == "c").sum() == 4  # every "c" window before a second helping of "b"
    c = subs[2]
    assert (c[:, 1] == 1).sum() == 4 and sorted(set(labels[c[c[:, 1] == 0, 0]])) == ["a", "b"]
    two = one_vs_rest(["x", "y"], np.array(["x", "y", "y"], dtype=object), np.random.default_rng(0))
    assert len(two) == 1  # a binary task is one subtask


def test_classes_missing_from_a_split_are_dropped_and_a_task_needs_two():
    rng = np.random.default_rng(0)
    train = Windows([[0]] * 6, ["sport"] * 3 + ["tech"] * 3, ["bbc"] * 6)
    test = Windows([[0]] * 2, ["sport"] * 2, ["bbc"] * 2)
    subs, info, skipped = build_subtasks(["topics"], train, test, rng, lambda m: None)
    assert "topics" in skipped and not subs
    test = Windows([[0]] * 4, ["sport", "sport", "tech", "business"], ["bbc"] * 4)
    train = Windows([[0]] * 6, ["sport"] * 3 + ["tech"] * 3, ["bbc"] * 6)
    subs, info, skipped = build_subtasks(["topics", "sources"], train, test, rng, lambda m: None)
    assert info["topics"]["classes"] == ["sport", "tech"] and info["topics"]["dropped_classes"] == ["business"]
    assert "sources" in skipped  # one source only


def test_fit_logistic_agrees_with_the_linear_probe_and_rejects_bad_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    y = (x @ np.array([1.5, -1.0, 0.0, 0.5]) + 0.5 * rng.normal(size=300) > 0.2).astype(int)
    fit = fit_logistic(x, y, l2=1e-2)
    ours = logistic_scores(fit, x) > 0
    # LinearProbe's two-logit parametrisation halves the effective penalty
    theirs = LinearProbe(2, l2=2e-2).fit(x, y).predict(x) == 1
    assert (ours == theirs).mean() >= 0.98 and (ours == (y == 1)).mean() >= 0.85
    with pytest.raises(ValueError, match="0/1 labels"):
        fit_logistic(x, y + 1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown task"):
        ProbingConfig(tasks=["topics", "weather"])
    with pytest.raises(ValueError, match="ks"):
        ProbingConfig(ks=[0, 1])
    with pytest.raises(ValueError, match="held_out"):
        ProbingConfig(held_out=1.0)


def test_chat_file_errors(tmp_path, tiny_loaded):
    with pytest.raises(FileNotFoundError, match="chat_vs_news"):
        chat_documents(tmp_path / "missing.jsonl", tiny_loaded.tokenizer, 5)
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps({"id": 1, "text": "no messages here"}) + "\n")
    with pytest.raises(ValueError, match="messages"):
        chat_documents(bad, tiny_loaded.tokenizer, 5)


def test_end_to_end_on_the_tiny_model(tiny_loaded, assets):
    site_axis = SimpleNamespace(site_axis=True, config=SimpleNamespace(hookpoint_in="mlp_in.0-1",
                                                                       hookpoints_in=lambda: ["mlp_in.0", "mlp_in.1"]))
    decomposers = {"ident": SplitIdentity(32, "resid_post.1"), "hidden": SplitIdentity(128, "mlp_hidden.1"),
                   "clt": site_axis, "elsewhere": SplitIdentity(32, "resid_post.9")}
    cfg = ProbingConfig(docs_per_class=3, test_docs_per_class=2, window_tokens=8, ks=[1, 2, 500])
    logs = []
    out = run_probing(tiny_loaded, decomposers, cfg, CORPUS, assets / "chat-gsm8k-train.jsonl.gz", logs.append)
    json.dumps(out)  # plain JSON
    assert set(out) >= {"config", "tasks", "records", "skipped", "seconds"}
    assert set(out["skipped"]) == {"clt", "elsewhere"} and "sites" in out["skipped"]["clt"]
    assert set(out["tasks"]) == {"topics", "sources", "chat_vs_news"}
    news = out["tasks"]["chat_vs_news"]
    assert news["classes"] == ["chat", "news"] and news["n_train"] > 0 and news["n_test"] > 0
    assert set(news["full_accuracy"]) == {"resid_post.1", "mlp_hidden.1"}
    rec = out["records"]["ident"]
    assert rec["hookpoint"] == "resid_post.1" and set(rec["accuracy"]) == set(out["tasks"])
    assert set(rec["mean"]) == {"1", "2"}  # k = 500 exceeds the 64 latents: left out
    assert all(0.0 <= v <= 1.0 for v in rec["mean"].values()) and 0.0 <= rec["full_mean"] <= 1.0
    assert out["records"]["hidden"]["hookpoint"] == "mlp_hidden.1"
