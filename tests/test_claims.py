"""bench/claims.py: the verdict rule on constructed numbers (known answers), the run configs it writes, and a
smoke run of one claim through the real stages (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tomllib
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("claims", ROOT / "bench" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


claims = _bench()


# --- the verdict rule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi, claim, higher, expected", [
    (0.01, 0.05, "better", True, "supports"),
    (-0.05, -0.01, "better", True, "contradicts"),
    (-0.01, 0.03, "better", True, "within noise"),
    (-0.05, -0.01, "better", False, "supports"),  # lower is better (FVU, CE increase): A below B supports
    (0.01, 0.05, "better", False, "contradicts"),
    (-0.01, 0.02, "on par", True, "supports (within noise)"),
    (0.01, 0.02, "on par", True, "supports (A better)"),
    (-0.03, -0.01, "on par", True, "contradicts"),
    (0.01, 0.03, "on par", False, "contradicts"),
    (0.5, 0.9, None, True, "not claimed"),
])
def test_verdict_known_answers(lo, hi, claim, higher, expected):
    assert claims.verdict(lo, hi, claim, higher) == expected


def test_verdict_refuses_an_unknown_claim():
    with pytest.raises(ValueError, match="claim must be"):
        claims.verdict(0.0, 1.0, "worse", True)


def test_wilson_and_newcombe_match_published_values():
    lo, hi = claims.wilson(5, 10)  # Wilson's interval of 5/10: 0.2366 .. 0.7634
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert claims.wilson(0, 10)[0] == 0.0 and round(claims.wilson(0, 10)[1], 4) == 0.2775
    # Newcombe (1998), example (a): 56/70 vs 48/80, difference 0.2000 with 95% interval 0.0524 .. 0.3339
    pa, pb = 56 / 70, 48 / 80
    lo, hi = claims.newcombe(pa, claims.wilson(56, 70), pb, claims.wilson(48, 80))
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


def test_paired_t_interval_over_seeds():
    lo, hi = claims.paired_t([0.1, 0.2])  # mean 0.15, sd 0.0707, t(0.975, 1) = 12.706
    half = 12.7062 * math.sqrt(0.005) / math.sqrt(2)
    assert lo == pytest.approx(0.15 - half, abs=1e-3) and hi == pytest.approx(0.15 + half, abs=1e-3)


CE = claims.Metric("ce_loss_score", "CE score", higher_is_better=True, claim="better")
FVU = claims.Metric("fvu", "FVU", higher_is_better=False)
RATE = claims.Metric("steering.concept_rate", "rate", higher_is_better=True, claim="better", rate=True)


def test_one_seed_uses_the_stated_tolerance_and_says_so():
    tol = claims.TOLERANCE["ce_loss_score"]
    row = claims.compare(CE, [{"value": 0.90}], [{"value": 0.85}], 64)
    assert row.verdict == "supports" and row.interval == pytest.approx((0.05 - tol, 0.05 + tol))
    assert "one seed" in row.how and "assumed" in row.how
    assert claims.compare(CE, [{"value": 0.85 + tol / 2}], [{"value": 0.85}], 64).verdict == "within noise"
    assert claims.compare(CE, [{"value": 0.80}], [{"value": 0.85}], 64).verdict == "contradicts"
    assert claims.compare(FVU, [{"value": 0.2}], [{"value": 0.3}], 64).verdict == "not claimed"


def test_several_seeds_use_the_paired_differences():
    # A beats B by 0.05 +/- 0.001 on three seeds: decided, although the seeds themselves vary by 0.1
    row = claims.compare(CE, [{"value": v + 0.05} for v in (0.7, 0.8, 0.9)],
                         [{"value": v} for v in (0.7, 0.8, 0.9001)], 64)
    assert row.verdict == "supports" and "3 seeds" in row.how
    noisy = claims.compare(CE, [{"value": v} for v in (0.9, 0.7, 0.85)], [{"value": v} for v in (0.8, 0.8, 0.8)], 64)
    assert noisy.verdict == "within noise"


def test_rates_use_counts_and_the_steering_evals_interval_when_given():
    # 40/64 vs 10/64: far apart, decided from Wilson intervals of the counts
    row = claims.compare(RATE, [{"value": 40 / 64, "n": 64}], [{"value": 10 / 64, "n": 64}], 0)
    assert row.verdict == "supports" and row.extra["n_a"] == 64 and "Wilson" in row.how
    assert claims.compare(RATE, [{"value": 3 / 16}], [{"value": 1 / 16}], 16).verdict == "within noise"
    assert claims.compare(RATE, [{"value": 0 / 64}], [{"value": 30 / 64}], 64).verdict == "contradicts"
    # the eval's own interval is used as given (here deliberately wide: the same rates become "within noise")
    given = claims.compare(RATE, [{"value": 40 / 64, "n": 64, "ci": [0.0, 1.0]}],
                           [{"value": 10 / 64, "n": 64, "ci": [0.0, 1.0]}], 0)
    assert given.verdict == "within noise" and "concept_rate_ci" in given.how
    # two seeds pool the continuations: 2 x 64
    pooled = claims.compare(RATE, [{"value": 0.5, "n": 64}, {"value": 0.25, "n": 64}],
                            [{"value": 0.0, "n": 64}, {"value": 0.0, "n": 64}], 0)
    assert pooled.a == pytest.approx(48 / 128) and pooled.extra["n_a"] == 128


def test_a_missing_value_is_reported_not_guessed():
    row = claims.compare(RATE, [{"value": None}], [{"value": 0.1}], 16)
    assert row.verdict == "not measured" and "A" in row.how and row.diff is None


# --- the configs it writes ----------------------------------------------------------------------------------------
def _args(tmp_path: Path, **over) -> Namespace:
    ns = dict(out=str(tmp_path), cache="", claims=list(claims.CLAIMS), steps=7, batch_size=64, lr=5e-4, k=8,
              expansion=2, layer=3, n_tokens=4096, grad_tokens=1024, sample_tokens=256, snmf_features=16,
              snmf_iters=5, eval_rows=256, downstream_sequences=1, steering=True, kl=0.5, concept="sport",
              prompts=4, samples=2, new_tokens=8, features=1, seed=3, seeds=2, model=str(claims.MODEL),
              corpus=str(claims.CORPUS))
    ns.update(over)
    return Namespace(**ns)


def test_run_configs_train_both_sides_per_seed_at_one_k_and_parse(tmp_path):
    from dictlearn.run import read_run_config
    from dictlearn.trainers.spec import build_spec

    args = _args(tmp_path)
    widths = {f"{hp}.3": {"width": 24 if hp != "mlp_hidden" else 64}
              for hp in ("resid_post", "mlp_in", "mlp_out", "mlp_hidden")}
    widths["resid_post.3@grad"] = {"width": 24}
    for claim in claims.CLAIMS.values():
        path = tmp_path / f"{claim.name}.toml"
        path.write_text(claims.run_config(claim, tmp_path / claim.name, tmp_path / "cache", args))
        data = read_run_config(path)
        tables = data["decomposers"]
        assert [t["name"] for t in tables] == [f"{claim.a_name}_s3", f"{claim.b_name}_s3",
                                               f"{claim.a_name}_s4", f"{claim.b_name}_s4"]
        assert [t["seed"] for t in tables] == [3, 3, 4, 4]
        assert {t.get("k") for t in tables if t["kind"] != "snmf"} == {8}  # one k: matched L0
        assert data["train"]["n_steps"] == 7 and data["train"]["cache"] == str(tmp_path / "cache")
        assert ("steering" in data["eval"]) == claim.steering
        for table in tables:
            spec = build_spec(table, widths, tmp_path / table["name"], str(path))
            assert spec.name == table["name"]
    gtopk = tomllib.loads(claims.run_config(claims.CLAIMS["gtopk"], tmp_path, tmp_path / "c", args))["decomposers"][0]
    assert gtopk["kind"] == "gtopk" and gtopk["hookpoint_in"] == "resid_post.3"
    off = tomllib.loads(claims.run_config(claims.CLAIMS["snmf"], tmp_path, tmp_path / "c", _args(tmp_path, steering=False)))
    assert "steering" not in off["eval"]


def test_format_claim_prints_every_row_and_how_it_was_decided():
    row = claims.compare(CE, [{"value": 0.9}], [{"value": 0.8}], 16)
    result = {"statement": "A is better", "source": "Someone 2024", "seeds": [0],
              "a": {"kind": "gtopk", "hookpoint_in": "resid_post.10"}, "b": {"kind": "topk", "hookpoint_in": "resid_post.10"},
              "rows": [row.__dict__], "steering_references": {"diffmean@resid_post.10": {
                  "concept_rate": 0.5, "concept_rate_ci": [0.3, 0.7], "p_value": 0.001}}}
    text = claims.format_claim("gtopk", result)
    tol = claims.TOLERANCE["ce_loss_score"]
    assert f"| A better | CE score | 0.900 | 0.800 | +0.100 [{0.1 - tol:+.3f}, {0.1 + tol:+.3f}] | supports |" in text
    assert "assumed tolerance" in text and "- reference diffmean@resid_post.10: concept rate 0.500 [0.300, 0.700]" in text


# --- a real run of one claim (the framework's stages on the SmolLM2 test cache) -----------------------------------
@pytest.mark.slow
def test_smoke_transcoder_claim_on_the_test_cache(smol_cache, tmp_path, capsys):
    out = tmp_path / "claims"
    assert claims.main(["--out", str(out), "--cache", str(smol_cache.path), "--claims", "transcoder", "--steps", "4",
                        "--batch-size", "128", "--sample-tokens", "512", "--eval-rows", "256",
                        "--downstream-sequences", "1", "--no-steering"]) == 0
    printed = capsys.readouterr().out
    assert "| A on par | CE-loss score (spliced) |" in printed
    result = json.loads((out / "claims.json").read_text())["claims"]["transcoder"]
    assert result["a"]["kind"] == "transcoder" and result["b"]["hookpoint_in"] == "mlp_out.10"
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["L0"]["a"] == pytest.approx(rows["L0"]["b"])  # TopK on both sides: the same L0
    assert rows["CE-loss score (spliced)"]["verdict"] in ("supports (within noise)", "supports (A better)", "contradicts")
    assert (out / "cache").is_symlink() and not (Path(smol_cache.path) / "decomposers").exists()


def _fake_cache(folder: Path, arrays: list[str]) -> Path:
    from dictlearn.activations.cache import FORMAT, FORMAT_VERSION, MANIFEST

    folder.mkdir(parents=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "shards": [],
                "hookpoints": {a: {"width": 8, "dtype": "bfloat16"} for a in arrays}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_a_given_cache_is_linked_read_only_and_a_missing_array_is_named(tmp_path):
    given = _fake_cache(tmp_path / "given", ["mlp_in.3", "mlp_out.3", "mlp_hidden.3", "resid_post.3"])
    args = _args(tmp_path / "out", cache=str(given))
    (tmp_path / "out").mkdir()
    chosen = claims.pick_caches([claims.CLAIMS["transcoder"], claims.CLAIMS["snmf"]], args)
    link = tmp_path / "out" / "cache"
    assert chosen == {"transcoder": link, "snmf": link} and link.is_symlink() and link.resolve() == given
    assert sorted(p.name for p in given.iterdir()) == ["manifest.json"]  # nothing written into it
    with pytest.raises(SystemExit, match=r"lacks \['mlp_in.4', 'mlp_out.4'\] for claim 'transcoder'"):
        claims.pick_caches([claims.CLAIMS["transcoder"]], _args(tmp_path / "out", cache=str(given), layer=4))


def test_a_harvested_cache_is_not_silently_replaced_by_a_given_one(tmp_path):
    _fake_cache(tmp_path / "out" / "cache", ["mlp_in.3", "mlp_out.3"])
    given = _fake_cache(tmp_path / "given", ["mlp_in.3", "mlp_out.3"])
    with pytest.raises(SystemExit, match="harvested earlier; use another --out"):
        claims.pick_caches([claims.CLAIMS["transcoder"]], _args(tmp_path / "out", cache=str(given)))
