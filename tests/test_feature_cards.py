"""Feature cards on constructed activations, and the vocabulary projection against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dictlearn.activations import hookpoints as hp
from dictlearn.activations import families
from dictlearn.eval.feature_cards import (build_cards, select_features, shade_contexts, vocab_projection,
                                          window_activations, window_positions, write_cards)


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


def test_activation_histogram_counts_constructed_codes():
    from dictlearn.eval.reconstruction import ACT_BIN_EDGES, ReconstructionAccumulator, activation_histogram

    codes = np.zeros((5, 3), np.float32)
    codes[:, 0] = [1e-5, 0.0011, 0.5, 2e4, 0.0]  # below the first edge, the first bin, 10^-0.3, above the last edge
    codes[:, 1] = [1.0, 1.0, 1.0, 0.0, 7.0]  # 7 is a padding row (weight 0): not counted
    w = np.array([1, 1, 1, 1, 0], np.float32)
    h = activation_histogram(codes, w)
    n_bins = len(ACT_BIN_EDGES) - 1
    assert h.shape == (3, n_bins) and h[2].sum() == 0
    expect0 = np.zeros(n_bins, int)
    expect0[0] = 2  # 1e-5 and 0.0011 (the first bin is open below)
    expect0[int(np.searchsorted(ACT_BIN_EDGES, np.log10(0.5), side="right")) - 1] += 1
    expect0[-1] = 1  # 2e4 (the last bin is open above)
    assert h[0].tolist() == expect0.tolist()
    assert h[1, int(np.searchsorted(ACT_BIN_EDGES, 0.0, side="right")) - 1] == 3 and h[1].sum() == 3
    acc = ReconstructionAccumulator(3, top_k=2)  # the accumulator adds batches' histograms
    for _ in range(2):
        acc.act_hist += activation_histogram(codes, w)
    assert (acc.act_hist == 2 * h).all()


def test_cards_carry_suppressed_tokens_and_the_histogram(tmp_path):
    row_seq, row_pos, top_vals, top_rows, stats = constructed()
    vocab = (np.array([[5], [6]]), np.array([[2.0], [1.0]]))
    low = (np.array([[9], [7]]), np.array([[-3.5], [-1.25]]))
    hist = np.zeros((3, 60), int)
    hist[0, 30:33] = [4, 9, 2]
    cards = build_cards([0, 1], stats, top_vals, top_rows, row_seq, row_pos, sequence_tokens, FakeTokenizer(), vocab=vocab,
                        suppressed=low, histograms=hist)
    assert cards[0]["suppressed"] == [{"id": 9, "token": " t9", "logit": -3.5}] and cards[1]["suppressed"][0]["token"] == "<b>"
    assert cards[0]["histogram"]["counts"][30:33] == [4, 9, 2] and sum(cards[1]["histogram"]["counts"]) == 0
    positions = window_positions(cards)
    shade_contexts(cards, positions, [i if p[1] % 2 else -1 for i, p in enumerate(positions)],
                   np.arange(len(positions) * 3, dtype=np.float32).reshape(-1, 3))
    c = cards[0]["contexts"][0]  # positions 0..9 of seq 10 around pos 5; even positions "not stored"
    start = c["pos"] - c["highlight"]
    for i, v in enumerate(c["shade"]):
        j = positions.index((c["seq"], start + i))
        assert v == (None if (start + i) % 2 == 0 else 3 * j)  # feature 0's code of that position's row
    folder = write_cards(tmp_path / "sae", "sae", {"kind": "topk"}, cards, stats)
    page = (folder / "features" / "0.html").read_text()
    assert "<svg" in page and "Suppressed" in page and "-3.50" in page and "+2.00" in page
    assert "not stored" in page and "background:rgba(255,140,0," in page
    index = (folder / "index.html").read_text()  # the preview outlines the activating token
    assert "<span class='hi'> t105</span>" in index


def test_suppressed_tokens_are_the_most_negative_logits(tiny_gpt2):
    resid = hp.resolve(tiny_gpt2, ["resid_post.1"])[0]
    dirs = np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32)
    ids, vals = vocab_projection(tiny_gpt2, resid, dirs, k=5, chunk=3, lowest=True)
    logits = families.logit_lens(tiny_gpt2, "resid_post.1")(dirs)
    np.testing.assert_array_equal(ids, np.argsort(logits, axis=1)[:, :5])
    np.testing.assert_allclose(vals, np.sort(logits, axis=1)[:, :5], rtol=1e-4, atol=1e-5)
    assert (np.diff(vals, axis=1) >= 0).all()  # the most negative first


def test_shading_equals_the_features_activation_on_every_token(tiny_harvest, tiny_loaded):
    """Shading read back from the cache equals encoding the model's own activation at each position."""
    from flax import nnx

    from dictlearn.activations.hookpoints import capture, run_forward
    from dictlearn.decomposers.topk import TopKConfig, TopKSAE
    from dictlearn.eval.suite import encode_rows

    cache = tiny_harvest()
    sae = TopKSAE(TopKConfig(d_in=32, n_features=64, k=8, hookpoint_in="resid_post.1"), rngs=nnx.Rngs(0))
    seq = int(cache.eval_sequences()[1])
    stats = {"frequency": np.ones(64), "mean_activation": np.ones(64), "max_activation": np.ones(64)}
    top_vals, top_rows = np.ones((64, 1), np.float32), np.zeros((64, 1), np.int64)
    cards = build_cards([3, 40], stats, top_vals, top_rows, np.array([seq]), np.array([20]), cache.sequence_tokens,
                        tiny_loaded.tokenizer, window=(20, 6))
    positions = window_positions(cards)
    assert positions[0] == (seq, 0) and len(positions) == 27  # positions 0..26, the sink included
    found, arrays = window_activations(cache, ["resid_post.1"], positions)
    assert found[0] == -1 and all(f >= 0 for f in found[1:])  # the harvest leaves the sink (position 0) out
    shade_contexts(cards, positions, found, encode_rows(sae, arrays["resid_post.1"], batch_size=16))
    ids = torch.tensor(cache.sequence_tokens([seq])[:, :27], dtype=torch.long)
    with torch.no_grad(), capture(tiny_loaded.model, hp.resolve(tiny_loaded.model, ["resid_post.1"])) as acts:
        run_forward(tiny_loaded.model, ids)
    want = np.asarray(sae.encode(acts["resid_post.1"][0].float().numpy()))
    for card in cards:
        shade = card["contexts"][0]["shade"]
        assert shade[0] is None
        np.testing.assert_allclose(shade[1:], want[1:, card["index"]], rtol=1e-4, atol=1e-5)
        assert any(v != 0 for v in shade[1:])  # a test that can fail: some token fires
