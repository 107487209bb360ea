"""Feature matching between dictionaries: does one decomposition hold the other's features?

    result = run_matching(decomposers, cache, output_projection, MatchingConfig(), log=print)
    plot_matching(result, eval_dir / "plots" / "matching.png")

For two decomposers a and b that write to one space, each feature of a gets two numbers:
- its decoder direction's best cosine with any of b's directions (features(), rows, unit-normalised);
- its activation's best Pearson correlation with any of b's features on the same held-out tokens (each
  decomposer encodes its own input, `config.hookpoint_in`, for the same cache rows).
A pair's figures are the mean and median of those per-feature bests over a's features (and the share above 0.7),
reported once per order (a -> b and b -> a): "do a's features exist in b" is not "do b's exist in a" when b has
18 times as many features.

The spaces. A decomposer writes at `config.hookpoint_out`; a write to an MLP hidden site (semi-NMF on
`mlp_hidden.L`) is mapped through the MLP's output projection, f -> f @ W_out, to where that lands
(`output_projection(hookpoint)`: the model family decides, see dictlearn.activations.families). Every write that
is a d_model vector in the residual stream's basis at block L (`resid_pre/resid_mid/resid_post/attn_out/mlp_out.L`,
families.RESIDUAL_ALIASES) is in the space "residual stream at layer L": an SAE on `resid_post.10`, a transcoder
writing `mlp_out.10` and semi-NMF on `mlp_hidden.10` (through W_out, landing at `mlp_out.10`) are comparable. Any
other site is its own space. Two decomposers that write at the same hookpoint are compared there as they are
(two semi-NMFs in MLP-neuron space, not through W_out, which would drop what W_out cannot see).

Codes are kept sparse (CSR, float64) over the rows, so the cross sums cost what the active pairs cost; a
dictionary that fires on more than half its entries is kept dense (float32, n_rows x n_features). The pairwise
(n_a, n_b) matrices are made a block of rows at a time (BLOCK_ENTRIES), so memory stays bounded for wide ones.
Site-axis kinds (cross-layer transcoders) write one feature to several layers and are skipped with a reason.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import nnx

from dictlearn.files import atomic_write_bytes

THRESHOLD = 0.7  # a "match": best cosine (or correlation) above this (the key decoder_frac_above_0.7)
BLOCK_ENTRIES = 1 << 24  # the pairwise matrices are made this many entries at a time (float64: 128 MB)
DENSE_ABOVE = 0.5  # codes active on more than this share of (row, feature) entries are kept as a dense array
SAME_KIND, OTHER_KINDS, OTHER_SITES = "same kind", "different kinds", "same kind, other hookpoints"

OutputProjection = Callable[[str], "tuple[np.ndarray, str] | None"]


@dataclass
class MatchingConfig:
    """The `[eval.matching]` table."""

    n_rows: int = 16_384  # held-out cache rows for the activation correlations (capped at the eval split)
    batch_size: int = 4096  # rows per encode
    pairs: list[list[str]] = field(default_factory=list)  # [["snmf", "topk"], ...]; []: every pair writing to one space

    def __post_init__(self) -> None:
        for name in ("n_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for pair in self.pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"each entry of pairs names two different decomposers, e.g. [\"snmf\", \"topk\"]; "
                                 f"got {pair!r}")


# --- where each decomposer writes ---------------------------------------------------------------------------------
def space_of(hookpoint: str) -> str:
    """The space a write at `hookpoint` lands in: "residual stream at layer L" for the residual stream's aliases,
    else the hookpoint itself."""
    from dictlearn.activations import families

    alias = families.parse_alias(hookpoint)
    if alias is not None and alias[0] in families.RESIDUAL_ALIASES:
        return f"residual stream at layer {alias[1]}"
    return hookpoint


@dataclass
class Writes:
    """A decomposer's decoder directions where it writes, and mapped to where they land in the model."""

    at: str  # config.hookpoint_out
    directions: np.ndarray  # (n_features, d_out): features()
    mapped_at: str  # where the mapped directions appear (`at` unless it is an MLP hidden site)
    mapped: np.ndarray  # (n_features, d): directions @ W_out for an MLP hidden site, else directions

    @property
    def space(self) -> str:
        return space_of(self.mapped_at)


def writes_of(decomposer: Any, output_projection: OutputProjection | None) -> Writes:
    """The decomposer's directions (features()) at config.hookpoint_out and mapped through the MLP output
    projection when that hookpoint is an MLP hidden site (`output_projection` returns None for other sites)."""
    from dictlearn.activations import families

    at = decomposer.config.hookpoint_out
    directions = np.asarray(decomposer.features(), np.float32)
    alias = families.parse_alias(at)
    residual = alias is not None and alias[0] in families.RESIDUAL_ALIASES  # never a hidden site: no model needed
    projection = None if residual or output_projection is None else output_projection(at)
    if projection is None:
        return Writes(at, directions, at, directions)
    w_out, landed = projection
    w_out = np.asarray(w_out, np.float32)
    if w_out.shape[0] != directions.shape[1]:
        raise ValueError(f"the output projection of {at} is {tuple(w_out.shape)}, but the decomposer's directions "
                         f"there are {directions.shape[1]} wide")
    return Writes(at, directions, landed, directions @ w_out)


def compared(a: Writes, b: Writes) -> tuple[str, np.ndarray, np.ndarray, str, str] | None:
    """(space, a's directions, b's directions, where a's are, where b's are) for a pair, or None when they write
    to different spaces: as they are when both write at one hookpoint, else as they land in the model."""
    if a.at == b.at:
        return space_of(a.at), a.directions, b.directions, a.at, b.at
    if a.space == b.space and a.mapped.shape[1] == b.mapped.shape[1]:
        return a.space, a.mapped, b.mapped, a.mapped_at, b.mapped_at
    return None


def relation(a: Any, b: Any) -> str:
    """"same kind" for one kind at the same hookpoints (seeds: stability), else "different kinds" (or "same kind,
    other hookpoints")."""
    if a.kind != b.kind:
        return OTHER_KINDS
    same_sites = (a.config.hookpoints_in() == b.config.hookpoints_in()
                  and a.config.hookpoints_out() == b.config.hookpoints_out())
    return SAME_KIND if same_sites else OTHER_SITES


# --- the numbers ----------------------------------------------------------------------------------------------------
def unit_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit norm, which rows have a direction at all (norm > 0))."""
    m = np.asarray(m, np.float32)
    norms = np.linalg.norm(m, axis=1)
    return m / np.where(norms > 0, norms, 1)[:, None], norms > 0


def best_cosines(a: np.ndarray, b: np.ndarray, block: int = BLOCK_ENTRIES) -> tuple[np.ndarray, np.ndarray]:
    """(for each row of a its best cosine with a row of b, for each row of b its best with a row of a); rows of
    zero norm have no direction and get NaN."""
    (ua, live_a), (ub, live_b) = unit_rows(a), unit_rows(b)
    return best_both_ways(lambda rows: ua[rows] @ ub.T, live_a, live_b, block)


def same_index_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean cosine of feature i of a with feature i of b (None when the counts differ). Independently trained
    dictionaries give about 0 (feature order is arbitrary); a high value means a shared initialisation (the same
    seed and shapes) that training has not moved far from, so the best-match cosines are partly inherited."""
    if a.shape != b.shape:
        return None
    (ua, live_a), (ub, live_b) = unit_rows(a), unit_rows(b)
    live = live_a & live_b
    return float(np.sum(ua[live] * ub[live], axis=1).mean()) if live.any() else None


@functools.lru_cache(maxsize=64)
def chance_cosine(n_b: int, d: int, n_probe: int = 512, seed: int = 0) -> float:
    """The mean best cosine of a random direction with n_b random directions in d dimensions: what a feature
    matched against an unrelated (isotropic random) dictionary of b's size scores."""
    rng = np.random.default_rng(seed)
    probe = unit_rows(rng.standard_normal((n_probe, d)))[0]
    return float((probe @ unit_rows(rng.standard_normal((n_b, d)))[0].T).max(axis=1).mean())


class Codes:
    """One decomposer's codes over the rows: appended a batch at a time (sparse, or dense when a batch is mostly
    active), then `finish`ed into one CSR float64 matrix, or a dense float32 array when mostly active."""

    def __init__(self) -> None:
        self.parts: list[sp.csr_matrix | np.ndarray] = []
        self.matrix: sp.csr_matrix | np.ndarray | None = None

    def add(self, codes: np.ndarray) -> None:
        c = np.asarray(codes, np.float32)
        flat = np.flatnonzero(c)
        if len(flat) > DENSE_ABOVE * c.size:
            self.parts.append(c)
            return
        rows, cols = np.divmod(flat, c.shape[1])
        indptr = np.zeros(len(c) + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=len(c)), out=indptr[1:])
        self.parts.append(sp.csr_matrix((c.ravel()[flat].astype(np.float64), cols.astype(np.int32), indptr),
                                        shape=c.shape))

    def finish(self) -> None:
        parts, self.parts = self.parts, []
        size = sum(p.shape[0] * p.shape[1] for p in parts)
        active = sum(p.nnz if sp.issparse(p) else np.count_nonzero(p) for p in parts)
        if active > DENSE_ABOVE * size:
            self.matrix = np.concatenate([p.toarray().astype(np.float32) if sp.issparse(p) else p for p in parts])
        else:
            self.matrix = sp.vstack([p if sp.issparse(p) else sp.csr_matrix(p.astype(np.float64)) for p in parts],
                                    format="csr")

    @property
    def sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(sum over rows, sum of squares over rows), float64."""
        m = self.matrix
        if sp.issparse(m):
            return np.asarray(m.sum(axis=0)).ravel(), np.asarray(m.multiply(m).sum(axis=0)).ravel()
        m64 = m.astype(np.float64)
        return m64.sum(axis=0), (m64 * m64).sum(axis=0)


def cross_sums(a: sp.csr_matrix | np.ndarray, b: sp.csr_matrix | np.ndarray, chunk: int = 4096) -> np.ndarray:
    """a.T @ b (n_features_a, n_features_b) in float64, at the cost of the active entries when either is sparse."""
    if sp.issparse(a) and sp.issparse(b):
        return (a.T @ b).toarray()
    if sp.issparse(a):
        return np.asarray(a.T @ b.astype(np.float64))
    if sp.issparse(b):
        return np.asarray(b.T @ a.astype(np.float64)).T
    out = np.zeros((a.shape[1], b.shape[1]), np.float64)
    for i in range(0, a.shape[0], chunk):
        out += (a[i:i + chunk].T @ b[i:i + chunk]).astype(np.float64)
    return out


def best_correlations(a: Codes, b: Codes, n: int, block: int = BLOCK_ENTRIES) -> tuple[np.ndarray, np.ndarray]:
    """(for each feature of a its best Pearson correlation with a feature of b over the n rows, and the same for
    b); a feature that is constant on the rows (never fires) has no correlation and gets NaN."""
    (sa, qa), (sb, qb) = a.sums, b.sums
    ma, mb = sa / n, sb / n
    va, vb = qa / n - ma ** 2, qb / n - mb ** 2
    live_a = va > 1e-12 * np.maximum(qa / n, 1e-30)
    live_b = vb > 1e-12 * np.maximum(qb / n, 1e-30)
    sd_a, sd_b = np.sqrt(np.where(live_a, va, 1)), np.sqrt(np.where(live_b, vb, 1))
    columns = a.matrix.tocsc() if sp.issparse(a.matrix) else a.matrix  # a's features are sliced by block

    def corr(rows: slice) -> np.ndarray:
        m = cross_sums(columns[:, rows], b.matrix)  # turned into the correlations in place
        m /= n
        m -= np.outer(ma[rows], mb)
        m /= sd_a[rows, None]
        m /= sd_b[None, :]
        return m

    return best_both_ways(corr, live_a, live_b, block)


def best_both_ways(block_of: Callable[[slice], np.ndarray], live_a: np.ndarray, live_b: np.ndarray,
                   block: int = BLOCK_ENTRIES) -> tuple[np.ndarray, np.ndarray]:
    """Row and column maxima of the (n_a, n_b) matrix whose rows `block_of(slice)` computes a block at a time (at
    most `block` entries each), over the live rows and columns: NaN for a dead one or one with no live partner;
    clipped to [-1, 1] (rounding)."""
    n_a, n_b = len(live_a), len(live_b)
    best_a, best_b = np.full(n_a, -np.inf), np.full(n_b, -np.inf)
    step = max(1, block // max(n_b, 1))
    for start in range(0, n_a, step):
        rows = slice(start, min(n_a, start + step))
        m = block_of(rows)
        if not live_b.all():
            m[:, ~live_b] = -np.inf
        if not live_a[rows].all():
            m[~live_a[rows], :] = -np.inf
        best_a[rows] = m.max(axis=1, initial=-np.inf)
        np.maximum(best_b, m.max(axis=0, initial=-np.inf), out=best_b)
    best_a = np.where(live_a & live_b.any(), best_a, np.nan)
    best_b = np.where(live_b & live_a.any(), best_b, np.nan)
    return np.clip(best_a, -1, 1), np.clip(best_b, -1, 1)


def summary(best: np.ndarray) -> dict[str, float | int | None]:
    """mean, median and share above THRESHOLD of the per-feature bests that exist (NaN: no direction / never fired)."""
    ok = best[np.isfinite(best)]
    if ok.size == 0:
        return {"mean": None, "median": None, "frac": None, "n": 0}
    return {"mean": float(ok.mean()), "median": float(np.median(ok)), "frac": float((ok > THRESHOLD).mean()),
            "n": int(ok.size)}


# --- the stage --------------------------------------------------------------------------------------------------------
def plan_pairs(decomposers: dict[str, Any], writes: dict[str, Writes], cfg: MatchingConfig,
               skipped: dict[str, str]) -> list[tuple[str, str]]:
    """The unordered pairs to compare (cfg.pairs, or every pair writing to one space); what cannot be compared goes
    to `skipped` with the reason."""
    if cfg.pairs:
        todo = []
        for a, b in cfg.pairs:
            missing = [n for n in (a, b) if n not in decomposers]
            if missing:
                skipped[f"{a} vs {b}"] = (f"{' and '.join(missing)} is not among the decomposers evaluated "
                                          f"({', '.join(decomposers) or 'none'})")
            elif a in skipped or b in skipped:
                skipped[f"{a} vs {b}"] = f"{a if a in skipped else b} is skipped: {skipped.get(a) or skipped[b]}"
            elif compared(writes[a], writes[b]) is None:
                skipped[f"{a} vs {b}"] = (f"{a} writes to {writes[a].space} and {b} to {writes[b].space}: no common "
                                          "space to compare their directions in")
            elif (b, a) not in todo and (a, b) not in todo:  # a pair listed twice is compared once
                todo.append((a, b))
        return todo
    names = [n for n in decomposers if n not in skipped]
    todo = [(a, b) for a, b in itertools.combinations(names, 2) if compared(writes[a], writes[b]) is not None]
    for n in names:
        if not any(n in p for p in todo):
            skipped[n] = f"no other decomposer writes to its space ({writes[n].space})"
    return todo


def encode_fn(decomposer: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A jitted (B, d_in) -> (B, n_features) encode on numpy arrays."""
    graphdef, state = nnx.split(decomposer)

    @jax.jit
    def enc(state, x):
        return nnx.merge(graphdef, state).encode(x)

    return lambda x: np.asarray(enc(state, jnp.asarray(x)))


def collect_codes(decomposers: dict[str, Any], cache: Any, cfg: MatchingConfig) -> tuple[dict[str, Codes], int]:
    """Every decomposer's codes for the same held-out rows (each from its own hookpoint_in); (codes, rows)."""
    from dictlearn.eval.reconstruction import pad_rows
    from dictlearn.eval.suite import eval_batches

    keys = sorted({d.config.hookpoint_in for d in decomposers.values()})
    missing = [k for k in keys if k not in cache.hookpoints]
    if missing:
        raise ValueError(f"feature matching needs {', '.join(missing)}, which the cache at {cache.path} does not hold "
                         f"(it holds {', '.join(cache.hookpoints)}); harvest it, or leave those decomposers out of "
                         "eval.matching.pairs")
    fns = {n: encode_fn(d) for n, d in decomposers.items()}
    codes = {n: Codes() for n in decomposers}
    rows = 0
    for batch in eval_batches(cache, keys, cfg.n_rows, cfg.batch_size):
        b = len(batch["seq"])
        for n, d in decomposers.items():
            codes[n].add(fns[n](pad_rows(batch[d.config.hookpoint_in], cfg.batch_size))[:b])
        rows += b
    for c in codes.values():
        c.finish()
    return codes, rows


def both_orders(decomposers: dict[str, Any], a: str, b: str, writes: dict[str, Writes], codes: dict[str, Codes],
                rows: int) -> list[dict[str, Any]]:
    """The records of a -> b and b -> a (each: how a's features are found in b)."""
    space, da, db, at_a, at_b = compared(writes[a], writes[b])
    cos, corr = best_cosines(da, db), best_correlations(codes[a], codes[b], rows)
    same_index = same_index_cosine(da, db)
    out = []
    for i, (x, y, wx, wy, dy) in enumerate(((a, b, at_a, at_b, db), (b, a, at_b, at_a, da))):
        c, r = summary(cos[i]), summary(corr[i])
        out.append({
            "a": x, "b": y, "space": space, "written_at_a": wx, "written_at_b": wy,
            "relation": relation(decomposers[x], decomposers[y]),
            "decoder_cos_mean": c["mean"], "decoder_cos_median": c["median"], f"decoder_frac_above_{THRESHOLD}": c["frac"],
            "decoder_cos_chance": chance_cosine(*dy.shape), "decoder_cos_same_index": same_index,
            "activation_corr_mean": r["mean"], "activation_corr_median": r["median"],
            f"activation_frac_above_{THRESHOLD}": r["frac"], "n_features_correlated": r["n"],
            "n_rows": rows, "n_features_a": int(decomposers[x].config.n_features),
            "n_features_b": int(decomposers[y].config.n_features),
        })
    return out


def run_matching(decomposers: dict[str, Any], cache: Any, output_projection: OutputProjection | None,
                 cfg: MatchingConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Match the features of every pair of `decomposers` ({name: Decomposer}) that write to one space (or of
    cfg.pairs): best-match decoder cosines and activation correlations on the held-out rows of `cache`.

    output_projection(hookpoint) -> (W_out (d_hidden, d_model), where hidden @ W_out appears) or None (not an MLP
    hidden site): Run.output_projection. Returns {"config", "pairs": [...], "decomposers", "skipped", "seconds"}
    (see docs/evaluation.md, "Feature matching")."""
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    for n, d in decomposers.items():
        if d.site_axis:
            skipped[n] = ("it writes each feature to several layers (a site axis), so a feature has no single "
                          "direction to match")
    writes = {n: writes_of(d, output_projection) for n, d in decomposers.items() if n not in skipped}
    todo = plan_pairs(decomposers, writes, cfg, skipped)
    used = {n: decomposers[n] for n in dict.fromkeys(itertools.chain(*todo))}
    codes, rows = collect_codes(used, cache, cfg) if used else ({}, 0)
    log(f"matching: codes of {len(used)} decomposer(s) on {rows:,} held-out rows ({time.perf_counter() - t0:.1f} s)")
    pairs = []
    for a, b in todo:
        pairs += both_orders(decomposers, a, b, writes, codes, rows)
        log(f"matching: {a} vs {b} ({pairs[-1]['space']}): decoder cos {_fmt(pairs[-2]['decoder_cos_mean'])} / "
            f"{_fmt(pairs[-1]['decoder_cos_mean'])}, activation corr {_fmt(pairs[-2]['activation_corr_mean'])} / "
            f"{_fmt(pairs[-1]['activation_corr_mean'])}")
    seconds = time.perf_counter() - t0
    log(f"matching: {len(todo)} pair(s) on {rows:,} held-out rows, {len(skipped)} skipped ({seconds:.1f} s)")
    return {"config": dataclasses.asdict(cfg), "pairs": pairs,
            "decomposers": {n: {"kind": decomposers[n].kind, "written_at": w.mapped_at, "space": w.space}
                            for n, w in writes.items()},
            "skipped": skipped, "seconds": seconds}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# --- the plot -------------------------------------------------------------------------------------------------------
def plot_matching(result: dict[str, Any], path: str | Path) -> bool:
    """Two heatmaps, row a and column b: the mean best-match decoder cosine and the mean best activation
    correlation of a's features in b. One PNG, written atomically; False (nothing written) with no pairs."""
    pairs = result.get("pairs") or []
    if not pairs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = {n for p in pairs for n in (p["a"], p["b"])}
    names = [n for n in dict.fromkeys([*(result.get("decomposers") or {}), *sorted(paired)]) if n in paired]
    index = {n: i for i, n in enumerate(names)}
    chance = [p["decoder_cos_chance"] for p in pairs if p.get("decoder_cos_chance") is not None]
    span = (f" (random directions: {min(chance):.2f}" + (f"-{max(chance):.2f})" if max(chance) - min(chance) >= 0.005
                                                         else ")")) if chance else ""
    panels = [("decoder_cos_mean", f"decoder directions: mean best cosine{span}"),
              ("activation_corr_mean", "activations: mean best correlation")]
    size = max(4.0, 0.55 * len(names) + 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        grid = np.full((len(names), len(names)), np.nan)
        for p in pairs:
            if p.get(key) is not None:
                grid[index[p["a"]], index[p["b"]]] = p[key]
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1,
                          cmap=plt.get_cmap("viridis").with_extremes(bad="#dddddd"))
        for i, j in zip(*np.nonzero(np.isfinite(grid))):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("b (matched against)")
        ax.set_ylabel("a (each of its features)")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    rows = pairs[0].get("n_rows")
    fig.suptitle(f"Feature matching: a's features found in b (grey: not compared; {rows:,} held-out rows)",
                 fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), buf.getvalue())
    return True
