"""Feature cards on constructed activations, and the vocabulary projection against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dictlearn.activations import hookpoints as hp
from dictlearn.activations import families
from dictlearn.eval.feature_cards import build_cards, select_features, vocab_projection, write_cards


class FakeTokenizer:
    def decode(self, ids):
        return "".join("<b>" if i == 7 else f" t{i}" for i in ids)


SEQS = {10: np.arange(100, 132), 11: np.arange(200, 232)}  # two sequences of 32 tokens


def sequence_tokens(ids):
    return np.stack([SEQS[int(i)] for i in ids])


def constructed():
    """3 features; rows 0..4 are (seq, pos) = (10, 0), (10, 5), (11, 30), (11, 31), (10, 20)."""
    row_seq, row_pos = np.array([10, 10, 11, 11, 10]), np.array([0, 5, 30, 31, 20])
    top_vals = np.array([[3.0, 2.0, 0.0], [5.0, -np.inf, -np.inf], [0.0, 0.0, 0.0]], np.float32)
    top_rows = np.array([[1, 2, 4], [0, -1, -1], [0, 1, 2]])
    stats = {"frequency": np.array([0.4, 0.2, 0.0]), "mean_activation": np.array([2.5, 5.0, 0.0]),
             "max_activation": np.array([3.0, 5.0, 0.0])}
    return row_seq, row_pos, top_vals, top_rows, stats


def test_cards_hold_the_top_contexts_with_the_token_highlighted():
    row_seq, row_pos, top_vals, top_rows, stats = constructed()
    vocab = (np.array([[5, 6], [7, 8], [1, 2]]), np.array([[2.0, 1.0], [3.0, 2.5], [0.1, 0.0]]))
    cards = build_cards([0, 1, 2], stats, top_vals, top_rows, row_seq, row_pos, sequence_tokens, FakeTokenizer(),
                        vocab=vocab, window=(3, 2))
    f0, f1, f2 = cards
    assert [c["activation"] for c in f0["contexts"]] == [3.0, 2.0]  # the 0.0 entry is not a context
    c = f0["contexts"][0]  # row 1: seq 10, pos 5 -> tokens at positions 2..7
    assert c["token_ids"] == [102, 103, 104, 105, 106, 107] and c["highlight"] == 3
    assert c["token_ids"][c["highlight"]] == SEQS[10][5]
    c = f0["contexts"][1]  # row 2: seq 11, pos 30 -> clipped at the sequence end
    assert c["token_ids"] == [227, 228, 229, 230, 231] and c["token_ids"][c["highlight"]] == 230
    c = f1["contexts"][0]  # row 0: pos 0 -> clipped at the start
    assert c["token_ids"] == [100, 101, 102] and c["highlight"] == 0
    assert f2["contexts"] == [] and f2["frequency"] == 0.0
    assert [v["id"] for v in f1["vocab"]] == [7, 8] and f1["vocab"][0]["token"] == "<b>"
    assert f0["mean_activation"] == 2.5 and f1["max_activation"] == 5.0


def test_written_cards_are_json_and_escaped_html(tmp_path):
    row_seq, row_pos, top_vals, top_rows, stats = constructed()
    vocab = (np.array([[7], [8]]), np.array([[1.0], [0.5]]))
    cards = build_cards([0, 1], stats, top_vals, top_rows, row_seq, row_pos, sequence_tokens, FakeTokenizer(), vocab=vocab)
    folder = write_cards(tmp_path / "sae", "sae", {"kind": "topk", "hookpoint": "resid_post.3"}, cards, stats)
    data = json.loads((folder / "cards.json").read_text())
    assert data["decomposer"] == "sae" and [f["index"] for f in data["features"]] == [0, 1]
    assert json.loads((folder / "features.json").read_text())["frequency"] == [0.4, 0.2, 0.0]
    index = (folder / "index.html").read_text()
    assert "features/0.html" in index and "features/1.html" in index
    page = (folder / "features" / "0.html").read_text()  # feature 0 promotes token 7, shown as "<b>"
    assert "&lt;b&gt;" in page and "<b>" not in page  # token text is escaped
    assert "<script" not in page and "src=" not in page  # static: no scripts, no external files
    assert page.count("class='tok hi'") == 2  # one highlighted token per context


def test_select_features_samples_live_ones_only():
    freq = np.zeros(100)
    freq[::3] = 0.01
    picked = select_features(freq, 10, seed=1)
    assert len(picked) == 10 and picked == sorted(picked) and all(freq[i] > 0 for i in picked)
    assert select_features(freq, 10, seed=1) == picked  # seeded
    assert select_features(freq, 1000) == np.flatnonzero(freq).tolist()


def test_vocab_projection_matches_direct_computation(tiny_gpt2):
    model = tiny_gpt2
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(torch.linspace(0.5, 1.5, 32))
    resid = hp.resolve(model, ["resid_post.1"])[0]
    dirs = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    ids, vals = vocab_projection(model, resid, dirs, k=4, chunk=2)
    w_u = model.lm_head.weight.detach().numpy()
    logits = (dirs * np.linspace(0.5, 1.5, 32, dtype=np.float32)) @ w_u.T
    np.testing.assert_array_equal(ids, np.argsort(-logits, axis=1)[:, :4])
    np.testing.assert_allclose(vals, np.sort(logits, axis=1)[:, ::-1][:, :4], rtol=1e-4, atol=1e-5)


def test_hidden_directions_map_through_the_output_projection(tiny_gpt2):
    hidden = hp.resolve(tiny_gpt2, ["mlp_hidden.1"])[0]
    assert hidden.width == 128
    f = np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32)
    where, mapped = families.to_residual(tiny_gpt2, hidden.name, f)
    assert where == "mlp_out.1"
    np.testing.assert_allclose(mapped, f @ tiny_gpt2.transformer.h[1].mlp.c_proj.weight.detach().numpy(), rtol=1e-5)
    ids, _ = vocab_projection(tiny_gpt2, hidden, f, k=3)
    lens = families.logit_lens(tiny_gpt2, "mlp_out.1")(mapped)
    np.testing.assert_array_equal(ids, np.argsort(-lens, axis=1)[:, :3])
    assert vocab_projection(tiny_gpt2, hp.resolve(tiny_gpt2, ["mlp_in.1"])[0], f) is None  # not a residual space
