"""circuit-tracer reads dictlearn's exports: its own loaders, in its own virtual environment, encode and decode
real SmolLM2 activations as dictlearn does (max abs differences printed); optionally an attribution graph on
SmolLM2 through circuit-tracer, offline.

  python3 bench/circuit_tracer_check.py --make-venv            # once: the peer venv (circuit-tracer + CPU torch)
  .venv/bin/python bench/circuit_tracer_check.py               # exports, peer encode/decode, differences
  .venv/bin/python bench/circuit_tracer_check.py --graph       # also an attribution graph on SmolLM2

circuit-tracer (decoderesearch, PyPI `circuit-tracer`) pins transformers <= 4.57.3 and dictlearn needs >= 5, so
it lives in its own venv: $DICTLEARN_CIRCUIT_TRACER_VENV, default /tmp/peers/circuit-tracer. --make-venv runs
`python -m venv` there and pip-installs torch (from the PyTorch CPU index when it answers, else as pip finds
it; --torch names another requirement or a wheel file), circuit-tracer and an nnsight it can import (NNSIGHT).

The dictionaries are constructed, not trained (random encoder directions scaled to the data, biases from the
data, a few percent of latents firing): the check is of the computation, which does not depend on training.
Rows whose codes sit within 1e-3 of a threshold are left out of the code comparison: float32 matmuls in
JAX and torch round differently there. The same file is the peer's worker (`--worker JOB.json`); at top
level it imports only the standard library and numpy, so it runs in either venv.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DICTLEARN_ASSETS", ROOT.parent / "shared" / "assets"))
SMOL_GGUF = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = ASSETS / "english-corpus.jsonl.gz"
VENV = Path(os.environ.get("DICTLEARN_CIRCUIT_TRACER_VENV", "/tmp/peers/circuit-tracer"))
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MAKE_VENV = "python3 bench/circuit_tracer_check.py --make-venv"
# circuit-tracer 0.5.0 asks for nnsight>=0.6.0 but imports nnsight.intervention.tracing, gone in nnsight 0.8:
# its nnsight backend (the one that takes a local model folder) needs a 0.6 release.
NNSIGHT = "nnsight>=0.6,<0.7"


# ---- the peer venv -------------------------------------------------------------------------------------------------
def peer_python(venv: Path = VENV) -> Path | None:
    """The peer venv's python when circuit-tracer is installed there, else None."""
    exe = Path(venv) / "bin" / "python"
    if not exe.is_file():
        return None
    probe = subprocess.run([str(exe), "-c", "import circuit_tracer"], capture_output=True)
    return exe if probe.returncode == 0 else None


def _reachable(url: str, timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


def make_venv(venv: Path, torch_req: str) -> int:
    """Create `venv` and install CPU torch and circuit-tracer into it, printing each command."""
    def sh(*cmd: str) -> None:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    sh(sys.executable, "-m", "venv", str(venv))
    pip = str(Path(venv) / "bin" / "pip")
    index = ["--index-url", TORCH_CPU_INDEX] if not Path(torch_req).is_file() and _reachable(TORCH_CPU_INDEX + "/torch/") else []
    if not index:
        print(f"  ({TORCH_CPU_INDEX} not used: unreachable, or a wheel file was given)")
    sh(pip, "install", *index, torch_req)
    sh(pip, "install", "circuit-tracer", NNSIGHT)
    print(f"circuit-tracer venv ready: {venv}")
    return 0


# ---- the worker (runs in the peer venv) -------------------------------------------------------------------------------
def worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    return {"encode": worker_encode, "graph": worker_graph}[job["task"]](job)


def worker_encode(job: dict) -> int:
    """Load each export with circuit-tracer's local loader (config.yaml included) and encode/decode its inputs
    both ways circuit-tracer does: dense encode + decode, and the sparse path attribution uses."""
    import torch
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from safetensors.numpy import load_file, save_file

    infos = []
    for item in job["items"]:
        folder = Path(item["folder"])
        coder, config = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=torch.device("cpu"),
                                                    dtype=torch.float32)
        x = torch.from_numpy(load_file(item["inputs"])["x"])  # (n_layers, rows, d)
        with torch.no_grad():
            codes = coder.encode(x)
            recon = coder.decode(codes, x) if config["model_kind"] == "transcoder_set" else coder.decode(codes)
            parts = coder.compute_attribution_components(x, zero_positions=slice(0, 0))
        save_file({"codes": codes.numpy(), "recon": recon.contiguous().numpy(),
                   "recon_attribution": parts["reconstruction"].contiguous().numpy()}, item["out"])
        infos.append({"loaded": type(coder).__name__, "n_layers": int(len(coder) if hasattr(coder, "__len__") else coder.n_layers),
                      "skip": bool(coder.skip_connection), "input_hook": coder.feature_input_hook,
                      "output_hook": coder.feature_output_hook})
    print(json.dumps(infos))
    return 0


def worker_graph(job: dict) -> int:
    """An attribution graph through circuit-tracer's ReplacementModel (nnsight backend) on a local HF folder."""
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    folder = Path(job["folder"])
    cpu = torch.device("cpu")
    coder, _ = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=cpu, dtype=torch.float32)
    t0 = time.time()
    model = ReplacementModel.from_pretrained_and_transcoders(job["model"], coder, backend=job.get("backend", "nnsight"),
                                                             device=cpu, dtype=torch.float32)
    ids = model.tokenizer(job["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits, _ = model.get_activations(ids)
    graph = attribute(ids[0], model, max_n_logits=job.get("max_n_logits", 5), batch_size=job.get("batch_size", 64),
                      max_feature_nodes=job.get("max_feature_nodes", 256))
    graph.to_pt(job["out"])
    replacement, completeness = compute_graph_scores(graph)
    print(json.dumps({"seconds": round(time.time() - t0, 1), "n_tokens": int(ids.shape[1]),
                      "active_features": int(graph.active_features.shape[0]),
                      "selected_features": int(graph.selected_features.shape[0]),
                      "adjacency": list(graph.adjacency_matrix.shape),
                      "top_logits": [t.token_str for t in graph.logit_targets][:5],
                      "top_logit_probs": [round(float(p), 4) for p in graph.logit_probabilities[:5]],
                      "replacement_score": float(replacement), "completeness_score": float(completeness),
                      "last_logits_head": logits[0, -1, :5].tolist()}))
    return 0


# ---- dictlearn side (runs in the project's venv) --------------------------------------------------------------------
def run_peer(python: Path, job: dict, tmp: Path, timeout: float = 900) -> object:
    """Run one worker job in the peer venv (offline); returns the JSON it printed last."""
    job_path = tmp / f"job-{job['task']}.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(job_path)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"circuit-tracer worker failed ({job['task']}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_encode(python: Path, exports: dict[str, tuple[Path, np.ndarray]], tmp: Path) -> dict[str, tuple[dict, dict]]:
    """circuit-tracer's encodings of each export: {label: (its arrays, what it loaded)}; exports maps a label to
    (export folder, (n_layers, rows, d) inputs). One worker process for all of them."""
    from safetensors.numpy import load_file, save_file

    items = []
    for i, (folder, x) in enumerate(exports.values()):
        save_file({"x": np.ascontiguousarray(x, np.float32)}, str(tmp / f"x-{i}.safetensors"))
        items.append({"folder": str(folder), "inputs": str(tmp / f"x-{i}.safetensors"), "out": str(tmp / f"out-{i}.safetensors")})
    infos = run_peer(python, {"task": "encode", "items": items}, tmp)
    return {label: (load_file(item["out"]), info) for label, item, info in zip(exports, items, infos)}


def smol_activations(loaded, layers: list[int], n_seq: int = 8, ctx: int = 64) -> dict[str, np.ndarray]:
    """mlp_in.L / mlp_out.L of SmolLM2 on the first corpus documents: {hookpoint: (n_seq * ctx, d) float32}."""
    import torch

    from dictlearn.activations.hookpoints import capture, resolve, run_forward

    ids = []
    with gzip.open(CORPUS, "rt") as f:
        for line in f:
            ids += loaded.tokenizer(json.loads(line)["text"]).input_ids
            if len(ids) >= n_seq * ctx:
                break
    batch = torch.tensor(ids[: n_seq * ctx]).reshape(n_seq, ctx)
    names = [f"{a}.{layer}" for layer in layers for a in ("mlp_in", "mlp_out")]
    with torch.no_grad(), capture(loaded.model, resolve(loaded.model, names), stop_early=True) as acts:
        run_forward(loaded.model, batch)
    return {k: v.reshape(-1, v.shape[-1]).float().numpy() for k, v in acts.items()}


def _directions(rng, n: int, d: int) -> np.ndarray:
    w = rng.standard_normal((n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def construct(module, x: np.ndarray, y: np.ndarray, seed: int = 0, fire: float = 0.05):
    """Give a (skip) transcoder or CLT weights fitted to the data's scale: unit-variance pre-activations of
    which about `fire` exceed the threshold, biases at the data's means, JumpReLU thresholds in 0.1..0.5.
    x, y: (rows, d) for a transcoder, (rows, L, d) for a CLT."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    clt = x.ndim == 3
    xs, ys = (x, y) if clt else (x[:, None], y[:, None])
    n_layers, n, d_out = xs.shape[1], module.config.n_features, ys.shape[-1]
    w_enc = np.zeros((n_layers, xs.shape[-1], n))
    b_enc = np.zeros((n_layers, n))
    for layer in range(n_layers):
        xc = xs[:, layer] - xs[:, layer].mean(0)
        w = _directions(rng, n, xs.shape[-1]).T
        w /= (xc @ w).std(0) + 1e-6
        w_enc[layer] = w
        b_enc[layer] = 0.3 - np.quantile(xc @ w, 1 - fire, axis=0)  # about `fire` above 0.3
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    if clt:
        module.W_enc[...] = f32(w_enc)
        module.b_enc[...] = f32(b_enc)
        module.b_in[...] = f32(xs.mean(0))
        module.b_dec[...] = f32(ys.mean(0))
        for i in range(n_layers):
            module.decoder(i)[...] = f32(0.05 * rng.standard_normal((n, n_layers - i, d_out)))
        set_thresholds(module.sparsity, rng, (n_layers, n))
        return module
    module.W_enc[...] = f32(w_enc[0].T)
    module.b_enc[...] = f32(b_enc[0])
    module.b_in[...] = f32(xs[:, 0].mean(0))
    module.W_dec[...] = f32(0.05 * rng.standard_normal((n, d_out)))
    module.b_dec[...] = f32(ys[:, 0].mean(0))
    if getattr(module, "skip", False):
        module.W_skip[...] = f32(0.02 * rng.standard_normal((xs.shape[-1], d_out)))
    set_thresholds(module.sparsity, rng, (n,))
    return module


def set_thresholds(sparsity, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    """Give whichever threshold the sparsity mechanism learns a value that makes some codes fire and others not:
    JumpReLU's per-latent log thresholds, BatchTopK's one threshold (per layer for a CLT); ReLU has none."""
    if hasattr(sparsity, "log_threshold"):
        sparsity.log_threshold[...] = np.log(rng.uniform(0.1, 0.5, shape)).astype(np.float32)
    elif hasattr(sparsity, "threshold"):
        sparsity.threshold[...] = np.full(sparsity.threshold[...].shape, 0.3, np.float32)


def dictlearn_outputs(modules: dict[int, object], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What dictlearn computes on (n_layers, rows, d) inputs, in circuit-tracer's (layer, row, ...) order:
    codes, reconstruction (skip path included), and each code's distance from its decision boundary
    (pre-activation minus threshold; the TopK-free kinds here all gate at a threshold)."""
    import jax.numpy as jnp

    if len(modules) == 1 and getattr(next(iter(modules.values())), "site_axis", False):  # a CLT
        (first, clt), = modules.items()
        xs = jnp.asarray(np.swapaxes(x[first:first + clt.n_layers], 0, 1))
        codes = clt.encode(xs)
        pre = np.asarray(clt.preacts(xs))
        gap = np.abs(pre - np.asarray(clt.thresholds())[None])
        return (np.swapaxes(np.asarray(codes), 0, 1), np.swapaxes(np.asarray(clt.decode(codes)), 0, 1),
                np.swapaxes(gap, 0, 1))
    from dictlearn.export.kinds import to_linear

    codes, recon, gaps = [], [], []
    for layer, m in sorted(modules.items()):
        xl = jnp.asarray(x[layer])
        codes.append(np.asarray(m.encode(xl)))
        recon.append(np.asarray(m(xl)))
        lin = to_linear(m).without_input_bias()
        pre = x[layer].astype(np.float64) @ lin.W_enc + lin.b_enc
        gaps.append(np.abs(pre - (lin.threshold if lin.threshold is not None else 0.0)))
    return np.stack(codes), np.stack(recon), np.stack(gaps)


def differences(modules: dict[int, object], x: np.ndarray, theirs: dict[str, np.ndarray], margin: float = 1e-3
                ) -> dict[str, float]:
    """Max abs differences between dictlearn and circuit-tracer on the covered layers (codes on rows away from
    a threshold; reconstructions everywhere), and how many code entries were compared and fired."""
    codes, recon, gap = dictlearn_outputs(modules, x)
    if len(modules) == 1 and getattr(next(iter(modules.values())), "site_axis", False):
        first = next(iter(modules))
        layers = list(range(first, first + codes.shape[0]))
    else:
        layers = sorted(modules)
    t_codes, t_recon, t_attr = (theirs[k][layers] for k in ("codes", "recon", "recon_attribution"))
    rows = min(t_recon.shape[1], recon.shape[1])  # circuit-tracer's CLT decode stops at the last row with a code
    safe = np.all(gap > margin, axis=(0, 2))  # rows with no pre-activation near a threshold in any layer
    return {"codes": float(np.abs(t_codes[:, safe] - codes[:, safe]).max()),
            "recon": float(np.abs(t_recon[:, :rows] - recon[:, :rows]).max()),
            "recon_attribution": float(np.abs(t_attr[:, :rows] - recon[:, :rows]).max()),
            "recon_scale": float(np.abs(recon).max()),
            "rows_compared": int(safe.sum()), "rows": int(x.shape[1]), "rows_decoded": int(rows),
            "codes_fired": float((codes != 0).mean()),
            "padded_codes_max": float(np.abs(np.delete(theirs["codes"], layers, axis=0)).max(initial=0.0))}


def peer_inputs(acts: dict[str, np.ndarray], n_layers: int) -> np.ndarray:
    """(n_layers, rows, d) MLP inputs for circuit-tracer; layers without activations are zeros."""
    some = next(iter(acts.values()))
    x = np.zeros((n_layers, *some.shape), np.float32)
    for name, a in acts.items():
        alias, layer = name.rsplit(".", 1)
        if alias == "mlp_in" and int(layer) < n_layers:
            x[int(layer)] = a
    return x


def hf4_folder(loaded_folder: Path, out: Path) -> Path:
    """The dequantised SmolLM2 folder as transformers 4.57 (circuit-tracer's) reads it, weights linked: transformers 5
    writes the RoPE base under `rope_parameters`, which 4.57 ignores (it would use 10000, not SmolLM2's 100000), and
    names the tokenizer class `TokenizersBackend`, which 4.57 does not know (PreTrainedTokenizerFast reads the same
    tokenizer.json)."""
    out.mkdir(parents=True, exist_ok=True)
    for p in loaded_folder.iterdir():
        if p.name not in ("config.json", "tokenizer_config.json") and not (out / p.name).exists():
            (out / p.name).symlink_to(p.resolve())
    cfg = json.loads((loaded_folder / "config.json").read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = json.loads((loaded_folder / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    return out


def main_check(args) -> int:
    python = peer_python(args.venv)
    if python is None:
        print(f"no circuit-tracer venv at {args.venv}: create it with `{MAKE_VENV}`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ct-check-") as tmp:
        return check(args, python, Path(tmp))


def check(args, python: Path, tmp: Path) -> int:
    """Exports on SmolLM2 activations, circuit-tracer's encodings of them, the differences; then the graph."""
    import torch

    from dictlearn.activations.models import default_cache_dir, load_model
    from dictlearn.decomposers import base
    from dictlearn.export.circuit_tracer import write_clt, write_transcoder_set

    loaded = load_model(str(SMOL_GGUF))
    n_model = loaded.model.config.num_hidden_layers
    layers = [0, 1, 2]
    acts = smol_activations(loaded, layers, n_seq=args.seqs, ctx=args.ctx)
    d = acts["mlp_in.0"].shape[1]

    def tc(kind, sparsity, layer, seed):
        m = base.build(kind, dict(d_in=d, d_out=d, n_features=args.width, sparsity=sparsity, k=8,
                                  hookpoint_in=f"mlp_in.{layer}", hookpoint_out=f"mlp_out.{layer}", seed=seed))
        return construct(m, acts[f"mlp_in.{layer}"], acts[f"mlp_out.{layer}"], seed)

    sets = {
        "transcoders relu/jumprelu/batchtopk (layers 0-2)":
            {0: tc("transcoder", "relu", 0, 0), 1: tc("transcoder", "jumprelu", 1, 1), 2: tc("transcoder", "batchtopk", 2, 2)},
        "skip transcoders jumprelu (layers 1-2, layer 0 padded)":
            {1: tc("skip_transcoder", "jumprelu", 1, 3), 2: tc("skip_transcoder", "jumprelu", 2, 4)},
    }
    x_all = peer_inputs(acts, n_model)
    exports, modules = {}, {}
    for i, (label, members) in enumerate(sets.items()):
        write_transcoder_set({f"L{layer}": m for layer, m in members.items()}, tmp / f"set-{i}")
        exports[label], modules[label] = (tmp / f"set-{i}", x_all[: max(members) + 1]), members
    xs = np.stack([acts[f"mlp_in.{i}"] for i in layers], 1)
    ys = np.stack([acts[f"mlp_out.{i}"] for i in layers], 1)
    for sparsity in ("jumprelu", "batchtopk"):
        clt = base.build("clt", dict(d_in=d, d_out=d, n_features=args.width, sparsity=sparsity, k=8,
                                     hookpoint_in="mlp_in.0-2", hookpoint_out="mlp_out.0-2", seed=5))
        write_clt(construct(clt, xs, ys, 5), tmp / f"clt-{sparsity}")
        label = f"CLT {sparsity} (layers 0-2)"
        exports[label], modules[label] = (tmp / f"clt-{sparsity}", x_all[:3]), {0: clt}
    results = {label: {**differences(modules[label], exports[label][1], arrays), "loaded": info}
               for label, (arrays, info) in peer_encode(python, exports, tmp).items()}
    print(f"SmolLM2-135M-Instruct mlp_in/mlp_out of layers 0-2, {x_all.shape[1]} tokens, {args.width} latents per layer")
    print(f"{'dictionary':58s} {'codes':>9s} {'recon':>9s} {'attr.recon':>10s} {'|recon|':>8s} {'fired':>6s} rows")
    for label, r in results.items():
        print(f"{label:58s} {r['codes']:9.2e} {r['recon']:9.2e} {r['recon_attribution']:10.2e} {r['recon_scale']:8.2f} "
              f"{r['codes_fired']:6.3f} {r['rows_compared']}/{r['rows']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.graph:
        return 0
    # an attribution graph: every model layer needs a transcoder (circuit-tracer iterates over all of them)
    members = {layer: tc("transcoder", "relu", layer, 10 + layer) for layer in layers}
    folder = tmp / "graph-set"
    write_transcoder_set({f"L{layer}": m for layer, m in members.items()}, folder, n_layers=n_model)
    hf_folder = hf4_folder(next((default_cache_dir() / "gguf").glob(f"{SMOL_GGUF.stem}-*")), tmp / "smollm2-hf4")
    ids = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits[0, -1, :5].tolist()
    try:
        info = run_peer(python, {"task": "graph", "folder": str(folder), "model": str(hf_folder), "prompt": args.prompt,
                                    "backend": args.backend, "out": str(tmp / "graph.pt")}, tmp, timeout=args.graph_timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"attribution graph: FAILED\n{e}")
        return 1
    info["logit_head_max_abs_diff_vs_dictlearn"] = float(np.abs(np.asarray(info.pop("last_logits_head")) - np.asarray(ours)).max())
    print("attribution graph (circuit-tracer, nnsight backend, SmolLM2 from the local GGUF, 3 constructed transcoders "
          "+ 27 never-firing layers):")
    print(json.dumps(info, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-venv", action="store_true", help="create the circuit-tracer venv and exit")
    ap.add_argument("--venv", type=Path, default=VENV, help="the circuit-tracer venv (env DICTLEARN_CIRCUIT_TRACER_VENV)")
    ap.add_argument("--torch", default="torch==2.13.*", help="--make-venv: torch requirement or wheel file")
    ap.add_argument("--width", type=int, default=512, help="latents per layer")
    ap.add_argument("--seqs", type=int, default=8, help="corpus sequences")
    ap.add_argument("--ctx", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--graph", action="store_true", help="also build an attribution graph through circuit-tracer")
    ap.add_argument("--backend", default="nnsight", choices=["nnsight", "transformerlens"])
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--graph-timeout", type=float, default=1800)
    ap.add_argument("--json", help="also write the differences here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.make_venv:
        return make_venv(args.venv, args.torch)
    return main_check(args)


if __name__ == "__main__":
    sys.exit(main())
