"""SAELens export: SAELens itself loads our folders and computes what dictlearn computes.

sae-lens is a dev extra (it installs beside transformers 5.23 / torch 2.13 without changing them), so
these tests run SAELens in-process. Inputs near a JumpReLU threshold or a TopK boundary are left out of
the code comparison: float32 matmuls in JAX and torch round differently there.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.decomposers import base
from dictlearn.export.kinds import from_linear, to_linear
from dictlearn.export.saelens import (
    SaeLensFormatError, architecture_of, export_saelens, hookpoint_from_tl, import_saelens, read_saelens, tl_hook_name,
)

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
torch = pytest.importorskip("torch")

D, N, D_OUT, B = 24, 96, 20, 256


def randomise(module, rng):
    """Random weights with a non-trivial input bias, output bias and thresholds."""
    cfg = module.config
    module.W_enc[...] = jnp.asarray(rng.standard_normal((cfg.n_features, cfg.d_in)).astype(np.float32) / np.sqrt(cfg.d_in))
    module.b_enc[...] = jnp.asarray(rng.normal(-0.3, 0.2, cfg.n_features).astype(np.float32))
    module.W_dec[...] = jnp.asarray(rng.standard_normal((cfg.n_features, cfg.d_out)).astype(np.float32))
    module.b_dec[...] = jnp.asarray(rng.standard_normal(cfg.d_out).astype(np.float32))
    if hasattr(module, "b_in"):
        module.b_in[...] = jnp.asarray(rng.standard_normal(cfg.d_in).astype(np.float32))
    if hasattr(module, "W_skip"):
        module.W_skip[...] = jnp.asarray(0.1 * rng.standard_normal((cfg.d_in, cfg.d_out)).astype(np.float32))
    name = type(module.sparsity).name
    if name == "jumprelu":
        module.sparsity.log_threshold[...] = jnp.asarray(np.log(rng.uniform(0.05, 0.6, cfg.n_features)).astype(np.float32))
    if name == "batchtopk":
        module.sparsity.threshold[...] = jnp.asarray(0.25, jnp.float32)
    return module


def safe_rows(lin, x, margin=1e-3):
    """Rows whose codes cannot flip under float32 rounding (no pre-activation near a decision boundary)."""
    lin64 = lin.without_input_bias()
    pre = x.astype(np.float64) @ lin64.W_enc.astype(np.float64) + lin64.b_enc
    if lin.sparsity == "relu":
        gap = np.abs(pre)
    elif lin.sparsity == "jumprelu":
        gap = np.abs(pre - lin.threshold)
    else:
        s = -np.sort(-pre, axis=1)
        gap = np.abs(s[:, [lin.k - 1]] - s[:, [lin.k]]) * np.ones_like(pre)
    keep = gap.min(axis=1) > margin
    assert keep.mean() > 0.5, "too few rows away from decision boundaries; the test data is badly chosen"
    return keep


CASES = {
    "relu": ("relu", {}, "standard"),
    "topk": ("topk", {"k": 8}, "topk"),
    "jumprelu": ("jumprelu", {}, "jumprelu"),
    "batchtopk": ("batchtopk", {"k": 8}, "jumprelu"),
    "gtopk": ("gtopk", {"k": 8}, "topk"),
    "transcoder_relu": ("transcoder", {"sparsity": "relu"}, "transcoder"),
    "transcoder_jumprelu": ("transcoder", {"sparsity": "jumprelu"}, "jumprelu_transcoder"),
    "skip_transcoder_relu": ("skip_transcoder", {"sparsity": "relu"}, "skip_transcoder"),
}


def make(case, seed=0):
    kind, extra, _ = CASES[case]
    transcoder = kind.endswith("transcoder")
    cfg = dict(d_in=D, n_features=N, d_out=D_OUT if transcoder else D, seed=seed,
               hookpoint_in="mlp_in.3" if transcoder else "resid_post.3",
               hookpoint_out="mlp_out.3" if transcoder else "", **extra)
    return randomise(base.build(kind, cfg), np.random.default_rng(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_loads_export_and_matches(case, tmp_path):
    module = make(case)
    folder = export_saelens(module, tmp_path / case, metadata={"model_name": "test-model"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == CASES[case][2]
    assert cfg["normalize_activations"] == "none"
    sae = sae_lens.SAE.load_from_disk(str(folder))
    assert sae.cfg.architecture() == CASES[case][2]

    x = np.random.default_rng(1).normal(0, 1.5, (B, D)).astype(np.float32)
    keep = safe_rows(to_linear(module), x)
    ours_codes = np.asarray(module.encode(jnp.asarray(x)))
    ours_out = np.asarray(module(jnp.asarray(x)))
    with torch.no_grad():
        xt = torch.from_numpy(x)
        theirs_codes = sae.encode(xt).numpy()
        theirs_out = sae(xt).numpy()
    np.testing.assert_allclose(theirs_codes[keep], ours_codes[keep], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(theirs_out[keep], ours_out[keep], rtol=1e-4, atol=1e-3)
    assert (theirs_codes[keep] > 0).sum() > 0.02 * keep.sum() * N  # the comparison is not vacuous
    # the decode half alone agrees on the same codes (skip path excluded on both sides)
    with torch.no_grad():
        dec = sae.decode(torch.from_numpy(ours_codes.copy())).numpy()
    np.testing.assert_allclose(dec, np.asarray(module.decode(jnp.asarray(ours_codes))), rtol=1e-4, atol=1e-3)


def test_metadata_names_hooks_for_saelens_and_dictlearn(tmp_path):
    folder = export_saelens(make("transcoder_relu"), tmp_path / "tc", metadata={"model_name": "m"})
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.3.ln2.hook_normalized" and meta["hook_name_out"] == "blocks.3.hook_mlp_out"
    assert meta["dictlearn_hookpoint"] == "mlp_in.3" and meta["dictlearn_hookpoint_out"] == "mlp_out.3"
    assert meta["model_name"] == "m"
    assert tl_hook_name("resid_post.10") == "blocks.10.hook_resid_post"
    assert hookpoint_from_tl("blocks.7.hook_resid_pre") == "resid_pre.7"
    assert hookpoint_from_tl("blocks.7.hook_mlp_in") is None  # pre-LayerNorm in TransformerLens: no exact alias


def test_topk_transcoder_has_no_saelens_form(tmp_path):
    module = base.build("transcoder", dict(d_in=D, n_features=N, d_out=D_OUT, k=4, hookpoint_in="mlp_in.1",
                                           hookpoint_out="mlp_out.1"))
    with pytest.raises(SaeLensFormatError, match="no TopK transcoder"):
        export_saelens(module, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["relu", "topk", "jumprelu", "transcoder_jumprelu", "skip_transcoder_relu"])
def test_export_import_round_trip_is_exact(case, tmp_path):
    module = make(case, seed=3)
    back = import_saelens(export_saelens(module, tmp_path / case))
    assert back.kind == (module.kind if case != "batchtopk" else "jumprelu")
    assert back.config.hookpoint_in == module.config.hookpoint_in and back.config.hookpoint_out == module.config.hookpoint_out
    x = jnp.asarray(np.random.default_rng(2).normal(0, 1.5, (64, D)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(back.encode(x)), np.asarray(module.encode(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(back(x)), np.asarray(module(x)), rtol=1e-5, atol=1e-4)


def test_refuses_runtime_normalisation_and_unknown_architecture(tmp_path):
    folder = export_saelens(make("relu"), tmp_path / "a")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SaeLensFormatError, match="layer_norm"):
        read_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SaeLensFormatError, match="'gated' has no dictlearn counterpart"):
        read_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "metadata": {}}))
    with pytest.raises(SaeLensFormatError, match="--hookpoint"):
        read_saelens(folder)
    assert read_saelens(folder, hookpoint="resid_post.3")[0].hookpoint_in == "resid_post.3"


def test_architecture_names():
    assert architecture_of(to_linear(make("relu"))) == "standard"
    assert architecture_of(to_linear(make("batchtopk"))) == "jumprelu"
    assert from_linear(to_linear(make("gtopk"))).kind == "topk"
