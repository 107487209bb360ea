"""A ready accelerator check in one command: dictlearn's TopK step against sparsify, a bf16-matmul variant,
and a tiny harvest -> train -> eval on the device, printed as one table.

  .venv/bin/python bench/device_check.py                             # a CUDA or TPU machine (under 8 minutes)
  JAX_PLATFORMS=cpu .venv/bin/python bench/device_check.py --small   # anywhere: small sizes, under a minute

Rows, per size (batch 4096, k 32; --small: 512, k 8), the systems alternating in rounds so that machine noise
hits them alike:
  dictlearn fp32         the SGD trainer's TopK step (bench/train_throughput.py's `dictlearn_step`), float32
                         arrays at JAX's default matmul precision (TF32 on recent NVIDIA GPUs, bfloat16 passes
                         on TPU, float32 on CPU)
  dictlearn bf16-matmul  the same step with its one dense matmul (the encoder's) in bfloat16 with float32
                         accumulation; parameters, optimiser state and the sparse decode stay float32
  sparsify               sparsify's SparseCoder step as its trainer runs it (train_throughput.py's
                         `worker_sparsify`), in this process on torch's device: on CUDA its forward runs under
                         bf16 autocast (as sparsify ships it) with its Triton decoder when Triton is installed;
                         "not installed" when sparsify is not
  e2e harvest / train / eval   a small model harvested on torch's device, a TopK SAE trained on the JAX device,
                         evaluated (FVU, L0, spliced next-token CE): SmolLM2-135M from ../shared/assets when
                         present (not with --small), else a tiny random-weight Llama with a byte tokenizer
"x sparsify" is sparsify's median step time over the row's: above 1 the row is faster than sparsify.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the accelerator's memory
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import dictlearn_step, make_batch, summary, timed, worker_sparsify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DICTLEARN_ASSETS", ROOT.parent / "shared" / "assets"))
SMOL_GGUF = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGLISH = ASSETS / "english-corpus.jsonl.gz"
COLUMNS = ("row", "size", "ms", "tokens/s", "x sparsify", "detail")
NOT_INSTALLED = "not installed"


# ---- environment --------------------------------------------------------------------------------------


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_devices() -> list[str]:
    """Header lines: JAX's and torch's devices and the versions that matter."""
    import jax
    import torch

    dev = jax.devices()[0]
    lines = [f"JAX {jax.__version__}: {len(jax.devices())} x {dev.platform} ({getattr(dev, 'device_kind', '?')})"]
    tdev = torch_device()
    name = torch.cuda.get_device_name() if tdev == "cuda" else "cpu"
    lines.append(f"torch {torch.__version__}: {tdev} ({name})")
    try:
        import sparsify
        from sparsify import utils as sparsify_utils

        decoder = getattr(sparsify_utils.decoder_impl, "__name__", "?")
        lines.append(f"sparsify {getattr(sparsify, '__version__', '(version unknown)')}: decoder {decoder}")
    except ImportError:
        lines.append(f"sparsify: {NOT_INSTALLED} (pip install eai-sparsify)")
    return lines


def sparsify_available() -> bool:
    try:
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the TopK step ----------------------------------------------------------------------------------


@contextlib.contextmanager
def bf16_encoder_matmul():
    """While a step is traced: the encoder matmul (the step's one dense matmul) in bfloat16 with float32
    accumulation, the parameters float32. An experiment for this benchmark, not a library option."""
    import jax.numpy as jnp

    from dictlearn.decomposers.sae import SparseCoder

    original = SparseCoder.encoder_product

    def encoder_product(self, x):
        a = (x.astype(jnp.float32) - self.input_bias()).astype(jnp.bfloat16)
        return jnp.matmul(a, self.W_enc[...].astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)

    SparseCoder.encoder_product = encoder_product
    try:
        yield
    finally:
        SparseCoder.encoder_product = original


def bf16_error(x: np.ndarray, n: int, rows: int = 256) -> float:
    """Max |bf16 - fp32| of the encoder pre-activations over their max |fp32|, on a fresh SAE: shows that
    the variant really multiplies in bfloat16 (about 1e-3) and no worse."""
    import jax.numpy as jnp

    import dictlearn.decomposers as D

    model = D.build("topk", {"d_in": x.shape[1], "n_features": n, "k": 1})
    xs = jnp.asarray(x[:rows])
    z32 = np.asarray(model.encoder_product(xs))
    with bf16_encoder_matmul():
        z16 = np.asarray(model.encoder_product(xs))
    return float(np.abs(z16 - z32).max() / np.abs(z32).max())


def step_rows(d: int, n: int, args) -> list[dict]:
    """The three systems' steps at one size, in alternating rounds; one row each."""
    x = make_batch(args.batch, d)
    size = f"{d}x{n} b{args.batch} k{args.k}"
    runs = {"dictlearn fp32": dictlearn_step(x, n, args.k)}
    bf16 = dictlearn_step(x, n, args.k)
    with bf16_encoder_matmul():
        bf16()  # traced (and compiled) here, with the bfloat16 matmul
    runs["dictlearn bf16-matmul"] = bf16
    has_sparsify = sparsify_available()
    if has_sparsify:
        runs["sparsify"] = worker_sparsify(x, n, args.k, device=torch_device())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            times[name] += timed(fn, args.steps, args.warmup if r == 0 else 1)
    stats = {name: summary(t, args.batch) for name, t in times.items()}
    rows = []
    for name, s in stats.items():
        vs = stats["sparsify"]["step_s"] / s["step_s"] if has_sparsify else None
        detail = f"n={s['n']}, min {1e3 * s['min_s']:.1f} ms"
        if name == "dictlearn bf16-matmul":
            detail += f", pre-activation error {bf16_error(x, n):.1e} of fp32's max"
        rows.append({"row": name, "size": size, "ms": 1e3 * s["step_s"], "tokens/s": s["tokens_per_s"],
                     "x sparsify": vs, "detail": detail})
    if not has_sparsify:
        rows.append({"row": "sparsify", "size": size, "ms": NOT_INSTALLED, "tokens/s": NOT_INSTALLED,
                     "x sparsify": None, "detail": "pip install eai-sparsify"})
    return rows


# ---- tiny end to end ------------------------------------------------------------------------------------


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens and an end-of-text token), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_llama(device: str, hidden: int, layers: int):
    """A random-weight Llama from a transformers config, with the byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dictlearn.activations.models import LoadedModel

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny random Llama ({layers} layers, d {hidden})",
                       fingerprint=f"device_check:tiny-llama-{layers}x{hidden}")


def synthetic_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """English-like documents from a fixed word list (where the shared English corpus is absent)."""
    words = ("the a of to and in is it that was for on are with as his they be at one have this from by hot word "
             "but what some we can out other were all there when up use your how said an each she which do their time "
             "if will way about many then them write would like so these her long make thing see him two has look").split()
    rng = np.random.default_rng(seed)
    with gzip.open(path, "wt") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(words, rng.integers(60, 200))) + "."
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def e2e_rows(args, work: Path) -> list[dict]:
    """Harvest a small cache on torch's device, train a TopK SAE on the JAX device, evaluate it."""
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.models import load_model
    from dictlearn.decomposers import base
    from dictlearn.eval.suite import EvalConfig, evaluate
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.sgd import TrainConfig, train
    from dictlearn.trainers.spec import DecomposerSpec, data_keys

    device = torch_device()
    if args.model == "smollm2" and not SMOL_GGUF.is_file():
        raise SystemExit(f"--model smollm2: {SMOL_GGUF} is not there (set DICTLEARN_ASSETS, or use --model tiny)")
    if args.model == "smollm2" or (args.model == "auto" and SMOL_GGUF.is_file() and not args.small):
        loaded, layer = load_model(str(SMOL_GGUF), device=device), 10
    else:
        loaded, layer = tiny_llama(device, hidden=64 if args.small else 256, layers=2 if args.small else 4), 1
    corpus_file = ENGLISH if ENGLISH.is_file() else synthetic_corpus(work / "corpus.jsonl.gz")
    hp = f"resid_post.{layer}"
    sizes = dict(tokens=4096, steps=40, batch=256, seqs=2) if args.small else dict(tokens=131072, steps=300, batch=1024, seqs=16)

    t0 = time.perf_counter()
    cache = harvest(loaded, CorpusConfig(path=str(corpus_file), context_length=128),
                    HarvestConfig(hookpoints=[hp], n_tokens=sizes["tokens"], dtype="float32", batch_size=8,
                                  shard_mb=1.0 if args.small else 8.0, eval_fraction=0.25), work / "cache", progress=False)
    t_harvest = time.perf_counter() - t0
    d = cache.hookpoints[hp]["width"]
    cfg = base.REGISTRY["topk"].config_cls(d_in=d, n_features=4 * d, k=16, hookpoint_in=hp)
    specs = [DecomposerSpec("topk", "topk", cfg, work / "topk")]
    steps, batch = sizes["steps"], sizes["batch"]
    t0 = time.perf_counter()
    result = train(specs, CacheSource(cache, data_keys(specs), batch),
                   TrainConfig(batch_size=batch, n_steps=steps, lr=1e-3, warmup_steps=steps // 10, progress=False,
                               log_every=steps, checkpoint_every=steps, sample_tokens=min(8192, cache.rows("train"))))
    t_train = time.perf_counter() - t0
    model = base.load(result.folders["topk"])
    eval_cfg = EvalConfig(n_eval_rows=4096 if args.small else 16384, batch_size=1024,
                          n_downstream_sequences=sizes["seqs"], n_feature_cards=0)
    t0 = time.perf_counter()
    rec = evaluate({"topk": model}, loaded, cache, eval_cfg, log=lambda _: None, progress=False)["topk"]
    t_eval = time.perf_counter() - t0
    what = f"{Path(loaded.name).name} {hp}"
    return [
        {"row": "e2e harvest", "size": what, "ms": 1e3 * t_harvest, "tokens/s": cache.rows() / t_harvest,
         "x sparsify": None, "detail": f"{cache.rows():,} rows on torch {device}"},
        {"row": "e2e train", "size": f"topk {4 * d} latents k16", "ms": 1e3 * t_train, "tokens/s": steps * batch / t_train,
         "x sparsify": None, "detail": f"{steps} steps of {batch}, compile included"},
        {"row": "e2e eval", "size": f"{rec['n_tokens']:,} rows", "ms": 1e3 * t_eval, "tokens/s": rec["n_tokens"] / t_eval,
         "x sparsify": None, "detail": f"FVU {rec['fvu']:.3f}, L0 {rec['l0']:.1f}, CE score {rec['ce_loss_score']:.3f}"},
    ]


# ---- the table ----------------------------------------------------------------------------------------------


def cell(v, column: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if not math.isfinite(v):
        return str(v)
    if column == "x sparsify":
        return f"{v:.2f}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c], c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small sizes: a CPU smoke test in under a minute")
    ap.add_argument("--sizes", help="d_in x latents, comma separated (default 768x16384,2304x65536; --small 64x512)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per system per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, help="rounds alternating the systems")
    ap.add_argument("--parts", default="step,e2e", help="comma separated: step (the TopK step rows), e2e")
    ap.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto",
                    help="e2e model: auto = SmolLM2 from the shared assets when present (not with --small), else tiny")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    small = {"sizes": "64x512", "batch": 512, "k": 8, "steps": 3, "rounds": 2}
    full = {"sizes": "768x16384,2304x65536", "batch": 4096, "k": 32, "steps": 5, "rounds": 3}
    for key, v in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, v)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - {"step", "e2e"}:
        ap.error(f"--parts takes step and/or e2e, got {args.parts!r}")

    t_start = time.perf_counter()
    header = describe_devices()
    rows: list[dict] = []
    if "step" in parts:
        for size in args.sizes.split(","):
            d, n = (int(v) for v in size.lower().split("x"))
            rows += step_rows(d, n, args)
    if "e2e" in parts:
        with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
            rows += e2e_rows(args, Path(tmp))
    print("\n## dictlearn device check\n")
    print("\n".join(f"- {line}" for line in header))
    print(f"- total {time.perf_counter() - t_start:.0f} s; ms: median step (steps), wall time of the stage (e2e)\n")
    print(table(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
