"""The evaluation suite on cross-layer transcoders (kind "clt", a site axis): per-layer reconstruction metrics,
the replacement model (every covered MLP spliced in one forward), per-layer feature cards and the report.

A tiny GPT-2 with ReLU MLPs makes exact answers possible: a CLT whose encoder of layer l is the MLP's first
linear layer (JumpReLU at threshold ~0 is ReLU there) and whose decoder from layer l to layer l is the second
reproduces every MLP exactly, so its replacement model is the model."""

from __future__ import annotations

import contextlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import CORPUS, LinearReLU
from dictlearn.activations import hookpoints as hpmod
from dictlearn.decomposers.base import build
from dictlearn.eval.downstream import evaluate_downstream
from dictlearn.eval.reconstruction import evaluate_reconstruction, mean_of

N_LAYER, D, HIDDEN, VOCAB = 3, 32, 128, 49152
TINY_THRESHOLD = 1e-30  # JumpReLU fires where pre > threshold: ReLU up to values below 1e-30


@pytest.fixture(scope="module")
def relu_gpt2():
    """A tiny random GPT-2 whose MLPs are ReLU(x W_fc + b_fc) W_proj + b_proj, with embeddings and MLP outputs
    scaled up so that the logits are far from uniform and replacing or removing the MLPs moves them clearly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_LAYER, n_embd=D, n_head=4, n_positions=128, vocab_size=VOCAB, activation_function="relu")
    model = GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(30.0)  # tied: the unembedding too
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_(0, 0.5)
            block.mlp.c_proj.weight.mul_(25.0)
            block.mlp.c_proj.bias.normal_(0, 0.5)
    return model


def mlp_weights(model, layer):
    mlp = model.transformer.h[layer].mlp
    return [t.detach().numpy().astype(np.float32) for t in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)]


def clt(layers=range(N_LAYER), **kw):
    first, last = min(layers), max(layers)
    span = f"{first}-{last}" if last > first else f"{first}"
    config = dict(d_in=D, d_out=D, n_features=HIDDEN, hookpoint_in=f"mlp_in.{span}", hookpoint_out=f"mlp_out.{span}",
                  seed=3, **kw)
    return build("clt", config)


def exact_clt(model, layers=range(N_LAYER), cross: float = 0.0):
    """A CLT (JumpReLU) reproducing the MLPs of `layers`; cross != 0 adds cross * W_proj of each layer to its
    writes to every later layer (a cross-layer term the model does not have)."""
    layers = list(layers)
    c = clt(layers, sparsity="jumprelu", initial_threshold=TINY_THRESHOLD)
    w = [mlp_weights(model, l) for l in layers]
    c.W_enc[...] = jnp.asarray(np.stack([x[0] for x in w]))
    c.b_enc[...] = jnp.asarray(np.stack([x[1] for x in w]))
    c.b_in[...] = jnp.zeros((len(layers), D))
    c.b_dec[...] = jnp.asarray(np.stack([x[3] for x in w]))
    for i in range(len(layers)):
        dec = np.zeros((HIDDEN, len(layers) - i, D), np.float32)
        dec[:, 0] = w[i][2]
        dec[:, 1:] = cross * w[i][2][:, None]
        c.decoder(i)[...] = jnp.asarray(dec)
    return c


def random_ids(n=2, t=16, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, t))


# --- the replacement model ---------------------------------------------------------------------------------------
def test_exact_clt_replacement_model_is_the_model(relu_gpt2):
    """Every MLP replaced at once by an exact CLT scores 1 (KL 0); a cross-layer write the model lacks does not."""
    seqs = random_ids()
    res = evaluate_downstream(relu_gpt2, seqs, {"exact": exact_clt(relu_gpt2), "cross": exact_clt(relu_gpt2, cross=0.5),
                                                "zero": clt(sparsity="jumprelu", initial_threshold=1e6)})
    exact, cross, zero = res["exact"], res["cross"], res["zero"]
    assert exact.resumed and exact.n_tokens == 2 * 15
    assert exact.ce_ablated > exact.ce_clean + 1.0  # zeroing every MLP output hurts
    assert exact.ce_loss_score == pytest.approx(1.0, abs=1e-4) and exact.kl_spliced < 1e-7
    assert exact.kl_score == pytest.approx(1.0, abs=1e-5)
    assert cross.kl_spliced > 0.1 and cross.kl_score < 0.99  # the cross-layer writes are applied
    # a fresh CLT that never fires outputs its zero b_dec: the ablated run, score 0
    assert zero.ce_ablated == exact.ce_ablated and zero.ce_spliced == zero.ce_ablated and zero.ce_loss_score == 0.0


def replacement_by_iteration(model, c, ids, rounds):
    """An independent reference: splice outputs computed from the mlp_in activations of the previous forward
    (round 0: the clean one), `rounds` times. The input of layer l only depends on layers below it, so after
    rounds >= number of layers this is the replacement model; after 1 round it is splicing on clean inputs."""
    hps_in, hps_out = hpmod.resolve(model, c.config.hookpoints_in()), hpmod.resolve(model, c.config.hookpoints_out())

    def forward(outputs):
        with contextlib.ExitStack() as stack:
            for j, hp in enumerate(hps_out):
                if outputs is not None:
                    stack.enter_context(hpmod.intervene(model, hp, lambda a, j=j: torch.from_numpy(outputs[:, j]).reshape(a.shape)))
            acts = stack.enter_context(hpmod.capture(model, hps_in))
            logits = hpmod.run_forward(model, torch.as_tensor(ids)).logits
        x = np.stack([acts[h.name].reshape(-1, D).numpy() for h in hps_in], axis=1)
        return logits, x

    with torch.no_grad():
        logits, x = forward(None)
        for _ in range(rounds):
            logits, x = forward(np.array(c.decode(c.encode(jnp.asarray(x))), np.float32))
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return float(-logp.gather(-1, torch.as_tensor(ids)[:, 1:, None]).double().mean())


@pytest.mark.parametrize("resume", [True, False])
def test_replacement_model_uses_its_own_inputs(relu_gpt2, resume):
    """The spliced CE of a random CLT with cross-layer writes equals the iterated reference at its fixed point,
    and differs from splicing on the clean model's MLP inputs (so a wrong wiring would fail here)."""
    c = clt(sparsity="topk", k=6)
    ids = random_ids(seed=1)
    got = evaluate_downstream(relu_gpt2, ids, {"clt": c}, resume=resume)["clt"]
    assert got.resumed == resume
    fixed = replacement_by_iteration(relu_gpt2, c, ids, N_LAYER)
    assert replacement_by_iteration(relu_gpt2, c, ids, N_LAYER + 1) == pytest.approx(fixed, abs=1e-6)  # converged
    open_loop = replacement_by_iteration(relu_gpt2, c, ids, 1)
    assert abs(open_loop - fixed) > 1e-3
    assert got.ce_spliced == pytest.approx(fixed, abs=1e-5)


def test_one_layer_clt_matches_the_single_site_path(relu_gpt2):
    """A CLT over one layer goes through the site-axis path; a transcoder with the same weights through the
    single-site one: same scores. Both replace only mlp_out.1, so they share the ablated run."""
    w_fc, b_fc, w_proj, b_proj = mlp_weights(relu_gpt2, 1)
    rng = np.random.default_rng(2)
    w_fc = w_fc + rng.normal(0, 0.01, w_fc.shape).astype(np.float32)  # not quite the MLP
    c = exact_clt(relu_gpt2, layers=[1])
    c.W_enc[...] = jnp.asarray(w_fc[None])
    tc = LinearReLU(w_fc, b_fc, w_proj, b_proj, hookpoint_in="mlp_in.1", hookpoint_out="mlp_out.1")
    ids = random_ids(seed=3)
    res = evaluate_downstream(relu_gpt2, ids, {"clt": c, "tc": tc})
    assert c.config.hookpoints_out() == ["mlp_out.1"]
    # the single-site path is plain splicing: the transcoder's output from the input of the same forward
    full = evaluate_downstream(relu_gpt2, ids, {"tc": tc}, resume=False)["tc"]
    assert full.ce_spliced == pytest.approx(replacement_by_iteration(relu_gpt2, tc, ids, 1), abs=1e-9)
    assert res["clt"].ce_ablated == res["tc"].ce_ablated
    assert res["clt"].ce_spliced == pytest.approx(res["tc"].ce_spliced, abs=1e-6)
    assert res["clt"].kl_spliced == pytest.approx(res["tc"].kl_spliced, abs=1e-7)
    assert 1e-3 < res["tc"].kl_spliced < res["tc"].kl_ablated


# --- reconstruction and sparsity per layer ----------------------------------------------------------------------
def test_per_layer_metrics_match_the_formulas():
    """Overall metrics pool the layers (one concatenated output, every latent); per-site ones split them."""
    c = clt(sparsity="topk", k=5)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, N_LAYER, D)).astype(np.float32)
    y_hat = np.asarray(c.decode(c.encode(jnp.asarray(x))))
    codes = np.asarray(c.encode(jnp.asarray(x)))
    y = y_hat + rng.normal(size=y_hat.shape).astype(np.float32) * np.array([0.0, 0.5, 2.0], np.float32)[:, None]
    y[:, 0] = y_hat[:, 0]  # layer 0 exact
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 300, 64)]
    acc = evaluate_reconstruction(c, batches, batch_size=64, top_k=3, target_mean=mean_of(b for _, b in batches))
    m, site = acc.metrics(), acc.site_metrics()
    y64, e64 = y.astype(np.float64), (y - y_hat).astype(np.float64)
    var = ((y64 - y64.mean(0)) ** 2).sum(axis=(0, 2))  # per layer
    sse = (e64**2).sum(axis=(0, 2))
    np.testing.assert_allclose(site["fvu"], sse / var, rtol=1e-5, atol=1e-9)
    assert site["fvu"][0] < 1e-9 and site["fvu"][1] < site["fvu"][2]
    assert m["fvu"] == pytest.approx(sse.sum() / var.sum(), rel=1e-5)
    assert m["mse"] == pytest.approx((e64**2).sum(axis=(1, 2)).mean(), rel=1e-5)
    np.testing.assert_allclose(site["l0"], (codes != 0).sum(2).mean(0), rtol=1e-6)
    assert site["l0"] == pytest.approx([5.0] * N_LAYER)  # TopK: k per row and layer
    assert m["l0"] == pytest.approx(5.0 * N_LAYER)
    fired = (codes != 0).any(0)  # (L, F)
    np.testing.assert_allclose(site["dead_fraction"], 1 - fired.mean(1))
    assert m["dead_fraction"] == pytest.approx(1 - fired.mean())
    assert acc.n_features == N_LAYER * HIDDEN
    # latent f of layer 1 is latent HIDDEN + f: its top rows are its largest codes
    f = int(np.argmax((codes[:, 1] != 0).sum(0)))
    best = np.sort(codes[:, 1, f])[::-1][:3]
    np.testing.assert_allclose(acc.top_vals[HIDDEN + f], best, rtol=1e-6)
    np.testing.assert_allclose(codes[acc.top_rows[HIDDEN + f], 1, f], best, rtol=1e-6)


# --- the suite end to end: records, cards, report ---------------------------------------------------------------
@pytest.fixture(scope="module")
def relu_cache(relu_gpt2, smol, tmp_path_factory):
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.models import LoadedModel

    loaded = LoadedModel(model=relu_gpt2, tokenizer=smol.tokenizer, name="relu-gpt2", fingerprint="test:relu-gpt2")
    hps = [f"{a}.{l}" for a in ("mlp_in", "mlp_out") for l in range(N_LAYER)]
    config = HarvestConfig(hookpoints=hps, n_tokens=2048, dtype="float32", batch_size=4, shard_mb=0.25,
                           eval_fraction=0.25)
    cache = harvest(loaded, CorpusConfig(path=str(CORPUS), context_length=32), config,
                    tmp_path_factory.mktemp("relu_cache") / "cache", progress=False)
    return loaded, cache


def test_suite_records_cards_and_report(relu_cache, tmp_path):
    from dictlearn.eval.report import write_report
    from dictlearn.eval.suite import EvalConfig, evaluate

    loaded, cache = relu_cache
    w_fc, b_fc, w_proj, b_proj = mlp_weights(loaded.model, 2)
    decs = {"clt": exact_clt(loaded.model), "tc": LinearReLU(w_fc, b_fc, w_proj, b_proj, "mlp_in.2", "mlp_out.2")}
    cfg = EvalConfig(n_eval_rows=600, batch_size=256, n_downstream_sequences=2, n_feature_cards=2, top_k_contexts=3)
    recs = evaluate(decs, loaded, cache, cfg, cards_dir=tmp_path / "cards", log=lambda m: None, progress=False)
    r, t = recs["clt"], recs["tc"]
    assert set(r) == set(t)  # the same record keys for every kind
    assert r["n_sites"] == N_LAYER and t["n_sites"] == 1 and r["n_features"] == N_LAYER * HIDDEN
    assert list(r["fvu_per_site"]) == [f"mlp_out.{l}" for l in range(N_LAYER)]
    assert list(r["l0_per_site"]) == [f"mlp_in.{l}" for l in range(N_LAYER)]
    assert max(r["fvu_per_site"].values()) < 1e-6 and r["fvu"] < 1e-6  # exact on the cached rows too
    assert t["fvu_per_site"] == {"mlp_out.2": t["fvu"]} and t["l0_per_site"] == {"mlp_in.2": t["l0"]}
    assert r["l0"] == pytest.approx(sum(r["l0_per_site"].values()))
    assert r["l0_per_site"]["mlp_in.2"] == pytest.approx(t["l0"])  # the same latents as the layer-2 transcoder
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and t["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert r["ce_ablated"] > t["ce_ablated"]  # removing three MLPs hurts more than removing one
    cards = json.loads((tmp_path / "cards" / "clt" / "cards.json").read_text())
    by_site = {}
    for card in cards["features"]:
        by_site.setdefault(card["site"], []).append(card)
        assert card["index"] == int(card["site"][-1]) * HIDDEN + card["latent"]
        assert card["contexts"] and len(card["vocab"]) == cfg.n_vocab_tokens
    assert {s: len(v) for s, v in by_site.items()} == {f"mlp_in.{l}": 2 for l in range(N_LAYER)}
    assert "latent" not in json.loads((tmp_path / "cards" / "tc" / "cards.json").read_text())["features"][0]
    page = (tmp_path / "cards" / "clt" / "features" / f"{cards['features'][-1]['index']}.html").read_text()
    assert "of mlp_in.2)" in page
    write_report(tmp_path / "report", {"model": "relu"}, [r, t],
                 steering={"records": {}, "skipped": {"clt": "its latents write to several layers"}})
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Per layer" in md and "| clt | mlp_in.1 | mlp_out.1 |" in md and "| tc | mlp_in.2" not in md
    assert "clt is not steered: its latents write to several layers" in md
    assert "## Steering\n" in md and "| vector |" not in md  # nothing was steered: no empty table


def test_latent_vocab_sums_every_written_layer(relu_gpt2):
    """A cross-layer latent promotes what its writes to every layer add to the logits together."""
    from dictlearn.activations import families
    from dictlearn.eval.feature_cards import vocab_projection
    from dictlearn.eval.suite import written_directions

    c = clt(sparsity="topk", k=4)
    dirs = written_directions(c, np.array([5, HIDDEN + 7, 2 * HIDDEN + 1]))
    assert dirs.shape == (3, N_LAYER, D)
    np.testing.assert_allclose(dirs[0], np.asarray(c.decoder(0)[...][5]), rtol=1e-6, atol=1e-7)
    assert np.all(dirs[1, 0] == 0) and np.all(dirs[2, :2] == 0)  # a latent of layer l writes to layers >= l only
    outs = c.config.hookpoints_out()
    ids, vals = vocab_projection(relu_gpt2, outs, dirs, k=4)
    want = sum(families.logit_lens(relu_gpt2, o)(dirs[:, j]) for j, o in enumerate(outs))
    np.testing.assert_array_equal(ids, np.argsort(-want, axis=1)[:, :4])
    np.testing.assert_allclose(vals, np.sort(want, axis=1)[:, ::-1][:, :4], rtol=1e-4, atol=1e-5)


def test_steering_skips_site_axis_kinds_with_a_reason():
    from dictlearn.eval.steering import evaluate_steering

    out = evaluate_steering(None, None, {"clt": clt(sparsity="topk", k=4)})
    assert out["records"] == {} and "several layers" in out["skipped"]["clt"]
