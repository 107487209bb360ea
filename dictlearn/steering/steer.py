"""Steer a Hugging Face model with dictionary features: add directions, or clamp one feature's activation.

Two context managers, active for every forward pass inside the `with` block (plain forwards and
`model.generate`, prompt and generated positions alike):

    with steer(model, "resid_post.10", vectors, alphas):      # h -> h + sum_i alpha_i v_i
        model.generate(...)
    with clamp(model, decomposer, "resid_post.10", feature=123, value=8.0):
        model.generate(...)                                     # feature 123's activation := 8.0

Both keep whatever the dictionary does not explain: `steer` adds to the real activation, and `clamp`
adds only the change the new code makes to the reconstruction, x + (decode(c') - decode(c)), which is
decode(c') + (x - x_hat) with the reconstruction error added back. A clamp to the feature's own value
therefore changes nothing, bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dictlearn.activations.hookpoints import Hookpoint, HookpointError, capture, intervene, resolve


class SteeringError(ValueError):
    """Steering inputs that do not fit the model (feature index, hookpoint, width)."""


def torch_model(model: Any) -> torch.nn.Module:
    """The torch module of a model or of a `LoadedModel`."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and not isinstance(model, torch.nn.Module):
        return inner
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch model or a LoadedModel, got {type(model).__name__}")
    return model


def _model_label(model: torch.nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{type(model).__name__}" + (f" ({name})" if name else "")


def resolve_hookpoint(model: Any, hookpoint: str | Hookpoint) -> Hookpoint:
    """One hookpoint with its width measured; a name the model lacks is a SteeringError naming both."""
    model = torch_model(model)
    if isinstance(hookpoint, Hookpoint) and hookpoint.width is not None:
        return hookpoint
    name = hookpoint.name if isinstance(hookpoint, Hookpoint) else hookpoint
    try:
        found = resolve(model, [name])
    except HookpointError as e:
        raise SteeringError(f"hookpoint {name!r} does not exist in the model {_model_label(model)}: {e}") from e
    if len(found) != 1:
        raise SteeringError(f"hookpoint {name!r} matches {len(found)} places in {_model_label(model)}; name exactly one")
    return found[0]


def check_width(hp: Hookpoint, width: int, what: str, model: torch.nn.Module | None = None) -> None:
    if hp.width is not None and hp.width != width:
        where = f" of the model {_model_label(model)}" if model is not None else ""
        raise SteeringError(f"{what} has width {width}, but hookpoint {hp.name}{where} has width {hp.width}; "
                            f"use a dictionary trained on this model and hookpoint")


def _as_matrix(vectors: Any) -> torch.Tensor:
    v = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(np.array(vectors, dtype=np.float32))
    v = v.detach().to(torch.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[0] == 0:
        raise SteeringError(f"steering vectors must be (d,) or (n, d) with n > 0, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise SteeringError("steering vectors hold non-finite values (inf or nan)")
    return v


def steering_delta(vectors: Any, alphas: float | Sequence[float] | Any = 1.0) -> torch.Tensor:
    """sum_i alpha_i v_i as a (d,) float32 tensor; alphas is one number or one per vector."""
    v = _as_matrix(vectors)
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float32).reshape(-1))
    if a.numel() == 1:
        a = a.expand(v.shape[0])
    if a.numel() != v.shape[0]:
        raise SteeringError(f"got {v.shape[0]} steering vectors but {a.numel()} alphas; give one alpha or one per vector")
    return (a[:, None] * v).sum(0)


@contextlib.contextmanager
def steer(model: Any, hookpoint: str | Hookpoint, vectors: Any, alphas: float | Sequence[float] = 1.0) -> Iterator[Hookpoint]:
    """Add sum_i alphas[i] * vectors[i] to the activation at `hookpoint`, at every position, while active.

    vectors: (d,) or (n, d) array/tensor in the hookpoint's space (e.g. `read_features(...).vectors[[3, 7]]`).
    Yields the resolved Hookpoint."""
    module = torch_model(model)
    hp = resolve_hookpoint(module, hookpoint)
    delta = steering_delta(vectors, alphas)
    check_width(hp, int(delta.shape[0]), f"the steering vector ({int(delta.shape[0])} wide)", module)
    cache: dict[tuple, torch.Tensor] = {}

    def add(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in cache:
            cache[key] = delta.to(device=h.device, dtype=h.dtype)
        return h + cache[key]

    with intervene(module, hp, add):
        yield hp


def _codes_change(decomposer: Any, feature: int, value: float):
    """x (N, d_in) -> decode(c') - decode(c), where c = encode(x) and c' is c with c[:, feature] = value."""
    import jax.numpy as jnp

    def change(x: np.ndarray) -> np.ndarray:
        codes = decomposer.encode(jnp.asarray(x))
        clamped = codes.at[:, feature].set(jnp.asarray(value, codes.dtype))
        return np.asarray(decomposer.decode(clamped) - decomposer.decode(codes))

    return change


@contextlib.contextmanager
def clamp(
    model: Any, decomposer: Any, hookpoint: str | Hookpoint | None, feature: int, value: float
) -> Iterator[Hookpoint]:
    """Set one feature's activation to `value` at every position while active, keeping the error term.

    The activation x at the decomposer's input hookpoint is encoded to c; the output hookpoint's
    activation h becomes h + decode(c') - decode(c), with c' = c except c'[feature] = value. For an
    SAE both hookpoints are `hookpoint`; for a transcoder `hookpoint` is where it writes (hookpoint_out)
    and x is read at its hookpoint_in during the same forward pass. Yields the output Hookpoint."""
    module = torch_model(model)
    cfg = decomposer.config
    n = int(cfg.n_features)
    if not 0 <= int(feature) < n:
        raise SteeringError(f"feature {feature} is out of range: the {getattr(decomposer, 'kind', '') or 'dictionary'} "
                            f"has {n} features (indices 0..{n - 1})")
    out_name = hookpoint.name if isinstance(hookpoint, Hookpoint) else (hookpoint or cfg.hookpoint_out)
    if out_name != cfg.hookpoint_out:
        raise SteeringError(f"clamp at hookpoint {out_name!r}, but the dictionary writes to {cfg.hookpoint_out!r} "
                            f"(and reads {cfg.hookpoint_in!r}); clamp where it writes")
    hp_out = resolve_hookpoint(module, hookpoint if isinstance(hookpoint, Hookpoint) else out_name)
    same = cfg.hookpoint_in == cfg.hookpoint_out
    hp_in = hp_out if same else resolve_hookpoint(module, cfg.hookpoint_in)
    check_width(hp_in, int(cfg.d_in), f"the dictionary's input ({cfg.hookpoint_in})", module)
    check_width(hp_out, int(cfg.d_out), f"the dictionary's output ({cfg.hookpoint_out})", module)
    change = _codes_change(decomposer, int(feature), float(value))

    def apply(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).cpu().numpy()
        d = torch.from_numpy(np.array(change(flat))).reshape(h.shape).to(device=h.device, dtype=h.dtype)
        return h + d

    if same:
        with intervene(module, hp_out, lambda h: apply(h, h)):
            yield hp_out
        return
    with capture(module, [hp_in]) as acts, intervene(module, hp_out, lambda h: apply(h, acts[hp_in.name])):
        yield hp_out


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The model's continuation of `prompt` (greedy when temperature is 0, else sampled from `seed`);
    run it inside `steer(...)` or `clamp(...)` to get the steered continuation."""
    module = torch_model(model)
    device = next(module.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  attention_mask=torch.ones_like(ids))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = module.generate(ids, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
