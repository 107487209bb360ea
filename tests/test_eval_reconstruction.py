"""Reconstruction and sparsity metrics on constructed data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AllZero, LinearReLU, SplitIdentity
from dictlearn.eval.reconstruction import FREQ_BIN_EDGES, ReconstructionAccumulator, evaluate_reconstruction, mean_of


def batches(x, y, size):
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


def run(dec, x, y=None, batch_size=64, top_k=0, global_mean=True):
    y = x if y is None else y
    mean = mean_of(b for _, b in batches(x, y, batch_size)) if global_mean else None
    acc = evaluate_reconstruction(dec, batches(x, y, batch_size), batch_size=batch_size, top_k=top_k, target_mean=mean)
    return acc, acc.metrics()


def reference(x, y, codes, y_hat):
    """The formulas of eval/reconstruction.py's docstring, written out directly in numpy float64."""
    x, y, codes, y_hat = (np.asarray(a, np.float64) for a in (x, y, codes, y_hat))
    err2 = ((y - y_hat) ** 2).sum(1)
    n_in, n_out = np.linalg.norm(y, axis=1), np.linalg.norm(y_hat, axis=1)
    p = (codes != 0).mean(0)
    return {
        "mse": err2.mean(),
        "fvu": err2.sum() / ((y - y.mean(0)) ** 2).sum(),
        "explained_variance": (1 - err2 / ((y - y.mean(0)) ** 2).sum(1)).mean(),
        "cossim": ((y * y_hat).sum(1) / (n_in * n_out)).mean(),
        "l2_norm_in": n_in.mean(),
        "l2_norm_out": n_out.mean(),
        "l2_ratio": (n_out / n_in).mean(),
        "relative_reconstruction_bias": (n_out**2).mean() / (y * y_hat).sum(1).mean(),
        "l0": (codes != 0).sum(1).mean(),
        "l1": np.abs(codes).sum(1).mean(),
        "dead_fraction": (p == 0).mean(),
        "dense_fraction": (p > 0.1).mean(),
    }


def test_identity_is_perfect():
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32) + 3.0
    _, m = run(SplitIdentity(8), x)
    assert m["mse"] == 0 and m["fvu"] == 0
    assert m["explained_variance"] == pytest.approx(1.0)
    assert m["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert m["l0"] == 8  # each dim fires exactly one of its two halves
    assert m["l1"] == pytest.approx(np.abs(x).sum(1).mean(), rel=1e-5)
    assert m["n_tokens"] == 300


def test_shrunk_reconstruction_known_answers():
    """decode(encode(x)) = 0.5 x on zero-mean data: FVU 0.25, cosine 1, L2 ratio 0.5, bias 0.5."""
    half = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    x = np.concatenate([half, -half])  # exactly zero mean
    _, m = run(SplitIdentity(6, scale=2.0, gain=0.5), x, batch_size=100)
    assert m["fvu"] == pytest.approx(0.25, rel=1e-5)
    assert m["explained_variance"] == pytest.approx(0.75, rel=1e-5)  # one batch, zero-mean: same as 1 - fvu
    assert m["mse"] == pytest.approx(0.25 * (x.astype(np.float64) ** 2).sum(1).mean(), rel=1e-5)
    assert m["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert m["l2_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)
    assert m["l1"] == pytest.approx(2.0 * np.abs(x).sum(1).mean(), rel=1e-5)


def test_dead_dense_and_histogram_known_answers():
    n = 20
    x = np.zeros((n, 3), np.float32)
    x[:, 0] = 1.0  # feature 0 fires always, feature 3 never
    x[:, 1] = -1.0
    x[7, 1] = 2.0  # feature 1 fires on 1/20 tokens, feature 4 on 19/20
    # column 2 stays 0: features 2 and 5 never fire
    acc, m = run(SplitIdentity(3), x, batch_size=8)
    np.testing.assert_allclose(acc.density(), [1.0, 0.05, 0.0, 0.0, 0.95, 0.0])
    assert m["dead_fraction"] == pytest.approx(0.5)
    assert m["dense_fraction"] == pytest.approx(2 / 6)
    assert m["l0"] == 2.0
    hist = m["freq_hist"]
    assert hist["dead"] == 3 and sum(hist["counts"]) == 3
    assert hist["log10_edges"] == FREQ_BIN_EDGES.tolist()
    bin_of_005 = np.searchsorted(FREQ_BIN_EDGES, np.log10(0.05), side="right") - 1
    assert hist["counts"][bin_of_005] == 1 and hist["counts"][-1] == 2  # 1.0 and 0.95 in the top bin
    stats = acc.feature_stats()
    np.testing.assert_allclose(stats["mean_activation"], [1.0, 2.0, 0, 0, 1.0, 0])
    np.testing.assert_allclose(stats["max_activation"], [1.0, 2.0, 0, 0, 1.0, 0])


def test_all_zero_decomposer():
    half = np.random.default_rng(2).normal(size=(40, 5)).astype(np.float32)
    x = np.concatenate([half, -half])
    _, m = run(AllZero(5, 7), x, batch_size=32)
    assert m["fvu"] == pytest.approx(1.0, rel=1e-6)
    assert m["cossim"] == 0 and m["l2_ratio"] == 0 and m["l2_norm_out"] == 0
    assert m["l0"] == 0 and m["l1"] == 0
    assert m["dead_fraction"] == 1.0 and m["freq_hist"]["dead"] == 7
    assert np.isnan(m["relative_reconstruction_bias"])  # 0 / 0: no reconstruction to be biased


@pytest.mark.parametrize("batch_size", [7, 64, 500])
def test_transcoder_matches_reference_for_any_batch_size(batch_size):
    """A known linear transcoder (d_in 4 -> d_out 3) against the formulas written out in numpy."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(211, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 3)) + 5.0).astype(np.float32)
    w_enc, b_enc = rng.normal(size=(4, 10)), rng.normal(size=10) - 0.5
    w_dec, b_dec = rng.normal(size=(10, 3)) * 0.3, np.full(3, 4.0)
    dec = LinearReLU(w_enc, b_enc, w_dec, b_dec, hookpoint_in="mlp_in.0", hookpoint_out="mlp_out.0")
    codes = np.maximum(x @ w_enc.astype(np.float32) + b_enc.astype(np.float32), 0)
    y_hat = codes @ w_dec.astype(np.float32) + b_dec.astype(np.float32)
    ref = reference(x, y, codes, y_hat)
    acc, m = run(dec, x, y, batch_size=batch_size, top_k=3)
    for key, want in ref.items():
        assert m[key] == pytest.approx(want, rel=2e-5, abs=1e-6), key
    # the streamed top-3 rows of each feature are its 3 largest activations
    for f in range(10):
        best = np.sort(codes[:, f])[::-1][:3]
        np.testing.assert_allclose(acc.top_vals[f], best, rtol=1e-5)
        np.testing.assert_allclose(codes[acc.top_rows[f], f], best, rtol=1e-5)


def test_explained_variance_without_a_global_mean_centres_on_each_batch():
    """SAEBench's own form: each token's variance is taken around its batch's mean."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(96, 3)).astype(np.float32)
    x[48:] += 10.0  # the two batches have very different means
    dec = SplitIdentity(3, gain=0.9)
    _, m = run(dec, x, batch_size=48, global_mean=False)
    err2 = ((0.1 * x.astype(np.float64)) ** 2).sum(1)
    want = np.concatenate([1 - err2[s] / ((x[s] - x[s].mean(0)) ** 2).sum(1) for s in (slice(0, 48), slice(48, 96))])
    assert m["explained_variance"] == pytest.approx(want.mean(), rel=1e-5)
    _, m_global = run(dec, x, batch_size=48)
    assert m_global["explained_variance"] > m["explained_variance"]  # the global mean is far from every token
    assert m_global["fvu"] == pytest.approx(m["fvu"], rel=1e-6)  # FVU does not depend on batching


class SkipLinear(LinearReLU):
    """A transcoder with a linear skip path that decode() leaves out (as SparseCoder's skip transcoder does)."""

    skip = True

    def __call__(self, x):
        return self.decode(self.encode(x)) + 2.0 * x


def test_skip_path_is_part_of_the_reconstruction():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    dec = SkipLinear(rng.normal(size=(3, 4)), np.zeros(4), rng.normal(size=(4, 3)), np.zeros(3))
    y = np.asarray(dec(x))  # the target is exactly what the decomposer outputs with its skip path
    _, m = run(dec, x, y)
    assert m["fvu"] < 1e-10 and m["cossim"] == pytest.approx(1.0, abs=1e-6)


def test_empty_eval_is_an_error():
    acc = ReconstructionAccumulator(4)
    with pytest.raises(ValueError, match="no rows were evaluated"):
        acc.metrics()


def test_oversized_batch_is_an_error():
    x = np.ones((10, 2), np.float32)
    with pytest.raises(ValueError, match="more than batch_size"):
        evaluate_reconstruction(SplitIdentity(2), [(x, x)], batch_size=4)
