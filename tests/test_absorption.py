"""Feature absorption: known answers on constructed codes (a general letter latent that token-specific
latents replace on some words gives exactly that share as the absorption rate), the criteria one by one,
the packed spelling prompts, error paths, and one cheap end-to-end run on the tiny random GPT-2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from dictlearn.eval.absorption import (AbsorptionConfig, absorption_of_words, absorption_scores, letter_probe,
                                       run_absorption, spelling_sequences, vocabulary_words)

from conftest import SplitIdentity


def unit(v):
    return v / np.linalg.norm(v)


def test_criteria_on_hand_made_words():
    cfg = AbsorptionConfig()
    d = 4
    p = np.eye(d)[0]  # the probe direction
    features = np.stack([p, unit(np.eye(d)[0] + np.eye(d)[1]), np.eye(d)[2], unit(np.eye(d)[0] * 0.01 + np.eye(d)[3])])
    codes = np.array([[1.0, 0, 0, 0],  # the main latent fires: no absorption
                      [0, 1.4, 0, 0],  # an aligned latent carries it instead: full absorption, fraction 1
                      [0, 0, 2.0, 0],  # nothing along the probe: the probe projection is 0, no absorption
                      [0.5, 0.7, 0, 0],  # partial: the main latent carries 0.5 of 1.0, the aligned one 0.49
                      [0, 0, 0, 3.0]])  # a latent barely aligned (cos 0.01) carries it: not absorption
    x = codes @ features
    full, frac = absorption_of_words(codes, codes * (features @ p), features @ p, x @ p, np.array([0]), cfg)
    assert full.tolist() == [False, True, False, False, False]
    assert frac[0] == 0 and frac[1] == 1 and frac[2] == 0 and frac[4] == 0
    absorbed = 0.7 * features[1] @ p  # 0.495
    assert frac[3] == pytest.approx(absorbed / (absorbed + 0.5))


def planted_absorption(rng, n_per_letter=120, absorbed_share=0.25, d=24):
    """Words of letters a and b. Latent 0 carries "starts with a" (direction e0), latent 1 "starts with b"
    (e1); a share of the a-words has latent 0 silent and instead its own token latent, whose direction is
    e0 plus a token direction: absorption on exactly those words."""
    letters = np.r_[np.zeros(n_per_letter, int), np.ones(n_per_letter, int)]
    absorbed = np.zeros(len(letters), bool)
    absorbed[rng.choice(n_per_letter, int(absorbed_share * n_per_letter), replace=False)] = True
    n_tok = int(absorbed.sum())
    features = np.zeros((2 + n_tok, d))
    features[0, 0] = features[1, 1] = 1.0
    for i in range(n_tok):
        features[2 + i] = unit(np.eye(d)[0] + np.eye(d)[2 + i % (d - 2)])
    codes = np.zeros((len(letters), 2 + n_tok))
    codes[(letters == 0) & ~absorbed, 0] = 1.0 + 0.1 * rng.random(((letters == 0) & ~absorbed).sum())
    codes[letters == 1, 1] = 1.0 + 0.1 * rng.random(n_per_letter)
    codes[np.flatnonzero(absorbed), 2 + np.arange(n_tok)] = 1.5
    x = codes @ features + 0.02 * rng.normal(size=(len(letters), d))
    return letters, absorbed, codes, features, x


def test_planted_absorption_gives_the_expected_rate():
    rng = np.random.default_rng(0)
    letters, absorbed, codes, features, x = planted_absorption(rng)
    perm = rng.permutation(len(letters))
    test, train = np.sort(perm[:96]), np.sort(perm[96:])
    cfg = AbsorptionConfig(n_words=240, min_words_per_letter=5)
    probe = letter_probe(x, letters, train, test, cfg)
    assert probe.accuracy >= 0.95 and probe.chance == pytest.approx(max(np.bincount(letters[test])) / len(test))
    out = absorption_scores(codes, features, x, letters, train, test, probe, cfg)
    assert out["n_letters"] == 2
    assert out["letters"]["a"]["main_latents"] == [0] and out["letters"]["b"]["main_latents"] == [1]
    share = absorbed[test[(letters[test] == 0) & probe.correct]].mean()  # of the held-out a-words the probe reads
    assert 0.15 < share < 0.35
    assert out["letters"]["a"]["full_absorption"] == pytest.approx(share)
    assert out["letters"]["a"]["absorption_fraction"] == pytest.approx(share)
    assert out["letters"]["b"]["full_absorption"] == 0.0
    assert out["full_absorption_rate"] == pytest.approx(share / 2) and out["absorption_rate"] == pytest.approx(share / 2)
    # the general latent fires with the token latents: partial absorption only (fraction, not full)
    codes[letters == 0, 0] = 1.0
    partial = absorption_scores(codes, features, codes @ features, letters, train, test, probe, cfg)
    assert partial["full_absorption_rate"] == 0.0 and 0.0 < partial["absorption_rate"] < share / 2
    # without the token latents: nothing is absorbed
    codes[:, 2:] = 0.0
    clean = absorption_scores(codes, features, codes @ features, letters, train, test, probe, cfg)
    assert clean["full_absorption_rate"] == 0.0 and clean["absorption_rate"] == 0.0


def test_letters_the_probe_cannot_read_are_not_scored():
    rng = np.random.default_rng(1)
    letters, _, codes, features, _ = planted_absorption(rng, n_per_letter=60)
    noise = rng.normal(size=(len(letters), 24))  # activations without the letter
    perm = rng.permutation(len(letters))
    test, train = np.sort(perm[:40]), np.sort(perm[40:])
    cfg = AbsorptionConfig(n_words=120, min_words_per_letter=5, min_probe_f1=0.9)
    probe = letter_probe(noise, letters, train, test, cfg)
    assert probe.accuracy < 0.8
    out = absorption_scores(codes, features, noise, letters, train, test, probe, cfg)
    assert out["n_letters"] == 0 and out["absorption_rate"] is None
    with pytest.raises(ValueError, match="n_words"):
        letter_probe(noise, np.zeros(len(letters), int), train, test, cfg)  # one letter only


def test_spelling_prompts_read_each_word_at_its_own_token(tiny_loaded):
    tok = tiny_loaded.tokenizer
    vocab = vocabulary_words(tok)
    assert len(vocab) > 1000 and all(w.isalpha() and w.islower() for w, _ in vocab[:200])
    words, examples = vocab[100:125], vocab[500:510]
    cfg = AbsorptionConfig(words_per_prompt=10, icl_examples=3)
    seqs, positions, kept = spelling_sequences(tok, words, examples, cfg, np.random.default_rng(0))
    assert len(seqs) == 3 and len(kept) == sum(len(p) for p in positions) >= 20
    flat = [(j, p) for j, ps in enumerate(positions) for p in ps]
    for (s, p), i in zip(flat, kept):
        assert seqs[s][p] == words[i][1]  # the word's own token
        assert tok.decode(seqs[s][p:]).startswith(f" {words[i][0]}: {words[i][0][0].upper()}\n")
        assert p > 0  # never the sink position
    assert tok.decode(seqs[0][: positions[0][0]]).count(":") == 3  # the example lines come first


def test_config_errors():
    with pytest.raises(ValueError, match="n_words"):
        AbsorptionConfig(n_words=5)
    with pytest.raises(ValueError, match="max_k"):
        AbsorptionConfig(max_k=0)


def test_end_to_end_on_the_tiny_model(tiny_loaded):
    site_axis = SimpleNamespace(site_axis=True, config=SimpleNamespace(hookpoint_in="mlp_in.0-1",
                                                                       hookpoints_in=lambda: ["mlp_in.0", "mlp_in.1"]))
    decomposers = {"ident": SplitIdentity(32, "resid_post.1"), "clt": site_axis}
    cfg = AbsorptionConfig(n_words=120, words_per_prompt=12, icl_examples=2, min_words_per_letter=2, max_k=2,
                           min_probe_f1=0.0)
    logs = []
    out = run_absorption(tiny_loaded, decomposers, cfg, logs.append)
    json.dumps(out)
    assert set(out) >= {"config", "probe", "records", "skipped", "seconds"}
    assert set(out["skipped"]) == {"clt"}
    probe = out["probe"]["resid_post.1"]
    assert set(probe) >= {"accuracy", "n_train", "n_test", "chance"} and 0 < probe["chance"] < 1
    assert probe["n_train"] + probe["n_test"] <= 120
    rec = out["records"]["ident"]
    assert set(rec) >= {"hookpoint", "absorption_rate", "full_absorption_rate", "n_letters", "mean_f1", "probe_accuracy"}
    assert rec["hookpoint"] == "resid_post.1" and rec["probe_accuracy"] == probe["accuracy"]
    assert rec["n_letters"] > 0 and 0.0 <= rec["absorption_rate"] <= 1.0
    assert any("first-letter probe" in m for m in logs)
