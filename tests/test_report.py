"""The comparison report (metrics.json, report.md, plots) and `dictlearn eval` end to end on a real cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SavedLinear, registered_saved_linear
from dictlearn.eval.report import (check_same_keys, markdown, off_target, pareto_front, plot_fvu, plot_steering,
                                   write_report)
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
    assert "| topk-32 | topk | resid_post.3 | 64 | 32.0 | - | 0.1500 |" in md
    assert "| relu |" in md and "| - |" in md  # a missing score shows as "-"
    assert "plots/fvu_vs_l0.png" in md and "Steering" not in md and " ⚠ |" not in md  # no target: nothing marked
    assert (tmp_path / "plots" / "downstream.png").read_bytes()[:8] == PNG
    for absent in ("Sparse probing", "Feature matching", "Out of distribution", "steering/index.html"):
        assert absent not in md, absent


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
    assert "## Steering\n\nAt KL 0.5 from the unsteered model, sign +1" in md and "| diffmean@resid_post.3 | diffmean |" in md
    assert "+0.300" in md and "probe 0.950" in md


def test_off_target_is_marked_in_the_table():
    recs = [record("topk", "topk", 32, 0.2, 0.9), record("relu", "relu", 60, 0.1, 0.9), record("jr", "jumprelu", 25, 0.1, 0.9),
            record("snmf", "snmf", 120, 0.3, 0.8)]
    for r, target in zip(recs, (32, 40, 32, None)):
        r["l0_target"] = target
    assert [off_target(r) for r in recs] == [False, True, True, False]  # 60 vs 40: 50 % off; 25 vs 32: 22 % off
    md = markdown({"model": "m"}, recs)
    assert "| relu | relu | resid_post.3 | 64 | 60.0 ⚠ | 40 |" in md and "| jr | jumprelu | resid_post.3 | 64 | 25.0 ⚠ |" in md
    assert "| topk | topk | resid_post.3 | 64 | 32.0 | 32 |" in md and "| snmf | snmf | resid_post.3 | 64 | 120.0 | - |" in md


def test_sections_render_from_constructed_results(tmp_path):
    recs = [record("topk", "topk", 32, 0.2, 0.9), record("snmf", "snmf", 120, 0.3, 0.8)]
    for r, k1, k5, ab in zip(recs, (0.71, 0.6), (0.82, 0.7), (0.05, None)):
        r.update(sparse_probe_k1=k1, sparse_probe_k5=k5, absorption_rate=ab)
    probing = {"tasks": {"bbc": {"classes": ["sport", "tech"], "n_train": 80, "n_test": 20,
                                 "full_accuracy": {"resid_post.3": 0.95}}},
               "records": {"topk": {"hookpoint": "resid_post.3", "accuracy": {}, "mean": {"1": 0.71, "2": 0.75, "5": 0.82, "10": 0.9},
                                    "full_mean": 0.95}}, "skipped": {"snmf": "reads mlp_hidden"}, "seconds": 3}
    absorption = {"probe": {"resid_post.3": {"accuracy": 0.62, "n_train": 300, "n_test": 100, "chance": 0.08}},
                  "records": {"topk": {"hookpoint": "resid_post.3", "absorption_rate": 0.05, "full_absorption_rate": 0.11,
                                       "n_letters": 12, "mean_f1": 0.4, "probe_accuracy": 0.62}}, "skipped": {}}
    matching = {"pairs": [{"a": "topk", "b": "snmf", "space": "resid_post.3", "relation": "different kinds",
                           "decoder_cos_mean": 0.41, "decoder_cos_median": 0.38, "decoder_frac_above_0.7": 0.07,
                           "activation_corr_mean": 0.2, "activation_corr_median": 0.15, "n_rows": 4096,
                           "n_features_a": 64, "n_features_b": 16}], "skipped": {}}
    ood_recs = [dict(recs[0], fvu=0.35, l0=30.0, ce_loss_score=0.7)]
    ood = {"wiki": {"corpus": "/data/wiki.txt", "n_tokens": 5000, "records": ood_recs}}
    (tmp_path / "steering").mkdir()
    (tmp_path / "steering" / "index.html").write_text("<html></html>")
    steering = {"records": {"topk": {"kind": "topk", "hookpoint": "resid_post.3", "concept_curve": [], "feature_curve": [],
                                     "summary": {"kl_target": 0.5, "concept_rate": 0.25, "concept_rate_ci": [0.15, 0.38],
                                                 "n_continuations": 64, "p_value": 0.004,
                                                 "gate_removed": {"loss": 0.1, "bigram": 0.05, "either": 0.125},
                                                 "input_score": 0.5, "output_score": 0.25}}}}
    fake_plot = []

    def plot_matching(result, path):
        fake_plot.append(result)
        path.write_bytes(PNG)
        return True

    import types, sys
    module = types.ModuleType("dictlearn.eval.matching")
    module.plot_matching = plot_matching
    real = sys.modules.get("dictlearn.eval.matching")
    sys.modules["dictlearn.eval.matching"] = module
    try:
        write_report(tmp_path, {"model": "m"}, recs, steering=steering,
                     sections={"probing": probing, "absorption": absorption, "matching": matching, "ood": ood})
    finally:
        if real is not None:
            sys.modules["dictlearn.eval.matching"] = real
        else:
            del sys.modules["dictlearn.eval.matching"]
    md = (tmp_path / "report.md").read_text()
    assert "| topk | 0.710 | 0.820 | 0.050 |" in md and "| snmf | 0.600 | 0.700 | - |" in md  # record columns
    assert "| topk | resid_post.3 | 0.710 | 0.750 | 0.820 | 0.900 | 0.950 |" in md  # k=1,2,5,10 and the full probe
    assert "| bbc | sport, tech | 80 | 20 | 0.950 |" in md and "snmf: no sparse probing (reads mlp_hidden)" in md
    assert "| topk | resid_post.3 | 0.050 | 0.110 | 0.400 | 12 | 0.620 |" in md  # absorption with the probe's accuracy
    assert "| resid_post.3 | 0.620 | 0.080 | 300 | 100 |" in md
    assert "| topk | snmf | resid_post.3 | different kinds | 0.410 | 0.380 | 0.070 | 0.200 | 0.150 | 4,096 |" in md
    assert fake_plot and "![matching](plots/matching.png)" in md
    assert "| FVU (in dist.) | FVU (wiki) |" in md and "| topk | 0.2000 | 0.3500 | 32.0 | 30.0 | 0.900 | 0.700 |" in md
    assert "| snmf | 0.3000 | - |" in md and "5,000 held-out tokens of `/data/wiki.txt`" in md
    assert "0.250 [0.15, 0.38] | 64 |" in md and "| 0.500 | 0.250 | 10% / 5% / 12% |" in md
    assert "[steering/index.html](steering/index.html)" in md
    for title, sentence in [("## Sparse probing and absorption", "logistic probe"), ("## Feature matching", "cosine"),
                            ("## Out of distribution", "training distribution")]:
        assert title in md and sentence in md.split(title, 1)[1].split("|", 1)[0], title  # a sentence under each title


def test_single_kl_target_draws_bars(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = {"records": {n: {"kind": k, "concept_curve": [{"sign": 1, "kl_target": 0.5, "concept_rate": v, "fluency": 0.5,
                                                         "combined": 0.2}], "feature_curve": []}
                       for n, k, v in (("topk", "topk", 0.1), ("diffmean", "diffmean", 0.3))}}
    fig = plot_steering(one, plt)
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert bars == pytest.approx([0.1, 0.3]) and not fig.axes[0].lines  # bars, not one-point lines
    plt.close(fig)
    two = {"records": {"topk": {"kind": "topk", "concept_curve": [{"sign": 1, "kl_target": t, "concept_rate": 0.1,
                                                                  "fluency": 0.5, "combined": 0.2} for t in (0.5, 1.0)]}}}
    fig = plot_steering(two, plt)
    assert len(fig.axes[0].lines) == 1 and not fig.axes[0].patches
    plt.close(fig)


def test_fvu_plot_has_a_panel_per_written_space():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [record("a", "topk", 32, 0.2, 0.9), record("b", "relu", 30, 0.25, 0.9), record("c", "snmf", 100, 0.4, 0.8)]
    recs[2]["hookpoint_out"] = "mlp_hidden.3"
    fig = plot_fvu(recs, {"topk": "C0", "relu": "C1", "snmf": "C2"}, plt)
    assert [ax.get_title() for ax in fig.axes] == ["writes resid_post.3", "writes mlp_hidden.3"]
    plt.close(fig)


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
