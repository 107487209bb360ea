"""Every model family on a tiny random-weight model (every norm's gain set away from 1, so a missed norm shows):
what each alias holds, splicing and steering at it, the resumed downstream forward and the logit lens."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SplitIdentity
from dictlearn.activations import families
from dictlearn.activations import hookpoints as H
from dictlearn.eval import downstream
from dictlearn.steering.steer import steer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(SMALL, num_key_value_heads=2)
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
L = 1  # the middle block


def _config(name: str):
    import transformers as t

    return {
        "gpt2": lambda: t.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=64, vocab_size=128, bos_token_id=1,
                                     eos_token_id=2),
        "gpt_neox": lambda: t.GPTNeoXConfig(**SMALL, use_parallel_residual=True),
        "gpt_neox_sequential": lambda: t.GPTNeoXConfig(**SMALL, use_parallel_residual=False),
        "llama": lambda: t.LlamaConfig(**GQA),
        "mistral": lambda: t.MistralConfig(**GQA),
        "qwen2": lambda: t.Qwen2Config(**GQA),
        "qwen3": lambda: t.Qwen3Config(**GQA, head_dim=16),
        "phi3": lambda: t.Phi3Config(**GQA),
        "gemma2": lambda: t.Gemma2Config(**GQA, head_dim=16, **SLIDING, final_logit_softcapping=5.0),
        "gemma3_text": lambda: t.Gemma3TextConfig(**GQA, head_dim=16, **SLIDING),
        "olmo2": lambda: t.Olmo2Config(**GQA),
        "gemma3": lambda: t.Gemma3Config(  # the multimodal model: its language model is the family's
            text_config=t.Gemma3TextConfig(**dict(GQA, vocab_size=300), head_dim=16, **SLIDING),
            vision_config=t.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298),
    }[name]()


NAMES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2",
         "gemma3_text", "gemma3", "olmo2"]
EXPECTED = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "gpt_neox_sequential": "GPT-NeoX", "llama": "Llama",
            "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi-3", "gemma2": "Gemma 2",
            "gemma3_text": "Gemma 3 (text)", "gemma3": "Gemma 3 (multimodal, its language model)", "olmo2": "OLMo 2"}


def _set_gains_away_from_one(model: torch.nn.Module, offset: float) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5 - offset)  # gain in [0.5, 1.5)
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.copy_(0.2 * torch.rand(m.bias.shape, generator=g) - 0.1)


@functools.lru_cache(maxsize=None)
def tiny(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _config(name)
    torch.manual_seed(0)
    options = {"attn_implementation": "sdpa", **families.load_options(cfg.model_type)}
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **options).eval()
    _set_gains_away_from_one(model, families.family_of(model).gain_offset)
    model.requires_grad_(False)
    return model


def _ids(n: int = 10, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(0))


def _acts(model, names, ids=None):
    hps = H.resolve(model, names)
    with torch.no_grad(), H.capture(model, hps) as acts:
        out = H.run_forward(model, _ids() if ids is None else ids)
    return {k: v.clone() for k, v in acts.items()}, out.logits


def _aliases(model) -> list[str]:
    """The aliases this model has: every one, less resid_mid in parallel blocks (which refuse it)."""
    parallel = families.family_of(model).is_parallel(model)
    return [a for a in families.ALIASES if not (parallel and a in families.SEQUENTIAL_ONLY)]


def _close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1.0)
    torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_family_is_recognised(name):
    assert families.family_of(tiny(name)).name == EXPECTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_block_adds_attn_out_and_mlp_out_to_the_residual_stream(name):
    model = tiny(name)
    a, _ = _acts(model, [f"{x}.{L}" for x in ("resid_pre", "attn_out", "mlp_out", "resid_post")])
    _close(a[f"resid_pre.{L}"] + a[f"attn_out.{L}"] + a[f"mlp_out.{L}"], a[f"resid_post.{L}"])
    assert families.family_of(model).is_parallel(model) == (name == "gpt_neox")


@pytest.mark.parametrize("name", NAMES)
def test_mlp_and_attention_sites_agree_with_the_layer_modules(name):
    model = tiny(name)
    fam = families.family_of(model)
    block = model.get_submodule(fam.block(L))
    a, _ = _acts(model, [f"{x}.{L}" for x in _aliases(model)])
    mlp_in, hidden = a[f"mlp_in.{L}"], a[f"mlp_hidden.{L}"]
    # the MLP's own output is hidden @ W_out + bias, with W_out from output_projection
    w_out, where = families.output_projection(model, f"mlp_hidden.{L}")
    assert where == (f"mlp_out_pre_norm.{L}" if fam.mlp_post_norm else f"mlp_out.{L}")
    proj = block.get_submodule(f"{fam.mlp}.{fam.out_proj}")
    bias = proj.bias if getattr(proj, "bias", None) is not None else 0.0
    _close(hidden @ torch.from_numpy(w_out) + bias, a[f"mlp_out_pre_norm.{L}"])
    _close(block.get_submodule(fam.mlp)(mlp_in), a[f"mlp_out_pre_norm.{L}"])
    # post-norms turn the modules' own outputs into what the block adds
    for alias, post in (("mlp_out", fam.mlp_post_norm), ("attn_out", fam.attn_post_norm)):
        norm = getattr(block, post) if post else torch.nn.Identity()
        _close(norm(a[f"{alias}_pre_norm.{L}"]), a[f"{alias}.{L}"])
        assert (post is None) == torch.equal(a[f"{alias}_pre_norm.{L}"], a[f"{alias}.{L}"])
    # the MLP reads the residual stream through its pre-norm (parallel: the block input)
    mid = a[f"resid_pre.{L}"] if fam.is_parallel(model) else a[f"resid_pre.{L}"] + a[f"attn_out.{L}"]
    pre = getattr(block, fam.mlp_pre_norm) if fam.mlp_pre_norm else torch.nn.Identity()
    _close(pre(mid), mlp_in)


class _Echo:
    """An exact one-site replacement for downstream.splice: writes back what it read."""

    def read(self, site: int, x: np.ndarray) -> None:
        self.x = x

    def write(self, site: int) -> np.ndarray:
        return self.x.copy()


@pytest.mark.parametrize("name", NAMES)
def test_exact_reconstruction_spliced_at_every_alias_gives_the_clean_logits(name):
    model = tiny(name)
    ids = _ids()
    _, clean = _acts(model, [f"resid_post.{L}"], ids)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    for alias in _aliases(model):
        hp = H.resolve(model, f"{alias}.{L}")[0]
        with torch.no_grad(), downstream.splice(model, [hp], [hp], _Echo(), keep):
            spliced = H.run_forward(model, ids).logits
        with torch.no_grad(), downstream.zero_ablate(model, [hp], keep):
            ablated = H.run_forward(model, ids).logits
        _close(spliced, clean)
        assert not torch.allclose(ablated, clean), alias  # the hook does act there


@pytest.mark.parametrize("name", [n for n in NAMES if n != "gpt_neox"])
def test_resid_mid_is_the_stream_between_attention_and_mlp(name):
    """resid_mid.L is exactly resid_pre.L + attn_out.L, the MLP's pre-norm of it is mlp_in.L, it has the residual
    width, and the module path it hooks maps back to it."""
    model = tiny(name)
    fam = families.family_of(model)
    block = model.get_submodule(fam.block(L))
    a, _ = _acts(model, [f"{x}.{L}" for x in ("resid_pre", "attn_out", "resid_mid", "mlp_in")])
    mid = a[f"resid_mid.{L}"]
    assert torch.equal(mid, a[f"resid_pre.{L}"] + a[f"attn_out.{L}"])  # the block's own sum, bit for bit
    pre = getattr(block, fam.mlp_pre_norm) if fam.mlp_pre_norm else torch.nn.Identity()
    assert (fam.mlp_pre_norm is None) == torch.equal(mid, a[f"mlp_in.{L}"])  # OLMo 2's MLP reads the stream itself
    _close(pre(mid), a[f"mlp_in.{L}"], 1e-6)
    hp = H.resolve(model, f"resid_mid.{L}")[0]
    assert hp.width == 64 and hp.site == "input" and hp.layer == L
    assert families.alias_of(model, f"{hp.module_path}:input") == ("resid_mid", L)
    assert families.tl_hook_name(f"resid_mid.{L}") == f"blocks.{L}.hook_resid_mid"
    d = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)  # same stream, same logit lens
    np.testing.assert_array_equal(families.unembed_directions(model, f"resid_mid.{L}", d),
                                  families.unembed_directions(model, f"resid_pre.{L}", d))


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox_sequential", "llama", "gemma2", "olmo2"])
def test_splice_at_resid_mid_changes_what_the_mlp_reads_not_the_skip(name):
    """A splice at resid_mid.L rewrites the MLP's input stream; the skip connection still carries the clean
    stream on, so resid_post.L - mlp_out.L stays resid_pre.L + attn_out.L (what the module docstring says)."""
    model = tiny(name)
    fam = families.family_of(model)
    block = model.get_submodule(fam.block(L))
    names = [f"{x}.{L}" for x in ("resid_mid", "mlp_in", "mlp_out", "resid_post")]
    clean, clean_logits = _acts(model, names)
    delta = torch.randn(64, generator=torch.Generator().manual_seed(5))
    hp = H.resolve(model, f"resid_mid.{L}")[0]
    with torch.no_grad(), H.intervene(model, hp, lambda x: x + delta):
        a, logits = _acts(model, names)
    pre = getattr(block, fam.mlp_pre_norm) if fam.mlp_pre_norm else torch.nn.Identity()
    _close(a[f"mlp_in.{L}"], pre(clean[f"resid_mid.{L}"] + delta), 1e-6)
    _close(a[f"resid_post.{L}"] - a[f"mlp_out.{L}"], clean[f"resid_mid.{L}"])
    assert not torch.allclose(a[f"mlp_out.{L}"], clean[f"mlp_out.{L}"]) and not torch.allclose(logits, clean_logits)


def test_parallel_blocks_refuse_resid_mid_naming_what_the_mlp_reads():
    model = tiny("gpt_neox")
    with pytest.raises(H.HookpointError, match=r"resid_mid\.1: .*parallel blocks \(use_parallel_residual is true\)"
                                                r".*The MLP reads resid_pre\.1 .*mlp_in\.1"):
        H.resolve(model, ["resid_mid.1"])
    pre_norm_input = f"{families.family_of(model).site('resid_mid', L)[0]}:input"
    assert families.alias_of(model, pre_norm_input) is None  # it is the MLP's read of resid_pre, no stream of its own
    assert H.resolve(model, [pre_norm_input])[0].width == 64  # the module path itself still works
    sequential = tiny("gpt_neox_sequential")
    assert families.alias_of(sequential, pre_norm_input) == ("resid_mid", L)


def test_a_clt_can_read_resid_mid_over_a_layer_range(tmp_path):
    """hookpoint_in = "resid_mid.0-1" expands to one site per layer, and those resolve on a model."""
    from dictlearn.trainers.spec import build_spec

    sites_in, sites_out = ["resid_mid.0", "resid_mid.1"], ["mlp_out.0", "mlp_out.1"]
    table = {"name": "c", "kind": "clt", "hookpoint_in": "resid_mid.0-1", "hookpoint_out": "mlp_out.0-1",
             "expansion": 2, "k": 4}
    cache = {s: {"width": 64, "dtype": "float32"} for s in sites_in + sites_out}
    spec = build_spec(table, cache, tmp_path / "c", "t")
    assert spec.x_keys == sites_in and spec.y_keys == sites_out and spec.config.d_in == 64
    assert [h.width for h in H.resolve(tiny("llama"), H.expand_hookpoints("resid_mid.0-1"))] == [64, 64]


@pytest.mark.parametrize("name", NAMES)
def test_steering_at_attn_out_and_mlp_out_adds_to_the_residual_stream(name):
    """What is added at attn_out / mlp_out reaches the residual stream unchanged (no post-norm after it)."""
    model = tiny(name)
    names = [f"{x}.{L}" for x in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    clean, _ = _acts(model, names)
    delta = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with steer(model, f"mlp_out.{L}", delta, 2.0):
        a, _ = _acts(model, names)
    _close(a[f"resid_post.{L}"] - clean[f"resid_post.{L}"], (2.0 * delta).expand_as(clean[f"resid_post.{L}"]), 1e-4)
    with steer(model, f"attn_out.{L}", delta, 2.0):
        a, _ = _acts(model, names)
    # the attention's contribution moved by exactly delta (the MLP, reading it, may change too)
    moved = (a[f"resid_post.{L}"] - a[f"mlp_out.{L}"]) - (clean[f"resid_post.{L}"] - clean[f"mlp_out.{L}"])
    _close(moved, (2.0 * delta).expand_as(moved), 1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_resumed_forward_equals_the_full_forward(name):
    model = tiny(name)
    ids = _ids()
    resumer = downstream.ResumedForward(model)
    with torch.no_grad():
        with resumer.recording([0, 1, 2]) as inputs:
            full = H.run_forward(model, ids).logits
        for layer in (0, 1, 2):
            _close(resumer.logits(inputs[layer], layer), full, 1e-4)


@pytest.mark.parametrize("name", ["gemma3_text", "olmo2"])
def test_downstream_eval_resumes_and_scores_an_identity_one(name):
    model = tiny(name)
    decs = {f"id_{a}": SplitIdentity(64, hookpoint=f"{a}.{L}") for a in ("mlp_out", "attn_out_pre_norm")}
    res = downstream.evaluate_downstream(model, _ids(12, 3).numpy(), decs, batch_size=2)
    for r in res.values():
        assert r.resumed and r.kl_spliced < 1e-8 and r.ce_spliced == pytest.approx(r.ce_clean, abs=1e-5)


def test_downstream_falls_back_to_full_forwards_with_a_message(monkeypatch, capsys):
    model = tiny("gemma3_text")

    def broken(self, hidden, layer):
        raise TypeError("forward() missing 1 required positional argument: 'layer_type'")

    monkeypatch.setattr(downstream.ResumedForward, "logits", broken)
    res = downstream.evaluate_downstream(model, _ids().numpy(), {"id": SplitIdentity(64, hookpoint=f"mlp_out.{L}")})
    assert not res["id"].resumed and res["id"].kl_spliced < 1e-8
    assert "resumed forward failed (TypeError" in capsys.readouterr().out


def _as_gain(norm: torch.nn.Module, v: torch.Tensor, scale: float = 1e4) -> torch.Tensor:
    """What a norm multiplies a (mean-zero) direction by, read through the module itself: at a large input the
    norm's 1/rms is known, so norm(x) * rms(x) is its gain times x."""
    x = v * scale
    return (norm(x) - norm(torch.zeros_like(x))) * x.pow(2).mean(-1, keepdim=True).sqrt() / scale


def _brute_unembed(model, alias: str, dirs: np.ndarray) -> np.ndarray:
    fam = families.family_of(model)
    block = model.get_submodule(fam.block(L))
    v = torch.from_numpy(dirs)
    if alias == "mlp_hidden":
        proj = block.get_submodule(f"{fam.mlp}.{fam.out_proj}")
        v = proj(v) - proj(torch.zeros_like(v))
        alias = "mlp_out_pre_norm"
    chain = [model.get_submodule(fam.final_norm)]
    if alias.endswith("_pre_norm"):  # the module the residual-stream alias hooks, when it is another one: a post-norm
        post, own = fam.site(alias[: -len("_pre_norm")], L)[0], fam.site(alias, L)[0]
        chain = ([model.get_submodule(post)] if post != own else []) + chain
    for norm in chain:
        v = _as_gain(norm, v)
    head = model.get_output_embeddings()
    return (head(v) - head(torch.zeros_like(v))).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_feature_card_projection_applies_every_norm_to_the_logits(name):
    model = tiny(name)
    fam = families.family_of(model)
    rng = np.random.default_rng(0)
    layer_norm = isinstance(model.get_submodule(fam.final_norm), torch.nn.LayerNorm)
    for alias in ("resid_post", "attn_out", "mlp_out", "attn_out_pre_norm", "mlp_out_pre_norm", "mlp_hidden"):
        width = 128 if alias == "mlp_hidden" else 64
        dirs = rng.standard_normal((5, width)).astype(np.float32)
        if alias == "mlp_hidden" and layer_norm:
            continue  # a LayerNorm also centres; the lens (like every logit lens here) applies gains only
        dirs -= dirs.mean(-1, keepdims=True) if layer_norm else 0.0
        got = families.unembed_directions(model, f"{alias}.{L}", dirs)
        np.testing.assert_allclose(got, _brute_unembed(model, alias, dirs), rtol=1e-4, atol=1e-5, err_msg=alias)
    with pytest.raises(families.HookpointError, match="residual stream"):
        families.unembed_directions(model, f"mlp_in.{L}", rng.standard_normal((2, 64)).astype(np.float32))
    # module paths of the same places project the same way
    proj = fam.site("mlp_hidden", L)[0]
    d = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(families.unembed_directions(model, proj, d),
                               families.unembed_directions(model, f"mlp_out_pre_norm.{L}", d), rtol=1e-6)
    h = rng.standard_normal((2, families.output_projection(model, proj + ":input")[0].shape[0])).astype(np.float32)
    np.testing.assert_allclose(families.unembed_directions(model, proj + ":input", h),
                               families.unembed_directions(model, f"mlp_hidden.{L}", h), rtol=1e-6)


def test_gemma_projection_differs_from_the_old_final_weight_only_one():
    """The bug the lens fixes: Gemma's (1 + w) and its post-feedforward norm both matter."""
    model = tiny("gemma2")
    d = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    old = d * model.model.norm.weight.numpy() @ model.lm_head.weight.numpy().T
    assert not np.allclose(families.unembed_directions(model, f"mlp_out_pre_norm.{L}", d), old, atol=1e-3)


def test_unknown_family_fails_naming_what_is_missing():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                     vocab_size=64, word_embed_proj_dim=32, max_position_embeddings=32))
    with pytest.raises(families.FamilyError, match=r"model_type 'opt'.*not a supported family.*model\.layers"):
        families.family_of(opt)
    with pytest.raises(H.HookpointError, match="not a supported family"):
        H.resolve(opt, ["mlp_out.0"])
    assert H.resolve(opt, ["model.decoder.layers.0.fc2"])[0].width == 32  # module paths still work
    broken = tiny("llama")
    saved = broken.model.layers[0].mlp.down_proj
    try:
        del broken.model.layers[0].mlp.down_proj
        families._CACHE.pop(broken, None)
        with pytest.raises(families.FamilyError, match=r"Llama model but lacks model\.layers\.0\.mlp\.down_proj"):
            families.family_of(broken)
    finally:
        broken.model.layers[0].mlp.down_proj = saved
        families._CACHE.pop(broken, None)


def test_llama_like_unknown_type_uses_the_llama_entry():
    model = tiny("llama")
    fake = torch.nn.Module()
    fake.model, fake.lm_head = model.model, model.lm_head
    fake.config = type("Config", (), {"model_type": "my_llama"})()
    fam = families.family_of(fake)
    assert fam.name == "my_llama (Llama-like)" and fam.site("mlp_out", 1) == ("model.layers.1.mlp", "output")


def test_output_projection_refuses_other_sites():
    model = tiny("gpt2")
    w, where = families.output_projection(model, "transformer.h.1.mlp.c_proj:input")
    assert where == "mlp_out.1" and w.shape == (256, 64)
    with pytest.raises(families.HookpointError, match="not an MLP hidden site"):
        families.output_projection(model, "mlp_out.1")
    assert families.to_residual(model, "resid_post.1", np.ones((1, 64)))[0] == "resid_post.1"


def test_transformerlens_hook_names_round_trip():
    assert families.tl_hook_name("mlp_out.6") == "blocks.6.hook_mlp_out"
    assert families.tl_hook_name("mlp_out_pre_norm.6") is None  # no TransformerLens hook holds it
    for alias in families.TL_HOOKS:
        assert families.hookpoint_from_tl(families.tl_hook_name(f"{alias}.3")) == f"{alias}.3"


def test_docs_family_table_is_current():
    doc = Path(__file__).resolve().parents[1] / "docs" / "families.md"
    assert doc.read_text() == families.family_table_markdown(), "regenerate docs/families.md from family_table_markdown()"


def test_gemma2_loads_with_eager_attention(tmp_path, smol):
    from dictlearn.activations.models import load_model

    tiny("gemma2").save_pretrained(tmp_path)
    smol.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.model.config._attn_implementation == "eager"
    with torch.no_grad():
        _close(loaded.model(input_ids=_ids()).logits, tiny("gemma2")(input_ids=_ids()).logits)


def test_smollm2_block_adds_attn_out_and_mlp_out(smol):
    ids = smol.tokenizer("The river flooded the small town", return_tensors="pt").input_ids
    a, _ = _acts(smol.model, [f"{x}.10" for x in ("resid_pre", "attn_out", "mlp_out", "resid_post")], ids)
    _close(a["resid_pre.10"] + a["attn_out.10"] + a["mlp_out.10"], a["resid_post.10"], 1e-5)
