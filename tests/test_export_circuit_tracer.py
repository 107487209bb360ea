"""circuit-tracer export: the files, keys, shapes and config.yaml that circuit-tracer 0.5's loaders read
(`load_relu_transcoder` / `load_transcoder_set`, `load_clt`, `load_transcoders_from_cache`), and a numpy
re-implementation of its encode/decode (SingleLayerTranscoder: act(x @ W_enc.T + b_enc), codes @ W_dec + b_dec
+ x @ W_skip.T, act ReLU or x * (x > threshold); CrossLayerTranscoder: output j sums codes_i @ W_dec_i[:, j - i]
over i <= j, plus b_dec_j) run on the written files, equal to dictlearn's own outputs.

The last test runs circuit-tracer's own loaders in circuit-tracer's own venv (it pins transformers <= 4.57.3,
so it cannot share ours) on real SmolLM2 activations; it is skipped when that venv is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from dictlearn.activations.families import FAMILIES, LLAMA, circuit_tracer_hook
from dictlearn.decomposers import base
from dictlearn.export.circuit_tracer import (
    CircuitTracerFormatError, plan_transcoder_sets, write_clt, write_transcoder_set,
)
from conftest import ROOT

yaml = pytest.importorskip("yaml")  # circuit-tracer reads config.yaml with PyYAML; so do these tests

D, N, B = 16, 48, 512


def randomise(module, rng):
    """Random weights, a non-trivial input bias, output bias, thresholds and skip path."""
    cfg = module.config
    if getattr(module, "site_axis", False):
        n_layers = cfg.n_layers
        module.W_enc[...] = jnp.asarray(rng.standard_normal((n_layers, D, N)).astype(np.float32) / np.sqrt(D))
        module.b_enc[...] = jnp.asarray(rng.normal(-0.3, 0.2, (n_layers, N)).astype(np.float32))
        module.b_in[...] = jnp.asarray(rng.standard_normal((n_layers, D)).astype(np.float32))
        module.b_dec[...] = jnp.asarray(rng.standard_normal((n_layers, D)).astype(np.float32))
        for i in range(n_layers):
            module.decoder(i)[...] = jnp.asarray(rng.standard_normal((N, n_layers - i, D)).astype(np.float32))
        if cfg.sparsity == "jumprelu":
            module.sparsity.log_threshold[...] = jnp.asarray(np.log(rng.uniform(0.05, 0.6, (n_layers, N))).astype(np.float32))
        else:
            module.sparsity.threshold[...] = jnp.asarray(rng.uniform(0.1, 0.4, n_layers).astype(np.float32))
        return module
    module.W_enc[...] = jnp.asarray(rng.standard_normal((N, D)).astype(np.float32) / np.sqrt(D))
    module.b_enc[...] = jnp.asarray(rng.normal(-0.3, 0.2, N).astype(np.float32))
    module.W_dec[...] = jnp.asarray(rng.standard_normal((N, D)).astype(np.float32))
    module.b_dec[...] = jnp.asarray(rng.standard_normal(D).astype(np.float32))
    module.b_in[...] = jnp.asarray(rng.standard_normal(D).astype(np.float32))
    if module.skip:
        module.W_skip[...] = jnp.asarray(0.1 * rng.standard_normal((D, D)).astype(np.float32))
    if cfg.sparsity == "jumprelu":
        module.sparsity.log_threshold[...] = jnp.asarray(np.log(rng.uniform(0.05, 0.6, N)).astype(np.float32))
    if cfg.sparsity == "batchtopk":
        module.sparsity.threshold[...] = jnp.asarray(0.25, jnp.float32)
    return module


def transcoder(sparsity="relu", layer=3, skip=False, seed=0, n=N, d_out=D, hp_in="mlp_in", hp_out="mlp_out", **kw):
    kind = "skip_transcoder" if skip else "transcoder"
    m = base.build(kind, dict(d_in=D, n_features=n, d_out=d_out, sparsity=sparsity, k=8, seed=seed,
                              hookpoint_in=f"{hp_in}.{layer}", hookpoint_out=f"{hp_out}.{layer}", **kw))
    return randomise(m, np.random.default_rng(seed)) if n == N and d_out == D else m


def clt(sparsity="jumprelu", layers="1-3", seed=0):
    m = base.build("clt", dict(d_in=D, n_features=N, d_out=D, sparsity=sparsity, k=8, seed=seed,
                               hookpoint_in=f"mlp_in.{layers}", hookpoint_out=f"mlp_out.{layers}"))
    return randomise(m, np.random.default_rng(seed))


# ---- circuit-tracer's math, from its source, on the written files ---------------------------------------------------
def ct_act(pre, threshold):
    return np.maximum(pre, 0) if threshold is None else pre * (pre > threshold)


def ct_transcoder(path, x):
    """SingleLayerTranscoder.encode / decode (circuit_tracer/transcoder/single_layer_transcoder.py)."""
    t = load_file(str(path))
    pre = x @ t["W_enc"].T + t["b_enc"]
    codes = ct_act(pre, t.get("activation_function.threshold"))
    out = codes @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return pre, codes, out


def ct_clt(folder, x):
    """CrossLayerTranscoder.encode / decode (circuit_tracer/transcoder/cross_layer_transcoder.py); x (n, B, d)."""
    n_layers = len(list(folder.glob("W_enc_*.safetensors")))
    pre, codes = [], []
    for i in range(n_layers):
        e = load_file(str(folder / f"W_enc_{i}.safetensors"))
        p = x[i] @ e[f"W_enc_{i}"].T + e[f"b_enc_{i}"]
        pre.append(p)
        codes.append(ct_act(p, e.get(f"threshold_{i}")))
    out = np.stack([load_file(str(folder / f"W_enc_{j}.safetensors"))[f"b_dec_{j}"] + np.zeros((x.shape[1], D), np.float32)
                    for j in range(n_layers)])
    for i in range(n_layers):
        w = load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        assert w.shape == (N, n_layers - i, D)
        out[i:] += np.einsum("bf,fjd->jbd", codes[i], w)
    return np.stack(pre), np.stack(codes), out


def safe(gap, margin=1e-3):
    """Rows with no pre-activation within `margin` of its threshold (float32 rounding may flip those)."""
    keep = np.all(gap > margin, axis=tuple(range(1, gap.ndim)))
    assert keep.mean() > 0.5, "too few rows away from thresholds; the test data is badly chosen"
    return keep


def config_of(folder):
    return yaml.safe_load((folder / "config.yaml").read_text())


# ---- per-layer transcoders ---------------------------------------------------------------------------------------------
CASES = {"relu": ("relu", False), "jumprelu": ("jumprelu", False), "batchtopk": ("batchtopk", False),
         "skip_relu": ("relu", True), "skip_jumprelu": ("jumprelu", True)}


@pytest.mark.parametrize("case", list(CASES))
def test_transcoder_files_compute_what_dictlearn_computes(case, tmp_path):
    sparsity, skip = CASES[case]
    m = transcoder(sparsity, layer=2, skip=skip)
    summary = write_transcoder_set({"tc": m}, tmp_path / "set")
    assert summary["files"] == ["layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors", "config.yaml"]
    t = load_file(str(tmp_path / "set" / "layer_2.safetensors"))
    want = {"W_enc": (N, D), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,)}
    if sparsity != "relu":
        want["activation_function.threshold"] = (N,)
    if skip:
        want["W_skip"] = (D, D)
    assert {k: v.shape for k, v in t.items()} == want and all(v.dtype == np.float32 for v in t.values())

    x = np.random.default_rng(1).normal(0, 1.5, (B, D)).astype(np.float32)
    pre, codes, out = ct_transcoder(tmp_path / "set" / "layer_2.safetensors", x)
    gap = np.abs(pre - t.get("activation_function.threshold", 0.0))
    keep = safe(gap)
    ours_codes = np.asarray(m.encode(jnp.asarray(x)))
    np.testing.assert_allclose(codes[keep], ours_codes[keep], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(out[keep], np.asarray(m(jnp.asarray(x)))[keep], rtol=1e-5, atol=1e-4)
    assert 0.02 < (codes[keep] > 0).mean() < 0.9  # the comparison is not vacuous
    # the input bias is folded, not dropped: without the fold the codes differ
    assert not np.allclose(np.maximum(x @ np.asarray(m.W_enc[...]).T + np.asarray(m.b_enc[...]), 0), ours_codes, atol=1e-3)


def test_set_config_padding_and_hooks(tmp_path):
    members = {"relu2": transcoder("relu", layer=2, seed=0), "jump4": transcoder("jumprelu", layer=4, seed=1)}
    folder = tmp_path / "circuit-tracer-mlp_in-mlp_out-48"
    write_transcoder_set(members, folder, n_layers=6, metadata={"model_name": "smol.gguf"})
    cfg = config_of(folder)
    assert cfg["model_kind"] == "transcoder_set" and cfg["scan"] == folder.name and cfg["model_name"] == "smol.gguf"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert cfg["dictlearn_layers"] == {"2": "relu2", "4": "jump4"} and cfg["dictlearn_padded_layers"] == [0, 1, 3, 5]
    assert sorted(p.name for p in folder.glob("layer_*.safetensors")) == [f"layer_{i}.safetensors" for i in range(6)]
    x = np.random.default_rng(0).normal(0, 2, (64, D)).astype(np.float32)
    for i in (0, 1, 3, 5):  # padding never fires and writes nothing: the whole MLP goes to the error node
        _, codes, out = ct_transcoder(folder / f"layer_{i}.safetensors", x)
        assert not codes.any() and not out.any()
    inodes = {os.stat(folder / f"layer_{i}.safetensors").st_ino for i in (0, 1, 3, 5)}
    assert len(inodes) == 1  # one padding file, hard-linked
    write_transcoder_set(members, folder)  # fewer layers: no stale layer_5 for circuit-tracer's glob to find
    assert sorted(p.name for p in folder.glob("layer_*")) == [f"layer_{i}.safetensors" for i in range(5)]


def test_hook_names_follow_the_family():
    gemma = next(f for f in FAMILIES if f.name == "Gemma 2")
    assert circuit_tracer_hook("mlp_in") == circuit_tracer_hook("mlp_in", gemma) == "mlp.hook_in"
    assert circuit_tracer_hook("mlp_out", LLAMA) == "mlp.hook_out"  # no post-norm: the MLP's output is what it adds
    assert circuit_tracer_hook("mlp_out", gemma) == "hook_mlp_out"  # after post_feedforward_layernorm
    assert circuit_tracer_hook("mlp_out_pre_norm", gemma) == "mlp.hook_out"
    assert circuit_tracer_hook("resid_post") is None


def test_what_circuit_tracer_cannot_hold_is_refused_with_the_reason(tmp_path):
    cases = [
        ({"a": transcoder("topk")}, "no TopK transcoder"),
        ({"a": transcoder("relu", hp_in="resid_pre", hp_out="resid_post")}, "replace an MLP"),
        ({"a": base.build("transcoder", dict(d_in=D, n_features=N, d_out=D, sparsity="relu",
                                              hookpoint_in="mlp_in.3", hookpoint_out="mlp_out.4"))}, "same layer"),
        ({"a": transcoder("relu", d_out=12)}, "reads 16 and writes 12"),
        ({"a": base.build("relu", dict(d_in=D, n_features=N, hookpoint_in="mlp_in.3"))}, "transcoders"),
        ({"a": transcoder("relu", seed=0), "b": transcoder("jumprelu", seed=1)}, "layer 3 has two transcoders"),
        ({"a": transcoder("relu", layer=1), "b": transcoder("relu", layer=2, skip=True)}, "cannot share a set"),
    ]
    for modules, message in cases:
        with pytest.raises(CircuitTracerFormatError, match=message):
            write_transcoder_set(modules, tmp_path / "x")
    with pytest.raises(CircuitTracerFormatError, match="leaves out layer 3"):
        write_transcoder_set({"a": transcoder()}, tmp_path / "x", n_layers=3)
    with pytest.raises(CircuitTracerFormatError, match="no TopK CLT"):
        write_clt(clt_topk := base.build("clt", dict(d_in=D, n_features=N, d_out=D, sparsity="topk", k=4,
                                                      hookpoint_in="mlp_in.0-1", hookpoint_out="mlp_out.0-1")),
                  tmp_path / "c")
    assert clt_topk.kind == "clt"


def test_a_runs_transcoders_are_grouped_into_sets():
    modules = {"r0": transcoder("relu", 0, seed=0), "j1": transcoder("jumprelu", 1, seed=1),
               "s1": transcoder("relu", 1, skip=True, seed=2), "k2": transcoder("topk", 2, seed=3),
               "w0": transcoder("relu", 0, n=64), "w0b": transcoder("jumprelu", 0, n=64),
               "sae": base.build("relu", dict(d_in=D, n_features=N, hookpoint_in="mlp_in.3")), "clt": clt()}
    plans, skipped = plan_transcoder_sets(modules)
    assert {p.name: p.members for p in plans} == {"circuit-tracer-mlp_in-mlp_out-48": {0: "r0", 1: "j1"},
                                                  "circuit-tracer-mlp_in-mlp_out-48-skip": {1: "s1"}}
    assert "no TopK transcoder" in skipped["k2"]
    assert "layer 0 has two transcoders (w0, w0b)" in skipped["circuit-tracer-mlp_in-mlp_out-64"]
    assert set(skipped) == {"k2", "circuit-tracer-mlp_in-mlp_out-64"}  # SAEs and CLTs are not per-layer transcoders


# ---- cross-layer transcoders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", ["jumprelu", "batchtopk"])
def test_clt_files_compute_what_dictlearn_computes(sparsity, tmp_path):
    m = clt(sparsity, layers="1-3")
    folder = tmp_path / "clt"
    summary = write_clt(m, folder, n_layers=5, scan="my-clt", source="clt13")
    cfg = config_of(folder)
    assert cfg["model_kind"] == "cross_layer_transcoder" and cfg["scan"] == "my-clt"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert cfg["dictlearn_layers"] == {"1": "clt13", "2": "clt13", "3": "clt13"} and cfg["dictlearn_padded_layers"] == [0, 4]
    assert summary["files"][-1] == "config.yaml" and len(summary["files"]) == 11
    e = load_file(str(folder / "W_enc_2.safetensors"))
    assert {k: v.shape for k, v in e.items()} == {"W_enc_2": (N, D), "b_enc_2": (N,), "b_dec_2": (D,), "threshold_2": (N,)}

    rng = np.random.default_rng(3)
    x = np.zeros((5, B, D), np.float32)
    x[1:4] = rng.normal(0, 1.5, (3, B, D))
    pre, codes, out = ct_clt(folder, x)
    thresholds = np.stack([load_file(str(folder / f"W_enc_{i}.safetensors"))[f"threshold_{i}"] for i in range(5)])
    keep = safe(np.swapaxes(np.abs(pre[1:4] - thresholds[1:4, None]), 0, 1))  # rows first
    xs = jnp.asarray(np.swapaxes(x[1:4], 0, 1))
    ours_codes = np.swapaxes(np.asarray(m.encode(xs)), 0, 1)
    ours_out = np.swapaxes(np.asarray(m.decode(m.encode(xs))), 0, 1)
    np.testing.assert_allclose(codes[1:4][:, keep], ours_codes[:, keep], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(out[1:4][:, keep], ours_out[:, keep], rtol=1e-5, atol=2e-4)
    assert 0.02 < (ours_codes[:, keep] != 0).mean() < 0.9
    assert not codes[0].any() and not codes[4].any()  # padded layers never fire...
    assert not out[0].any()  # ...and layer 4 receives nothing but its (zero) bias: the CLT ends at layer 3
    assert not out[4].any()
    # later layers really receive earlier layers' writes (the cross-layer part is exercised)
    w1 = load_file(str(folder / "W_dec_1.safetensors"))["W_dec_1"]
    assert w1.shape == (N, 4, D) and np.abs(w1[:, 2]).max() > 0 and not w1[:, 3].any()


# ---- the export stage ------------------------------------------------------------------------------------------------
def test_export_stage_writes_sets_and_clts(tmp_path, capsys):
    from dictlearn.cli.export import main
    from dictlearn.run import STAMP_FILE

    root = tmp_path / "run"
    made = {"tc1": transcoder("relu", 1, seed=0), "tc2": transcoder("jumprelu", 2, seed=1), "clt": clt("jumprelu", "0-1"),
            "tk": transcoder("topk", 3)}
    for name, m in made.items():
        base.save(m, root / "decomposers" / name)
    config = tmp_path / "run.toml"
    config.write_text(f'out_dir = "{root}"\n[model]\nname = "{tmp_path / "no-model.gguf"}"\n')
    assert main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "left out tk: circuit-tracer has no TopK transcoder" in out
    assert "circuit-tracer-mlp_in-mlp_out-48 (circuit-tracer transcoder set, layers 1: tc1, 2: tc2; 1 never-firing padding layer(s)" in out
    ex = root / "export"
    cfg = config_of(ex / "circuit-tracer-mlp_in-mlp_out-48")
    assert cfg["dictlearn_layers"] == {"1": "tc1", "2": "tc2"} and cfg["model_name"] == str(tmp_path / "no-model.gguf")
    assert (ex / "circuit-tracer-mlp_in-mlp_out-48" / STAMP_FILE).is_file()
    assert config_of(ex / "clt")["model_kind"] == "cross_layer_transcoder"
    assert {"W_enc_0.safetensors", "W_dec_1.safetensors", "config.yaml"} <= {p.name for p in (ex / "clt").iterdir()}
    summary = json.loads((ex / "clt" / "export.json").read_text())
    assert "several layers" in summary["skipped"]["features"] and not (ex / "clt" / "features.safetensors").exists()
    assert main([str(config)]) == 0
    assert "circuit-tracer-mlp_in-mlp_out-48: up to date" in capsys.readouterr().out
    assert main([str(config), "--set", "export.circuit_tracer_layers=5", "--only", "tc1"]) == 0
    assert "4 never-firing padding layer(s)" in capsys.readouterr().out
    assert len(list((ex / "circuit-tracer-mlp_in-mlp_out-48").glob("layer_*.safetensors"))) == 5


# ---- circuit-tracer itself, in its own venv ---------------------------------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("circuit_tracer_check", ROOT / "bench" / "circuit_tracer_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()
PEER = BENCH.peer_python()


@pytest.mark.skipif(PEER is None, reason=f"circuit-tracer's own venv is absent ({BENCH.VENV}): create it with "
                                         f"`{BENCH.MAKE_VENV}` (or set DICTLEARN_CIRCUIT_TRACER_VENV)")
def test_circuit_tracer_loads_exports_and_matches_on_smollm2(smol, tmp_path, record_property):
    acts = BENCH.smol_activations(smol, [0, 1, 2], n_seq=4, ctx=32)
    x_all = BENCH.peer_inputs(acts, 3)

    def tc(kind, sparsity, layer, seed):
        m = base.build(kind, dict(d_in=576, d_out=576, n_features=128, sparsity=sparsity, seed=seed,
                                  hookpoint_in=f"mlp_in.{layer}", hookpoint_out=f"mlp_out.{layer}"))
        return BENCH.construct(m, acts[f"mlp_in.{layer}"], acts[f"mlp_out.{layer}"], seed)

    sets = {"set": {0: tc("transcoder", "relu", 0, 0), 1: tc("transcoder", "jumprelu", 1, 1),
                    2: tc("transcoder", "batchtopk", 2, 2)},
            "skip_set": {1: tc("skip_transcoder", "jumprelu", 1, 3)}}
    exports, modules = {}, {}
    for label, members in sets.items():
        write_transcoder_set({f"L{k}": m for k, m in members.items()}, tmp_path / label)
        exports[label], modules[label] = (tmp_path / label, x_all[: max(members) + 1]), members
    cross = base.build("clt", dict(d_in=576, d_out=576, n_features=128, sparsity="jumprelu",
                                   hookpoint_in="mlp_in.0-2", hookpoint_out="mlp_out.0-2"))
    BENCH.construct(cross, np.stack([acts[f"mlp_in.{i}"] for i in range(3)], 1),
                    np.stack([acts[f"mlp_out.{i}"] for i in range(3)], 1), 4)
    write_clt(cross, tmp_path / "clt")
    exports["clt"], modules["clt"] = (tmp_path / "clt", x_all), {0: cross}

    found = BENCH.peer_encode(PEER, exports, tmp_path)
    for label, (arrays, info) in found.items():
        diff = BENCH.differences(modules[label], exports[label][1], arrays)
        record_property(f"max_abs_diff_{label}", diff)
        print(label, info, diff)
        assert info["loaded"] == ("CrossLayerTranscoder" if label == "clt" else "TranscoderSet")
        assert info["skip"] == (label == "skip_set") and info["input_hook"] == "mlp.hook_in"
        assert diff["rows_compared"] > diff["rows"] // 2 and diff["rows_decoded"] == diff["rows"]
        assert diff["codes_fired"] > 0.01 and diff["padded_codes_max"] == 0.0
        assert diff["codes"] < 1e-4 and diff["recon"] < 1e-4 * diff["recon_scale"] and diff["recon_attribution"] < 1e-4 * diff["recon_scale"]
