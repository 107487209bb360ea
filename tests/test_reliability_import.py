"""Imports refuse what does not add up, with a sentence naming the field or tensor, before writing anything:
SAELens cfg.json sizes against the weights, weights against each other, k against the width, non-finite
values, and hookpoints that cannot be one (a sparsify folder named after no module, a malformed --hookpoint).
Exports say truthfully what wrote them."""

from __future__ import annotations

import json
from importlib.metadata import version

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dictlearn.decomposers import base
from dictlearn.export.saelens import SaeLensFormatError, export_saelens, hookpoint_problem, read_saelens
from dictlearn.export.sparsify import SparsifyFormatError, import_sparsify, read_sparsify

D, N, D_OUT = 12, 40, 10


def _saelens(tmp_path, kind="relu", **extra):
    transcoder = kind == "transcoder"
    module = base.build(kind, dict(d_in=D, n_features=N, d_out=D_OUT if transcoder else D,
                                   hookpoint_in="mlp_in.2" if transcoder else "resid_post.2",
                                   hookpoint_out="mlp_out.2" if transcoder else "", **extra))
    return export_saelens(module, tmp_path / kind)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _edit_weights(folder, name, value):
    w = load_file(str(folder / "sae_weights.safetensors"))
    w[name] = np.asarray(value, np.float32)
    save_file(w, str(folder / "sae_weights.safetensors"))


def _cli(capsys, *argv):
    from dictlearn.cli.export import main

    rc = main(list(argv))
    got = capsys.readouterr()
    return rc, got.out + got.err


@pytest.mark.parametrize("field,value,kind", [("d_in", 99, "relu"), ("d_sae", N + 1, "relu"), ("d_out", 7, "transcoder")])
def test_saelens_cfg_sizes_must_match_the_weights(tmp_path, capsys, field, value, kind):
    folder = _saelens(tmp_path, kind, **({"sparsity": "relu"} if kind == "transcoder" else {}))
    read_saelens(folder)  # as written: consistent
    _edit_cfg(folder, **{field: value})
    with pytest.raises(SaeLensFormatError, match=rf"cfg.json: {field} is {value} but the weights say "):
        read_saelens(folder)
    rc, text = _cli(capsys, "--import-saelens", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 1 and f"{field} is {value} but the weights say" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize("name,shape", [("b_enc", (N - 1,)), ("W_dec", (N, D + 2)), ("b_dec", (D + 1,))])
def test_saelens_weights_that_do_not_fit_together_are_named(tmp_path, capsys, name, shape):
    folder = _saelens(tmp_path)
    _edit_weights(folder, name, np.zeros(shape))
    with pytest.raises(SaeLensFormatError, match=rf"{name} has shape \(.*\) but W_enc \({D}, {N}\)"):
        read_saelens(folder)
    rc, text = _cli(capsys, "--import-saelens", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 1 and f"{name} has shape" in text


@pytest.mark.parametrize("k", [N + 1, 0, "8"])
def test_saelens_k_must_fit_the_width(tmp_path, capsys, k):
    folder = _saelens(tmp_path, "topk", k=8)
    _edit_cfg(folder, k=k)
    with pytest.raises(SaeLensFormatError, match=rf"k is {k!r}, but a topk SAE keeps between 1 and d_sae = {N}"):
        read_saelens(folder)
    rc, text = _cli(capsys, "--import-saelens", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 1 and "k is" in text


def test_saelens_non_finite_weights_are_refused(tmp_path):
    folder = _saelens(tmp_path)
    w = load_file(str(folder / "sae_weights.safetensors"))["W_enc"]
    w[3, 4], w[0, 0] = np.nan, np.inf
    _edit_weights(folder, "W_enc", w)
    with pytest.raises(SaeLensFormatError, match="W_enc holds 2 nan or infinite value"):
        read_saelens(folder)


def test_saelens_hookpoints_are_checked_and_tl_names_mapped(tmp_path, capsys):
    folder = _saelens(tmp_path)
    assert read_saelens(folder, hookpoint="blocks.5.hook_mlp_out")[0].hookpoint_in == "mlp_out.5"
    assert read_saelens(folder, hookpoint="model.layers.5.mlp:input")[0].hookpoint_in == "model.layers.5.mlp:input"
    for bad, why in (("mlp_out", "takes a layer index"), ("resid_post.2.x", "takes a layer index"),
                     ("model.layers.*.mlp", "neither an alias"), ("a b", "neither an alias")):
        with pytest.raises(SaeLensFormatError, match=f"^--hookpoint: '.*{why}"):
            read_saelens(folder, hookpoint=bad)
    _edit_cfg(folder, metadata={"hook_name": "blocks.1.hook_unknown", "hf_hook_name": "layers 1"})
    with pytest.raises(SaeLensFormatError, match="cfg.json: 'layers 1' is neither an alias"):
        read_saelens(folder)
    rc, text = _cli(capsys, "--import-saelens", str(folder), "--out", str(tmp_path / "o"), "--hookpoint", "resid_post")
    assert rc == 1 and "'resid_post': the alias 'resid_post' takes a layer index" in text


def test_hookpoint_problem():
    assert hookpoint_problem("resid_post.10") is None and hookpoint_problem("mlp_out_pre_norm.3") is None
    assert hookpoint_problem("transformer.h.3.attn") is None and hookpoint_problem("model.layers.0.mlp.down_proj:input") is None
    assert "layer index" in hookpoint_problem("resid_post.x")
    assert "neither" in hookpoint_problem("model.layers.0:output") and "neither" in hookpoint_problem("")


def test_export_says_what_wrote_it(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
    folder = _saelens(tmp_path)
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["dictlearn_version"] == version("dictlearn")
    assert meta["sae_lens_version"] == "6.0.0"  # the layout SAELens >= 6 reads, not a SAELens that ran
    assert meta["sae_lens_training_version"] is None  # SAELens did not train it
    sae = sae_lens.SAE.load_from_disk(str(folder))  # SAELens takes its 6.x path and keeps the record
    assert sae.cfg.metadata.dictlearn_version == version("dictlearn") and sae.cfg.metadata.sae_lens_training_version is None


# ---- sparsify ---------------------------------------------------------------------------------------

def _sparsify(folder, n=N, d=D, k=4, transcode=False, **cfg_changes):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 0, "normalize_decoder": True, "num_latents": n, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": d, **cfg_changes}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": rng.standard_normal((n, d)).astype(np.float32),
               "encoder.bias": rng.standard_normal(n).astype(np.float32),
               "W_dec": rng.standard_normal((n, d)).astype(np.float32),
               "b_dec": rng.standard_normal(d).astype(np.float32)}, str(folder / "sae.safetensors"))
    return folder


@pytest.mark.parametrize("changes,said", [
    ({"num_latents": N * 2}, f"num_latents is {N * 2} but encoder.weight is ({N}, {D})"),
    ({"num_latents": 0, "expansion_factor": 4}, f"expansion_factor x d_in is {4 * D} but encoder.weight"),
    ({"d_in": D + 1}, f"d_in is {D + 1} but encoder.weight is ({N}, {D})"),
    ({"k": N + 1}, f"k is {N + 1}, but a top-k sparse coder keeps between 1 and num_latents = {N}"),
])
def test_sparsify_cfg_must_match_the_weights(tmp_path, capsys, changes, said):
    folder = _sparsify(tmp_path / "layers.3", **changes)
    with pytest.raises(SparsifyFormatError, match=said.replace("(", r"\(").replace(")", r"\)")):
        read_sparsify(folder)
    rc, text = _cli(capsys, "--import-sparsify", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 1 and said in text and not (tmp_path / "out").exists()


def test_sparsify_weights_that_do_not_fit_together_are_named(tmp_path):
    folder = _sparsify(tmp_path / "layers.3")
    w = load_file(str(folder / "sae.safetensors"))
    w["W_dec"] = np.zeros((N, D + 3), np.float32)
    save_file(w, str(folder / "sae.safetensors"))
    with pytest.raises(SparsifyFormatError, match=rf"W_dec has shape \({N}, {D + 3}\) but encoder.weight \({N}, {D}\) makes it \({N}, {D}\)"):
        read_sparsify(folder)


def test_sparsify_folder_named_after_no_module_needs_hookpoint(tmp_path, capsys):
    folder = _sparsify(tmp_path / "sp_topk")
    with pytest.raises(SparsifyFormatError, match="name 'sp_topk' is not a sparsify hookpoint.*pass it with --hookpoint"):
        import_sparsify(folder)
    rc, text = _cli(capsys, "--import-sparsify", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 1 and "is not a sparsify hookpoint" in text and not (tmp_path / "out").exists()

    # --hookpoint works for sparsify imports, from Python and from the command line
    assert import_sparsify(folder, hookpoint="resid_post.2")["sp_topk"].config.hookpoint_in == "resid_post.2"
    rc, text = _cli(capsys, "--import-sparsify", str(folder), "--out", str(tmp_path / "out"), "--hookpoint", "resid_post.2")
    assert rc == 0, text
    native = base.load(tmp_path / "out")
    assert (native.config.hookpoint_in, native.config.hookpoint_out) == ("resid_post.2", "resid_post.2")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, D)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(native(x)), np.asarray(import_sparsify(folder, hookpoint="resid_post.2")["sp_topk"](x)))

    rc, text = _cli(capsys, "--import-sparsify", str(folder), "--out", str(tmp_path / "bad"), "--hookpoint", "resid_post")
    assert rc == 1 and "--hookpoint: 'resid_post': the alias 'resid_post' takes a layer index" in text
    with pytest.raises(SparsifyFormatError, match="writes where it reads"):
        import_sparsify(folder, hookpoint="resid_post.2", hookpoint_out="resid_post.3")


def test_sparsify_hookpoint_override_rules(tmp_path):
    tc = _sparsify(tmp_path / "one" / "my_transcoder", transcode=True)
    with pytest.raises(SparsifyFormatError, match="--hookpoint and --hookpoint-out"):
        import_sparsify(tc)
    with pytest.raises(SparsifyFormatError, match="also needs the hookpoint it writes to"):
        import_sparsify(tc, hookpoint="mlp_in.1")
    got = import_sparsify(tc, hookpoint="mlp_in.1", hookpoint_out="mlp_out.1")["my_transcoder"]
    assert (got.kind, got.config.hookpoint_in, got.config.hookpoint_out) == ("transcoder", "mlp_in.1", "mlp_out.1")
    # a named folder keeps its mapping unless overridden
    named = _sparsify(tmp_path / "run" / "layers.4.mlp", transcode=True)
    assert import_sparsify(named, hookpoint="mlp_in.4")["layers.4.mlp"].config.hookpoint_out == "mlp_out.4"
    _sparsify(tmp_path / "run" / "layers.5")
    with pytest.raises(SparsifyFormatError, match="holds 2 dictionaries .* import them one folder at a time"):
        import_sparsify(tmp_path / "run", hookpoint="resid_post.5")
    assert sorted(import_sparsify(tmp_path / "run")) == ["layers.4.mlp", "layers.5"]
