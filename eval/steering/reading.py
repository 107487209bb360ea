"""Reading text with the unsteered model: activations pooled over read positions, and per-token loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import Hookpoint, capture, run_forward


@dataclass
class ReadOut:
    pooled: dict[str, np.ndarray]  # hookpoint -> (N, d): mean activation over each sequence's read positions
    tokens: dict[str, list[np.ndarray]]  # hookpoint -> per sequence (n_i, d) activations at read positions
    loss: np.ndarray | None  # (N,) mean next-token loss (nats) over the read positions


def read_sequences(model: torch.nn.Module, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                   hookpoints: Sequence[Hookpoint], keep_tokens: Sequence[str] = (), with_loss: bool = False,
                   batch_size: int = 16) -> ReadOut:
    """Run the (unsteered) model over token sequences and read positions [start, len) of each.

    Right-padded batches (exact under causal attention). Loss at position t is -log p(token_t | tokens_<t),
    so a start of at least 1 is needed with_loss. Stops after the last hooked block when no loss is needed."""
    if len(seqs) != len(starts):
        raise ValueError("need one start per sequence")
    for s, st in zip(seqs, starts):
        if not (0 <= st < len(s)) or (with_loss and st < 1):
            raise ValueError(f"read start {st} is out of range for a sequence of {len(s)} tokens")
    device = next(model.parameters()).device
    pooled = {h.name: [None] * len(seqs) for h in hookpoints}
    tokens = {name: [None] * len(seqs) for name in keep_tokens}
    loss = np.zeros(len(seqs)) if with_loss else None
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for b in range(0, len(seqs), batch_size):
        idx = order[b: b + batch_size]
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(list(seqs[i]))
        ids = ids.to(device)
        with torch.no_grad(), capture(model, list(hookpoints), stop_early=not with_loss) as acts:
            out = run_forward(model, ids)
        for r, i in enumerate(idx):
            st, n = int(starts[i]), len(seqs[i])
            for h in hookpoints:
                a = acts[h.name][r, st:n].float().cpu().numpy()
                pooled[h.name][i] = a.mean(0)
                if h.name in tokens:
                    tokens[h.name][i] = a
            if with_loss:
                loss[i] = float(torch.nn.functional.cross_entropy(out.logits[r, st - 1: n - 1].float(), ids[r, st:n]))
    return ReadOut({k: np.stack(v) for k, v in pooled.items()}, tokens, loss)
