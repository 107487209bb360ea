"""Scoring saved dictionaries on other text (`dictlearn eval --corpus`, [[eval.ood]]), the eval stage's optional
parts ([eval.probing], [eval.absorption], [eval.matching]: written once, reused while unchanged, their scalars
merged into the records), and the command-line switches for them (`--set eval.steering=false`)."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CORPUS

HP = "resid_post.1"
CHEAP = ("[eval]\nn_eval_rows = 512\nbatch_size = 128\nn_downstream_sequences = 0\nn_feature_cards = 0\n")


def _second_corpus(path: Path) -> Path:
    """A small corpus unlike the run's: numbered shopping lists."""
    items = ["apples", "bread", "milk", "eggs", "rice", "beans", "tea", "soap"]
    with gzip.open(path, "wt") as f:
        for i in range(120):
            text = "Shopping list %d: " % i + ", ".join(f"{(i * j) % 7 + 1} {items[(i + j) % 8]}" for j in range(12))
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture
def tiny_run(tmp_path, tiny_harvest, tiny_loaded):
    """(config path, make_run(*overrides) -> Run with the tiny model attached, out_dir): a run folder with a cache of
    the tiny GPT-2 on the English corpus and two saved TopK dictionaries on resid_post.1."""
    from dictlearn.decomposers import base
    from dictlearn.run import Run

    out = tmp_path / "run"
    tiny_harvest(out=out / "cache", hookpoints=[HP], n_tokens=2048, context_length=64)
    for name, seed in (("a", 0), ("b", 1)):
        base.save(base.build("topk", dict(d_in=32, n_features=64, k=4, hookpoint_in=HP, seed=seed)),
                  out / "decomposers" / name)
    config = tmp_path / "run.toml"
    config.write_text(f'out_dir = "{out}"\n[corpus]\npath = "{CORPUS}"\ncontext_length = 64\n' + CHEAP)

    def make(*overrides: str) -> Run:
        run = Run.from_config(config, list(overrides))
        run._model = tiny_loaded  # the tiny model is not loadable by name: attach it
        return run

    return config, make, out


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ood_args(config: Path, corpus: Path, **kw):
    from dictlearn.cli.evaluate import EvalArgs

    return EvalArgs(config=config, corpus=str(corpus), label="shop", **{"n_tokens": 1024, **kw})


def test_ood_scores_land_beside_eval_and_leave_it_byte_identical(tiny_run, tmp_path):
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.cli.evaluate import eval_stage, ood_only_stage

    config, make, out = tiny_run
    eval_stage(make(), log=lambda s: None)
    before = _tree_digest(out / "eval")
    lines: list[str] = []
    section = ood_only_stage(make(), _ood_args(config, _second_corpus(tmp_path / "shop.jsonl.gz")), log=lines.append)

    assert _tree_digest(out / "eval") == before  # the in-distribution results are not touched
    folder = out / "eval_ood" / "shop"
    cache = ActivationCache.open(folder / "cache")
    assert cache.shard_ids("eval") == cache.shard_ids("all") and not cache.shard_ids("train")  # eval-only
    assert list(cache.hookpoints) == [HP] and cache.context_length == 64
    assert cache.manifest["identity"]["harvest"]["dtype"] == "float32"  # the run cache's dtype
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [r["name"] for r in metrics["decomposers"]] == ["a", "b"] == [r["name"] for r in section["records"]]
    assert {p.name for p in (folder / "records").glob("?.json")} == {"a.json", "b.json"}
    home = {r["name"]: r for r in (json.loads((out / "eval" / "records" / f"{n}.json").read_text()) for n in "ab")}
    for r in metrics["decomposers"]:
        assert 0 < r["fvu"] and r["fvu"] != home[r["name"]]["fvu"]  # other rows, other figures
    table = "\n".join(lines).splitlines()
    assert any(line.split()[:1] == ["a"] and f"{home['a']['fvu']:.3f}" in line for line in table)  # side by side

    # unchanged: reused, nothing harvested or scored again; another n_tokens: harvested again
    lines.clear()
    ood_only_stage(make(), _ood_args(config, tmp_path / "shop.jsonl.gz"), log=lines.append)
    assert any("reusing the results of a, b" in line for line in lines), lines
    assert not any("harvesting it again" in line for line in lines)
    lines.clear()
    ood_only_stage(make(), _ood_args(config, tmp_path / "shop.jsonl.gz", n_tokens=2048), log=lines.append)
    assert any("harvesting it again" in line for line in lines) and not any("reusing" in line for line in lines)
    assert ActivationCache.open(folder / "cache").manifest["n_tokens"] == 2048


def test_eval_ood_entries_run_in_the_eval_stage_and_reach_the_report(tiny_run, tmp_path):
    from dictlearn.cli.evaluate import eval_stage

    config, make, out = tiny_run
    shop = _second_corpus(tmp_path / "shop.jsonl.gz")
    entry = f'eval.ood=[{{label = "shop", corpus = {{path = "{shop}"}}, n_tokens = 1024}}]'
    metrics = eval_stage(make(entry), log=lambda s: None)
    assert (out / "eval_ood" / "shop" / "metrics.json").is_file()
    assert metrics["meta"]["part_seconds"]["shop"] > 0
    report = (out / "eval" / "report.md").read_text()
    assert "shop" in report and str(shop) in report  # the out-of-distribution section names the text
    assert all(r["sparse_probe_k1"] is None and r["absorption_rate"] is None for r in metrics["decomposers"])


def test_bad_ood_corpus_is_a_sentence_not_a_traceback(tiny_run, capsys):
    from dictlearn.cli import main

    config, _, out = tiny_run
    assert main(["eval", str(config), "--corpus", "/no/such/corpus.jsonl.gz"]) == 1
    err = capsys.readouterr().err
    assert "dictlearn eval:" in err and "/no/such/corpus.jsonl.gz" in err and "Traceback" not in err, err
    assert not (out / "eval_ood").exists()
    assert main(["eval", str(config), "--set", 'eval.ood=[{label = "a/b", corpus = {path = "x"}}]']) == 1
    assert "plain folder name" in capsys.readouterr().err


def test_optional_parts_switch_from_the_command_line(tiny_run):
    from dictlearn.config import ConfigError
    from dictlearn.eval.matching import MatchingConfig
    from dictlearn.eval.steering import SteeringConfig
    from dictlearn.eval.suite import EvalConfig, stage_config

    _, make, _ = tiny_run
    with_table = ["eval.steering.n_prompts=3", "eval.matching.n_rows=100"]
    cfg = make(*with_table).section(EvalConfig, "eval")
    assert stage_config(cfg, "steering").n_prompts == 3 and stage_config(cfg, "matching").n_rows == 100
    off = make(*with_table, "eval.steering=false", "eval.matching=false").section(EvalConfig, "eval")
    assert off.steering is None and stage_config(off, "steering") is None and stage_config(off, "matching") is None
    on = make("eval.steering=true", "eval.matching=true").section(EvalConfig, "eval")
    assert stage_config(on, "steering") == SteeringConfig() and stage_config(on, "matching") == MatchingConfig()
    with pytest.raises(ConfigError, match="steering must be a table, true or false"):
        make("eval.steering=3").section(EvalConfig, "eval")
    with pytest.raises(ConfigError, match=r"\[eval.matching\]: unknown key"):
        stage_config(make("eval.matching.nrows=3").section(EvalConfig, "eval"), "matching")


# --- the optional parts, wired with stand-ins of the stages (the contracts' shapes) -------------------------------
@dataclass
class FakeProbingConfig:
    ks: list[int] = None
    seed: int = 0


@dataclass
class FakeAbsorptionConfig:
    seed: int = 0


def _fake_modules(monkeypatch, calls: list[str]) -> None:
    def run_probing(loaded, decomposers, cfg, corpus_path, chat_path, log):
        calls.append("probing")
        assert corpus_path == str(CORPUS) and hasattr(loaded, "tokenizer")
        return {"config": {"seed": cfg.seed}, "tasks": {},
                "records": {n: {"hookpoint": HP, "accuracy": {}, "mean": {"1": 0.5 + i / 10, "5": 0.75},
                                "full_mean": 0.9} for i, n in enumerate(decomposers)}, "skipped": {}}

    def run_absorption(loaded, decomposers, cfg, log):
        calls.append("absorption")
        return {"config": {}, "probe": {}, "records": {"a": {"hookpoint": HP, "absorption_rate": 0.25}},
                "skipped": {"b": "a reason"}}

    probing = types.ModuleType("dictlearn.eval.probing")
    probing.ProbingConfig, probing.run_probing = FakeProbingConfig, run_probing
    absorption = types.ModuleType("dictlearn.eval.absorption")
    absorption.AbsorptionConfig, absorption.run_absorption = FakeAbsorptionConfig, run_absorption
    monkeypatch.setitem(sys.modules, "dictlearn.eval.probing", probing)
    monkeypatch.setitem(sys.modules, "dictlearn.eval.absorption", absorption)


def test_parts_are_written_reused_and_merged_into_the_records(tiny_run, monkeypatch):
    from dictlearn.cli.evaluate import eval_stage

    _, make, out = tiny_run
    calls: list[str] = []
    _fake_modules(monkeypatch, calls)
    parts = ("eval.probing=true", "eval.absorption=true", "eval.matching.n_rows=256")
    metrics = eval_stage(make(*parts), log=lambda s: None)
    assert calls == ["probing", "absorption"]
    for name in ("probing", "absorption", "matching"):
        assert json.loads((out / "eval" / f"{name}.json").read_text())["seconds"] >= 0
    matching = json.loads((out / "eval" / "matching.json").read_text())
    assert [(p["a"], p["b"]) for p in matching["pairs"]] == [("a", "b"), ("b", "a")]
    recs = {r["name"]: r for r in metrics["decomposers"]}
    assert (recs["a"]["sparse_probe_k1"], recs["b"]["sparse_probe_k1"], recs["a"]["sparse_probe_k5"]) == (0.5, 0.6, 0.75)
    assert recs["a"]["absorption_rate"] == 0.25 and recs["b"]["absorption_rate"] is None  # skipped: None
    saved = json.loads((out / "eval" / "metrics.json").read_text())["decomposers"]
    assert {r["name"]: r["sparse_probe_k1"] for r in saved} == {"a": 0.5, "b": 0.6}

    eval_stage(make(*parts), log=lambda s: None)
    assert calls == ["probing", "absorption"]  # unchanged: read back
    eval_stage(make(*parts, "eval.probing.seed=1"), log=lambda s: None)
    assert calls == ["probing", "absorption", "probing"]  # an option changed: that part alone runs again
    (out / "eval" / "absorption.json").write_text("{}")
    eval_stage(make(*parts, "eval.probing.seed=1"), log=lambda s: None)
    assert calls[-1] == "absorption"  # a damaged output is redone, never read back


def test_eval_only_harvest_holds_every_shard_out_and_training_refuses_it(tiny_harvest, tiny_kind, tmp_path, capsys):
    from conftest import CLI_CONFIG

    from dictlearn.activations.harvest import eval_shard_ids
    from dictlearn.cli import main

    assert eval_shard_ids(5, 1.0) == [0, 1, 2, 3, 4] and eval_shard_ids(1, 1.0) == [0]
    assert eval_shard_ids(5, 0.2) == [2]  # below 1: unchanged
    cache = tiny_harvest(out=tmp_path / "held", eval_fraction=1.0, n_tokens=1024)
    assert cache.rows("eval") == cache.rows("all") > 0 and cache.rows("train") == 0
    cache.verify(checksums=True)
    config = tmp_path / "t.toml"
    config.write_text(CLI_CONFIG.format(out=tmp_path / "o", wandb="disabled")
                      .replace("[train]\n", f'[train]\ncache = "{cache.path}"\n'))
    capsys.readouterr()
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "eval-only" in err and "nothing to train on" in err and "Traceback" not in err, err
