"""Load a Hugging Face causal LM by hub name, local folder, or local `.gguf` file.

GGUF files are dequantised once through transformers' GGUF support and cached as an ordinary
safetensors folder, so later loads take seconds instead of the ~25 s dequantisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlearn.activations.families import load_options

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DICTLEARN_CACHE", Path.home() / ".cache" / "dictlearn"))


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's size plus its first and last MiB: cheap, and changes when the file does."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, 0))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


@dataclass
class ModelConfig:
    """The `[model]` table of a run config (the arguments of `load_model`)."""

    name: str  # hub id, local folder, or .gguf file
    dtype: str = "float32"  # weights and activations in the forward: float32 | float16 | bfloat16
    device: str = "cpu"  # torch device for the model: cpu, cuda, cuda:1, ...
    cache_dir: str | None = None  # where converted GGUF models are kept (default ~/.cache/dictlearn)
    trust_remote_code: bool = False  # run a hub model's own Python code (off unless you trust it)
    revision: str | None = None  # hub revision (branch, tag or commit) of a hub model

    def load(self) -> "LoadedModel":
        return load_model(self.name, self.dtype, self.device, self.cache_dir, self.trust_remote_code, self.revision)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    fingerprint: str  # identifies the weights (file hash for local models, name@revision for hub ones)


def _gguf_to_folder(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under cache_dir; reuse it afterwards."""
    out = cache_dir / "gguf" / f"{gguf.stem}-{file_fingerprint(gguf)}"
    if (out / "dictlearn-converted.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _convert(gguf, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


def _convert(gguf: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the weights in.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    (tmp / "dictlearn-converted.json").write_text(json.dumps({"source": str(gguf), "fingerprint": file_fingerprint(gguf)}))


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer. `name`: hub id, local folder, or path to a .gguf file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file {name!r} does not exist")
        folder = _gguf_to_folder(path.resolve(), cache_dir)
        fingerprint = "gguf:" + file_fingerprint(path)
    elif path.is_dir():
        folder = path
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not weights:
            raise FileNotFoundError(f"model folder {name!r} holds no *.safetensors weights")
        fingerprint = "local:" + hashlib.sha256("".join(file_fingerprint(w) for w in weights).encode()).hexdigest()[:16]
    elif path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {name!r} is neither a folder with safetensors weights nor a .gguf file")
    else:
        folder = name  # a hub id
        fingerprint = f"hub:{name}@{revision or 'main'}"
    kwargs = dict(trust_remote_code=trust_remote_code)
    if revision and not path.exists():
        kwargs["revision"] = revision
    # sdpa unless the family needs something else (Gemma 2: eager, see families.FAMILIES)
    options = {"attn_implementation": "sdpa", **load_options(AutoConfig.from_pretrained(folder, **kwargs).model_type)}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], **options, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint)
