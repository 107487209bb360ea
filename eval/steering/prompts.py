"""Prompts and batched, seeded generation of (optionally steered) continuations.

Generation is by rows: each row has its prompt, its own random stream and its own steering (what is added
at which hookpoint), so one batch can hold many conditions (different vectors, strengths, signs and the
unsteered model) and a row's continuation does not depend on what else is in its batch: the same seed gives
the same text whether a condition is generated alone or mixed with others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dictlearn.activations.hookpoints import Hookpoint, intervene

# Disjoint from dictlearn.steering.prompts.NEUTRAL_PROMPTS: unsteered continuations of these are the judges' "other" negatives.
JUDGE_PROMPTS: tuple[str, ...] = (
    "So", "Well,", "Once upon a time", "You know,", "The first", "It seems that", "As I", "There was a",
    "I would like to", "Many years ago,", "Note that", "Our", "Then", "A few", "Sometimes", "The following",
)


@dataclass(frozen=True)
class Row:
    """One continuation to generate: its prompt, its own random stream, and what is added where."""

    prompt: tuple[int, ...]
    seed: tuple[int, ...]  # e.g. (seed, prompt index, sample index): the row's own sampling stream
    steer: tuple[Hookpoint, torch.Tensor] | None = None  # (hookpoint, the vector added at every position)


def row_generator(seed: Sequence[int]) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (through numpy's SeedSequence, so nearby tuples
    give unrelated streams)."""
    state = int(np.random.SeedSequence([int(s) for s in seed]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


class RowSampler(LogitsProcessor):
    """Sampling from softmax(logits / temperature) (nucleus top_p) with each row's own generator, end-of-text
    suppressed, by the Gumbel-max trick: argmax(logits + G) with G = -log(-log U) drawn per token is a sample, so
    greedy decoding of the noisy scores samples, and a row's draws depend on its own seed only, never on the
    other rows of the batch (a tiny change in the logits moves the argmax only when two noisy scores tie, unlike
    inverting a cumulative sum over the vocabulary). temperature 0: greedy."""

    def __init__(self, seeds: Sequence[Sequence[int]], temperature: float, top_p: float, suppress: Sequence[int] = ()):
        self.generators = [row_generator(s) for s in seeds]
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.suppress = torch.tensor(sorted(set(int(t) for t in suppress)), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        suppress = self.suppress[self.suppress < scores.shape[-1]]  # a config may name an id past the vocabulary
        if len(suppress):
            scores = scores.index_fill(-1, suppress.to(scores.device), -float("inf"))
        if self.temperature <= 0:
            return scores
        scores = scores / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            p = sorted_scores.softmax(-1)
            outside = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, p.cumsum(-1) - p >= self.top_p)
            scores = scores.masked_fill(outside, -float("inf"))
        u = torch.empty(scores.shape, dtype=torch.float32)
        for row, g in zip(u, self.generators):
            row.uniform_(generator=g)
        return scores - u.to(scores.device).log().neg().log()  # + Gumbel noise -log(-log u); u = 0 gives -inf


def _added(rows: Sequence[Row]) -> dict[str, tuple[Hookpoint, torch.Tensor]]:
    """Per hookpoint steered in this batch: (hookpoint, (B, d) what each row adds there; zero rows add nothing)."""
    out: dict[str, tuple[Hookpoint, torch.Tensor]] = {}
    for i, r in enumerate(rows):
        if r.steer is None:
            continue
        hp, vec = r.steer
        if hp.name not in out:
            out[hp.name] = (hp, torch.zeros((len(rows), vec.shape[-1]), dtype=torch.float32))
        out[hp.name][1][i] = vec.detach().float().reshape(-1)
    return out


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook for the output head: generation hands it a strided slice (the last position), which
    torch multiplies by a broadcast copy of the head per row (10x the time of the plain product)."""
    return (args[0].contiguous(), *args[1:])


def _end_of_text(model: torch.nn.Module) -> list[int]:
    ids = []
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return ids


def _add_rows(delta: torch.Tensor):
    """fn for `hookpoints.intervene`: row i of the batch gets delta[i] at every position."""
    def fn(h: torch.Tensor) -> torch.Tensor:
        return h + delta.to(device=h.device, dtype=h.dtype)[:, None, :]
    return fn


def generate_rows(model: torch.nn.Module, rows: Sequence[Row], max_new_tokens: int, temperature: float,
                  top_p: float, pad_id: int, batch_size: int = 64) -> list[list[int]]:
    """The continuation of each row (exactly max_new_tokens each; end-of-text suppressed), in row order.

    Every prompt is left-padded to the longest prompt of the call, so a row's input is the same in whatever
    batch it lands; steering is added per row at each hookpoint some row of the batch steers. The caller's
    torch RNG state is left untouched (sampling uses the rows' own generators)."""
    if not rows:
        return []
    device = next(model.parameters()).device
    width = max(len(r.prompt) for r in rows)
    out: list[list[int]] = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b: b + batch_size]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):  # left padding: generation continues from the right end
            ids[r, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[r, width - len(row.prompt):] = 1
        sampler = RowSampler([row.seed for row in batch], temperature, top_p, _end_of_text(model))
        head = model.get_output_embeddings()
        with contextlib.ExitStack() as stack, torch.no_grad():
            for hp, delta in _added(batch).values():
                stack.enter_context(intervene(model, hp, _add_rows(delta)))
            if head is not None:
                stack.callback(head.register_forward_pre_hook(_contiguous_input).remove)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=pad_id, logits_processor=LogitsProcessorList([sampler]))
        out.extend(gen[:, width:].cpu().tolist())
    return out


def sample_rows(prompt_ids: Sequence[Sequence[int]], n_samples: int, seed: int,
                steer: tuple[Hookpoint, torch.Tensor] | None = None) -> list[Row]:
    """Rows for every prompt x sample (prompt-major), row (i, j) seeded by (seed, i, j): every condition
    generated with the same seed draws the same random numbers for the same prompt and sample (common random
    numbers), so steered and unsteered runs differ by the steering only."""
    return [Row(tuple(int(t) for t in p), (int(seed), i, j), steer) for i, p in enumerate(prompt_ids)
            for j in range(n_samples)]


def generate_continuations(model: torch.nn.Module, prompt_ids: list[list[int]], n_samples: int, max_new_tokens: int,
                           temperature: float, top_p: float, seed: int, pad_id: int,
                           steer: tuple[Hookpoint, torch.Tensor, float] | None = None,
                           batch_size: int = 16) -> list[list[int]]:
    """Sampled continuations of every prompt, n_samples each, prompt-major order (one condition:
    `steer` = (hookpoint, unit vector, alpha) adds alpha * v at every position)."""
    added = (steer[0], float(steer[2]) * steer[1].detach().float()) if steer else None
    return generate_rows(model, sample_rows(prompt_ids, n_samples, seed, added), max_new_tokens, temperature,
                         top_p, pad_id, batch_size)
