"""Feature matching (dictlearn.eval.matching): known answers on constructed dictionaries and caches."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import LinearReLU, write_cache
from dictlearn.activations import families
from dictlearn.config import ConfigError, from_dict
from dictlearn.eval.matching import (Codes, MatchingConfig, best_correlations, best_cosines, chance_cosine, plot_matching,
                                     run_matching, writes_of)

D, N = 64, 48  # activation width, features per dictionary


def sae(w_enc: np.ndarray, b_enc: np.ndarray, w_dec: np.ndarray, hookpoint: str = "resid_post.0", out: str = ""):
    return LinearReLU(w_enc, b_enc, w_dec, np.zeros(w_dec.shape[1], np.float32), hookpoint_in=hookpoint,
                      hookpoint_out=out)


def random_sae(seed: int, d: int = D, n: int = N, hookpoint: str = "resid_post.0", out: str = ""):
    rng = np.random.default_rng(seed)
    w_enc = rng.standard_normal((d, n)).astype(np.float32)
    return sae(w_enc, -0.5 * np.ones(n, np.float32), rng.standard_normal((n, d)).astype(np.float32), hookpoint, out)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = 4096  # 1,024 held-out rows (the last of 4 shards)
    arrays = {"resid_post.0": rng.standard_normal((rows, D)).astype(np.float32),
              "mlp_in.0": rng.standard_normal((rows, D)).astype(np.float32),
              "resid_post.1": rng.standard_normal((rows, 32)).astype(np.float32),
              "mlp_hidden.1": rng.standard_normal((rows, 128)).astype(np.float32)}
    return write_cache(tmp_path_factory.mktemp("matching") / "cache", arrays)


def opened(path):
    from dictlearn.activations.cache import ActivationCache

    return ActivationCache.open(path)


def match(decomposers, cache, cfg=None, projection=None):
    return run_matching(decomposers, opened(cache), projection, cfg or MatchingConfig(batch_size=300), log=lambda m: None)


def pair(result, a, b):
    return next(p for p in result["pairs"] if p["a"] == a and p["b"] == b)


def test_a_dictionary_matched_with_itself_scores_one(cache):
    d = random_sae(1)
    res = match({"x": d, "y": d}, cache)
    assert len(res["pairs"]) == 2 and res["skipped"] == {}
    for p in res["pairs"]:
        assert p["decoder_cos_mean"] == pytest.approx(1, abs=1e-5) and p["decoder_frac_above_0.7"] == 1
        assert p["activation_corr_mean"] == pytest.approx(1, abs=1e-6)
        assert p["activation_corr_median"] == pytest.approx(1, abs=1e-6)
        assert p["relation"] == "same kind" and p["space"] == "residual stream at layer 0"
        assert p["n_rows"] == 1024 and p["n_features_a"] == p["n_features_b"] == N
        assert p["decoder_cos_same_index"] == pytest.approx(1, abs=1e-5)


def test_a_permuted_rescaled_copy_matches_perfectly(cache):
    rng = np.random.default_rng(2)
    d = random_sae(3)
    w_enc, b_enc, w_dec = (np.asarray(v[...]) for v in (d.w_enc, d.b_enc, d.w_dec))
    perm, scale = rng.permutation(N), rng.uniform(0.2, 5.0, N).astype(np.float32)
    copy = sae(w_enc[:, perm] * scale, b_enc[perm] * scale, w_dec[perm] / scale[:, None] * 3.0)
    res = match({"x": d, "y": copy}, cache)
    for p in res["pairs"]:
        assert p["decoder_cos_mean"] == pytest.approx(1, abs=1e-5)
        assert p["activation_corr_mean"] == pytest.approx(1, abs=1e-5)
        assert p["activation_frac_above_0.7"] == 1
    assert pair(res, "x", "y")["decoder_cos_same_index"] < 0.5  # the order is shuffled: not a shared init


def test_a_planted_shared_subset_gives_the_planted_share(cache):
    a, other = random_sae(4, d=D, n=40), random_sae(5, d=D, n=40)
    shared = 10  # b holds a's first 10 features (encoder and decoder) and 30 unrelated ones
    w_enc = np.concatenate([np.asarray(a.w_enc[...])[:, :shared], np.asarray(other.w_enc[...])[:, shared:]], axis=1)
    b_enc = np.concatenate([np.asarray(a.b_enc[...])[:shared], np.asarray(other.b_enc[...])[shared:]])
    w_dec = np.concatenate([np.asarray(a.w_dec[...])[:shared], np.asarray(other.w_dec[...])[shared:]])
    res = match({"a": a, "b": sae(w_enc, b_enc, w_dec)}, cache)
    for p in res["pairs"]:
        assert p["decoder_frac_above_0.7"] == pytest.approx(shared / 40)
        assert p["activation_frac_above_0.7"] == pytest.approx(shared / 40)


def test_random_dictionaries_score_low_near_chance(cache):
    res = match({"a": random_sae(6), "b": random_sae(7)}, cache)
    for p in res["pairs"]:
        assert p["decoder_cos_mean"] < 0.7 and p["decoder_frac_above_0.7"] < 0.1
        assert abs(p["decoder_cos_mean"] - p["decoder_cos_chance"]) < 0.1
        assert p["activation_corr_mean"] < 0.7
        assert p["relation"] == "same kind"
    assert abs(pair(res, "a", "b")["decoder_cos_same_index"]) < 0.2
    assert chance_cosine(2304, 576) == pytest.approx(np.sqrt(2 * np.log(2304) / 576), rel=0.25)


def test_hidden_site_directions_map_through_the_output_projection(tiny_gpt2, cache):
    def projection(hookpoint):
        return families.output_projection(tiny_gpt2, hookpoint) if families.is_hidden_site(tiny_gpt2, hookpoint) else None

    w_out = tiny_gpt2.transformer.h[1].mlp.c_proj.weight.detach().numpy()  # GPT-2 Conv1D: (in 128, out 32)
    hidden = random_sae(8, d=128, n=16, hookpoint="mlp_hidden.1")
    writes = writes_of(hidden, projection)
    assert writes.at == "mlp_hidden.1" and writes.mapped_at == "mlp_out.1"
    assert writes.space == "residual stream at layer 1"
    np.testing.assert_allclose(writes.mapped, np.asarray(hidden.w_dec[...]) @ w_out, rtol=1e-5, atol=1e-6)
    # an SAE on resid_post.1 whose decoder rows are the mapped directions: cosine 1 in the residual stream
    resid = random_sae(9, d=32, n=16, hookpoint="resid_post.1")
    resid = sae(np.asarray(resid.w_enc[...]), np.asarray(resid.b_enc[...]), writes.mapped * 2.0, "resid_post.1")
    res = match({"hidden": hidden, "resid": resid}, cache, projection=projection)
    p = pair(res, "hidden", "resid")
    assert p["space"] == "residual stream at layer 1" and p["decoder_cos_mean"] == pytest.approx(1, abs=1e-5)
    assert (p["written_at_a"], p["written_at_b"]) == ("mlp_out.1", "resid_post.1")
    assert res["decomposers"]["hidden"] == {"kind": "test_linear_relu", "written_at": "mlp_out.1",
                                            "space": "residual stream at layer 1"}
    # two dictionaries writing the same hidden site compare there, in neuron space, not through W_out
    twin = random_sae(10, d=128, n=16, hookpoint="mlp_hidden.1")
    p = pair(match({"h1": hidden, "h2": twin}, cache, projection=projection), "h1", "h2")
    assert p["space"] == "mlp_hidden.1" and p["written_at_a"] == "mlp_hidden.1"


def test_a_transcoder_writing_mlp_out_is_in_the_residual_space(cache):
    transcoder = random_sae(11, hookpoint="mlp_in.0", out="mlp_out.0")
    res = match({"sae": random_sae(12), "transcoder": transcoder}, cache)
    p = pair(res, "transcoder", "sae")
    assert p["space"] == "residual stream at layer 0" and p["relation"] == "same kind, other hookpoints"
    assert (p["written_at_a"], p["written_at_b"]) == ("mlp_out.0", "resid_post.0")


class SiteAxisSAE(LinearReLU):
    site_axis = True


def test_what_cannot_be_compared_is_skipped_with_a_reason(cache):
    a, b = random_sae(13), random_sae(14)
    hidden = random_sae(15, d=128, n=16, hookpoint="mlp_hidden.1")  # no projection given: its own space
    clt = SiteAxisSAE(np.zeros((D, 4), np.float32), np.zeros(4, np.float32), np.zeros((4, D), np.float32),
                      np.zeros(D, np.float32))
    res = match({"a": a, "b": b, "hidden": hidden, "clt": clt}, cache)
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("a", "b"), ("b", "a")]
    assert "several layers" in res["skipped"]["clt"]
    assert "no other decomposer writes to its space (mlp_hidden.1)" in res["skipped"]["hidden"]
    res = match({"a": a, "b": b, "hidden": hidden, "clt": clt}, cache,
                MatchingConfig(batch_size=300, pairs=[["a", "hidden"], ["a", "nope"], ["clt", "b"], ["b", "a"], ["a", "b"]]))
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("b", "a"), ("a", "b")]
    assert "no common space" in res["skipped"]["a vs hidden"]
    assert "nope is not among the decomposers evaluated" in res["skipped"]["a vs nope"]
    assert "clt is skipped" in res["skipped"]["clt vs b"]
    assert match({"a": a}, cache)["pairs"] == []


def test_correlations_stream_the_same_from_sparse_and_dense_codes():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((500, 30)) * (rng.random((500, 30)) < 0.1)  # sparse
    y = np.abs(rng.standard_normal((500, 20))) + x[:, :20] * 0.5  # dense
    y[:, 5] = 0  # a feature that never fires: no correlation
    codes = {}
    for name, m in (("x", x), ("y", y)):
        codes[name] = Codes()
        for part in np.array_split(m, 3):
            codes[name].add(part)
        codes[name].finish()
    assert isinstance(codes["y"].matrix, np.ndarray) and not isinstance(codes["x"].matrix, np.ndarray)  # dense / CSR
    best_x, best_y = best_correlations(codes["x"], codes["y"], 500)
    live = np.arange(20) != 5
    full = np.corrcoef(x.T, y[:, live].T)[:30, 30:]  # (30, 19): the live features of y
    np.testing.assert_allclose(best_x, full.max(axis=1), atol=1e-5)
    assert np.isnan(best_y[5])
    np.testing.assert_allclose(best_y[live], full.max(axis=0), atol=1e-5)
    for got, want in zip(best_correlations(codes["x"], codes["y"], 500, block=45), (best_x, best_y)):  # 2 rows a block
        np.testing.assert_allclose(got, want, atol=1e-12)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((20, 8))
    for got, want in zip(best_cosines(a, b, block=50), best_cosines(a, b)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_plot_and_the_config(cache, tmp_path):
    res = match({"a": random_sae(17), "b": random_sae(18)}, cache)
    assert plot_matching(res, tmp_path / "plots" / "matching.png")
    assert (tmp_path / "plots" / "matching.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_matching({"pairs": []}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    assert res["config"] == {"n_rows": 16384, "batch_size": 300, "pairs": []} and res["seconds"] > 0
    assert from_dict(MatchingConfig, {"pairs": [["snmf", "topk"]]}).pairs == [["snmf", "topk"]]
    with pytest.raises(ConfigError, match="two different decomposers"):
        from_dict(MatchingConfig, {"pairs": [["topk", "topk"]]})
    with pytest.raises(ConfigError, match="n_rows must be at least 1"):
        from_dict(MatchingConfig, {"n_rows": 0})
