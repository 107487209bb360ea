"""Prompts and batched, seeded generation of (optionally steered) continuations."""

from __future__ import annotations

import contextlib

import torch

from dictlearn.activations.hookpoints import Hookpoint, intervene
from dictlearn.steering.calibrate import add_vector

# Disjoint from dictlearn.steering.prompts.NEUTRAL_PROMPTS: unsteered continuations of these are the judges' "other" negatives.
JUDGE_PROMPTS: tuple[str, ...] = (
    "So", "Well,", "Once upon a time", "You know,", "The first", "It seems that", "As I", "There was a",
    "I would like to", "Many years ago,", "Note that", "Our", "Then", "A few", "Sometimes", "The following",
)


def generate_continuations(model: torch.nn.Module, prompt_ids: list[list[int]], n_samples: int, max_new_tokens: int,
                           temperature: float, top_p: float, seed: int, pad_id: int,
                           steer: tuple[Hookpoint, torch.Tensor, float] | None = None,
                           batch_size: int = 16) -> list[list[int]]:
    """Sampled continuations (exactly max_new_tokens each; end-of-text suppressed), prompt-major order.

    The same seed gives every condition the same random stream (common random numbers), so steered and
    unsteered runs differ by the steering only. `steer` = (hookpoint, unit vector, alpha) adds alpha * v at
    every position through `hookpoints.intervene`. The caller's torch RNG state is left untouched."""
    device = next(model.parameters()).device
    rows = [p for p in prompt_ids for _ in range(n_samples)]
    out: list[list[int]] = []
    ctx = intervene(model, steer[0], add_vector(steer[1], steer[2])) if steer else contextlib.nullcontext()
    with ctx, torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for b in range(0, len(rows), batch_size):
            batch = rows[b: b + batch_size]
            T = max(len(p) for p in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, p in enumerate(batch):  # left padding: generation continues from the right end
                ids[r, T - len(p):] = torch.tensor(p)
                mask[r, T - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=0, pad_token_id=pad_id)
            out.extend(gen[:, T:].cpu().tolist())
    return out
