"""KL calibration of steering strength: constructed checks on a tiny GPT-2, and the real SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dictlearn.activations.hookpoints import intervene, resolve
from dictlearn.steering.calibrate import KLCalibrator, add_vector, calibrate_alpha, kl_divergence, pad_right, unit


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core machine one torch thread is several times faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = [[5, 17, 300], [42, 7], [1000, 2000, 3000, 4000, 5], [9]]


def independent_kl(model, hp, prompts, vector, alpha):
    """Mean last-token KL(base || steered), each prompt run alone (no padding), for checking the calibrator."""
    v = unit(vector)
    kls = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            base = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            with intervene(model, hp, add_vector(v, alpha)):
                steered = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        kls.append(float(kl_divergence(base[None], steered[None])[0]))
    return float(np.mean(kls))


def test_pad_right_and_unit():
    ids, lengths = pad_right([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]
    assert float(unit(np.array([3.0, 4.0])).norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero"):
        unit(np.zeros(4))
    with pytest.raises(ValueError, match="non-empty"):
        pad_right([[1], []])


def test_right_padded_batch_gives_each_prompts_own_distribution(tiny_gpt2):
    hp = resolve(tiny_gpt2, "resid_post.1")[0]
    cal = KLCalibrator(tiny_gpt2, hp, PROMPTS)
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            alone = torch.log_softmax(tiny_gpt2(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
        assert torch.allclose(cal.base_logprobs[i], alone, atol=1e-4)


def test_calibration_hits_targets_both_signs(tiny_gpt2):
    hp = resolve(tiny_gpt2, "resid_post.1")[0]
    cal = KLCalibrator(tiny_gpt2, hp, PROMPTS)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    for sign in (1, -1):
        results = cal.calibrate_targets(v, [0.001, 0.003, 0.008], sign=sign, tol=0.02, max_forwards=16)
        for r, target in zip(results, [0.001, 0.003, 0.008]):
            assert r.converged and r.sign == sign and np.sign(r.alpha) == sign
            assert abs(r.kl - target) <= 0.02 * target
            assert 1 <= r.n_forwards <= 16 or r.n_forwards == 0  # 0: an earlier target's evaluation already hit it
            assert independent_kl(tiny_gpt2, hp, PROMPTS, v, r.alpha) == pytest.approx(r.kl, rel=1e-3)
        alphas = [abs(r.alpha) for r in results]
        assert alphas == sorted(alphas)  # more KL needs more strength


def test_calibration_reports_non_convergence(tiny_gpt2):
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    r = calibrate_alpha(tiny_gpt2, "resid_post.1", v, PROMPTS, target_kl=0.3, tol=1e-9, max_forwards=3)
    assert not r.converged and r.n_forwards == 3 and r.kl > 0


def test_calibration_input_errors(tiny_gpt2):
    cal = KLCalibrator(tiny_gpt2, "resid_post.1", PROMPTS)
    with pytest.raises(ValueError, match="width"):
        cal.kl(unit(np.ones(7)), 1.0)
    with pytest.raises(ValueError, match="sign"):
        cal.calibrate(np.ones(32), 0.1, sign=0)
    with pytest.raises(ValueError, match="positive"):
        cal.calibrate(np.ones(32), -0.1)


def test_calibration_on_smollm2_within_ten_percent(smol):
    """Issue 5: on the real model the calibrated KL is within 10% of the target (checked independently)."""
    tok = smol.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ["I think that", "The weather today", "Yesterday, my friend and I", "In my opinion,"]]
    hp = resolve(smol.model, "resid_post.10")[0]
    v = torch.randn(hp.width, generator=torch.Generator().manual_seed(0))
    cal = KLCalibrator(smol.model, hp, prompts)
    results = cal.calibrate_targets(v, [0.25, 1.0], sign=1)
    for r, target in zip(results, [0.25, 1.0]):
        assert r.converged and r.n_forwards <= 8
        measured = independent_kl(smol.model, hp, prompts, v, r.alpha)
        assert abs(measured - target) <= 0.1 * target
        assert 0.05 < abs(r.alpha) / r.activation_norm < 2.0  # a sane share of the residual norm
