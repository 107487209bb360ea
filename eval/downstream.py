"""Downstream loss with a dictionary spliced into the model.

For each held-out sequence the model runs three ways:
  clean     untouched;
  spliced   the activation at the decomposer's `hookpoint_out` replaced by its reconstruction from a_in, where a_in is
            the activation at `hookpoint_in` in the same forward (an SAE reads and writes one place; a
            transcoder reads the MLP input and writes the MLP output; semi-NMF rewrites the MLP hidden layer);
  ablated   the activation at `hookpoint_out` replaced by zeros.
Positions holding a special token (the cache's `excluded_token_ids`: BOS, EOS, ...) keep their real activation
in both interventions, are never zeroed, and are left out of every average, as the cache leaves them out.

Metrics, averaged over the next-token predictions t of non-special positions (SAEBench core eval):
  ce_*            = mean_t -log p(token_{t+1} | ...)   for clean, spliced and ablated runs
  ce_loss_score   = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)    1: as good as the model, 0: as bad as
                    removing the activation
  kl_*            = mean_t KL(p_clean(.|t) || p_run(.|t))                  (kl of the clean run is 0)
  kl_score        = (kl_ablated - kl_spliced) / kl_ablated

Speed. The clean pass runs once per batch of sequences and also records the input and call arguments of every
decoder block; the ablated pass runs once per distinct `hookpoint_out`; both are shared by every decomposer.
Ablated and spliced passes resume from the recorded block input (blocks L..end with their recorded arguments,
final norm, LM head) instead of re-running the layers below L. The resumed forward is checked against the clean
logits on the first batch and replaced by full forwards, with a message, if it fails or disagrees.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dictlearn.activations import families
from dictlearn.activations import hookpoints as hpmod
from dictlearn.eval.reconstruction import reconstruct

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


def _through(fn: Callable[[np.ndarray], np.ndarray], act: torch.Tensor) -> torch.Tensor:
    flat = act.detach().reshape(-1, act.shape[-1]).to(torch.float32).cpu().numpy()
    out = np.array(fn(flat), dtype=np.float32)  # a writable copy for torch
    return torch.from_numpy(out).reshape(*act.shape[:-1], out.shape[-1]).to(act.dtype).to(act.device)


@contextlib.contextmanager
def splice(model: torch.nn.Module, hp_in: hpmod.Hookpoint, hp_out: hpmod.Hookpoint,
           recon: Callable[[np.ndarray], np.ndarray], keep: torch.Tensor) -> Iterator[None]:
    """Within the block, the activation at hp_out is recon(activation at hp_in) where keep (B, T) is True.

    For hp_in != hp_out the input is captured first in the same forward (hp_in must come earlier)."""
    mask = keep.unsqueeze(-1)
    if hp_in.name == hp_out.name:
        with hpmod.intervene(model, hp_out, lambda a: torch.where(mask, _through(recon, a), a)):
            yield
        return
    with hpmod.capture(model, [hp_in]) as acts:

        def replace(a: torch.Tensor) -> torch.Tensor:
            if hp_in.name not in acts:  # popped after each use, so a stale input is never reused
                raise DownstreamError(f"{hp_out.name} ran before {hp_in.name}: a decomposer must read a hookpoint that "
                                      "comes before the one it writes")
            return torch.where(mask, _through(recon, acts.pop(hp_in.name)), a)

        with hpmod.intervene(model, hp_out, replace):
            yield


@contextlib.contextmanager
def zero_ablate(model: torch.nn.Module, hp_out: hpmod.Hookpoint, keep: torch.Tensor) -> Iterator[None]:
    mask = keep.unsqueeze(-1)
    with hpmod.intervene(model, hp_out, lambda a: torch.where(mask, torch.zeros_like(a), a)):
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
    hp_in: hpmod.Hookpoint
    hp_out: hpmod.Hookpoint
    layer: int | None
    recon: Callable[[np.ndarray], np.ndarray]
    sums: _Sums = field(default_factory=_Sums)


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

    Decomposers are given by name; their configs name the hookpoints (hookpoint_in, hookpoint_out). Returns
    one DownstreamResult per name. `progress(n_sequences)` is called after each batch. `keep` (n, T) bool: the
    positions the cache kept (`harvest.kept_positions`: no padding, sink or other roles); by default the
    positions whose token is not in `excluded_token_ids`."""
    if len(sequences) == 0:
        raise DownstreamError("no sequences to evaluate the downstream loss on (n_downstream_sequences is 0 or the eval split is empty)")
    seqs = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise DownstreamError(f"sequences must be (n, T) token ids with T >= 2, got shape {tuple(seqs.shape)}")
    names = sorted({h for d in decomposers.values() for h in (d.config.hookpoint_in, d.config.hookpoint_out)})
    try:
        resolved = {h.name: h for h in hpmod.resolve(model, names)}
    except hpmod.HookpointError as e:
        raise DownstreamError(f"a decomposer's hookpoint is not in the model: {e}") from e
    entries = []
    for name, d in decomposers.items():
        hp_in, hp_out = resolved[d.config.hookpoint_in], resolved[d.config.hookpoint_out]
        for hp, width, what in ((hp_in, d.config.d_in, "d_in"), (hp_out, d.config.d_out, "d_out")):
            if hp.width != width:
                raise DownstreamError(f"decomposer {name!r}: {what} = {width} but {hp.name} has width {hp.width} in this model")
        layers = [h.layer for h in (hp_in, hp_out)]
        layer = None if None in layers else min(layers)
        entries.append(_Entry(name, hp_in, hp_out, layer, reconstruction_fn(d)))
    outs = sorted({e.hp_out.name for e in entries})
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
                layer = min((e.layer for e in entries if e.hp_out.name == o and e.layer is not None), default=None)
                with zero_ablate(model, resolved[o], keep_b):
                    logp, ce = _next_token_ce(run(layer), ids)
                ablated[o].add(ce, _kl(clean_logp, clean_p, logp), valid)
            for e in entries:
                with splice(model, e.hp_in, e.hp_out, e.recon, keep_b):
                    logp, ce = _next_token_ce(run(e.layer), ids)
                e.sums.add(ce, _kl(clean_logp, clean_p, logp), valid)
        if progress is not None:
            progress(len(ids))

    if clean.n == 0:
        raise DownstreamError("every position of the downstream sequences is a special token; nothing to score")
    return {
        e.name: DownstreamResult(
            ce_clean=clean.ce / clean.n, ce_spliced=e.sums.ce / e.sums.n, ce_ablated=ablated[e.hp_out.name].ce / clean.n,
            kl_spliced=e.sums.kl / e.sums.n, kl_ablated=ablated[e.hp_out.name].kl / clean.n, n_tokens=clean.n,
            resumed=resumer is not None and e.layer is not None,
        )
        for e in entries
    }
