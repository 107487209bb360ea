"""Writes the two notebooks (kept as code so review diffs stay readable): python notebooks/make_notebooks.py"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

SETUP = '''import json, os
from pathlib import Path

import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

# The quickstart's outputs (run `dictlearn run configs/quickstart.toml` from the project root first).
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
RUN = Path(os.environ.get("DICTLEARN_RUN", ROOT / "runs" / "quickstart"))
assert (RUN / "eval" / "metrics.json").is_file(), f"no evaluated run in {RUN}: run `dictlearn run configs/quickstart.toml` first"
metrics = json.loads((RUN / "eval" / "metrics.json").read_text())
records = {r["name"]: r for r in metrics["decomposers"]}
sorted(records)'''


def quickstart() -> nbf.NotebookNode:
    return nbf.v4.new_notebook(cells=[
        nbf.v4.new_markdown_cell("# dictlearn quickstart\n\nLoad the quickstart's dictionaries, look at the "
                                 "comparison, browse feature cards, and steer SmolLM2 with a feature."),
        nbf.v4.new_code_cell(SETUP),
        nbf.v4.new_markdown_cell("## The comparison table\n\nThe report the evaluation suite wrote "
                                 "(same keys for every decomposer)."),
        nbf.v4.new_code_cell('''from IPython.display import Markdown, display
display(Markdown((RUN / "eval" / "report.md").read_text().split("![")[0]))'''),
        nbf.v4.new_code_cell('''fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for name, r in records.items():
    axes[0].scatter(r["l0"], r["fvu"]); axes[0].annotate(name, (r["l0"], r["fvu"]), fontsize=8)
    if r.get("ce_loss_score") is not None:
        axes[1].scatter(r["l0"], r["ce_loss_score"]); axes[1].annotate(name, (r["l0"], r["ce_loss_score"]), fontsize=8)
axes[0].set(xlabel="L0", ylabel="FVU (held-out)", xscale="log"); axes[1].set(xlabel="L0", ylabel="CE-loss score", xscale="log")
fig.tight_layout()
assert all(0 <= r["fvu"] < 1.5 for r in records.values())'''),
        nbf.v4.new_markdown_cell("## Load a dictionary\n\nEvery decomposer is saved in the native format "
                                 "(`config.json` + `params.safetensors`) and reads raw activations."),
        nbf.v4.new_code_cell('''import jax.numpy as jnp
import dictlearn.decomposers as decomposers
from dictlearn.activations.cache import ActivationCache
from dictlearn.activations.loader import BatchLoader

sae = decomposers.load(RUN / "decomposers" / "topk")
cache = ActivationCache.open(RUN / "cache")
batch = BatchLoader(cache, [sae.config.hookpoint_in], 512, split="eval", seed=0, prefetch=0).batch(0)
x = jnp.asarray(batch[sae.config.hookpoint_in])
codes = sae.encode(x)
x_hat = sae.decode(codes)
fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
print(f"{sae.kind}: {sae.config.n_features} features, L0 {float((codes > 0).sum(1).mean()):.1f}, FVU on 512 held-out rows {fvu:.3f}")'''),
        nbf.v4.new_markdown_cell("## Feature cards\n\nThe suite wrote JSON and static HTML "
                                 "(`eval/feature_cards/<name>/index.html`) for a sample of live features."),
        nbf.v4.new_code_cell('''cards = json.loads((RUN / "eval" / "feature_cards" / "topk" / "cards.json").read_text())["features"]
for card in cards[:4]:
    print(f"feature {card['index']}: frequency {card['frequency']:.4f}, max activation {card['max_activation']:.2f}")
    print("   promotes:", " ".join(repr(v["token"]) for v in card.get("vocab", [])[:8]))
    for ctx in card["contexts"][:3]:
        toks = ctx["tokens"]; h = ctx["highlight"]
        print(f"   {ctx['activation']:7.2f}  " + "".join(toks[:h]) + " [[" + toks[h] + "]] " + "".join(toks[h + 1:]))
print("browse:", RUN / "eval" / "feature_cards" / "topk" / "index.html")'''),
        nbf.v4.new_markdown_cell("## Steer with a feature\n\nAdd alpha times a feature's decoder direction to the "
                                 "residual stream at every position, keeping the reconstruction error (h + alpha v)."),
        nbf.v4.new_code_cell('''import tomllib
from dictlearn.activations.models import ModelConfig
from dictlearn.config import from_dict
from dictlearn.export.features import read_features
from dictlearn.steering.steer import generate, steer

model_cfg = from_dict(ModelConfig, tomllib.loads((ROOT / "configs" / "quickstart.toml").read_text())["model"])
if not Path(model_cfg.name).is_absolute():
    model_cfg.name = str((ROOT / model_cfg.name).resolve())
lm = model_cfg.load()
feats = read_features(RUN / "export" / "topk")
feature = cards[0]["index"]
prompt = "Yesterday the minister said"
plain = generate(lm, lm.tokenizer, prompt, max_new_tokens=24)
with steer(lm, feats.hookpoint, feats.vectors[feature], 8.0 * float(np.mean([c["max_activation"] for c in cards]))):
    steered = generate(lm, lm.tokenizer, prompt, max_new_tokens=24)
print("unsteered:", plain)
print(f"steered (feature {feature}):", steered)
assert plain != steered'''),
    ])


def compare() -> nbf.NotebookNode:
    return nbf.v4.new_notebook(cells=[
        nbf.v4.new_markdown_cell("# Comparing decompositions\n\nSAEs, a transcoder and semi-NMF were trained on the "
                                 "same cached activations of SmolLM2 layer 10. How do their features relate?"),
        nbf.v4.new_code_cell(SETUP),
        nbf.v4.new_code_cell('''import dictlearn.decomposers as decomposers
loaded = {name: decomposers.load(RUN / "decomposers" / name) for name in records}
for name, d in loaded.items():
    r = records[name]
    print(f"{name:10s} {d.kind:10s} {d.config.hookpoint_in:>14s} -> {d.config.hookpoint_out:<14s} "
          f"features {d.config.n_features:5d}  L0 {r['l0']:7.1f}  FVU {r['fvu']:.3f}  CE score {r.get('ce_loss_score')}")'''),
        nbf.v4.new_markdown_cell("## Do different SAEs find the same directions?\n\nFor each TopK feature, the best "
                                 "cosine with any feature of each other SAE on the same hookpoint."),
        nbf.v4.new_code_cell('''def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

ref = unit(loaded["topk"].features())
same_site = [n for n, d in loaded.items() if n != "topk" and d.config.hookpoint_out == loaded["topk"].config.hookpoint_out]
fig, ax = plt.subplots(figsize=(6, 4))
for name in same_site:
    best = (ref @ unit(loaded[name].features()).T).max(1)
    ax.hist(best, bins=40, range=(0, 1), histtype="step", label=name)
    print(f"topk vs {name}: median best cosine {np.median(best):.2f}, share above 0.9: {(best > 0.9).mean():.2f}")
ax.set(xlabel="best cosine with a topk feature", ylabel="features"); ax.legend()'''),
        nbf.v4.new_markdown_cell("## Firing frequencies\n\nDead and dense latents at a glance (from the suite's "
                                 "per-feature statistics)."),
        nbf.v4.new_code_cell('''fig, ax = plt.subplots(figsize=(6, 4))
for name in records:
    stats_path = RUN / "eval" / "feature_cards" / name / "features.json"
    if stats_path.is_file():
        freq = np.asarray(json.loads(stats_path.read_text())["frequency"])
        ax.hist(np.log10(freq[freq > 0]), bins=40, histtype="step", label=f"{name} ({(freq == 0).mean():.0%} dead)")
ax.set(xlabel="log10 firing frequency", ylabel="features"); ax.legend(fontsize=7)'''),
        nbf.v4.new_markdown_cell("## Semi-NMF features in the residual stream\n\nSemi-NMF factorises the MLP's hidden "
                                 "activation; through the MLP's output projection each feature is a direction the "
                                 "MLP writes. How close are those to the transcoder's features (which also write "
                                 "`mlp_out.10`)?"),
        nbf.v4.new_code_cell('''snmf, tc = loaded["snmf"], loaded["transcoder"]
resid = unit(snmf.resid_features())
best = (resid @ unit(tc.features()).T).max(1)
print(f"semi-NMF ({resid.shape[0]} features) vs transcoder ({tc.config.n_features}): median best cosine {np.median(best):.2f}")
assert resid.shape[1] == tc.config.d_out'''),
    ])


if __name__ == "__main__":
    for name, nb in {"quickstart.ipynb": quickstart(), "compare_decompositions.ipynb": compare()}.items():
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, HERE / name)
        print("wrote", HERE / name)
