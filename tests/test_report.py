"""The comparison report (metrics.json, report.md, plots) and `dictlearn eval` end to end on a real cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SavedLinear, registered_saved_linear
from dictlearn.eval.report import check_same_keys, markdown, pareto_front, write_report
from dictlearn.eval.suite import downstream_sequences

PNG = b"\x89PNG\r\n\x1a\n"


def record(name, kind, l0, fvu, score):
    return {"name": name, "kind": kind, "hookpoint_in": "resid_post.3", "hookpoint_out": "resid_post.3",
            "n_features": 64, "n_tokens": 1000, "l0": l0, "fvu": fvu, "explained_variance": 1 - fvu, "cossim": 0.9,
            "l2_ratio": 0.95, "relative_reconstruction_bias": 0.97, "dead_fraction": 0.1, "dense_fraction": 0.0,
            "ce_clean": 2.0, "ce_spliced": 2.3, "ce_ablated": 9.0, "ce_loss_score": score, "kl_score": None,
            "n_downstream_tokens": 500, "freq_hist": {"log10_edges": [-3, -2, -1, 0], "counts": [10, 30, 18], "dead": 6}}


def test_pareto_front_known_answer():
    pts = [(10, 0.3), (20, 0.2), (15, 0.35), (40, 0.1), (30, 0.25), (10, 0.4)]
    assert pareto_front(pts) == [(10, 0.3), (20, 0.2), (40, 0.1)]
    assert pareto_front([]) == []


def test_records_must_share_keys():
    a, b = record("a", "topk", 8, 0.2, 0.9), record("b", "relu", 20, 0.1, 0.95)
    check_same_keys([a, b])
    del b["kl_score"]
    with pytest.raises(ValueError, match="kl_score"):
        check_same_keys([a, b])


def test_report_files(tmp_path):
    recs = [record("topk-8", "topk", 8, 0.3, 0.8), record("topk-32", "topk", 32, 0.15, 0.93),
            record("relu", "relu", 50, 0.2, float("nan"))]
    recs[2]["ce_loss_score"] = None  # as the suite writes a NaN
    write_report(tmp_path, {"model": "m", "cache": "c", "seconds": 12.0}, recs)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["name"] for r in data["decomposers"]] == ["topk-8", "topk-32", "relu"]
    for f in ("fvu_vs_l0.png", "ce_score_vs_l0.png", "freq_hist.png"):
        assert (tmp_path / "plots" / f).read_bytes()[:8] == PNG, f
    assert not (tmp_path / "plots" / "steering_curves.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| topk-32 | topk | resid_post.3 | 64 | 32.0 | 0.1500 |" in md
    assert "| relu |" in md and "| - |" in md  # a missing score shows as "-"
    assert "plots/fvu_vs_l0.png" in md and "Steering" not in md


def test_report_with_steering(tmp_path):
    curve = [{"sign": 1, "kl_target": t, "concept_rate": 0.1 * i, "fluency": 1 - 0.1 * i, "combined": 0.2,
              "concept": 0.3, } for i, t in enumerate([0.1, 0.5, 1.0])]
    summary = {"kl_target": 0.5, "detection_auc": 0.81, "concept_rate": 0.4, "gain_over_random": 0.3, "p_value": 0.001,
               "fluency": 0.9, "combined": 0.55, "feature_concept": 0.2, "feature_fluency": 0.8, "feature_combined": 0.3}
    steering = {"judges": {"heldout_accuracy": {"probe": 0.95, "lexical": 0.9}}, "records": {
        "topk-8": {"kind": "topk", "hookpoint": "resid_post.3", "concept_curve": curve, "feature_curve": curve,
                   "summary": summary},
        "diffmean@resid_post.3": {"kind": "diffmean", "hookpoint": "resid_post.3", "concept_curve": curve,
                                  "feature_curve": [], "summary": summary}}}
    write_report(tmp_path, {"model": "m"}, [record("topk-8", "topk", 8, 0.3, 0.8)], steering=steering)
    assert (tmp_path / "plots" / "steering_curves.png").read_bytes()[:8] == PNG
    md = (tmp_path / "report.md").read_text()
    assert "## Steering (at KL 0.5, sign +1)" in md and "| diffmean@resid_post.3 | diffmean |" in md
    assert "+0.300" in md and "probe 0.950" in md


def test_markdown_without_records_is_valid():
    assert markdown({"model": "m"}, []).startswith("# Evaluation report")


# --- end to end ----------------------------------------------------------------------------------------------------
def save_decomposers(root, cache):
    from dictlearn.decomposers.base import DecomposerConfig, save

    w = {k: v["width"] for k, v in cache.hookpoints.items()}
    for name, cfg in {
        "sae": DecomposerConfig(d_in=w["resid_post.10"], n_features=256, hookpoint_in="resid_post.10", seed=1),
        "tc": DecomposerConfig(d_in=w["mlp_in.10"], d_out=w["mlp_out.10"], n_features=128, hookpoint_in="mlp_in.10",
                               hookpoint_out="mlp_out.10", seed=2),
    }.items():
        save(SavedLinear(cfg, rngs=__import__("flax").nnx.Rngs(cfg.seed)), root / "decomposers" / name)


@pytest.fixture
def saved_linear_kind():
    with registered_saved_linear() as cls:
        yield cls


def test_dictlearn_eval_end_to_end(smol_cache, tmp_path, capsys, saved_linear_kind):
    from dictlearn.cli import main

    root = tmp_path / "run"
    save_decomposers(root, smol_cache)
    config = tmp_path / "run.toml"
    config.write_text(f'out_dir = "{root}"\n[eval]\nn_eval_rows = 1500\nbatch_size = 512\nn_downstream_sequences = 2\n'
                      f'downstream_context = 24\nn_feature_cards = 3\ntop_k_contexts = 4\n[train]\ncache = "{smol_cache.path}"\n')
    assert main(["eval", str(config)]) == 0
    out = root / "eval"
    tokens = downstream_sequences(smol_cache, 2, 24)[:, :-1]
    scored = int((~np.isin(tokens, smol_cache.manifest["excluded_token_ids"]) & (np.arange(tokens.shape[1]) > 0)).sum())  # sink left out
    assert 0 < scored < tokens.size  # the sequences start with BOS
    data = json.loads((out / "metrics.json").read_text())
    recs = {r["name"]: r for r in data["decomposers"]}
    assert set(recs) == {"sae", "tc"} and set(recs["sae"]) == set(recs["tc"])
    for r in recs.values():
        assert r["n_tokens"] == 1500 and 0 < r["fvu"] and 0 < r["l0"] < r["n_features"]
        assert r["ce_clean"] > 0 and r["ce_spliced"] > 0 and r["ce_ablated"] > 0 and r["ce_loss_score"] is not None
        assert r["n_downstream_tokens"] == scored  # predictions made at special tokens are not scored
        assert r["steering"] is None
    assert recs["tc"]["hookpoint_out"] == "mlp_out.10" and recs["tc"]["d_out"] == 576
    assert recs["sae"]["ce_ablated"] > recs["sae"]["ce_clean"] + 1  # zeroing the residual stream is ruinous
    assert recs["sae"]["ce_clean"] == recs["tc"]["ce_clean"]  # one shared clean pass
    cards = json.loads((out / "feature_cards" / "sae" / "cards.json").read_text())
    assert len(cards["features"]) == 3 and all(c["contexts"] and c["vocab"] for c in cards["features"])
    assert (out / "feature_cards" / "tc" / "index.html").is_file() and (out / "plots" / "fvu_vs_l0.png").is_file()
    assert "| sae | test_saved_linear |" in (out / "report.md").read_text()
    # a second run reuses the unchanged results; --only/--force re-evaluates one
    capsys.readouterr()
    assert main(["eval", str(config)]) == 0
    assert "reusing the results of sae, tc" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["decomposers"] == data["decomposers"]
    assert main(["eval", str(config), "--only", "tc", "--force", "--set", "eval.n_feature_cards=0"]) == 0
    assert [r["name"] for r in json.loads((out / "metrics.json").read_text())["decomposers"]] == ["tc"]


def test_dictlearn_eval_errors(smol_cache, tmp_path, capsys):
    from dictlearn.cli import main

    config = tmp_path / "run.toml"
    config.write_text(f'out_dir = "{tmp_path / "run"}"\n[eval]\nn_eval_rowz = 5\n')
    assert main(["eval", str(config)]) == 1
    assert "n_eval_rowz" in capsys.readouterr().err
    config.write_text(f'out_dir = "{tmp_path / "run"}"\n[train]\ncache = "{smol_cache.path}"\n')
    assert main(["eval", str(config)]) == 1
    assert "dictlearn train" in capsys.readouterr().err  # no decomposers yet
