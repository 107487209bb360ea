"""Import: folders made by SAELens and by sparsify become dictlearn decomposers that compute the same thing."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dictlearn.export.saelens import export_saelens, import_saelens
from dictlearn.export.sparsify import SparsifyFormatError, hookpoints_for, import_sparsify, read_sparsify_run

torch = pytest.importorskip("torch")
D, N, B = 16, 64, 128


def _x(d=D, seed=5):
    return np.random.default_rng(seed).normal(0, 1.5, (B, d)).astype(np.float32)


def _fill(module, gen, d_out=D):
    """Random SAELens weights: non-unit decoder rows, negative-ish encoder biases, thresholds > 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.05)
            elif name == "b_enc":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 - 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name == "W_skip" else 1.0 / np.sqrt(p.shape[0])))


def _saelens_made(kind, folder):
    sl = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
    from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

    meta = sl.saes.sae.SAEMetadata(hook_name="blocks.2.hook_resid_post", model_name="some-model")
    tmeta = sl.saes.sae.SAEMetadata(hook_name="blocks.2.ln2.hook_normalized", hook_name_out="blocks.2.hook_mlp_out")
    if kind == "standard":
        sae = sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=True, metadata=meta))
    elif kind == "topk_rescaled":
        sae = sl.TopKSAE(sl.TopKSAEConfig(d_in=D, d_sae=N, k=6, rescale_acts_by_decoder_norm=True, metadata=meta))
    elif kind == "jumprelu_no_bdec":
        sae = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False, metadata=meta))
    elif kind == "transcoder":
        sae = Transcoder(TranscoderConfig(d_in=D, d_sae=N, d_out=12, apply_b_dec_to_input=False, metadata=tmeta))
    else:
        sae = SkipTranscoder(SkipTranscoderConfig(d_in=D, d_sae=N, d_out=12, apply_b_dec_to_input=False, metadata=tmeta))
    _fill(sae, torch.Generator().manual_seed(len(kind)))
    sae.save_model(str(folder))
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk_rescaled", "jumprelu_no_bdec", "transcoder", "skip_transcoder"])
def test_saelens_made_folder_round_trips(kind, tmp_path):
    sae = _saelens_made(kind, tmp_path / "made")
    ours = import_saelens(tmp_path / "made")
    transcoder = "transcoder" in kind
    assert ours.config.hookpoint_in == ("mlp_in.2" if transcoder else "resid_post.2")
    assert ours.config.hookpoint_out == ("mlp_out.2" if transcoder else "resid_post.2")
    x = _x()
    with torch.no_grad():
        want_codes, want_out = sae.encode(torch.from_numpy(x)).numpy(), sae(torch.from_numpy(x)).numpy()
    codes, out = np.asarray(ours.encode(jnp.asarray(x))), np.asarray(ours(jnp.asarray(x)))
    np.testing.assert_allclose(codes, want_codes, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    assert (want_codes > 0).mean() > 0.02

    # ... and back out: SAELens reads our re-export and still computes the same
    import sae_lens

    again = sae_lens.SAE.load_from_disk(str(export_saelens(ours, tmp_path / "again")))
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), want_out, rtol=1e-4, atol=1e-4)


def _sparsify_folder(folder, rng, d_in, n, k, transcode=False, skip=False):
    """A folder in sparsify's documented layout (as SparseCoder.save_to_disk writes it)."""
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": n // d_in, "normalize_decoder": True, "num_latents": n, "k": k,
        "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": d_in}))
    w = {"encoder.weight": rng.standard_normal((n, d_in)).astype(np.float32) / np.sqrt(d_in),
         "encoder.bias": rng.normal(-0.1, 0.1, n).astype(np.float32),
         "W_dec": rng.standard_normal((n, d_in)).astype(np.float32),
         "b_dec": rng.standard_normal(d_in).astype(np.float32)}
    if skip:
        w["W_skip"] = 0.1 * rng.standard_normal((d_in, d_in)).astype(np.float32)
    save_file(w, str(folder / "sae.safetensors"))
    return w


def _sparsify_reference(w, x, k, transcode, skip):
    """sparsify's math, in numpy: top k of relu((x - b_dec) W^T + b), decoded with W_dec, plus the skip."""
    xin = x if transcode else x - w["b_dec"]
    pre = np.maximum(xin @ w["encoder.weight"].T + w["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=1)[:, :k]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, idx, np.take_along_axis(pre, idx, 1), 1)
    out = codes @ w["W_dec"] + w["b_dec"]
    return codes, out + (x @ w["W_skip"].T if skip else 0)


def test_sparsify_layout_per_hookpoint(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    specs = {"layers.4": (False, False), "layers.4.mlp": (True, False), "layers.6.mlp": (True, True)}
    weights = {name: _sparsify_folder(run / name, rng, D, N, 5, t, s) for name, (t, s) in specs.items()}
    (run / "lr_scheduler_0.pt").write_bytes(b"not a dictionary")  # training leftovers are ignored
    found = import_sparsify(run)
    assert sorted(found) == sorted(specs)
    assert found["layers.4"].kind == "topk" and found["layers.4"].config.hookpoint_in == "resid_post.4"
    tc = found["layers.4.mlp"]
    assert tc.kind == "transcoder" and (tc.config.hookpoint_in, tc.config.hookpoint_out) == ("mlp_in.4", "mlp_out.4")
    assert found["layers.6.mlp"].kind == "skip_transcoder"
    x = _x()
    for name, (t, s) in specs.items():
        want_codes, want_out = _sparsify_reference(weights[name], x, 5, t, s)
        np.testing.assert_allclose(np.asarray(found[name].encode(jnp.asarray(x))), want_codes, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(found[name](jnp.asarray(x))), want_out, rtol=1e-4, atol=1e-4)


def test_sparsify_errors(tmp_path):
    with pytest.raises(SparsifyFormatError, match="holds no sparsify dictionary"):
        read_sparsify_run(tmp_path)
    _sparsify_folder(tmp_path / "layers.1", np.random.default_rng(1), D, N, 4)
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(SparsifyFormatError, match="groupmax"):
        read_sparsify_run(tmp_path)
    assert hookpoints_for("transformer.h.3.attn", False) == ("model.transformer.h.3.attn", "model.transformer.h.3.attn")
    assert hookpoints_for("h.3.attn", True, prefix="transformer.") == ("transformer.h.3.attn:input", "transformer.h.3.attn")
    assert hookpoints_for("sp_topk", False) is None and hookpoints_for("embed_tokens", True) is None  # no block: ask


@pytest.mark.parametrize("transcode,skip", [(False, False), (True, True)])
def test_folder_made_by_sparsify(transcode, skip, tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[dev]'")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=6, transcode=transcode, skip_connection=skip))
    with torch.no_grad():
        coder.encoder.bias.normal_(-0.1, 0.1)
        coder.b_dec.normal_()
        coder.W_dec.normal_()
        if skip:
            coder.W_skip.normal_(0, 0.1)
    coder.save_to_disk(tmp_path / "layers.3.mlp")
    ours = import_sparsify(tmp_path)["layers.3.mlp"]
    x = _x()
    with torch.no_grad():
        enc = coder.encode(torch.from_numpy(x))
        want = coder(torch.from_numpy(x)).sae_out.numpy()
        want_codes = np.zeros((B, N), np.float32)
        np.put_along_axis(want_codes, enc.top_indices.numpy(), enc.top_acts.numpy(), 1)
    np.testing.assert_allclose(np.asarray(ours.encode(jnp.asarray(x))), want_codes, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


def test_import_cli_writes_native_folders(tmp_path, capsys):
    from dictlearn.cli.export import main
    from dictlearn.decomposers import base

    _saelens_made("jumprelu_no_bdec", tmp_path / "sl")
    assert main(["--import-saelens", str(tmp_path / "sl"), "--out", str(tmp_path / "run" / "decomposers" / "jr")]) == 0
    assert "as jumprelu (resid_post.2 -> resid_post.2, 64 features)" in capsys.readouterr().out
    native = base.load(tmp_path / "run" / "decomposers" / "jr")
    direct = import_saelens(tmp_path / "sl")
    x = jnp.asarray(_x())
    np.testing.assert_array_equal(np.asarray(native.encode(x)), np.asarray(direct.encode(x)))
    meta = json.loads((tmp_path / "run" / "decomposers" / "jr" / "config.json").read_text())
    assert meta["extra"]["format"] == "saelens"

    rng = np.random.default_rng(3)
    for name in ("layers.1", "layers.2.mlp"):
        _sparsify_folder(tmp_path / "sp" / name, rng, D, N, 4, transcode=name.endswith("mlp"))
    assert main(["--import-sparsify", str(tmp_path / "sp"), "--out", str(tmp_path / "imp")]) == 0
    assert base.load(tmp_path / "imp" / "layers.1").kind == "topk"
    assert base.load(tmp_path / "imp" / "layers.2.mlp").config.hookpoint_in == "mlp_in.2"
    assert main(["--import-sparsify", str(tmp_path / "sp" / "layers.1"), "--out", str(tmp_path / "one")]) == 0
    assert base.load(tmp_path / "one").config.hookpoint_in == "resid_post.1"  # a single folder: --out is the folder
    capsys.readouterr()

    assert main(["--import-saelens", str(tmp_path / "sl")]) == 1
    assert "needs --out" in capsys.readouterr().err
    assert main(["--import-saelens", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert "cfg.json is missing" in capsys.readouterr().err
