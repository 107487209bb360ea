"""Reproduce the seed papers' claims on our setup and print our numbers next to each claim.

    python bench/claims.py --out /tmp/claims --cache runs/quickstart/cache --steps 300

Three comparisons, each one run folder under --out with its own config.toml, trained and evaluated by the
framework's own stages (`dictlearn train`, `dictlearn eval`) on one cache with one budget:

  gtopk       gradient TopK vs TopK at the same k on resid_post.L (Olmo et al., "Features that Make a
              Difference": better downstream loss and steering). Needs `resid_post.L@grad` in the cache; when
              --cache has none, a gradient cache of --grad-tokens is harvested into <out>/grad_cache.
  transcoder  a TopK transcoder mlp_in.L -> mlp_out.L vs a TopK SAE on mlp_out.L at the same k, so the same
              L0 (Dunefsky et al., "Transcoders find interpretable LLM feature circuits": CE loss on par).
  snmf        semi-NMF on mlp_hidden.L vs a TopK SAE on resid_post.L, steering (Shafran et al., "Decomposing
              MLP activations into interpretable features via semi-NMF": semi-NMF features steer better).

Without --cache, one cache of --n-tokens (resid_post, mlp_in, mlp_out, mlp_hidden of layer L) is harvested into
<out>/cache. A given --cache is only read (symlinked as <out>/cache; nothing is written into it).

How a verdict is decided, per metric, on the difference A - B (A is the claim's subject):
  - a rate (the steering concept rate): the 95 % interval of the difference of two proportions (Newcombe's
    method from each side's Wilson interval: the steering eval's own `concept_rate_ci` when it gives one and
    there is one seed, else Wilson on the continuations pooled over seeds);
  - any other number with two or more seeds: the 95 % t-interval of the per-seed paired differences;
  - with one seed there is no measured noise for such numbers: the interval is A - B +/- an assumed tolerance
    (TOLERANCE below, printed in the table), and the table says so.
Then "supports" when the whole interval lies on the claimed side, "contradicts" when it lies on the other side,
"within noise" when it straddles zero (for an "on par" claim, a straddle supports it). Metrics the paper makes
no claim about are shown with "not claimed".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DICTLEARN_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = ASSETS / "english-corpus.jsonl.gz"

# Assumed noise of a scalar metric's A - B when there is only one seed (the table says so next to it). FVU and
# CE-loss score: about twice the seed-to-seed sd of the paired difference measured with --seeds 3 on the
# transcoder claim (0.005 and 0.015, docs/benchmarks.md); the CE increase's 0.003 there was at mlp_out, whose
# ablation costs 0.2 nats, so the residual stream's 10x larger increases keep 0.02; the rest are not measured.
TOLERANCE = {"fvu": 0.01, "ce_loss_score": 0.03, "ce_loss_increase": 0.02, "feature_concept": 0.02,
             "detection_auc": 0.05, "l0": 1.0}
Z95 = 1.959964


# --- what each paper claims ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One row of a claim's table: where the number is in an eval record and what the paper says about it."""

    key: str  # a key of the eval record, or "steering.<key>" for its steering summary
    label: str
    higher_is_better: bool
    claim: str | None = None  # "better" (A beats B) | "on par" (A not worse than B) | None (not claimed)
    rate: bool = False  # a proportion of judged continuations (its interval comes from counts)

    @property
    def name(self) -> str:
        return self.key.split(".")[-1]


@dataclass(frozen=True)
class Claim:
    name: str
    source: str
    statement: str
    a_name: str  # the claim's subject, as named in the run folder (suffixed _s<seed>)
    a: dict[str, Any]  # its [[decomposers]] table ("{L}" stands for the layer, "{k}" for k)
    b_name: str  # what it is compared with
    b: dict[str, Any]
    metrics: tuple[Metric, ...]
    steering: bool
    needs: tuple[str, ...]  # cache arrays the two need ("{L}": the layer)


FVU = Metric("fvu", "FVU (held-out)", higher_is_better=False)
L0 = Metric("l0", "L0", higher_is_better=False)
CE_SCORE = Metric("ce_loss_score", "CE-loss score (spliced)", higher_is_better=True)
CE_UP = Metric("ce_loss_increase", "CE increase, nats (spliced)", higher_is_better=False)
RATE = Metric("steering.concept_rate", "steering concept rate", higher_is_better=True, rate=True)
FEATURE = Metric("steering.feature_concept", "feature concept score", higher_is_better=True)
AUC = Metric("steering.detection_auc", "concept detection AUC", higher_is_better=True)


def _claimed(metric: Metric, claim: str) -> Metric:
    return Metric(metric.key, metric.label, metric.higher_is_better, claim, metric.rate)


CLAIMS = {c.name: c for c in (
    Claim("gtopk", "Olmo et al. 2024, Features that Make a Difference (g-SAE)",
          "gradient TopK beats TopK at the same k on downstream loss and steering",
          a_name="gtopk", b_name="topk",
          a={"kind": "gtopk", "hookpoint_in": "resid_post.{L}", "k": "{k}", "expansion": "{expansion}", "beta": 1.0},
          b={"kind": "topk", "hookpoint_in": "resid_post.{L}", "k": "{k}", "expansion": "{expansion}"},
          metrics=(FVU, L0, _claimed(CE_SCORE, "better"), _claimed(CE_UP, "better"), _claimed(RATE, "better"),
                   _claimed(FEATURE, "better")),
          steering=True, needs=("resid_post.{L}", "resid_post.{L}@grad")),
    Claim("transcoder", "Dunefsky, Chlenski & Nanda 2024, Transcoders Find Interpretable LLM Feature Circuits",
          "a transcoder (mlp_in -> mlp_out) matches an MLP-out SAE on CE loss at matched L0",
          a_name="transcoder", b_name="sae_mlp_out",
          a={"kind": "transcoder", "hookpoint_in": "mlp_in.{L}", "hookpoint_out": "mlp_out.{L}", "sparsity": "topk",
             "k": "{k}", "expansion": "{expansion}"},
          b={"kind": "topk", "hookpoint_in": "mlp_out.{L}", "k": "{k}", "expansion": "{expansion}"},
          metrics=(L0, FVU, _claimed(CE_SCORE, "on par"), _claimed(CE_UP, "on par")),
          steering=False, needs=("mlp_in.{L}", "mlp_out.{L}")),
    Claim("snmf", "Shafran, Geiger & Geva 2025, Decomposing MLP Activations into Interpretable Features via Semi-NMF",
          "semi-NMF features steer better than SAE features",
          a_name="snmf", b_name="topk_resid",
          a={"kind": "snmf", "hookpoint_in": "mlp_hidden.{L}", "n_features": "{snmf_features}", "solver": "memory",
             "max_rows": 32768, "max_iters": "{snmf_iters}"},
          b={"kind": "topk", "hookpoint_in": "resid_post.{L}", "k": "{k}", "expansion": "{expansion}"},
          metrics=(_claimed(RATE, "better"), _claimed(FEATURE, "better"), AUC, FVU, CE_SCORE),
          steering=True, needs=("mlp_hidden.{L}", "resid_post.{L}")),
)}


# --- deciding a verdict -------------------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe(pa: float, ci_a: tuple[float, float], pb: float, ci_b: tuple[float, float]) -> tuple[float, float]:
    """95 % interval of pa - pb from each proportion's own interval (Newcombe's hybrid score method)."""
    d = pa - pb
    return (d - math.hypot(pa - ci_a[0], ci_b[1] - pb), d + math.hypot(ci_a[1] - pa, pb - ci_b[0]))


def paired_t(diffs: list[float]) -> tuple[float, float]:
    """95 % t-interval of the mean of per-seed differences (two or more seeds)."""
    from scipy.stats import t

    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def verdict(lo: float, hi: float, claim: str | None, higher_is_better: bool) -> str:
    """The verdict on A vs B from the interval [lo, hi] of A - B (see the module docstring)."""
    if claim is None:
        return "not claimed"
    if claim not in ("better", "on par"):
        raise ValueError(f"claim must be 'better', 'on par' or None, got {claim!r}")
    a_better, a_worse = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    if a_worse:
        return "contradicts"
    if claim == "better":
        return "supports" if a_better else "within noise"
    return "supports (A better)" if a_better else "supports (within noise)"


@dataclass
class Row:
    """One metric of one claim: our numbers, the interval of A - B, how it was decided and the verdict."""

    metric: str
    claim: str | None
    a: float | None
    b: float | None
    diff: float | None
    interval: tuple[float, float] | None
    verdict: str
    how: str
    extra: dict[str, Any] = field(default_factory=dict)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def compare(metric: Metric, a: list[dict], b: list[dict], n_default: int) -> Row:
    """Row for `metric` from per-seed values: a, b are lists (one per seed) of {"value", "n", "ci"}; a rate also
    carries the number of judged continuations "n" (None: n_default) and the steering eval's "ci" when given."""
    pairs = [(x, y) for x, y in zip(a, b) if x.get("value") is not None and y.get("value") is not None]
    if not pairs:
        missing = "A" if all(x.get("value") is None for x in a) else "B"
        return Row(metric.label, metric.claim, _first(a), _first(b), None, None, "not measured",
                   f"no value for {missing} (the eval did not report {metric.key})")
    va, vb = [x["value"] for x, _ in pairs], [y["value"] for _, y in pairs]
    ma, mb = _mean(va), _mean(vb)
    seeds = len(pairs)
    if metric.rate:
        na = [x.get("n") or n_default for x, _ in pairs]
        nb = [y.get("n") or n_default for _, y in pairs]
        if seeds == 1 and pairs[0][0].get("ci") and pairs[0][1].get("ci"):
            ci_a, ci_b, src = tuple(pairs[0][0]["ci"]), tuple(pairs[0][1]["ci"]), "the steering eval's concept_rate_ci"
        else:
            ka, kb = sum(round(v * n) for v, n in zip(va, na)), sum(round(v * n) for v, n in zip(vb, nb))
            ma, mb = ka / sum(na), kb / sum(nb)
            ci_a, ci_b, src = wilson(ka, sum(na)), wilson(kb, sum(nb)), "Wilson intervals"
        interval = newcombe(ma, ci_a, mb, ci_b)
        how = (f"95% interval of the difference of rates (Newcombe, from {src}); A {ma:.3f} "
               f"[{ci_a[0]:.3f}, {ci_a[1]:.3f}] of {sum(na)}, B {mb:.3f} [{ci_b[0]:.3f}, {ci_b[1]:.3f}] of {sum(nb)}"
               f" continuations; {seeds} seed{'s' if seeds > 1 else ''}")
        extra = {"ci_a": list(ci_a), "ci_b": list(ci_b), "n_a": sum(na), "n_b": sum(nb)}
    elif seeds >= 2:
        interval = paired_t([x - y for x, y in zip(va, vb)])
        how, extra = f"95% t-interval of the paired difference over {seeds} seeds", {"per_seed_a": va, "per_seed_b": vb}
    else:
        tol = TOLERANCE.get(metric.name, 0.0)
        interval = (ma - mb - tol, ma - mb + tol)
        how, extra = f"one seed: no measured noise; assumed tolerance +/-{tol:g} on A - B", {"tolerance": tol}
    return Row(metric.label, metric.claim, ma, mb, ma - mb, interval,
               verdict(interval[0], interval[1], metric.claim, metric.higher_is_better), how, extra)


def _first(values: list[dict]) -> float | None:
    return next((v["value"] for v in values if v.get("value") is not None), None)


# --- configs and stages -------------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _table(header: str, values: dict[str, Any]) -> list[str]:
    return [header, *(f"{k} = {_toml_value(v)}" for k, v in values.items())]


def _fill(template: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A [[decomposers]] template with "{L}", "{k}"... filled in (a value that is only a placeholder keeps its type)."""
    out = {}
    for key, value in template.items():
        if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in params:
            out[key] = params[value[1:-1]]
        elif isinstance(value, str):
            out[key] = value.format(**params)
        else:
            out[key] = value
    return out


def _model_and_corpus(args: argparse.Namespace) -> list[str]:
    return [*_table("[model]", {"name": str(args.model), "dtype": "float32"}),
            *_table("[corpus]", {"path": str(args.corpus), "field": "text", "context_length": 128})]


def names(claim: Claim, seed: int) -> tuple[str, str]:
    """The run's decomposer names of A and B for one seed."""
    return f"{claim.a_name}_s{seed}", f"{claim.b_name}_s{seed}"


def run_config(claim: Claim, out: Path, cache: Path, args: argparse.Namespace) -> str:
    """The TOML run config of one claim's folder: both dictionaries per seed, one budget, one cache."""
    params = {"L": args.layer, "k": args.k, "expansion": args.expansion, "snmf_features": args.snmf_features,
              "snmf_iters": args.snmf_iters}
    lines = [f"out_dir = {_toml_value(str(out))}", *_model_and_corpus(args)]
    lines += _table("[train]", {"cache": str(cache), "batch_size": args.batch_size, "n_steps": args.steps,
                                "lr": args.lr, "warmup_steps": min(50, max(1, args.steps // 6)),
                                "log_every": max(1, args.steps // 4), "checkpoint_every": 100_000,
                                "sample_tokens": args.sample_tokens, "seed": args.seed, "progress": False})
    for seed in range(args.seed, args.seed + args.seeds):
        for name, template in zip(names(claim, seed), (claim.a, claim.b)):
            table = {"name": name, **_fill(template, params), "seed": seed}
            lines += _table("[[decomposers]]", table)
    lines += _table("[eval]", {"n_eval_rows": args.eval_rows, "n_downstream_sequences": args.downstream_sequences,
                               "n_feature_cards": 0, "torch_threads": 1, "seed": args.seed})
    if claim.steering and args.steering:
        lines += _table("[eval.steering]", steering_table(args))
    lines += _table("[wandb]", {"mode": "disabled"})
    return "\n".join(lines) + "\n"


def steering_table(args: argparse.Namespace) -> dict[str, Any]:
    return {"kl_targets": [args.kl], "summary_kl": args.kl, "n_prompts": args.prompts,
            "samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens, "n_features": args.features,
            "concepts": [args.concept], "corpus": str(args.corpus), "seed": args.seed}


def cli(argv: list[str]) -> None:
    from dictlearn.cli import main as dictlearn

    print(f"$ dictlearn {' '.join(argv)}", flush=True)
    if dictlearn(argv) != 0:
        raise SystemExit(f"claims: `dictlearn {' '.join(argv)}` failed (its message is above)")


def harvest(folder: Path, hookpoints: list[str], gradients: list[str], n_tokens: int, args) -> Path:
    """A fresh cache at `folder` through `dictlearn harvest` (resumed when a previous call was cut short)."""
    lines = [f"out_dir = {_toml_value(str(folder.parent))}", *_model_and_corpus(args)]
    lines += _table("[harvest]", {"hookpoints": hookpoints, "gradients": gradients, "n_tokens": n_tokens,
                                  "dtype": "bfloat16", "eval_fraction": 0.1, "shard_mb": shard_mb(n_tokens, hookpoints + gradients)})
    lines += _table("[train]", {"cache": str(folder)})
    config = folder.parent / f"{folder.name}.toml"
    config.write_text("\n".join(lines) + "\n")
    cli(["harvest", str(config)])
    return folder


def shard_mb(n_tokens: int, arrays: list[str], shards: int = 20, width: int = 1024) -> float:
    """Shard size giving about `shards` shards (so eval_fraction 0.1 holds out whole shards) for arrays of about
    `width` bfloat16 values per token (SmolLM2: 576 residual, 1536 MLP hidden)."""
    return max(0.25, round(n_tokens * width * 2 * len(arrays) / shards / 2**20, 2))


def cache_arrays(folder: Path) -> set[str]:
    from dictlearn.activations.cache import ActivationCache

    return set(ActivationCache.open(folder).hookpoints)


def pick_caches(claims: list[Claim], args) -> dict[str, Path]:
    """{claim name: cache folder}. --cache (symlinked as <out>/cache, only read) serves every claim whose arrays
    it has; without --cache, <out>/cache is harvested with the activations of the claims that need no gradients.
    A claim that needs gradients the main cache lacks gets <out>/grad_cache (--grad-tokens, full backward)."""
    out, layer = Path(args.out), args.layer
    main = out / "cache"
    needs = {c.name: {n.format(L=layer) for n in c.needs} for c in claims}
    if args.cache:
        source = Path(args.cache).resolve()
        if main.is_symlink() and main.resolve() != source:
            main.unlink()
        if main.exists() and not main.is_symlink():
            raise SystemExit(f"claims: {main} is a cache this script harvested earlier; use another --out to compare "
                             f"on --cache {args.cache}")
        if not main.exists():
            main.symlink_to(source, target_is_directory=True)
        have = cache_arrays(main)
    else:
        have = cache_arrays(main) if (main / "manifest.json").is_file() else set()
        wanted = sorted({n for ns in needs.values() if not any("@" in x for x in ns) for n in ns})
        if wanted and not set(wanted) <= have:
            harvest(main, wanted, [], args.n_tokens, args)
            have = cache_arrays(main)
    chosen = {}
    for claim in claims:
        missing = needs[claim.name] - have
        if not missing:
            chosen[claim.name] = main
            continue
        if args.cache and any("@" not in n for n in missing):
            raise SystemExit(f"claims: the cache {args.cache} lacks {sorted(missing)} for claim {claim.name!r}; pass a "
                             f"--cache harvested at layer {layer} with those hookpoints, or leave --cache out")
        grad_cache = out / "grad_cache"
        if not ((grad_cache / "manifest.json").is_file() and needs[claim.name] <= cache_arrays(grad_cache)):
            harvest(grad_cache, sorted(n for n in needs[claim.name] if "@" not in n),
                    sorted(n.split("@")[0] for n in needs[claim.name] if "@" in n), args.grad_tokens, args)
        chosen[claim.name] = grad_cache
    return chosen


# --- reading the results ------------------------------------------------------------------------------------------
def value_of(record: dict, metric: Metric) -> dict[str, Any]:
    """{"value", "n", "ci"} of a metric in one eval record (steering ones from its steering summary)."""
    if metric.key.startswith("steering."):
        summary = record.get("steering") or {}
        key = metric.name
        return {"value": summary.get(key), "n": summary.get("n_continuations"),
                "ci": summary.get(f"{key}_ci") if metric.rate else None}
    return {"value": record.get(metric.key)}


def references(steering: dict, hookpoints: list[str]) -> dict[str, Any]:
    """DiffMean and random-direction concept rates at the claim's hookpoints (context for the steering rows)."""
    out = {}
    for name, rec in (steering.get("records") or {}).items():
        if "@" in name and name.split("@")[1] in hookpoints:
            summary = rec.get("summary") or {}
            out[name] = {"concept_rate": summary.get("concept_rate"), "concept_rate_ci": summary.get("concept_rate_ci"),
                         "p_value": summary.get("p_value")}
    return out


def evaluate_claim(claim: Claim, folder: Path, cache: Path, args) -> dict[str, Any]:
    """Train and evaluate one claim's pair (per seed) through the framework's stages; its rows and numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text(run_config(claim, folder, cache, args))
    tic = time.perf_counter()
    cli(["train", str(config)])
    cli(["eval", str(config)])
    seconds = time.perf_counter() - tic
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    records = {r["name"]: r for r in metrics["decomposers"]}
    seeds = list(range(args.seed, args.seed + args.seeds))
    pairs = [names(claim, s) for s in seeds]
    steered = claim.steering and args.steering
    n_default = args.prompts * args.samples
    rows = []
    for metric in claim.metrics:
        if metric.key.startswith("steering.") and not steered:
            continue
        rows.append(compare(metric, [value_of(records[a], metric) for a, _ in pairs],
                            [value_of(records[b], metric) for _, b in pairs], n_default))
    steering_path = folder / "eval" / "steering.json"
    refs = {}
    if steered and steering_path.is_file():
        hps = sorted({records[n]["hookpoint_in"] for pair in pairs for n in pair})
        refs = references(json.loads(steering_path.read_text()), hps)
    a0, b0 = records[pairs[0][0]], records[pairs[0][1]]
    return {"source": claim.source, "statement": claim.statement, "folder": str(folder), "config": str(config),
            "cache": str(cache), "seeds": seeds, "seconds": seconds,
            "a": {"names": [a for a, _ in pairs], "kind": a0["kind"], "hookpoint_in": a0["hookpoint_in"],
                  "hookpoint_out": a0.get("hookpoint_out")},
            "b": {"names": [b for _, b in pairs], "kind": b0["kind"], "hookpoint_in": b0["hookpoint_in"],
                  "hookpoint_out": b0.get("hookpoint_out")},
            "rows": [row.__dict__ for row in rows], "steering_references": refs}


# --- printing -----------------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_claim(name: str, result: dict[str, Any]) -> str:
    """A claim's table as Markdown: claim | metric | ours A | ours B | A - B [95% interval] | verdict."""
    a, b = result["a"], result["b"]
    side = lambda s: f"{s['kind']} {s['hookpoint_in']}" + (f" -> {s['hookpoint_out']}" if s.get("hookpoint_out") not in (None, s["hookpoint_in"]) else "")
    lines = [f"**{name}**: {result['statement']} ({result['source']}). A = {side(a)}, B = {side(b)}; "
             f"seeds {result['seeds']}.", "",
             "| claim | metric | ours A | ours B | A - B [95% interval] | verdict |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        iv = row["interval"]
        diff = "-" if row["diff"] is None else f"{row['diff']:+.3f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "")
        lines.append(f"| {'A ' + row['claim'] if row['claim'] else '-'} | {row['metric']} | {_fmt(row['a'])} | {_fmt(row['b'])} | {diff} | "
                     f"{row['verdict']} |")
    lines += ["", "How decided: " + "; ".join(dict.fromkeys(f"{r['metric']}: {r['how']}" for r in result["rows"]
                                                           if r["claim"]))]
    if result.get("steering_references"):
        lines.append("")
    for ref, values in result.get("steering_references", {}).items():
        ci = values.get("concept_rate_ci")
        lines.append(f"- reference {ref}: concept rate {_fmt(values['concept_rate'])}"
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f", p vs random {_fmt(values['p_value'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working folder (one run folder per claim, claims.json)")
    parser.add_argument("--cache", default="", help="an existing cache with layer L's hookpoints (read only)")
    parser.add_argument("--claims", nargs="+", choices=list(CLAIMS), default=list(CLAIMS))
    parser.add_argument("--steps", type=int, default=300, help="training steps of every SGD dictionary")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--k", type=int, default=32, help="k of every TopK kind (so L0 is matched)")
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--n-tokens", type=int, default=200_000, help="tokens to harvest when --cache is not given")
    parser.add_argument("--grad-tokens", type=int, default=32_768,
                        help="tokens of the gradient cache for gtopk when the main cache has no gradients")
    parser.add_argument("--sample-tokens", type=int, default=16_384)
    parser.add_argument("--snmf-features", type=int, default=128)
    parser.add_argument("--snmf-iters", type=int, default=200)
    parser.add_argument("--eval-rows", type=int, default=16_384)
    parser.add_argument("--downstream-sequences", type=int, default=16)
    parser.add_argument("--steering", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--kl", type=float, default=0.5, help="the one KL target of the steering eval")
    parser.add_argument("--concept", default="sport")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="continuations per prompt and condition")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--features", type=int, default=2, help="sampled features per dictionary (feature score)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per dictionary (2+: measured noise)")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--corpus", default=str(CORPUS))
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be at least 1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    command = "python bench/claims.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from dictlearn.eval.report import json_safe
    from dictlearn.files import atomic_write_json

    results = {}
    caches = pick_caches([CLAIMS[n] for n in args.claims], args)  # every harvest first, each cache once
    for name in args.claims:  # in the order given; claims.json grows after each one
        results[name] = evaluate_claim(CLAIMS[name], out / name, caches[name], args)
        seconds = time.perf_counter() - tic
        atomic_write_json(out / "claims.json", json_safe({"command": command, "options": vars(args),
                                                           "seconds": seconds, "claims": results}))
    print(f"\n{command}\n{seconds:.0f} s; {args.steps} steps of {args.batch_size} rows per dictionary, k {args.k}, "
          f"layer {args.layer}\n")
    for name, result in results.items():
        print(format_claim(name, result) + "\n")
    print(f"wrote {out / 'claims.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
