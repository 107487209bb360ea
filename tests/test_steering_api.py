"""Steering API on the real SmolLM2: additive steering and clamping at a hookpoint, in forwards and generation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dictlearn.activations.hookpoints import capture, resolve
from dictlearn.decomposers import base
from dictlearn.steering.steer import SteeringError, clamp, generate, steer

LAYER = 6
HP = f"resid_post.{LAYER}"
NEXT = f"resid_pre.{LAYER + 1}"  # what the next block reads: the steered activation


@pytest.fixture(scope="module")
def ids(smol):
    return smol.tokenizer("The river flooded the small town", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def base_run(smol, ids):
    with torch.no_grad(), capture(smol.model, resolve(smol.model, [NEXT], probe_widths=False)) as acts:
        logits = smol.model(input_ids=ids).logits
    return logits, acts[NEXT].clone()


@pytest.fixture(scope="module")
def sae(base_run):
    """A TopK SAE on resid_post.6 centred on the real activations (random directions, known weights)."""
    module = base.build("topk", dict(d_in=576, n_features=512, k=16, hookpoint_in=HP, seed=0))
    module.b_dec[...] = jnp.asarray(base_run[1][0].mean(0).numpy())
    return module


def forward(smol, ids, with_acts=False):
    with torch.no_grad(), capture(smol.model, resolve(smol.model, [NEXT], probe_widths=False)) as acts:
        logits = smol.model(input_ids=ids).logits
    return (logits, acts[NEXT]) if with_acts else logits


def unit(seed, d=576):
    v = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    return v / np.linalg.norm(v)


def test_alpha_zero_changes_nothing(smol, ids, base_run):
    with steer(smol, HP, np.stack([unit(1), unit(2)]), [0.0, 0.0]):
        logits = forward(smol, ids)
    assert torch.equal(logits, base_run[0])


def test_added_vector_appears_in_the_hooked_activation(smol, ids, base_run):
    v = unit(3)
    with steer(smol.model, HP, v, 12.5) as hp:
        logits, act = forward(smol, ids, with_acts=True)
    assert hp.width == 576
    diff = (act - base_run[1])[0].numpy()  # every position moved by exactly 12.5 v
    np.testing.assert_allclose(diff, np.broadcast_to(12.5 * v, diff.shape), atol=2e-4)
    assert not torch.allclose(logits, base_run[0])
    _, after = forward(smol, ids, with_acts=True)  # the hook is gone after the block
    assert torch.equal(after, base_run[1])


def test_several_features_at_once_equal_their_sum(smol, ids, base_run):
    vs, alphas = np.stack([unit(4), unit(5), unit(6)]), [6.0, -3.0, 2.5]
    with steer(smol, HP, vs, alphas):
        together = forward(smol, ids)
    with steer(smol, HP, sum(a * v for a, v in zip(alphas, vs)), 1.0):
        summed = forward(smol, ids)
    with steer(smol, HP, vs[0], alphas[0]), steer(smol, HP, vs[1:], alphas[1:]):
        nested = forward(smol, ids)
    torch.testing.assert_close(together, summed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together, nested, atol=1e-4, rtol=1e-4)
    assert (together - base_run[0]).abs().max() > 0.1


def test_clamp_to_own_value_changes_nothing(smol, sae):
    one = smol.tokenizer("Rain", return_tensors="pt").input_ids[:, :1]  # one position: one value per feature
    clean_logits, act = forward(smol, one, with_acts=True)
    codes = np.asarray(sae.encode(jnp.asarray(act[0].numpy())))[0]
    active, silent = int(np.argmax(codes)), int(np.argmin(codes))
    assert codes[active] > 0 and codes[silent] == 0
    with clamp(smol, sae, HP, active, float(codes[active])):
        assert torch.equal(forward(smol, one), clean_logits)
    with clamp(smol, sae, None, silent, 0.0):
        assert torch.equal(forward(smol, one), clean_logits)


def test_clamp_moves_the_activation_along_the_feature(smol, ids, sae, base_run):
    f, value = 7, 30.0
    codes = np.asarray(sae.encode(jnp.asarray(base_run[1][0].numpy())))[:, f]
    with clamp(smol, sae, HP, f, value):
        _, act = forward(smol, ids, with_acts=True)
    want = base_run[1][0].numpy() + (value - codes)[:, None] * np.asarray(sae.W_dec[...])[f]
    np.testing.assert_allclose(act[0].numpy(), want, atol=2e-3)


def test_transcoder_clamp_reads_one_hookpoint_and_writes_another(smol):
    tc = base.build("transcoder", dict(d_in=576, n_features=256, d_out=576, sparsity="relu", hookpoint_in="mlp_in.3",
                                       hookpoint_out="mlp_out.3", seed=1))
    one = smol.tokenizer("Rain", return_tensors="pt").input_ids[:, :1]
    hps = resolve(smol.model, ["mlp_in.3", "mlp_out.3"], probe_widths=False)
    with torch.no_grad(), capture(smol.model, hps) as acts:
        clean = smol.model(input_ids=one).logits
    codes = np.asarray(tc.encode(jnp.asarray(acts["mlp_in.3"][0].numpy())))[0]
    f = int(np.argmax(codes))
    with clamp(smol, tc, "mlp_out.3", f, float(codes[f])):
        assert torch.equal(forward(smol, one), clean)
    with torch.no_grad(), clamp(smol, tc, "mlp_out.3", f, float(codes[f]) + 5.0), capture(smol.model, hps) as got:
        smol.model(input_ids=one)
    moved = (got["mlp_out.3"] - acts["mlp_out.3"])[0, 0].numpy()
    np.testing.assert_allclose(moved, 5.0 * np.asarray(tc.W_dec[...])[f], atol=1e-4)


def test_steering_applies_during_generation(smol):
    plain = generate(smol, smol.tokenizer, "My favourite food is", max_new_tokens=4)
    with steer(smol, HP, unit(7), 0.0):
        assert generate(smol, smol.tokenizer, "My favourite food is", max_new_tokens=4) == plain
    with steer(smol, HP, unit(7), 400.0):
        assert generate(smol, smol.tokenizer, "My favourite food is", max_new_tokens=4) != plain


def test_errors_name_both_sides(smol, sae):
    with pytest.raises(SteeringError, match=r"resid_post\.99.*LlamaForCausalLM.*0\.\.29"):
        with steer(smol, "resid_post.99", unit(1), 1.0):
            pass
    with pytest.raises(SteeringError, match=r"width 100.*resid_post\.6.*width 576"):
        with steer(smol, HP, np.ones(100, np.float32), 1.0):
            pass
    with pytest.raises(SteeringError, match=r"2 steering vectors but 3 alphas"):
        with steer(smol, HP, np.stack([unit(1), unit(2)]), [1.0, 2.0, 3.0]):
            pass
    with pytest.raises(SteeringError, match=r"feature 512 is out of range.*512 features \(indices 0\.\.511\)"):
        with clamp(smol, sae, HP, 512, 1.0):
            pass
    with pytest.raises(SteeringError, match=r"clamp at hookpoint 'resid_post\.5'.*writes to 'resid_post\.6'"):
        with clamp(smol, sae, "resid_post.5", 0, 1.0):
            pass
    wide = base.build("topk", dict(d_in=768, n_features=64, k=4, hookpoint_in="resid_post.6"))
    with pytest.raises(SteeringError, match=r"width 768.*resid_post\.6.*width 576"):
        with clamp(smol, wide, HP, 0, 1.0):
            pass
