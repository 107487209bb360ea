"""Planted dictionaries are recovered: TopK, BatchTopK and JumpReLU each find >= 90% of the true atoms.

Data: 128 random unit-norm atoms in 32 dimensions; each row is a non-negative combination of exactly 4
of them (coefficients uniform in [1, 2]) plus Gaussian noise (0.01), scaled to unit mean squared norm
as the trainer does. An atom counts as recovered when some learned feature (decoder row) has cosine
> 0.9 with it. 256 latents, batch 512, Adam; the step counts are what each mechanism needs here."""

from __future__ import annotations

import numpy as np
import pytest

import dictlearn.decomposers as D

D_IN, ATOMS, K, LATENTS = 32, 128, 4, 256


def planted(rows: int = 20_000, noise: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((ATOMS, D_IN))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    support = np.argsort(rng.random((rows, ATOMS)), axis=1)[:, :K]
    codes = np.zeros((rows, ATOMS))
    np.put_along_axis(codes, support, rng.uniform(1.0, 2.0, (rows, K)), axis=1)
    x = codes @ atoms + noise * rng.standard_normal((rows, D_IN))
    x /= np.sqrt(np.mean(np.sum(x**2, axis=1)))
    return atoms.astype(np.float32), x.astype(np.float32)


def recovered(atoms: np.ndarray, features: np.ndarray, cosine: float = 0.9) -> float:
    f = np.array(features, dtype=np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return float(np.mean(np.max(atoms @ f.T, axis=1) > cosine))


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.mark.parametrize("kind,config,steps,lr", [
    ("topk", {"k": K, "dead_tokens": 4096}, 600, 1e-2),
    ("batchtopk", {"k": K, "dead_tokens": 4096}, 1000, 1e-2),
    ("jumprelu", {"initial_threshold": 0.3, "bandwidth": 0.2, "l0_coefficient": 0.07, "l0_warmup_steps": 0}, 4000, 3e-3),
])
def test_recovers_planted_atoms(data, kind, config, steps, lr, train_steps):
    atoms, x = data
    model = D.build(kind, {"d_in": D_IN, "n_features": LATENTS, **config})
    before = recovered(atoms, model.features())
    metrics = train_steps(model, {"x": x, "y": x}, steps=steps, batch_size=512, lr=lr, decay=True)
    share = recovered(atoms, model.features())
    assert before < 0.05  # a random dictionary recovers nothing
    assert share >= 0.9, f"{kind} recovered {share:.1%} of the atoms (fvu {metrics['fvu'][-1]:.3f}, l0 {metrics['l0'][-1]:.2f})"
    assert metrics["fvu"][-1] < 0.3
    assert 2.0 <= metrics["l0"][-50:].mean() <= 6.0
