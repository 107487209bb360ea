"""Run a model over a packed corpus and store the activations at named hookpoints in a cache.

The forward stops after the last hooked decoder block (no later layers, no LM head) unless gradients are
asked for. With `gradients = ["resid_post.10"]` each batch also runs the rest of the model, sums the
next-token cross-entropy over every position, and stores d(loss)/d(activation) under
`resid_post.10@grad`; the hooked activation is made a leaf that requires grad, so the backward pass stops
there. (The last position of a sequence predicts nothing, so its gradient is zero.)

Shard k holds sequences [k*S, (k+1)*S) with S fixed by the config; its rows are shuffled with a
generator seeded by (seed, k) before the write. Because sequence i is always the same tokens
(`corpus.sequences`) and shard k always the same sequences, a killed harvest resumes after its
last listed shard and ends with exactly the rows an uninterrupted run writes. One harvest at a time holds
the cache folder (`dictlearn.files.FolderLock`); a full disk stops it with a sentence saying what is written
and that the same command resumes; the corpus and the disk space are checked before the folder is created.

Positions left out (`corpus.left_out`): padding and other roles' tokens (chat mode), special tokens, and by
default the attention-sink position 0 (on the quickstart cache those rows were 0.8% of the rows but carried
5.3% of the squared norm of mlp_hidden.10); optionally rows whose norm exceeds `outlier_norm_factor` times the
shard's median norm. The manifest's `left_out` counts the tokens each rule left out.

Several processes (`process=(i, n)`, from `dictlearn.activations.processes.process_slot`) share one harvest:
process i writes the contiguous global shards `shard_range(n_shards, i, n)` as an ordinary, separately
resumable cache in `<out>/parts/<i>-of-<n>` (its manifest's `part` record names the range; its
`n_shards_planned` counts its own shards), and `dictlearn.activations.merge` joins the parts into `<out>`.
Shard k's sequences, shuffle and split depend on k alone, so the merged cache equals a one-process harvest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import math
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dictlearn.activations import hookpoints as hp_mod
from dictlearn.activations.cache import FORMAT, FORMAT_VERSION, MANIFEST, STORAGE_DTYPES, ActivationCache, CacheError, CacheWriter
from dictlearn.activations.corpus import (LEFT_OUT_RULES, CorpusConfig, Sequence, check_corpus, fingerprint as corpus_fingerprint,
                                          left_out, sequences, special_token_ids)
from dictlearn.activations.models import LoadedModel
from dictlearn.activations.processes import check_part_count, part_dir, shard_range
from dictlearn.files import FolderLock, human_size

_TORCH_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GRAD_SUFFIX = "@grad"


class HarvestError(RuntimeError):
    """A harvest that cannot run as configured (no room on disk, corpus too short, ...)."""


@dataclass
class HarvestConfig:
    """The `[harvest]` table of a run config."""

    hookpoints: list[str]  # aliases (resid_post.10, mlp_hidden.10, ...) or module paths
    n_tokens: int = 100_000  # corpus tokens to run through the model (rounded up to whole sequences)
    gradients: list[str] = field(default_factory=list)  # hookpoints whose loss gradient is stored as `<name>@grad`
    dtype: str = "bfloat16"  # storage dtype: float16, bfloat16 or float32
    batch_size: int = 8  # sequences per forward pass
    shard_mb: float = 64.0  # target shard size; rows are shuffled within a shard before it is written
    eval_fraction: float = 0.05  # share of shards held out for evaluation (at least one when > 0; 1: every shard, an eval-only cache with nothing to train on)
    exclude_special_tokens: bool = True  # leave BOS / EOS / padding positions out of the cache
    skip_sink_positions: bool = True  # leave out position 0 (the attention sink; BOS there is left out anyway)
    outlier_norm_factor: float = 0.0  # > 0: leave out rows whose norm exceeds this times the shard's median norm
    seed: int = 0

    def __post_init__(self) -> None:
        self.hookpoints, self.gradients = hp_mod.expand_hookpoints(self.hookpoints), hp_mod.expand_hookpoints(self.gradients)
        if not self.hookpoints:
            raise ValueError("hookpoints is empty: name at least one, e.g. hookpoints = [\"resid_post.10\"]")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not a storage dtype; use one of {', '.join(STORAGE_DTYPES)}")
        if self.n_tokens <= 0 or self.batch_size <= 0 or self.shard_mb <= 0:
            raise ValueError("n_tokens, batch_size and shard_mb must be positive")
        if self.outlier_norm_factor < 0 or 0 < self.outlier_norm_factor <= 1:
            raise ValueError(f"outlier_norm_factor must be 0 (off) or above 1, got {self.outlier_norm_factor}")
        if not 0 <= self.eval_fraction <= 1:
            raise ValueError(f"eval_fraction must be in [0, 1] (1: an eval-only cache), got {self.eval_fraction}")
        missing = [g for g in self.gradients if g not in self.hookpoints]
        if missing:
            raise ValueError(f"gradients {missing} must also be listed in hookpoints")


@dataclass
class Plan:
    """What a harvest will write, fixed before any work."""

    hookpoints: list  # resolved Hookpoints
    widths: dict[str, int]  # stored key -> width (activations and gradients)
    n_sequences: int
    sequences_per_shard: int
    n_shards: int
    eval_shards: list[int]
    row_bytes: int
    context_length: int

    @property
    def estimated_bytes(self) -> int:
        return self.n_sequences * self.context_length * (self.row_bytes + 4)  # + `sequence_tokens`, int32


def eval_shard_ids(n_shards: int, fraction: float) -> list[int]:
    """Evenly spread held-out shard indices (at least one when fraction > 0 and there are 2+ shards); every
    shard when fraction is 1 (an eval-only cache: scoring saved dictionaries on other text)."""
    if fraction >= 1:
        return list(range(n_shards))
    if fraction <= 0 or n_shards < 2:
        return []
    n_eval = min(n_shards - 1, max(1, round(fraction * n_shards)))
    return sorted({int((i + 0.5) * n_shards / n_eval) for i in range(n_eval)})


def plan(loaded: LoadedModel, corpus: CorpusConfig, config: HarvestConfig) -> Plan:
    """Resolve hookpoints (failing before any work on a bad one) and fix the shard layout."""
    hps = hp_mod.resolve(loaded.model, config.hookpoints)
    widths = {h.name: h.width for h in hps}
    by_name = {h.name: h for h in hps}
    for g in config.gradients:
        widths[g + GRAD_SUFFIX] = by_name[g].width
    itemsize = np.dtype(np.float32).itemsize if config.dtype == "float32" else 2
    row_bytes = sum(widths.values()) * itemsize + 12  # + token_id, seq, pos
    ctx = corpus.context_length
    n_seq = math.ceil(config.n_tokens / ctx)
    per_shard = max(1, int(config.shard_mb * 1e6 / (row_bytes * ctx)) // config.batch_size) * config.batch_size
    per_shard = min(per_shard, math.ceil(n_seq / config.batch_size) * config.batch_size)
    n_shards = math.ceil(n_seq / per_shard)
    return Plan(hps, widths, n_seq, per_shard, n_shards, eval_shard_ids(n_shards, config.eval_fraction), row_bytes, ctx)


def identity(loaded: LoadedModel, corpus: CorpusConfig, config: HarvestConfig) -> dict:
    """Everything that decides what a cache holds; a resumed harvest must match it exactly. Models and
    corpora count by content (fingerprints), so the same files named by another path still match."""
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    corpus_settings = {k: v for k, v in dataclasses.asdict(corpus).items() if k != "path"}
    return {
        "model": {"fingerprint": loaded.fingerprint, "dtype": dtype},
        "corpus": {"fingerprint": corpus_fingerprint(corpus), **corpus_settings},
        "harvest": dataclasses.asdict(config),
    }


DISK_MARGIN_FRACTION = 0.02  # on top of the estimate: safetensors headers, the manifest, file-system blocks
DISK_MARGIN_BYTES = 16 << 20



def _check_disk(out: Path, needed: int, config: HarvestConfig, resuming: bool) -> None:
    """Refuse before any work when the disk holding `out` lacks `needed` bytes plus a stated margin."""
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(probe).free
    margin = int(needed * DISK_MARGIN_FRACTION) + DISK_MARGIN_BYTES
    if needed + margin <= free:
        return
    if resuming:  # its settings are fixed: changing n_tokens or dtype would be refused as a different config
        advice = ("free some space and run the same command again (it resumes), or move the cache folder to a larger "
                  "disk and point out_dir there")
    else:
        advice = ", ".join(["free some space", "lower harvest.n_tokens"]
                           + (['store harvest.dtype = "bfloat16"'] if config.dtype == "float32" else [])
                           + ["or choose another out_dir"])
    raise HarvestError(
        f"the cache {'still needs' if resuming else 'needs'} about {human_size(needed)} plus a safety margin of {human_size(margin)} "
        f"({DISK_MARGIN_FRACTION:.0%} + {DISK_MARGIN_BYTES >> 20} MiB for headers, the manifest and file-system "
        f"overhead) but {probe} has only {human_size(free)} free; {advice}"
    )


def _disk_full_error(out: Path, e: OSError) -> HarvestError:
    """The sentence for a disk that filled up mid-harvest: what is safely written, and how to resume."""
    try:
        m = ActivationCache.open(out).manifest  # what is on disk, not what this process meant to write
        shards, planned = m["shards"], m.get("n_shards_planned")
    except CacheError:
        shards, planned = [], None
    written = (f"{len(shards)} of {planned} shards ({sum(s['rows'] for s in shards):,} rows, "
               f"{human_size(sum(s['bytes'] for s in shards))}) are safely written" if shards else "no shard was written yet")
    resume = f"it resumes after shard {len(shards) - 1}" if shards else "it starts the cache again"
    return HarvestError(
        f"the disk holding {out} is full ({e.strerror or e}): {written}; free some space and run the same command "
        f"again: {resume}"
    )


@contextlib.contextmanager
def _gradient_leaves(model: torch.nn.Module, hps: list) -> Iterator[dict[str, torch.Tensor]]:
    """Make the first gradient hookpoint reached a leaf requiring grad (backward stops there); later ones
    keep their .grad. Yields name -> tensor whose .grad is filled by backward."""
    leaves: dict[str, torch.Tensor] = {}

    def make(name):
        def fn(act):
            if act.requires_grad:
                act.retain_grad()
                t = act
            else:
                t = act.detach().requires_grad_(True)
            leaves[name] = t
            return t
        return fn

    with contextlib.ExitStack() as stack:
        for h in hps:
            stack.enter_context(hp_mod.intervene(model, h, make(h.name)))
        yield leaves


def _forward(model, ids: torch.Tensor, hps: list, grad_hps: list) -> dict[str, torch.Tensor]:
    """Activations (and `<name>@grad` gradients) at the hookpoints for a batch of token ids."""
    if not grad_hps:
        with torch.no_grad(), hp_mod.capture(model, hps, stop_early=True) as acts:
            hp_mod.run_forward(model, ids)
        return dict(acts)
    with torch.enable_grad(), hp_mod.capture(model, hps) as acts, _gradient_leaves(model, grad_hps) as leaves:
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()
        out = dict(acts)
        for name, t in leaves.items():
            out[name + GRAD_SUFFIX] = t.grad.detach()
    return out


def _numpy_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.to(_TORCH_STORAGE[dtype]).contiguous()
    if dtype == "bfloat16":
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _n_layers(model) -> int | None:
    """The decoder's layer count, or None for a model whose family is unknown (module-path hookpoints still work)."""
    try:
        return hp_mod.n_layers(model)
    except hp_mod.FamilyError:
        return None


def _outliers(arrays: dict[str, np.ndarray], p: Plan, factor: float) -> np.ndarray:
    """Rows whose norm, at any stored activation, exceeds `factor` times that activation's median row norm."""
    from dictlearn.activations.cache import to_float32

    out = np.zeros(len(arrays["seq"]), dtype=bool)
    for key in p.widths:
        if key.endswith(GRAD_SUFFIX) or not len(out):
            continue
        a = arrays[key]
        norms = np.linalg.norm(to_float32(a) if a.dtype != np.float32 else a, axis=1)
        out |= norms > factor * np.median(norms)
    return out


def _shard_rows(model, seqs: list[Sequence], seq_start: int, p: Plan, grad_hps: list, config: HarvestConfig,
                rules: dict, on_batch) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Rows (in harvest order) of every stored array for one shard's sequences, with the positions
    `corpus.left_out` leaves out (and, when asked, outlier rows) dropped; also the count per rule.
    `on_batch(n_tokens)` reports progress."""
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {key: [] for key in [*p.widths, "token_id", "seq", "pos"]}
    counts = dict.fromkeys(LEFT_OUT_RULES, 0)
    ctx = p.context_length
    for b0 in range(0, len(seqs), config.batch_size):
        batch = seqs[b0 : b0 + config.batch_size]
        tokens = np.stack([s.tokens for s in batch])
        keep, n_out = left_out(tokens, rules["excluded_token_ids"], rules["skip_sink_positions"],
                               np.stack([s.content for s in batch]), np.array([s.length for s in batch]))
        counts = {k: counts[k] + n_out[k] for k in counts}
        ids = torch.from_numpy(tokens.astype(np.int64))
        acts = _forward(model, ids.to(device), p.hookpoints, grad_hps)
        keep_np = keep.reshape(-1)
        keep_t = torch.from_numpy(keep_np)
        for key, width in p.widths.items():
            if acts[key].shape[-1] != width:
                raise HarvestError(f"{key}: captured width {acts[key].shape[-1]}, planned {width}")
            out[key].append(_numpy_storage(acts[key].reshape(-1, width)[keep_t.to(acts[key].device)].cpu(), config.dtype))
        out["token_id"].append(tokens.reshape(-1)[keep_np])
        out["seq"].append(np.repeat(np.arange(seq_start + b0, seq_start + b0 + len(batch), dtype=np.int32), ctx)[keep_np])
        out["pos"].append(np.tile(np.arange(ctx, dtype=np.int32), len(batch))[keep_np])
        on_batch(ids.numel())
    arrays = {key: np.concatenate(v) for key, v in out.items()}
    counts["outliers"] = 0
    if config.outlier_norm_factor > 0:
        drop = _outliers(arrays, p, config.outlier_norm_factor)
        counts["outliers"] = int(drop.sum())
        arrays = {key: v[~drop] for key, v in arrays.items()}
    return arrays, counts


def kept_positions(cache: ActivationCache, seq_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(n, T) bool: the positions of these cached sequences that the harvest kept (by `corpus.left_out`, with
    the cache's own rules and, for chat caches, its stored role masks and lengths), for the downstream loss."""
    m = cache.manifest
    rules = m.get("position_rules", {"excluded_token_ids": m.get("excluded_token_ids", []), "skip_sink_positions": False})
    content = lengths = None
    if m.get("corpus", {}).get("config", {}).get("mode") == "chat":
        starts = np.array([s["seq_start"] for s in cache.shards])
        content, lengths = np.zeros(tokens.shape, dtype=bool), np.zeros(len(tokens), dtype=np.int64)
        for j, sid in enumerate(np.asarray(seq_ids, dtype=np.int64)):
            k = int(np.searchsorted(starts, sid, side="right")) - 1
            arrays = cache.shard_arrays(k, ["sequence_content", "sequence_length"])
            content[j] = arrays["sequence_content"][sid - starts[k]].astype(bool)[: tokens.shape[1]]
            lengths[j] = arrays["sequence_length"][sid - starts[k]]
    return left_out(tokens, rules["excluded_token_ids"], rules["skip_sink_positions"], content, lengths)[0]


def _left_out_line(counts: dict[str, int], n_tokens: int) -> str:
    shown = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items() if v)
    return f"harvest: of {n_tokens:,} tokens read, left out: {shown or 'none'}"


def harvest(
    loaded: LoadedModel,
    corpus: CorpusConfig,
    config: HarvestConfig,
    out: str | Path,
    progress: bool = True,
    process: tuple[int, int] = (0, 1),
) -> ActivationCache:
    """Harvest (or finish harvesting) the cache at `out`; returns it opened. Refuses an existing cache
    made with a different model, corpus or harvest config.

    With `process=(i, n)`, n > 1: harvest (or finish) only process i's share, into `<out>/parts/<i>-of-<n>`,
    and return that part; when `<out>` already holds the merged cache of the same config, return it."""
    out = Path(out)
    index, count = process
    model = loaded.model
    p = plan(loaded, corpus, config)  # bad hookpoints fail here, before any work
    grad_hps = [h for h in p.hookpoints if h.name in config.gradients]
    ident = identity(loaded, corpus, config)
    # in chat mode with template tokens kept, which positions are cached is decided by the role mask alone
    keeps_template = corpus.mode == "chat" and corpus.template_tokens
    excluded_ids = special_token_ids(loaded.tokenizer).tolist() if config.exclude_special_tokens and not keeps_template else []
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": ident,
        "model": {"name": loaded.name, **ident["model"], "n_layers": _n_layers(model)},
        "corpus": {"fingerprint": ident["corpus"]["fingerprint"], "config": dataclasses.asdict(corpus)},
        "context_length": corpus.context_length,
        "hookpoints": {
            k: {"width": w, "dtype": config.dtype, "kind": "gradient" if k.endswith(GRAD_SUFFIX) else "activation"}
            for k, w in p.widths.items()
        },
        "excluded_token_ids": excluded_ids,
        "position_rules": {"excluded_token_ids": excluded_ids, "skip_sink_positions": config.skip_sink_positions,
                           "outlier_norm_factor": config.outlier_norm_factor},
        "sequences_per_shard": p.sequences_per_shard,
        "n_shards_planned": p.n_shards,
        "eval_shards": p.eval_shards,
        "n_tokens": 0,
        "n_rows": 0,
    }
    shards, target = range(p.n_shards), out
    if count > 1:
        merged = _merged_already(out, manifest)
        if merged is not None:
            return merged
        check_part_count(out, count)
        shards, target = shard_range(p.n_shards, index, count), part_dir(out, index, count)
        manifest.update(n_shards_planned=len(shards), part={
            "index": index, "count": count, "first_shard": shards.start, "stop_shard": shards.stop,
            "n_shards_total": p.n_shards})
    elif not (out / MANIFEST).is_file():
        check_part_count(out, 1)
    if not (target / MANIFEST).is_file():  # checks that must not leave a folder (or a lock file) behind when they fail
        CacheWriter.check_new_folder(target)
        check_corpus(corpus)
        _check_disk(target, p.estimated_bytes * len(shards) // p.n_shards, config, resuming=False)
    try:
        with FolderLock(target, "an activation harvest"):  # a second harvest into `target` refuses, naming this pid
            return _harvest_locked(loaded, corpus, config, target, p, grad_hps, manifest, progress, shards)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full_error(target, e) from None
        raise


def _merged_already(out: Path, manifest: dict) -> ActivationCache | None:
    """The finished cache at `out` when a part harvest finds its parts already merged there (None when there is
    none yet); a cache of another config, or an unfinished one-process harvest there, is refused."""
    if not (out / MANIFEST).is_file():
        return None
    writer = CacheWriter.create_or_resume(out, manifest)  # refuses another config, naming what differs
    if not writer.manifest.get("complete"):
        raise HarvestError(f"{out} holds an unfinished one-process harvest; finish it without --process-count "
                           "(or delete the folder to start a multi-process harvest)")
    return ActivationCache(out, writer.manifest)


def _harvest_locked(loaded: LoadedModel, corpus: CorpusConfig, config: HarvestConfig, out: Path, p: Plan,
                    grad_hps: list, manifest: dict, progress: bool, shards: range) -> ActivationCache:
    """Write the global shards `shards` (all of them, or one process's share) into `out`, after those done."""
    model = loaded.model
    writer = CacheWriter.create_or_resume(out, manifest)
    if writer.manifest.get("complete"):
        return ActivationCache(out, writer.manifest)
    start_shard = shards.start + writer.n_done
    if writer.n_done:
        _check_disk(out, p.estimated_bytes * (shards.stop - start_shard) // p.n_shards, config, resuming=True)
    first_seq = shards.start * p.sequences_per_shard
    n_seq = min(shards.stop * p.sequences_per_shard, p.n_sequences) - first_seq
    if progress:
        share = (f"process {manifest['part']['index']} of {manifest['part']['count']}: shards {shards.start}-"
                 f"{shards.stop - 1} of {p.n_shards}, " if "part" in manifest else "")
        print(
            f"harvest: {share}{len(p.widths)} arrays x {n_seq * p.context_length:,} tokens -> {out} "
            f"(about {human_size(p.estimated_bytes * len(shards) // p.n_shards)} in {len(shards)} shards"
            + (f"; resuming after shard {start_shard - 1}" if writer.n_done else "") + ")",
            file=sys.stderr,
        )
    seqs = sequences(corpus, loaded.tokenizer, start=start_shard * p.sequences_per_shard)

    from tqdm import tqdm

    bar = tqdm(total=n_seq * p.context_length, initial=(start_shard * p.sequences_per_shard - first_seq) * p.context_length,
               unit="tok", unit_scale=True, disable=not progress, desc="harvest", dynamic_ncols=True)
    writing: threading.Thread | None = None
    failure: list[BaseException] = []

    def write(arrays, info):
        try:
            writer.add_shard(arrays, info)
        except BaseException as e:  # surfaced in the main thread
            failure.append(e)

    try:
        for k in range(start_shard, shards.stop):
            seq_start = k * p.sequences_per_shard
            tokens = list(itertools.islice(seqs, min(p.sequences_per_shard, p.n_sequences - seq_start)))
            if seq_start + len(tokens) < min(seq_start + p.sequences_per_shard, p.n_sequences):
                have = seq_start + len(tokens)
                raise HarvestError(
                    f"the corpus ran out after {have} sequences of {p.context_length} tokens "
                    f"({have * p.context_length:,} tokens); delete {out} (its shards were laid out for the larger "
                    "harvest) and lower harvest.n_tokens to at most that"
                )
            arrays, counts = _shard_rows(model, tokens, seq_start, p, grad_hps, config, manifest["position_rules"], bar.update)
            perm = np.random.default_rng([config.seed, k]).permutation(len(arrays["seq"]))  # seeded per shard
            arrays = {key: v[perm] for key, v in arrays.items()}
            arrays["sequence_tokens"] = np.stack([s.tokens for s in tokens])
            if corpus.mode == "chat":  # what the downstream loss needs to leave out the same positions
                arrays["sequence_content"] = np.stack([s.content for s in tokens]).astype(np.int16)  # a dtype the cache reads
                arrays["sequence_length"] = np.array([s.length for s in tokens], dtype=np.int32)
            info = {"rows": len(arrays["seq"]), "tokens": len(tokens) * p.context_length, "seq_start": seq_start,
                    "seq_stop": seq_start + len(tokens), "split": "eval" if k in p.eval_shards else "train",
                    "left_out": counts}
            if writing is not None:
                writing.join()
            if failure:
                raise failure[0]
            # the write (serialise, checksum, fsync) overlaps the next shard's forward passes
            writing = threading.Thread(target=write, args=(arrays, info), name=f"write-shard-{k}")
            writing.start()
        if writing is not None:
            writing.join()
        if failure:
            raise failure[0]
    finally:
        if writing is not None:  # never leave a shard write running past the lock (an error above, Ctrl-C)
            writing.join()
        bar.close()
    shards = writer.manifest["shards"]
    writer.manifest["left_out"] = {r: sum(s.get("left_out", {}).get(r, 0) for s in shards) for r in [*LEFT_OUT_RULES, "outliers"]}
    if progress:
        print(_left_out_line(writer.manifest["left_out"], writer.manifest["n_tokens"]), file=sys.stderr)
    return writer.finish()
