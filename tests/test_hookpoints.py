"""What each hookpoint captures, proved against the model's own outputs and weights."""

from __future__ import annotations

import pytest
import torch

from dictlearn.activations import hookpoints as H

ALL = ["resid_pre", "resid_post", "mlp_in", "mlp_hidden", "mlp_out", "attn_out"]


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20000, (2, n), generator=g)


def _capture(model, names, ids, stop_early=False):
    hps = H.resolve(model, names)
    with torch.no_grad(), H.capture(model, hps, stop_early=stop_early) as acts:
        out = H.run_forward(model, ids, output_hidden_states=not stop_early)
    return hps, dict(acts), out


def test_smol_hookpoints_match_model_and_weights(smol):
    model, L = smol.model, 10
    names = [f"{a}.{L}" for a in ALL]
    hps, acts, out = _capture(model, names, _ids())
    hs = out.hidden_states
    assert torch.equal(acts[f"resid_post.{L}"], hs[L + 1])
    assert torch.equal(acts[f"resid_pre.{L}"], hs[L])
    block = model.model.layers[L]
    mlp_in = acts[f"mlp_in.{L}"]
    # mlp_in is the normalised residual (after attention) that the MLP reads
    resid_mid = hs[L] + acts[f"attn_out.{L}"]
    torch.testing.assert_close(mlp_in, block.post_attention_layernorm(resid_mid), rtol=1e-5, atol=1e-5)
    hidden = block.mlp.act_fn(block.mlp.gate_proj(mlp_in)) * block.mlp.up_proj(mlp_in)
    torch.testing.assert_close(acts[f"mlp_hidden.{L}"], hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts[f"mlp_out.{L}"], block.mlp.down_proj(acts[f"mlp_hidden.{L}"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts[f"resid_post.{L}"], resid_mid + acts[f"mlp_out.{L}"], rtol=1e-5, atol=1e-4)
    # widths read off the modules equal the captured widths
    assert {h.name: h.width for h in hps} == {n: acts[n].shape[-1] for n in names}
    assert {h.name: h.width for h in hps}[f"mlp_hidden.{L}"] == 1536


def test_smol_stop_early_skips_later_layers_and_keeps_values(smol):
    model = smol.model
    later = []
    handle = model.model.layers[11].register_forward_hook(lambda *a: later.append(1))
    try:
        _, early, out = _capture(model, ["resid_post.10", "mlp_hidden.10"], _ids(), stop_early=True)
    finally:
        handle.remove()
    assert out is None and later == []
    _, full, _ = _capture(model, ["resid_post.10", "mlp_hidden.10"], _ids())
    assert torch.equal(early["resid_post.10"], full["resid_post.10"])
    assert torch.equal(early["mlp_hidden.10"], full["mlp_hidden.10"])


def test_tiny_gpt2_hookpoints_match_model_and_weights(tiny_gpt2):
    model, L = tiny_gpt2, 1  # not the last block: GPT-2's last hidden state has ln_f applied
    names = [f"{a}.{L}" for a in ALL]
    hps, acts, out = _capture(model, names, _ids(16))
    hs = out.hidden_states
    assert torch.equal(acts[f"resid_post.{L}"], hs[L + 1])
    assert torch.equal(acts[f"resid_pre.{L}"], hs[L])
    block = model.transformer.h[L]
    torch.testing.assert_close(acts[f"mlp_in.{L}"], block.ln_2(hs[L] + acts[f"attn_out.{L}"]))
    hidden = block.mlp.act(block.mlp.c_fc(acts[f"mlp_in.{L}"]))
    torch.testing.assert_close(acts[f"mlp_hidden.{L}"], hidden)
    torch.testing.assert_close(acts[f"mlp_out.{L}"], block.mlp.c_proj(acts[f"mlp_hidden.{L}"]))
    assert {h.name: h.width for h in hps} == {n: acts[n].shape[-1] for n in names}
    assert acts[f"mlp_hidden.{L}"].shape[-1] == 4 * 32


def test_module_path_patterns_and_input_suffix(tiny_gpt2):
    hps = H.resolve(tiny_gpt2, ["transformer.h.*.mlp.c_proj:input"])
    assert [h.name for h in hps] == [f"transformer.h.{i}.mlp.c_proj:input" for i in range(3)]
    assert [h.layer for h in hps] == [0, 1, 2] and all(h.width == 128 for h in hps)
    _, acts, _ = _capture(tiny_gpt2, ["transformer.h.1.mlp.c_proj:input", "mlp_hidden.1"], _ids(8))
    assert torch.equal(acts["transformer.h.1.mlp.c_proj:input"], acts["mlp_hidden.1"])


@pytest.mark.parametrize("name", ["resid_post.3", "resid.1", "transformer.h.*.nothing", "mlp_hidden.-1"])
def test_bad_hookpoint_fails_listing_valid_ones(tiny_gpt2, name):
    with pytest.raises(H.HookpointError, match="valid hookpoints: aliases resid_pre.L"):
        H.resolve(tiny_gpt2, [name])


def test_intervene_replaces_activation(tiny_gpt2):
    ids = _ids(8)
    hp = H.resolve(tiny_gpt2, ["resid_post.1"])[0]
    with torch.no_grad():
        base = tiny_gpt2(ids).logits
        with H.intervene(tiny_gpt2, hp, lambda a: a):
            same = tiny_gpt2(ids).logits
        with H.intervene(tiny_gpt2, hp, lambda a: a + 1.0):
            moved = tiny_gpt2(ids).logits
    assert torch.equal(base, same) and not torch.allclose(base, moved)


def _tiny_family(family: str):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, Qwen2Config

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 vocab_size=256, max_position_embeddings=64)
    cfg = {
        "gpt_neox": lambda: GPTNeoXConfig(**small),
        "qwen2": lambda: Qwen2Config(**small, num_key_value_heads=2),
        "gemma2": lambda: Gemma2Config(**small, num_key_value_heads=2, head_dim=8),
        "gemma3": lambda: Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=8),
    }[family]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2", "gemma2", "gemma3"])
def test_aliases_work_across_families(family):
    model, L = _tiny_family(family), 1
    names = [f"{a}.{L}" for a in ALL]
    hps, acts, out = _capture(model, names, torch.randint(0, 256, (2, 10)))
    assert torch.equal(acts[f"resid_post.{L}"], out.hidden_states[L + 1])
    assert torch.equal(acts[f"resid_pre.{L}"], out.hidden_states[L])
    mlp, x = model.get_submodule(hps[ALL.index("mlp_in")].module_path), acts[f"mlp_in.{L}"]
    if family == "gpt_neox":
        hidden, down = mlp.act(mlp.dense_h_to_4h(x)), mlp.dense_4h_to_h
    else:
        hidden, down = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj
    torch.testing.assert_close(acts[f"mlp_hidden.{L}"], hidden)
    # mlp_out is what the block adds to the residual stream: after Gemma's post-feedforward norm
    block = model.get_submodule(hps[0].module_path)  # resid_pre.L is block L's input
    post = getattr(block, "post_feedforward_layernorm", torch.nn.Identity())
    torch.testing.assert_close(acts[f"mlp_out.{L}"], post(down(acts[f"mlp_hidden.{L}"])))
    assert {h.name: h.width for h in hps} == {n: acts[n].shape[-1] for n in names}
