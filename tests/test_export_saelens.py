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


# ---- features.safetensors -------------------------------------------------------------------------

from dictlearn.export.features import FeaturesError, read_features, write_features  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402


def test_features_round_trip_and_validation(tmp_path):
    v = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    folder = write_features(tmp_path / "f", v, "resid_post.2", model="/models/m.gguf", source={"kind": "topk"})
    fs = read_features(folder / "features.safetensors")
    np.testing.assert_array_equal(fs.vectors, v)
    assert (fs.hookpoint, fs.model, fs.n_features, fs.width, fs.source) == ("resid_post.2", "/models/m.gguf", 5, 7, {"kind": "topk"})
    with pytest.raises(FeaturesError, match=r"feature 5 is out of range: here holds 5 features \(indices 0\.\.4\)"):
        fs.vector(5, where="here")

    meta = json.loads((folder / "features.json").read_text())
    (folder / "features.json").write_text(json.dumps({**meta, "n_features": 6}))
    with pytest.raises(FeaturesError, match=r"shape \(5, 7\), but features.json says \(n_features, width\) = \(6, 7\)"):
        read_features(folder)
    (folder / "features.json").write_text(json.dumps(meta))
    save_file({"vectors": v.astype(np.float16)}, str(folder / "features.safetensors"))
    with pytest.raises(FeaturesError, match="dtype float16"):
        read_features(folder)
    tampered = v.copy()
    tampered[2, 3] += 1e-3
    save_file({"vectors": tampered}, str(folder / "features.safetensors"))
    with pytest.raises(FeaturesError, match="checksum mismatch"):
        read_features(folder)
    save_file({"W_dec": v}, str(folder / "features.safetensors"))
    with pytest.raises(FeaturesError, match="one tensor named 'vectors'"):
        read_features(folder)
    (folder / "features.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(FeaturesError, match="unreadable"):
        read_features(folder)
    (folder / "features.safetensors").unlink()
    with pytest.raises(FeaturesError, match="features.safetensors is missing"):
        read_features(folder)
    with pytest.raises(FeaturesError, match="non-empty"):
        write_features(tmp_path / "g", np.zeros((0, 3)), "resid_post.0")


# ---- semi-NMF export ----------------------------------------------------------------------------

def _snmf(d_mlp=32, k=8, d_model=24, with_resid=True):
    import dictlearn.decomposers.snmf  # noqa: F401

    m = base.build("snmf", dict(d_in=d_mlp, n_features=k, hookpoint_in="mlp_hidden.3", encode_iters=50))
    rng = np.random.default_rng(4)
    f = rng.standard_normal((d_mlp, k)) * (rng.random((d_mlp, k)) < 0.3)
    m.set_features(jnp.asarray(f + 1e-3, jnp.float32))
    w_out = rng.standard_normal((d_mlp, d_model)).astype(np.float32)
    if with_resid:
        m.set_w_out(w_out, resid_hookpoint="mlp_out.3")  # where F^T W_out appears (the family knows it)
    return m, w_out


def test_snmf_export_round_trip(tmp_path):
    from dictlearn.export import export_decomposer
    from dictlearn.export.snmf_format import SnmfFormatError, read_snmf

    m, w_out = _snmf()
    summary = export_decomposer(m, tmp_path / "s", model_name="mdl")
    assert summary["files"] == ["snmf.safetensors", "snmf.json", "features.safetensors", "features.json"]
    meta = json.loads((tmp_path / "s" / "snmf.json").read_text())
    assert (meta["hookpoint"], meta["resid_hookpoint"], meta["d_model"]) == ("mlp_hidden.3", "mlp_out.3", 24)
    back = read_snmf(tmp_path / "s")
    x = jnp.asarray(np.abs(np.random.default_rng(5).standard_normal((16, 32))).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(back.encode(x)), np.asarray(m.encode(x)))
    np.testing.assert_array_equal(np.asarray(back.resid_features()), np.asarray(m.resid_features()))
    fs = read_features(tmp_path / "s")  # steering vectors: F^T W_out at mlp_out
    assert fs.hookpoint == "mlp_out.3"
    np.testing.assert_allclose(fs.vectors, np.asarray(m.F[...]).T @ w_out, rtol=1e-5, atol=1e-5)

    bare, _ = _snmf(with_resid=False)  # no residual directions and no model: F only, no steering vectors
    with pytest.raises(SnmfFormatError, match="pass the language model"):
        export_decomposer(bare, tmp_path / "b")
    t = load_file(str(tmp_path / "s" / "snmf.safetensors"))
    t["F"][0, 0] += 1.0
    save_file(t, str(tmp_path / "s" / "snmf.safetensors"))
    with pytest.raises(SnmfFormatError, match="checksum"):
        read_snmf(tmp_path / "s")


# ---- `dictlearn export CONFIG` --------------------------------------------------------------------

def test_export_cli_writes_every_decomposer_and_skips_finished_ones(tmp_path, capsys):
    from dictlearn.cli.export import main

    root = tmp_path / "run"
    made = {"sae": make("topk"), "tc_topk": base.build("transcoder", dict(d_in=D, n_features=N, d_out=D_OUT, k=4,
                                                                           hookpoint_in="mlp_in.3", hookpoint_out="mlp_out.3")),
            "nmf": _snmf()[0]}
    for name, m in made.items():
        base.save(m, root / "decomposers" / name)
    config = tmp_path / "run.toml"
    config.write_text(f'out_dir = "{root}"\n[model]\nname = "{tmp_path / "no-model.gguf"}"\n')
    assert main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "tc_topk (transcoder)" in out and "skipped saelens: SAELens has no TopK transcoder" in out
    ex = root / "export"
    from dictlearn.run import STAMP_FILE  # the export stage's "up to date" stamp (one rule for every stage)

    assert sorted(p.name for p in (ex / "sae").iterdir()) == sorted(["cfg.json", "export.json", "features.json",
                                                                    "features.safetensors", "sae_weights.safetensors",
                                                                    STAMP_FILE])
    assert not (ex / "tc_topk" / "cfg.json").exists() and (ex / "tc_topk" / "features.safetensors").is_file()
    assert (ex / "nmf" / "snmf.json").is_file()
    sae = sae_lens.SAE.load_from_disk(str(ex / "sae"))
    assert sae.cfg.metadata.model_name == str(tmp_path / "no-model.gguf") and sae.cfg.metadata.dictlearn_name == "sae"
    np.testing.assert_array_equal(read_features(ex / "sae").vectors, np.asarray(made["sae"].features()))
    assert read_features(ex / "tc_topk").hookpoint == "mlp_out.3"

    assert main([str(config), "--only", "sae"]) == 0
    assert "sae: up to date" in capsys.readouterr().out
    assert main([str(config), "--only", "sae", "--force"]) == 0
    assert "sae (topk) ->" in capsys.readouterr().out
    assert main([str(config), "--only", "nope"]) == 1
    assert "no saved decomposer named nope" in capsys.readouterr().err
    assert main([]) == 1
    assert "give a run config" in capsys.readouterr().err
