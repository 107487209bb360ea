"""Steering evaluation: generation, the record schema on a tiny model, and DiffMean vs random on SmolLM2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dictlearn.activations.hookpoints import intervene, resolve, run_forward
from dictlearn.eval.report import STEERING_COLUMNS
from dictlearn.eval.steering import SteeringConfig, evaluate_steering, run_steering
from dictlearn.eval.steering.features import (
    best_feature_per_concept,
    cache_feature_stats,
    steering_site,
    vocab_projections,
)
from dictlearn.eval.steering.judges import FluencyReference, distinct_bigram_share
from dictlearn.eval.steering.page import page_html, write_continuations, write_page
from dictlearn.eval.steering.prompts import generate_continuations, generate_rows, sample_rows
from dictlearn.eval.steering.reading import read_sequences
from dictlearn.eval.steering.curves import gate_removed, gate_verdicts
from dictlearn.eval.steering.records import Detection, Record, SteeringResult, Summary
from dictlearn.eval.steering.runs import Generations
from dictlearn.eval.steering.stats import wilson_interval
from dictlearn.steering.calibrate import add_vector
from dictlearn.steering.prompts import NEUTRAL_PROMPTS


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core machine one torch thread is several times faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(assets):
    return str(assets / "english-corpus.jsonl.gz")


def test_generation_is_seeded_and_steerable(tiny_gpt2):
    hp = resolve(tiny_gpt2, "resid_post.1")[0]
    prompts = [[5, 6, 7], [8]]
    state = torch.random.get_rng_state()
    a = generate_continuations(tiny_gpt2, prompts, 2, 5, 1.0, 1.0, seed=3, pad_id=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    b = generate_continuations(tiny_gpt2, prompts, 2, 5, 1.0, 1.0, seed=3, pad_id=0)
    assert a == b and len(a) == 4 and all(len(c) == 5 for c in a)
    assert a != generate_continuations(tiny_gpt2, prompts, 2, 5, 1.0, 1.0, seed=4, pad_id=0)
    v = torch.zeros(hp.width)
    v[0] = 1.0
    steered = generate_continuations(tiny_gpt2, prompts, 2, 5, 1.0, 1.0, seed=3, pad_id=0, steer=(hp, v, 50.0))
    assert steered != a


def test_a_condition_generates_the_same_alone_or_mixed_with_others(tiny_gpt2):
    """Per-row steering and per-row random streams: a condition's continuations do not depend on which other
    conditions share its batches, nor on the batch size (sampled, and greedy at temperature 0)."""
    hp1, hp2 = resolve(tiny_gpt2, ["resid_post.1", "mlp_out.2"])
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(32, generator=g), torch.randn(32, generator=g)
    a = sample_rows(prompts, 2, 3, (hp1, 40.0 * v))
    b = sample_rows(prompts, 2, 3, (hp2, -60.0 * w))
    c = sample_rows(prompts, 2, 3)  # unsteered
    other = sample_rows([[1, 2, 3, 4, 5, 6, 7]], 3, 4)  # longer prompts change no row's padding effect
    for temperature in (1.0, 0.0):
        alone = [generate_rows(tiny_gpt2, rows, 6, temperature, 1.0, 0, bs) for rows, bs in ((a, 4), (b, 5), (c, 64))]
        mixed = generate_rows(tiny_gpt2, b + other + c + a, 6, temperature, 1.0, 0, 7)
        assert mixed[:6] == alone[1] and mixed[9:15] == alone[2] and mixed[15:] == alone[0]
        assert alone[0] != alone[2] and alone[1] != alone[2]  # the steering does change the text
    sampled = generate_rows(tiny_gpt2, c, 6, 1.0, 1.0, 0, 4)
    assert sampled[0] != sampled[1]  # two samples of one prompt draw different numbers
    assert sampled == generate_rows(tiny_gpt2, c, 6, 1.0, 1.0, 0, 4)  # and the same ones each time
    nucleus = generate_rows(tiny_gpt2, a + c, 6, 1.0, 0.5, 0, 5)
    assert nucleus[:6] == generate_rows(tiny_gpt2, a, 6, 1.0, 0.5, 0, 3)


def test_wilson_interval_known_answers():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(3, 16) == pytest.approx((0.06592, 0.43009), abs=1e-5)
    assert wilson_interval(1, 2, confidence=0.9) == pytest.approx((0.12087, 0.87913), abs=1e-5)  # z = 1.645
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(3, 2)


def test_gate_shares_count_each_gate_on_its_own():
    ref = FluencyReference(loss=2.0, bigram_share=1.0, loss_margin=1.0, bigram_frac=0.8)
    loss = np.array([2.5, 3.5, 3.5, 1.0])  # the 2nd and 3rd are too surprising
    share = np.array([0.9, 0.9, 0.5, 0.7])  # the 3rd and 4th repeat too much
    loss_ok, bigram_ok = gate_verdicts(ref, loss, share)
    assert loss_ok.tolist() == [True, False, False, True] and bigram_ok.tolist() == [True, True, False, False]
    removed = gate_removed(ref, [Generations([], [], loss[:2], share[:2], None, {}),
                                 Generations([], [], loss[2:], share[2:], None, {})])
    assert (removed.loss, removed.bigram, removed.either) == (0.5, 0.5, 0.75)


def test_page_escapes_text_and_shows_conditions_side_by_side(tmp_path):
    def cont(record, vector, kind, concepts, kl, prompt_index, sample, text, on_topic, loss_ok=True):
        return {"record": record, "kind": kind, "hookpoint": None if kind == "unsteered" else "resid_post.1",
                "vector": vector, "feature": None, "concepts": concepts, "sampled": False, "kl_target": kl,
                "kl": kl, "alpha": None, "sign": 0 if kl is None else 1, "prompt_index": prompt_index,
                "sample": sample, "prompt": ["I <think>", "Yes & no"][prompt_index], "text": text, "loss": 2.0,
                "loss_ok": loss_ok, "bigram_share": 1.0, "bigram_ok": True, "probe": "sport", "lexical": "other",
                "judged": "sport" if on_topic else None, "on_topic": on_topic}
    conts = [cont("unsteered", "unsteered", "unsteered", [], None, p, 0, f"plain {p}", False) for p in (0, 1)]
    conts += [cont("diffmean@resid_post.1", "diffmean sport", "diffmean", ["sport"], 0.5, p, 0,
                   "<script>alert('goal')</script>" if p == 0 else "the match", p == 1) for p in (0, 1)]
    conts += [cont("diffmean@resid_post.1", "diffmean sport", "diffmean", ["sport"], 1.0, 0, 0, "other kl", False)]
    conts += [cont("random@resid_post.1", "random 0", "random", [], 0.5, p, 0, "gated text", False, False)
              for p in (0, 1)]
    result = SteeringResult({"summary_kl": 0.5, "signs": [1], "samples_per_prompt": 1, "concepts": ["sport"]}, None,
                            None, {"diffmean@resid_post.1": None, "random@resid_post.1": None}, {}, None, conts)
    page = page_html(result)
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;goal&#x27;)&lt;/script&gt;" in page
    assert "I &lt;think&gt;" in page and "Yes &amp; no" in page
    assert "other kl" not in page  # only the summary KL is shown side by side
    head = page.index("<table class='side'>")
    assert page.index("unsteered", head) < page.index("diffmean@resid_post.1", head) < page.index("random@resid_post.1", head)
    assert page.count('class="on"') == 1 and page.count('class="gated"') == 2
    assert "1/2" in page  # DiffMean: one of two on-topic in the per-column table


def test_vocab_projection_is_the_logit_lens(tiny_gpt2):
    d = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    proj = vocab_projections(tiny_gpt2, "resid_post.1", d)
    ln = tiny_gpt2.transformer.ln_f.weight.detach().numpy()
    assert proj.shape == (2, tiny_gpt2.lm_head.weight.shape[0])
    assert np.allclose(proj, (ln * d) @ tiny_gpt2.lm_head.weight.detach().numpy().T, atol=1e-5)
    assert vocab_projections(tiny_gpt2, "resid_post.1", np.ones((1, 7), np.float32)) is None  # not residual-wide


def _snmf(d_model: int = 0):
    from flax import nnx

    from dictlearn.decomposers.snmf import SemiNMF, SNMFConfig

    return SemiNMF(SNMFConfig(d_in=128, n_features=4, hookpoint_in="mlp_hidden.1", d_model=d_model), rngs=nnx.Rngs(0))


def test_semi_nmf_steers_at_its_own_hookpoint(tiny_gpt2):
    """No per-kind case: semi-NMF of mlp_hidden.1 steers there along F's columns, which is exactly adding
    F_k W_out to the MLP's output, and its vocabulary projection goes through W_out."""
    dec = _snmf()
    hp, dirs = steering_site(tiny_gpt2, dec)
    assert hp.name == "mlp_hidden.1" and np.allclose(dirs, np.asarray(dec.features()))
    w_out = tiny_gpt2.transformer.h[1].mlp.c_proj.weight.detach().numpy()  # Conv1D: (d_hidden, d_model)
    ln = tiny_gpt2.transformer.ln_f.weight.detach().numpy()
    lens = (ln * (dirs @ w_out)) @ tiny_gpt2.lm_head.weight.detach().numpy().T
    assert np.allclose(vocab_projections(tiny_gpt2, hp.name, dirs), lens, atol=1e-4)
    ids = torch.tensor([[5, 6, 7, 8]])
    out_hp = resolve(tiny_gpt2, "mlp_out.1")[0]
    v = torch.from_numpy(dirs[2])
    with torch.no_grad():
        with intervene(tiny_gpt2, hp, add_vector(v, 3.0)):
            at_hidden = run_forward(tiny_gpt2, ids).logits
        with intervene(tiny_gpt2, out_hp, add_vector(v @ torch.from_numpy(w_out), 3.0)):
            at_output = run_forward(tiny_gpt2, ids).logits
        plain = run_forward(tiny_gpt2, ids).logits
    assert torch.allclose(at_hidden, at_output, atol=1e-4) and not torch.allclose(at_hidden, plain, atol=1e-3)


class FakeCache:
    """The two ActivationCache methods the feature statistics use, over in-memory shards."""

    def __init__(self, shards: list[tuple[str, np.ndarray]]):
        self.hookpoints = {"resid_post.1": {"width": 4, "dtype": "float32"}}
        self._shards = shards

    def shard_ids(self, split="all"):
        return [i for i, (s, _) in enumerate(self._shards) if split in ("all", s)]

    def shard_arrays(self, index, keys=None):
        return {"resid_post.1": self._shards[index][1]}


def test_feature_stats_from_the_cache_eval_shards(known_decomposers):
    LinearReLU = known_decomposers.LinearReLU
    w = np.eye(4, 3, dtype=np.float32)  # feature j reads dimension j; dimension 3 is read by none
    dec = LinearReLU(w, np.zeros(3), w.T.copy(), np.zeros(4), hookpoint_in="resid_post.1")
    train = np.full((5, 4), 100.0, np.float32)  # must be ignored: eval shards only
    ev1 = np.array([[1.0, 0, 0, 9], [3.0, -1, 0, 0]], np.float32)
    ev2 = np.array([[0.0, 2, 0, 0], [0.0, 5, 0, 0], [7.0, 7, 7, 7]], np.float32)
    fmax, fired, n = cache_feature_stats(dec, FakeCache([("train", train), ("eval", ev1), ("eval", ev2)]), max_rows=4)
    assert n == 4  # stops at max_rows: the last eval row (7, 7, 7) is not read
    assert fmax.tolist() == [3.0, 5.0, 0.0] and fired.tolist() == [2, 2, 0]
    other = LinearReLU(w, np.zeros(3), w.T.copy(), np.zeros(4), hookpoint_in="resid_post.2")
    assert cache_feature_stats(other, FakeCache([("eval", ev1)]), 10) is None  # hookpoint not cached


def test_config_errors():
    with pytest.raises(ValueError, match="summary_kl"):
        SteeringConfig(kl_targets=[0.1], summary_kl=0.5)
    with pytest.raises(ValueError, match="signs"):
        SteeringConfig(signs=[2])
    with pytest.raises(ValueError, match="n_prompts"):
        SteeringConfig(n_prompts=len(NEUTRAL_PROMPTS) + 1)


def test_best_feature_is_chosen_on_train_and_scored_on_held_out(known_decomposers):
    """Feature 2 reads dimension 0, which is high on 'sport' windows: it is the one picked for sport."""
    LinearReLU = known_decomposers.LinearReLU
    rng = np.random.default_rng(0)

    def windows(n):
        labels = np.array(["sport"] * n + ["brown"] * n)
        toks = [rng.standard_normal((5, 4)).astype(np.float32) + (2.0 if l == "sport" else 0.0) * np.eye(4)[0]
                for l in labels]
        return toks, labels

    w = np.zeros((4, 3), np.float32)
    w[1, 0], w[2, 1], w[0, 2] = 1.0, 1.0, 1.0
    dec = LinearReLU(w, np.zeros(3), w.T.copy(), np.zeros(4))
    (tr, ytr), (te, yte) = windows(20), windows(10)
    best = best_feature_per_concept(dec, tr, ytr, te, yte, ["sport"], live=np.arange(3))
    assert best["sport"].feature == 2 and best["sport"].auc > 0.9 and best["sport"].auc_train > 0.9
    # a dead feature is never chosen, even when it would detect best
    assert best_feature_per_concept(dec, tr, ytr, te, yte, ["sport"], live=np.arange(2))["sport"].feature != 2


def test_record_schema_on_a_tiny_model(tiny_gpt2, smol, corpus, known_decomposers, tmp_path):
    """Every record has the same keys, whatever kind of vector it holds; every summary row has its interval,
    its n and its gate shares, counted from the stored continuations."""
    LinearReLU = known_decomposers.LinearReLU
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 12)) / np.sqrt(32)).astype(np.float32)
    dec = LinearReLU(w, np.zeros(12), w.T.copy(), np.zeros(32), hookpoint_in="resid_post.1")
    cfg = SteeringConfig(kl_targets=[0.002, 0.005], summary_kl=0.005, signs=[1, -1], n_prompts=4, samples_per_prompt=1,
                         max_new_tokens=6, n_features=2, concepts=["sport"], corpus=corpus, windows_per_class=16,
                         held_out_windows=8, judge_samples_per_prompt=1, batch_size=8)
    result = run_steering(tiny_gpt2, smol.tokenizer, {"planted": dec}, None, cfg)
    assert all(isinstance(r, Record) and isinstance(r.summary, Summary) for r in result.records.values())
    assert isinstance(result.records["planted"].detection["sport"], Detection)
    res = result.to_json()
    assert json.loads(json.dumps(res)) == res  # plain JSON, nothing lost
    recs = res["records"]
    assert set(recs["planted"]) == {"kind", "hookpoint", "detection_auc", "detection", "calibration", "feature_curve",
                                    "concept_curve", "summary"}
    assert {k for k, _, _ in STEERING_COLUMNS} < set(recs["planted"]["summary"])  # what the report tabulates
    assert set(recs) == {"planted", "diffmean@resid_post.1", "random@resid_post.1"}
    keys = {k: set(r) for k, r in recs.items()}
    assert len({frozenset(v) for v in keys.values()}) == 1
    assert len({frozenset(r["summary"]) for r in recs.values()}) == 1
    assert [r["kind"] for r in recs.values()] == ["test_linear_relu", "diffmean", "random"]
    planted = recs["planted"]
    assert {"feature", "auc_train", "auc"} <= set(planted["detection"]["sport"])
    assert planted["detection"]["sport"]["auc_train"] >= 0.5  # the best of 12 features on the training windows
    curve = [(e["sign"], e["kl_target"]) for e in planted["feature_curve"]]
    assert curve == [(1, 0.002), (1, 0.005), (-1, 0.002), (-1, 0.005)]
    assert planted["feature_curve"][0]["n_features"] == 2
    assert len(res["features"]["planted"]) == 2
    for r in recs.values():
        assert [e["kl_target"] for e in r["concept_curve"]] == [0.002, 0.005] * 2
        assert r["calibration"]["converged_fraction"] == 1.0 and r["calibration"]["rel_error_max"] <= 0.02
        for e in r["concept_curve"]:
            assert 0.0 <= e["concept_rate"] <= 1.0 and 0.0 <= e["fluency"] <= 1.0
    curve_keys = {frozenset(e) - {"per_concept"} for r in recs.values() for e in r["concept_curve"]}
    assert len(curve_keys) == 1
    judges = res["judges"]
    assert judges["classes"] == ["sport", "other"] and judges["probe_hookpoint"] == "resid_post.1"
    assert set(judges["base_rate"]["sport"]) == {"probe", "lexical", "both", "judged"}

    # every condition's continuations are stored: the unsteered run + each vector at 2 targets x 2 signs
    conts = result.continuations
    assert "continuations" not in res
    n_vectors = len(res["features"]["planted"]) + len({d["feature"] for d in planted["detection"].values()}
                                                      - set(res["features"]["planted"])) + 2  # + DiffMean, random
    assert len(conts) == (1 + 4 * n_vectors) * 4
    assert len({(c["record"], c["vector"], c["kl_target"], c["sign"]) for c in conts}) == 1 + 4 * n_vectors
    for name, r in recs.items():
        s = r["summary"]
        lo, hi = s["concept_rate_ci"]
        assert 0.0 <= lo <= s["concept_rate"] <= hi <= 1.0 and hi > lo  # never an empty interval
        assert s["n_continuations"] == 4
        g = s["gate_removed"]
        assert max(g["loss"], g["bigram"]) <= g["either"] <= g["loss"] + g["bigram"] + 1e-12
        for e in r["concept_curve"]:  # the curve's counts are the stored verdicts
            mine = [c for c in conts if c["record"] == name and c["kl_target"] == e["kl_target"]
                    and c["sign"] == e["sign"] and (name.startswith("random") or "sport" in c["concepts"])]
            assert len(mine) == e["n"]
            fluent = np.mean([c["loss_ok"] and c["bigram_ok"] for c in mine])
            assert e["gate_removed"]["either"] == pytest.approx(1 - fluent)
            if not name.startswith("random"):
                assert sum(c["on_topic"] for c in mine) == e["per_concept"]["sport"]["k"]
    human = res["human_text_gates"]
    assert human["n"] > 0 and 0.0 <= human["rejected"]["either"] <= 1.0
    write_continuations(tmp_path, result)
    write_page(tmp_path, result)
    lines = (tmp_path / "continuations.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(conts))
    page = (tmp_path / "index.html").read_text()
    assert "unsteered" in page and "diffmean@resid_post.1" in page and "random@resid_post.1" in page


def test_semi_nmf_evaluates_at_the_mlp_hidden_site(tiny_gpt2, smol, corpus):
    """A hidden-site dictionary goes through the same evaluation as any other: calibrated, compared with a random
    direction at its own site, and its features' vocabulary projections taken through W_out."""
    cfg = SteeringConfig(kl_targets=[0.005], summary_kl=0.005, n_prompts=3, samples_per_prompt=1, max_new_tokens=4,
                         n_features=2, concepts=[], corpus=corpus, windows_per_class=8, held_out_windows=4, batch_size=8)
    res = evaluate_steering(tiny_gpt2, smol.tokenizer, {"snmf": _snmf()}, None, cfg)
    assert set(res["records"]) == {"snmf", "random@mlp_hidden.1"}
    rec = res["records"]["snmf"]
    assert rec["kind"] == "snmf" and rec["hookpoint"] == "mlp_hidden.1"
    assert rec["calibration"]["converged_fraction"] == 1.0
    point = rec["feature_curve"][0]
    assert point["n_features"] == 2 and point["output_token_mass"] is not None


def test_fluency_gates_reject_word_salad_and_repetition_on_smollm2(smol):
    """The failure modes that fool a probe: the real model's loss and the bigram share catch them."""
    tok = smol.tokenizer
    hp = resolve(smol.model, "resid_post.15")[0]
    prompt = tok("I think that", add_special_tokens=False)["input_ids"]
    texts = {
        "plain": [" the weather will be better tomorrow, so we can go for a walk in the park.",
                  " it is a good idea to read the instructions before you start the machine."],
        "sport": [" the team played well in the second half and scored two late goals to win the match."],
        "salad": [" football match goal coach striker league penalty referee stadium season cup"],
        "repeat": [" the the the the the the the the the the the the the the the the"],
    }
    conts = {k: [tok(t, add_special_tokens=False)["input_ids"] for t in v] for k, v in texts.items()}
    flat = [c for v in conts.values() for c in v]
    read = read_sequences(smol.model, [prompt + c for c in flat], [len(prompt)] * len(flat), [hp], with_loss=True)
    loss = dict(zip([k for k, v in conts.items() for _ in v], read.loss))  # last of each kind
    shares = {k: distinct_bigram_share(v[-1]) for k, v in conts.items()}
    ref = FluencyReference.of(read.loss[:2], [distinct_bigram_share(c) for c in conts["plain"]])
    gate = {k: bool(ref.gate([loss[k]], [shares[k]])[0]) for k in conts}
    assert gate == {"plain": True, "sport": True, "salad": False, "repeat": False}, (loss, shares)


def diffmean_vs_random(smol, corpus, n_prompts, samples, concepts, max_new_tokens=24, windows=(64, 8)):
    cfg = SteeringConfig(kl_targets=[0.5], summary_kl=0.5, n_prompts=n_prompts, samples_per_prompt=samples,
                         max_new_tokens=max_new_tokens, n_features=0, concepts=concepts, corpus=corpus,
                         hookpoints=["resid_post.10"], windows_per_class=windows[0], held_out_windows=windows[1],
                         judge_samples_per_prompt=1)
    return evaluate_steering(smol.model, smol.tokenizer, {}, None, cfg)


def test_diffmean_sport_beats_random_direction_at_equal_kl(smol, corpus):
    """Issue 5: DiffMean for sport at resid_post.10, KL 0.5, raises the judged sport rate significantly
    more than a random direction calibrated to the same KL (small version; the full one is marked slow)."""
    res = diffmean_vs_random(smol, corpus, n_prompts=8, samples=4, concepts=["sport"])
    assert json.loads(json.dumps(res)) == res  # evaluate_steering returns steering.json's plain JSON
    print(json.dumps({"judges": res["judges"], "diffmean": res["records"]["diffmean@resid_post.10"]["concept_curve"],
                      "random": res["records"]["random@resid_post.10"]["concept_curve"]}, indent=1))
    dm = res["records"]["diffmean@resid_post.10"]["concept_curve"][0]
    rnd = res["records"]["random@resid_post.10"]["concept_curve"][0]
    assert abs(dm["kl"] - 0.5) <= 0.05 and abs(rnd["kl"] - 0.5) <= 0.05
    assert dm["concept_rate"] > rnd["concept_rate"] and dm["p_value"] < 0.05, (dm, rnd)
    judges = res["judges"]
    assert judges["heldout_accuracy"]["probe"] > 0.75
    assert judges["base_rate"]["sport"]["judged"] <= 0.125


@pytest.mark.slow
def test_diffmean_topics_beat_random_full_size(smol, corpus):
    """The full-size version: 32 neutral prompts x 4 samples, every BBC topic, one random direction."""
    topics = ["business", "entertainment", "politics", "sport", "tech"]
    res = diffmean_vs_random(smol, corpus, n_prompts=32, samples=4, concepts=topics, max_new_tokens=32, windows=(64, 24))
    curve = res["records"]["diffmean@resid_post.10"]["concept_curve"][0]
    per = curve["per_concept"]
    print(json.dumps({"judges": res["judges"], "diffmean": curve,
                      "random": res["records"]["random@resid_post.10"]["concept_curve"][0]}, indent=1))
    assert per["sport"]["p_value"] < 0.01 and per["sport"]["rate"] > per["sport"]["random_rate"]
    assert curve["p_value"] < 0.001 and curve["significant"]
    assert res["judges"]["heldout_accuracy"]["probe"] > 0.7  # 6 classes (chance 1/6); measured 0.757
