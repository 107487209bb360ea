"""Feature absorption on the first-letter task (SAEBench's protocol, after Chanin et al.): does a dictionary
keep "starts with L" in the latents that usually carry it, or do other latents swallow it for some words?

1. Words: single-token lowercase words of the tokenizer (" cat"), split into train and test words.
2. Prompts: in-context spelling lines packed into sequences (" cat: C\\n dog: D\\n ..."), each sequence opening
   with a few example lines; the model is read at each word's own token, where it has seen the pattern but
   not yet the answer (SAEBench reads the same place of "{word} has the first letter:").
3. A logistic probe for the first letter on those activations at the space the decomposer's features live
   in (`hookpoint_out`: its `features()` rows are directions there; the input hookpoint for an SAE or
   semi-NMF, the MLP output for a transcoder). Its held-out accuracy and chance say whether the model
   carries the signal at all; letters whose probe F1 is below `min_probe_f1` are not scored.
4. Main latents per letter: latents ranked by mean code difference (words with the letter minus the rest),
   k-sparse logistic probes for k = 1..max_k, k grown while the F1 jumps by at least `f1_jump`.
5. On held-out words the probe gets right: full absorption when no main latent fires and the one latent
   projecting most onto the probe direction (code x its feature's component along it) is aligned with it
   (cosine >= cos_threshold) and carries >= projection_share of the activation's projection; the absorption
   fraction is the share of the probe projection carried by up to max_absorbers aligned non-main latents
   rather than the main ones (SAEBench's partial measure). Rates are means over letters."""

from __future__ import annotations

import re
import string
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import HookpointError, resolve
from dictlearn.eval.probing import encode_rows, fit_logistic, logistic_scores, probe_sites
from dictlearn.eval.report import json_safe
from dictlearn.eval.steering.judges import LinearProbe
from dictlearn.eval.steering.reading import read_sequences

_WORD = re.compile(r"^ [a-z]{2,}$")


@dataclass
class AbsorptionConfig:
    """The `[eval.absorption]` table."""

    n_words: int = 1500  # vocabulary words read (train + test); the probe needs about 1,000 training words
    held_out: float = 0.3  # share of them held out for scoring
    words_per_prompt: int = 40  # spelling lines per packed sequence
    icl_examples: int = 4  # example lines opening each sequence (words not scored)
    min_words_per_letter: int = 6  # training words a letter needs to be probed
    min_probe_f1: float = 0.6  # letters whose probe F1 (held out) is lower are not scored
    max_k: int = 5  # largest k-sparse probe when looking for a letter's main latents
    f1_jump: float = 0.03  # k grows while the k-sparse probe's F1 rises by at least this
    cos_threshold: float = 0.025  # full absorption: the absorbing latent's cosine with the probe direction
    fraction_cos_threshold: float = 0.1  # absorption fraction: cosine an absorbing latent needs
    projection_share: float = 0.4  # absorbing latent(s) carry at least this share of the probe projection
    max_absorbers: int = 3  # absorption fraction: latents that may absorb together
    l2: float = 1e-2  # probes' L2 penalty (standardised inputs)
    batch_size: int = 8  # sequences per model forward
    encode_chunk: int = 1024  # token rows per encoder call (one fixed shape: one compile per decomposer)
    seed: int = 0  # word sample, example lines and the train/test split

    def __post_init__(self) -> None:
        if self.n_words < 20 or not 0 < self.held_out < 1:
            raise ValueError("eval.absorption needs n_words >= 20 and held_out between 0 and 1")
        if self.words_per_prompt < 1 or self.icl_examples < 0 or self.max_k < 1 or self.min_words_per_letter < 1:
            raise ValueError("eval.absorption needs words_per_prompt >= 1, icl_examples >= 0, max_k >= 1 and "
                             "min_words_per_letter >= 1")


def vocabulary_words(tokenizer) -> list[tuple[str, int]]:
    """(word, token id) for every token that decodes to a space and two or more lowercase ASCII letters
    (" cat"); `spelling_sequences` drops any whose spelling line does not start with that token."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [(t[1:], i) for i, t in enumerate(texts) if _WORD.match(t)]


@dataclass
class SpellingReads:
    """The scored words, their first letters and the activations at each word's token."""

    words: list[str]
    letters: np.ndarray  # (N,) int 0..25
    acts: dict[str, np.ndarray]  # hookpoint -> (N, width)


def spelling_sequences(tokenizer, words: Sequence[tuple[str, int]], examples: Sequence[tuple[str, int]],
                       cfg: AbsorptionConfig, rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Packed spelling prompts: (sequences, per sequence the positions of the scored words' tokens, the
    indices of those words); a word whose line does not start with its own token is left out."""
    def line(word: str) -> list[int]:
        return tokenizer(f" {word}: {word[0].upper()}\n", add_special_tokens=False)["input_ids"]

    seqs, positions, kept = [], [], []
    for start in range(0, len(words), cfg.words_per_prompt):
        ids: list[int] = []
        for j in rng.choice(len(examples), size=min(cfg.icl_examples, len(examples)), replace=False):
            ids += line(examples[j][0])
        pos = []
        for i in range(start, min(start + cfg.words_per_prompt, len(words))):
            w, tok = words[i]
            li = line(w)
            if li[0] != tok:
                continue
            pos.append(len(ids))
            kept.append(i)
            ids += li
        if pos:
            seqs.append(ids)
            positions.append(pos)
    return seqs, positions, kept


def read_spelling(model: torch.nn.Module, tokenizer, hookpoints: Sequence[Any], cfg: AbsorptionConfig,
                  rng: np.random.Generator) -> SpellingReads:
    vocab = vocabulary_words(tokenizer)
    if len(vocab) < cfg.n_words + cfg.icl_examples:
        raise ValueError(f"the tokenizer has {len(vocab)} single-token lowercase words; eval.absorption.n_words "
                         f"= {cfg.n_words} needs at least {cfg.n_words + cfg.icl_examples}: lower n_words")
    order = rng.permutation(len(vocab))
    words = [vocab[i] for i in order[: cfg.n_words]]
    examples = [vocab[i] for i in order[cfg.n_words: cfg.n_words + max(50, cfg.icl_examples)]]
    seqs, positions, kept = spelling_sequences(tokenizer, words, examples, cfg, rng)
    read = read_sequences(model, seqs, [1] * len(seqs), list(hookpoints), keep_tokens=[h.name for h in hookpoints],
                          batch_size=cfg.batch_size)
    acts = {h.name: np.concatenate([read.tokens[h.name][s][np.array(p) - 1] for s, p in enumerate(positions)])
            for h in hookpoints}
    scored = [words[i][0] for i in kept]
    return SpellingReads(scored, np.array([string.ascii_lowercase.index(w[0]) for w in scored]), acts)


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)


@dataclass
class LetterProbe:
    """The first-letter probe at one hookpoint: unit directions (raw activation space) per scored letter."""

    letters: list[int]  # letter indices probed (enough training words)
    directions: np.ndarray  # (n_letters, width) unit vectors
    correct: np.ndarray  # (N_test,) the probe's prediction is the right letter
    f1: dict[int, float]  # held-out F1 per letter
    accuracy: float
    chance: float
    n_train: int
    n_test: int


def letter_probe(x: np.ndarray, letters: np.ndarray, train: np.ndarray, test: np.ndarray, cfg: AbsorptionConfig) -> LetterProbe:
    """A multinomial probe over the letters with enough training words (the others are left out of it)."""
    counts = np.bincount(letters[train], minlength=26)
    probed = [int(c) for c in np.flatnonzero(counts >= cfg.min_words_per_letter)]
    if len(probed) < 2:
        raise ValueError(f"only {len(probed)} letter(s) have {cfg.min_words_per_letter}+ training words; "
                         "raise eval.absorption.n_words")
    index = {c: i for i, c in enumerate(probed)}
    tr = train[np.isin(letters[train], probed)]
    te = test[np.isin(letters[test], probed)]
    probe = LinearProbe(len(probed), l2=cfg.l2).fit(x[tr], np.array([index[c] for c in letters[tr]]))
    w = probe.w / probe.scale[:, None]  # raw-space weights per letter
    dirs = (w / (np.linalg.norm(w, axis=0, keepdims=True) + 1e-12)).T
    pred = np.array(probed)[probe.predict(x[test])] if len(test) else np.zeros(0, int)
    correct = pred == letters[test]
    f1s = {c: f1(pred == c, letters[test] == c) for c in probed}
    chance = float(np.bincount(letters[te]).max() / len(te)) if len(te) else float("nan")
    acc = float(correct[np.isin(letters[test], probed)].mean()) if len(te) else float("nan")
    return LetterProbe(probed, dirs, correct, f1s, acc, chance, len(tr), len(te))


def main_latents(codes_train: np.ndarray, y_train: np.ndarray, codes_test: np.ndarray, y_test: np.ndarray,
                 cfg: AbsorptionConfig) -> tuple[np.ndarray, float]:
    """(the letter's main latents, their k-sparse probe's held-out F1): latents ranked by mean code
    difference (letter minus the rest), k grown while the F1 jumps by at least cfg.f1_jump."""
    diff = codes_train[y_train].mean(0) - codes_train[~y_train].mean(0)
    order = np.argsort(-diff, kind="stable")
    best, chosen = -1.0, order[:1]
    for k in range(1, cfg.max_k + 1):
        cols = order[:k]
        fit = fit_logistic(codes_train[:, cols], y_train.astype(int), cfg.l2)
        score = f1(logistic_scores(fit, codes_test[:, cols]) > 0, y_test)
        if score < best + cfg.f1_jump:
            break
        best, chosen = score, cols
    return chosen, max(best, 0.0)


def absorption_of_words(codes: np.ndarray, projections: np.ndarray, cosines: np.ndarray, probe_proj: np.ndarray,
                        main: np.ndarray, cfg: AbsorptionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per word (rows): (full absorption 0/1, absorption fraction), SAEBench's criteria.

    codes (N, F) the words' codes; projections (N, F) each latent's contribution along the probe direction
    (code x feature . direction); cosines (F,) of each feature with the direction; probe_proj (N,) the
    activation's own projection; main: the letter's main latents."""
    n = len(codes)
    full, frac = np.zeros(n, bool), np.zeros(n)
    is_main = np.zeros(codes.shape[1], bool)
    is_main[main] = True
    for i in range(n):
        p, proj = probe_proj[i], projections[i]
        main_proj = float(proj[main].sum())
        if p > 0 and not (codes[i, main] > 1e-8).any():
            top = int(np.argmax(proj))
            full[i] = cosines[top] >= cfg.cos_threshold and proj[top] / p >= cfg.projection_share
        cand = proj[(~is_main) & (cosines >= cfg.fraction_cos_threshold) & (proj > 0)]
        absorbed = float(np.sort(cand)[::-1][: cfg.max_absorbers].sum())
        if p <= 0 or main_proj >= p or absorbed / p < cfg.projection_share:
            frac[i] = 0.0
        elif main_proj <= 0:
            frac[i] = 1.0
        else:
            a = min(absorbed, p - main_proj)
            frac[i] = float(np.clip(a / (a + main_proj), 0.0, 1.0))
    return full, frac


def absorption_scores(codes: np.ndarray, features: np.ndarray, x_out: np.ndarray, letters: np.ndarray,
                      train: np.ndarray, test: np.ndarray, probe: LetterProbe, cfg: AbsorptionConfig) -> dict[str, Any]:
    """One decomposer's absorption over the letters its probe reads well enough."""
    unit = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)
    full_rates, frac_rates, f1s, per_letter = [], [], [], {}
    for li, c in enumerate(probe.letters):
        if probe.f1[c] < cfg.min_probe_f1:
            continue
        direction = probe.directions[li]
        main, main_f1 = main_latents(codes[train], letters[train] == c, codes[test], letters[test] == c, cfg)
        hits = test[(letters[test] == c) & probe.correct]  # words of the letter the probe gets right
        if not len(hits):
            continue
        along = features @ direction  # (F,) each feature's component along the direction
        full, frac = absorption_of_words(codes[hits], codes[hits] * along, unit @ direction, x_out[hits] @ direction,
                                         main, cfg)
        full_rates.append(full.mean())
        frac_rates.append(frac.mean())
        f1s.append(main_f1)
        per_letter[string.ascii_lowercase[c]] = {"main_latents": main.tolist(), "f1": main_f1, "n_words": len(hits),
                                                 "full_absorption": float(full.mean()), "absorption_fraction": float(frac.mean())}
    mean = (lambda v: float(np.mean(v)) if v else None)
    return {"absorption_rate": mean(frac_rates), "full_absorption_rate": mean(full_rates), "n_letters": len(f1s),
            "mean_f1": mean(f1s), "letters": per_letter}


def run_absorption(loaded: Any, decomposers: dict[str, Any], cfg: AbsorptionConfig,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """First-letter absorption of every decomposer (contract 1): one model read of the spelling prompts at
    every hookpoint involved, one probe per probe space."""
    t0 = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    rng = np.random.default_rng(cfg.seed)
    sites, skipped = probe_sites(model, decomposers, "absorption")
    outs = {}
    for name in list(sites):
        try:
            outs[name] = resolve(model, decomposers[name].config.hookpoint_out)[0]
        except HookpointError as e:
            skipped[name] = f"its output hookpoint is not in the model: {e}"
            del sites[name]
    hps = {h.name: h for h in list(sites.values()) + list(outs.values())}
    probe_out: dict[str, Any] = {}
    records: dict[str, Any] = {}
    if sites:
        reads = read_spelling(model, tokenizer, list(hps.values()), cfg, rng)
        n = len(reads.words)
        perm = rng.permutation(n)
        test, train = np.sort(perm[: int(round(cfg.held_out * n))]), np.sort(perm[int(round(cfg.held_out * n)):])
        log(f"absorption: {n} words ({len(train)} train, {len(test)} test) read at {sorted(hps)} "
            f"in {time.perf_counter() - t0:.1f} s")
        probes = {}
        for hp in sorted({h.name for h in outs.values()}):
            probes[hp] = letter_probe(reads.acts[hp], reads.letters, train, test, cfg)
            p = probes[hp]
            probe_out[hp] = {"accuracy": p.accuracy, "n_train": p.n_train, "n_test": p.n_test, "chance": p.chance,
                             "n_letters": len(p.letters),
                             "n_letters_f1_ok": int(sum(v >= cfg.min_probe_f1 for v in p.f1.values()))}
            log(f"absorption: first-letter probe at {hp}: accuracy {p.accuracy:.3f} over {len(p.letters)} letters "
                f"(chance {p.chance:.3f}); {probe_out[hp]['n_letters_f1_ok']} letters with F1 >= {cfg.min_probe_f1}")
        for name, hp_in in sites.items():
            t = time.perf_counter()
            d, hp_out = decomposers[name], outs[name].name
            codes = encode_rows(d, reads.acts[hp_in.name], cfg.encode_chunk)
            features = np.asarray(d.features(), np.float64)
            if features.ndim != 2 or features.shape[1] != reads.acts[hp_out].shape[1]:
                skipped[name] = (f"its features() have shape {features.shape}, not (n_features, "
                                 f"{reads.acts[hp_out].shape[1]}) at {hp_out}")
                continue
            scores = absorption_scores(codes, features, reads.acts[hp_out], reads.letters, train, test, probes[hp_out], cfg)
            records[name] = {"hookpoint": hp_out, "hookpoint_in": hp_in.name, **scores,
                             "probe_accuracy": probes[hp_out].accuracy}
            fmt = (lambda v: "-" if v is None else f"{v:.3f}")
            log(f"absorption: {name}: rate {fmt(scores['absorption_rate'])}  full {fmt(scores['full_absorption_rate'])}  "
                f"over {scores['n_letters']} letters, main-latent F1 {fmt(scores['mean_f1'])}  ({time.perf_counter() - t:.1f} s)")
    return json_safe({"config": asdict(cfg), "probe": probe_out, "records": records, "skipped": skipped,
                      "seconds": time.perf_counter() - t0})
