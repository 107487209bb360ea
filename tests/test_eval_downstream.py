"""Spliced-in downstream loss on the real SmolLM2 (few short sequences, so the tests stay fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import AllZero, SplitIdentity
from dictlearn.decomposers.base import Decomposer, DecomposerConfig
from dictlearn.eval.downstream import DownstreamError, ResumedForward, evaluate_downstream

TEXTS = [
    "The committee met on Tuesday to discuss the new budget for the city's public schools and libraries.",
    "In the second half the striker scored twice, and the crowd sang until the final whistle blew loudly.",
]
LAYER = 10


@pytest.fixture(scope="module")
def seqs(smol):
    tok = smol.tokenizer
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"][:19] for t in TEXTS]
    return np.asarray(rows, dtype=np.int64)  # (2, 20): BOS + 19 tokens


@pytest.fixture(scope="module")
def special(smol):
    return sorted(set(smol.tokenizer.all_special_ids))


class ExactMLPTranscoder(Decomposer):
    """Reads mlp_in, writes mlp_out: the model's own MLP in JAX, with the hidden layer split into +/- codes."""

    kind = "test_exact_mlp"

    def __init__(self, mlp, layer):
        self.config = DecomposerConfig(d_in=mlp.gate_proj.in_features, n_features=2 * mlp.gate_proj.out_features,
                                       d_out=mlp.down_proj.out_features, hookpoint_in=f"mlp_in.{layer}",
                                       hookpoint_out=f"mlp_out.{layer}")
        self.wg, self.wu, self.wd = (jnp.asarray(m.weight.detach().numpy().T) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    def encode(self, x):
        h = jax.nn.silu(x @ self.wg) * (x @ self.wu)
        return jnp.concatenate([jax.nn.relu(h), jax.nn.relu(-h)], axis=-1)

    def decode(self, codes):
        n = codes.shape[-1] // 2
        return (codes[..., :n] - codes[..., n:]) @ self.wd


def test_resumed_forward_equals_full_forward(smol, seqs):
    ids = torch.as_tensor(seqs)
    from dictlearn.activations import hookpoints as hp

    resumer = ResumedForward(smol.model)
    layers = [0, LAYER, 29]
    with torch.no_grad():
        with resumer.recording(layers) as inputs:
            full = hp.run_forward(smol.model, ids).logits
        for L in layers:
            resumed = resumer.logits(inputs[L], L)
            assert float((resumed - full).abs().max()) < 1e-4, L


def test_identity_scores_one_and_all_zero_scores_zero(smol, seqs, special):
    d = smol.model.config.hidden_size
    mlp = smol.model.model.layers[LAYER].mlp
    decs = {
        "sae_identity": SplitIdentity(d, hookpoint=f"resid_post.{LAYER}"),
        "sae_zero": AllZero(d, 16, hookpoint_in=f"resid_post.{LAYER}"),
        "transcoder_exact": ExactMLPTranscoder(mlp, LAYER),
        "transcoder_zero": AllZero(d, 16, d_out=d, hookpoint_in=f"mlp_in.{LAYER}", hookpoint_out=f"mlp_out.{LAYER}"),
        "hidden_identity": SplitIdentity(mlp.down_proj.in_features, hookpoint=f"mlp_hidden.{LAYER}"),
    }
    res = evaluate_downstream(smol.model, seqs, decs, excluded_token_ids=special, batch_size=2)
    n_tokens = 2 * 18  # 19 predictions per sequence, minus the one made at the (left out) BOS position
    for name, r in res.items():
        assert r.n_tokens == n_tokens and r.resumed, name
        assert r.ce_ablated > r.ce_clean + 0.1, name  # removing the activation must hurt
    for name in ("sae_identity", "transcoder_exact", "hidden_identity"):
        assert res[name].ce_loss_score == pytest.approx(1.0, abs=2e-3), name
        assert res[name].kl_score == pytest.approx(1.0, abs=2e-3), name
        assert res[name].kl_spliced < 1e-4, name
    for name in ("sae_zero", "transcoder_zero"):
        assert res[name].ce_loss_score == 0.0 and res[name].kl_score == 0.0, name
    # the clean and ablated passes are shared: every decomposer writing one hookpoint sees the same baseline
    assert res["sae_identity"].ce_clean == res["transcoder_exact"].ce_clean
    assert res["sae_identity"].ce_ablated == res["sae_zero"].ce_ablated
    assert res["transcoder_exact"].ce_ablated == res["transcoder_zero"].ce_ablated


def test_special_positions_keep_their_activation(smol, seqs, special):
    """Zeroing only the BOS position changes nothing when BOS is excluded; it does when it is not."""
    d = smol.model.config.hidden_size
    decs = {"zero": AllZero(d, 4, hookpoint_in=f"resid_post.{LAYER}")}
    excl = evaluate_downstream(smol.model, seqs, decs, excluded_token_ids=special)["zero"]
    incl = evaluate_downstream(smol.model, seqs, decs, excluded_token_ids=[])["zero"]
    assert incl.n_tokens == 2 * 19  # the BOS positions now count too
    assert excl.ce_ablated != pytest.approx(incl.ce_ablated, abs=1e-3)


def test_full_forward_fallback_matches(smol, seqs, special):
    decs = {"id": SplitIdentity(smol.model.config.hidden_size, hookpoint=f"resid_post.{LAYER}")}
    a = evaluate_downstream(smol.model, seqs, decs, excluded_token_ids=special, resume=False)["id"]
    assert not a.resumed
    assert a.ce_spliced == pytest.approx(a.ce_clean, abs=1e-5)


def test_bad_decomposers_are_refused(smol, seqs):
    with pytest.raises(DownstreamError, match="width"):
        evaluate_downstream(smol.model, seqs, {"x": SplitIdentity(7, hookpoint="resid_post.3")})
    with pytest.raises(DownstreamError, match="not in the model"):
        evaluate_downstream(smol.model, seqs, {"x": SplitIdentity(576, hookpoint="resid_post.99")})
    backwards = AllZero(576, 4, d_out=576, hookpoint_in="mlp_out.5", hookpoint_out="mlp_in.5")
    with pytest.raises(DownstreamError, match="ran before"):
        evaluate_downstream(smol.model, seqs, {"x": backwards})
