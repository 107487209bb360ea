"""The `[eval.steering]` options, checked when the table is read (before any work)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dictlearn.eval.steering.corpus import TOPICS
from dictlearn.steering.prompts import NEUTRAL_PROMPTS


@dataclass
class SteeringConfig:
    """The `[eval.steering]` options."""

    kl_targets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])  # steering strengths, as KL (nats) on neutral prompts
    signs: list[int] = field(default_factory=lambda: [1])  # generation-scored signs (calibration: both)
    summary_kl: float = 0.5  # the KL target of the summary row (must be one of kl_targets)
    n_prompts: int = 16  # neutral prompts (first n of NEUTRAL_PROMPTS) for calibration and generation
    samples_per_prompt: int = 2  # sampled continuations per prompt and condition
    max_new_tokens: int = 32  # tokens generated per continuation
    temperature: float = 0.7  # sampled, not greedy (greedy continuations repeat)
    top_p: float = 1.0  # nucleus sampling (1.0: plain sampling)
    n_features: int = 4  # live features sampled per decomposer (unsupervised part; 0 skips it)
    output_top_k: int = 10  # top tokens of a feature's vocabulary projection
    concepts: list[str] = field(default_factory=lambda: list(TOPICS))  # [] skips the supervised part
    corpus: str = ""  # labelled .jsonl(.gz) corpus (source/id/text); needed for concepts
    hookpoints: list[str] = field(default_factory=list)  # extra DiffMean/random sites
    probe_hookpoint: str = ""  # "" : resid_post at half depth
    window_tokens: int = 32  # tokens per labelled window (probe, DiffMean, detection AUC)
    windows_per_class: int = 64  # training windows per concept (and 2x for "other")
    held_out_windows: int = 24  # held-out windows per class
    judge_samples_per_prompt: int = 2  # unsteered continuations of JUDGE_PROMPTS as negatives
    lexical_docs_per_label: int = 300  # training documents per label for the lexical judge
    probe_l2: float = 1.0  # L2 strength of the concept probe
    n_random: int = 1  # random directions per hookpoint
    loss_margin: float = 1.0  # fluency gate: loss within this many nats of unsteered
    bigram_frac: float = 0.8  # fluency gate: distinct-bigram share at least this fraction of unsteered
    alpha: float = 0.05  # significance level
    tol: float = 0.02  # calibration: relative KL tolerance
    max_forwards: int = 16  # calibration: forward passes per target at most
    cache_rows: int = 20000  # eval-split cache rows for feature firing statistics
    batch_size: int = 32  # generation batch: rows of any conditions together (reading: at most 16 sequences)
    seed: int = 0  # sampling and data-split seed

    def __post_init__(self) -> None:
        if not self.kl_targets or any(not (t > 0) for t in self.kl_targets):
            raise ValueError(f"kl_targets must be positive numbers, got {self.kl_targets}")
        if self.summary_kl not in self.kl_targets:
            raise ValueError(f"summary_kl {self.summary_kl} must be one of kl_targets {self.kl_targets}")
        if not self.signs or any(s not in (1, -1) for s in self.signs):
            raise ValueError(f"signs must be a non-empty list of 1 and/or -1, got {self.signs}")
        if not 1 <= self.n_prompts <= len(NEUTRAL_PROMPTS):
            raise ValueError(f"n_prompts must be in 1..{len(NEUTRAL_PROMPTS)}, got {self.n_prompts}")
        for name in ("samples_per_prompt", "max_new_tokens", "window_tokens", "batch_size", "n_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.window_tokens < 4:
            raise ValueError(f"window_tokens must be at least 4, got {self.window_tokens}")
        if len(set(self.concepts)) != len(self.concepts) or "other" in self.concepts:
            raise ValueError(f"concepts must be distinct labels (not 'other'), got {self.concepts}")
