"""Downstream loss with a dictionary spliced into the model.

For each held-out sequence the model runs three ways:
  clean     untouched;
  spliced   the activation at the decomposer's `hookpoint_out` replaced by its reconstruction from a_in, where a_in is
            the activation at `hookpoint_in` in the same forward (an SAE reads and writes one place; a
            transcoder reads the MLP input and writes the MLP output; semi-NMF rewrites the MLP hidden layer);
  ablated   the activation at `hookpoint_out` replaced by zeros.
A decomposer with a site axis (a cross-layer transcoder) is the replacement model: in one forward every output
site it covers (mlp_out.l) is replaced, each from the latents of its input sites 0..l (mlp_in) encoded as the
forward reaches them, so layer l reads a residual stream the replacements of earlier layers have already changed;
its ablated run zeroes every output site at once.
Positions holding a special token (the cache's `excluded_token_ids`: BOS, EOS, ...) keep their real activation
in both interventions, are never zeroed, and are left out of every average, as the cache leaves them out.

Metrics, averaged over the next-token predictions t of non-special positions (SAEBench core eval):
  ce_*            = mean_t -log p(token_{t+1} | ...)   for clean, spliced and ablated runs
  ce_loss_score   = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)    1: as good as the model, 0: as bad as
                    removing the activation
  kl_*            = mean_t KL(p_clean(.|t) || p_run(.|t))                  (kl of the clean run is 0)
  kl_score        = (kl_ablated - kl_spliced) / kl_ablated

Speed. The clean pass runs once per batch of sequences and also records the input and call arguments of every
decoder block; the ablated pass runs once per distinct set of written hookpoints; both are shared by every decomposer.
Ablated and spliced passes resume from the recorded block input (blocks L..end with their recorded arguments,
final norm, LM head) instead of re-running the layers below L. The resumed forward is checked against the clean
logits on the first batch and replaced by full forwards, with a message, if it fails or disagrees.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dictlearn.activations import families
from dictlearn.activations import hookpoints as hpmod
from dictlearn.eval.reconstruction import has_site_axis, reconstruct, site_hookpoints

RESUME_TOLERANCE = 1e-3  # max |logit difference| between resumed and full forward to trust resuming


class DownstreamError(ValueError):
    """A decomposer that cannot be spliced into this model as configured."""


# --- resuming a forward from a decoder block's input --------------------------------------------------------------
class ResumedForward:
    """Runs decoder blocks L..end, the final norm, the LM head (and the family's logit softcap) on a block input.

    Each block is called with the very arguments it got in a recorded clean forward (attention masks, rotary
    embeddings of its layer type, position ids), so no family's mask or rotary call is rebuilt here: record
    a forward with `recording(layers)`, then call `logits(hidden, layer)` for inputs of that batch's shape."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = model.get_submodule(families.family_of(model).layers)
        self._calls: dict[int, tuple[tuple, dict, bool]] = {}  # layer -> (other args, kwargs, hidden by keyword)

    @contextlib.contextmanager
    def recording(self, layers: list[int] | tuple[int, ...] = ()) -> Iterator[dict[int, torch.Tensor]]:
        """Records every block's call arguments during the forwards run inside; yields {layer: block input} for
        the given layers."""
        inputs: dict[int, torch.Tensor] = {}
        wanted = set(layers)
        handles = []
        for i, block in enumerate(self.layers):
            def pre(mod, args, kwargs, i=i):
                by_keyword = not (args and isinstance(args[0], torch.Tensor))
                hidden = kwargs["hidden_states"] if by_keyword else args[0]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self._calls[i] = (tuple(args if by_keyword else args[1:]), rest, by_keyword)
                if i in wanted:
                    inputs[i] = hidden.detach()
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield inputs
        finally:
            for h in handles:
                h.remove()

    def logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of the model given the input of block `layer` (B, T, d), from the recorded block arguments."""
        missing = [i for i in range(layer, len(self.layers)) if i not in self._calls]
        if missing:
            raise DownstreamError(f"no recorded forward for blocks {missing}; run one inside recording() first")
        h = hidden
        for i in range(layer, len(self.layers)):
            args, kwargs, by_keyword = self._calls[i]
            out = self.layers[i](*args, hidden_states=h, **kwargs) if by_keyword else self.layers[i](h, *args, **kwargs)
            h = out if isinstance(out, torch.Tensor) else out[0]
        return families.final_logits(self.model, h)


# --- splicing a decomposer in ----------------------------------------------------------------------------------
def reconstruction_fn(decomposer: nnx.Module) -> Callable[[np.ndarray], np.ndarray]:
    """A jitted (N, d_in) -> (N, d_out) reconstruction on numpy arrays (see eval.reconstruction.reconstruct)."""
    graphdef, state = nnx.split(decomposer)

    @jax.jit
    def recon(state, x):
        return reconstruct(nnx.merge(graphdef, state), x)

    return lambda x: np.asarray(recon(state, jnp.asarray(x)))


def _flat(act: torch.Tensor) -> np.ndarray:
    return act.detach().reshape(-1, act.shape[-1]).to(torch.float32).cpu().numpy()


def _back(out: Any, like: torch.Tensor) -> torch.Tensor:
    out = np.array(out, dtype=np.float32)  # a writable copy for torch
    return torch.from_numpy(out).reshape(*like.shape[:-1], out.shape[-1]).to(like.dtype).to(like.device)


class SingleSite:
    """One hookpoint read, one written: the output is the reconstruction of the input read in the same forward."""

    def __init__(self, decomposer: nnx.Module):
        self.fn = reconstruction_fn(decomposer)
        self.x: np.ndarray | None = None

    def read(self, site: int, x: np.ndarray) -> None:
        self.x = x

    def write(self, site: int) -> np.ndarray:
        x, self.x = self.x, None
        return self.fn(x)


class SiteAxis:
    """A decomposer over S sites (a cross-layer transcoder), run as the model runs.

    When input site i is reached its latents are encoded from the activation there, in this forward (so from
    a residual stream the replacements of earlier sites have already changed); output site j is decoded from
    the latents of sites 0..j read so far. This relies on what the site-axis contract promises: site i's
    latents depend on input site i only, and output j on the latents of sites <= j. Only encode and decode are
    used: the input stack holds zeros at sites not read yet, the latent stack zeros at sites not encoded."""

    def __init__(self, decomposer: nnx.Module, n_sites: int):
        graphdef, state = nnx.split(decomposer)
        self.n_sites, self.d_in = n_sites, int(decomposer.config.d_in)
        self.codes: dict[int, jax.Array] = {}

        @jax.jit
        def encode_site(state, x, i):
            stack = jnp.zeros((x.shape[0], n_sites, x.shape[1]), x.dtype)
            codes = nnx.merge(graphdef, state).encode(jax.lax.dynamic_update_index_in_dim(stack, x, i, 1))
            return jax.lax.dynamic_index_in_dim(codes, i, 1, keepdims=False)

        @jax.jit
        def decode_site(state, codes, j):
            return jax.lax.dynamic_index_in_dim(nnx.merge(graphdef, state).decode(codes), j, 1, keepdims=False)

        self._encode = lambda x, i: encode_site(state, jnp.asarray(x), i)
        self._decode = lambda codes, j: decode_site(state, codes, j)

    def read(self, site: int, x: np.ndarray) -> None:
        self.codes[site] = self._encode(x, site)

    def write(self, site: int) -> np.ndarray:
        some = next(iter(self.codes.values()))
        zero = jnp.zeros_like(some)
        stack = jnp.stack([self.codes.get(i, zero) if i <= site else zero for i in range(self.n_sites)], axis=1)
        out = np.asarray(self._decode(stack, site))
        if site == self.n_sites - 1:
            self.codes = {}
        return out


@contextlib.contextmanager
def splice(model: torch.nn.Module, hps_in: list[hpmod.Hookpoint], hps_out: list[hpmod.Hookpoint],
           replacement: SingleSite | SiteAxis, keep: torch.Tensor) -> Iterator[None]:
    """Within the block, the activation at every output site j is the decomposer's reconstruction from the
    activations at input sites 0..j of the same forward, where keep (B, T) is True (one site: an SAE rewrites
    the place it reads, a transcoder reads the MLP input and replaces the MLP output; S sites: the replacement
    model of a cross-layer transcoder, every covered MLP output replaced at once)."""
    mask = keep.unsqueeze(-1)
    read: set[int] = set()
    hooks = contextlib.ExitStack()

    def reader(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(a: torch.Tensor) -> torch.Tensor:
            replacement.read(i, _flat(a))
            read.add(i)
            return a
        return fn

    def writer(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(a: torch.Tensor) -> torch.Tensor:
            missing = [hps_in[i].name for i in range(j + 1) if i not in read]
            if missing:  # inputs are forgotten after the last output, so a stale one is never reused
                raise DownstreamError(f"{hps_out[j].name} ran before {', '.join(missing)}: a decomposer must read "
                                      "a hookpoint that comes before the one it writes")
            if j == len(hps_out) - 1:
                read.clear()
            return torch.where(mask, _back(replacement.write(j), a), a)
        return fn

    with hooks:
        for i, (h_in, h_out) in enumerate(zip(hps_in, hps_out)):
            if h_in.name == h_out.name:  # reads and rewrites the same place
                hooks.enter_context(hpmod.intervene(model, h_out, lambda a, i=i: writer(i)(reader(i)(a))))
            else:
                hooks.enter_context(hpmod.intervene(model, h_in, reader(i)))
                hooks.enter_context(hpmod.intervene(model, h_out, writer(i)))
        yield


@contextlib.contextmanager
def zero_ablate(model: torch.nn.Module, hps_out: list[hpmod.Hookpoint], keep: torch.Tensor) -> Iterator[None]:
    """Within the block, the activation at every hookpoint of hps_out is zero where keep (B, T) is True."""
    mask = keep.unsqueeze(-1)
    with contextlib.ExitStack() as hooks:
        for hp in hps_out:
            hooks.enter_context(hpmod.intervene(model, hp, lambda a: torch.where(mask, torch.zeros_like(a), a)))
        yield


# --- the metric sums -----------------------------------------------------------------------------------------------
@dataclass
class _Sums:
    ce: float = 0.0
    kl: float = 0.0
    n: int = 0

    def add(self, ce: torch.Tensor, kl: torch.Tensor | None, valid: torch.Tensor) -> None:
        self.ce += float(ce[valid].double().sum())
        if kl is not None:
            self.kl += float(kl[valid].double().sum())
        self.n += int(valid.sum())


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of positions 0..T-2, CE of predicting token t+1 at each of them)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp, ce


def _kl(clean_logp: torch.Tensor, clean_p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (clean_p * (clean_logp - logp)).sum(-1)


@dataclass
class DownstreamResult:
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    kl_spliced: float
    kl_ablated: float
    n_tokens: int
    resumed: bool = True

    @property
    def ce_loss_score(self) -> float:
        d = self.ce_ablated - self.ce_clean
        return (self.ce_ablated - self.ce_spliced) / d if d != 0 else float("nan")

    @property
    def kl_score(self) -> float:
        return (self.kl_ablated - self.kl_spliced) / self.kl_ablated if self.kl_ablated != 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "ce_clean": self.ce_clean, "ce_spliced": self.ce_spliced, "ce_ablated": self.ce_ablated,
            "ce_loss_increase": self.ce_spliced - self.ce_clean, "ce_loss_score": self.ce_loss_score,
            "kl_spliced": self.kl_spliced, "kl_ablated": self.kl_ablated, "kl_score": self.kl_score,
            "n_downstream_tokens": self.n_tokens,
        }


def _resume_problem(resumer: ResumedForward, inputs: dict[int, torch.Tensor], layer: int, logits: torch.Tensor) -> str | None:
    """Why resuming from `layer` cannot be trusted for this model (None: it reproduces the clean logits)."""
    try:
        diff = float((resumer.logits(inputs[layer], layer) - logits).abs().max())
    except Exception as e:  # a family whose blocks cannot be replayed: the full forward still works
        return f"failed ({type(e).__name__}: {e})"
    return f"differs from the full one by {diff:.2e}" if diff > RESUME_TOLERANCE else None


@dataclass
class _Entry:
    name: str
    hps_in: list[hpmod.Hookpoint]  # one per site, in site order
    hps_out: list[hpmod.Hookpoint]
    layer: int | None  # the first decoder block any of them lives in (where resumed forwards start)
    replacement: SingleSite | SiteAxis
    sums: _Sums = field(default_factory=_Sums)

    @property
    def outs(self) -> tuple[str, ...]:
        """What the ablated run zeroes: every hookpoint the decomposer writes."""
        return tuple(h.name for h in self.hps_out)


def _entry(name: str, d: nnx.Module, resolved: dict[str, hpmod.Hookpoint]) -> _Entry:
    """A decomposer's hookpoints in this model (widths checked) and how it is spliced in."""
    names_in, names_out = site_hookpoints(d)
    hps_in, hps_out = [resolved[h] for h in names_in], [resolved[h] for h in names_out]
    for hps, width, what in ((hps_in, d.config.d_in, "d_in"), (hps_out, d.config.d_out, "d_out")):
        for hp in hps:
            if hp.width != width:
                raise DownstreamError(f"decomposer {name!r}: {what} = {width} but {hp.name} has width {hp.width} in this model")
    layers = [h.layer for h in hps_in + hps_out]
    replacement = SiteAxis(d, len(hps_in)) if has_site_axis(d) else SingleSite(d)
    return _Entry(name, hps_in, hps_out, None if None in layers else min(layers), replacement)


def evaluate_downstream(
    model: torch.nn.Module,
    sequences: np.ndarray,
    decomposers: dict[str, nnx.Module],
    excluded_token_ids: list[int] | np.ndarray = (),
    batch_size: int = 4,
    resume: bool = True,
    progress: Callable[[int], None] | None = None,
    keep: np.ndarray | None = None,
) -> dict[str, DownstreamResult]:
    """Clean / spliced / ablated next-token CE and KL of every decomposer on `sequences` (n, T) token ids.

    Decomposers are given by name; their configs name the hookpoints (hookpoints_in(), hookpoints_out(): one of
    each, or one per site for a site-axis kind, all spliced into the same forward). Returns one DownstreamResult
    per name. `progress(n_sequences)` is called after each batch. `keep` (n, T) bool: the
    positions the cache kept (`harvest.kept_positions`: no padding, sink or other roles); by default the
    positions whose token is not in `excluded_token_ids`."""
    if len(sequences) == 0:
        raise DownstreamError("no sequences to evaluate the downstream loss on (n_downstream_sequences is 0 or the eval split is empty)")
    seqs = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise DownstreamError(f"sequences must be (n, T) token ids with T >= 2, got shape {tuple(seqs.shape)}")
    names = sorted({h for d in decomposers.values() for hps in site_hookpoints(d) for h in hps})
    try:
        resolved = {h.name: h for h in hpmod.resolve(model, names)}
    except hpmod.HookpointError as e:
        raise DownstreamError(f"a decomposer's hookpoint is not in the model: {e}") from e
    entries = [_entry(name, d, resolved) for name, d in decomposers.items()]
    outs = sorted({e.outs for e in entries})
    layers_needed = sorted({e.layer for e in entries if e.layer is not None})
    resumer = None
    if resume and layers_needed:
        try:
            resumer = ResumedForward(model)
        except hpmod.HookpointError as e:
            print(f"downstream: cannot resume forwards ({e}); using full forwards")
    excluded = torch.as_tensor(np.asarray(list(excluded_token_ids), dtype=np.int64))
    clean, ablated = _Sums(), {o: _Sums() for o in outs}
    checked = False

    for start in range(0, len(seqs), batch_size):
        ids = seqs[start : start + batch_size]
        if keep is not None:  # the cache's own rule (corpus.left_out): padding, other roles, the sink are left out too
            keep_b = torch.as_tensor(np.asarray(keep[start : start + batch_size], dtype=bool))
        else:
            keep_b = ~torch.isin(ids, excluded) if excluded.numel() else torch.ones_like(ids, dtype=torch.bool)
        valid = keep_b[:, :-1]
        with torch.no_grad():
            with resumer.recording(layers_needed) if resumer is not None else contextlib.nullcontext({}) as inputs:
                logits = hpmod.run_forward(model, ids).logits
            clean_logp, ce = _next_token_ce(logits, ids)
            clean_p = clean_logp.exp()
            clean.add(ce, None, valid)
            if resumer is not None and not checked:
                problem = _resume_problem(resumer, inputs, layers_needed[0], logits)
                if problem:
                    print(f"downstream: the resumed forward {problem}; using full forwards")
                    resumer = None
                checked = True
            del logits

            def run(layer: int | None) -> torch.Tensor:
                if resumer is not None and layer is not None:
                    return resumer.logits(inputs[layer], layer)
                return hpmod.run_forward(model, ids).logits

            for o in outs:
                layer = min((e.layer for e in entries if e.outs == o and e.layer is not None), default=None)
                with zero_ablate(model, [resolved[h] for h in o], keep_b):
                    logp, ce = _next_token_ce(run(layer), ids)
                ablated[o].add(ce, _kl(clean_logp, clean_p, logp), valid)
            for e in entries:
                with splice(model, e.hps_in, e.hps_out, e.replacement, keep_b):
                    logp, ce = _next_token_ce(run(e.layer), ids)
                e.sums.add(ce, _kl(clean_logp, clean_p, logp), valid)
        if progress is not None:
            progress(len(ids))

    if clean.n == 0:
        raise DownstreamError("every position of the downstream sequences is a special token; nothing to score")
    return {
        e.name: DownstreamResult(
            ce_clean=clean.ce / clean.n, ce_spliced=e.sums.ce / e.sums.n, ce_ablated=ablated[e.outs].ce / clean.n,
            kl_spliced=e.sums.kl / e.sums.n, kl_ablated=ablated[e.outs].kl / clean.n, n_tokens=clean.n,
            resumed=resumer is not None and e.layer is not None,
        )
        for e in entries
    }
