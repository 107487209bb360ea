"""Named places in a Hugging Face model where activations are read or replaced.

Two ways to name a hookpoint:
- aliases `resid_pre.L`, `resid_mid.L`, `resid_post.L`, `attn_out.L`, `mlp_in.L`, `mlp_hidden.L`, `mlp_out.L` and
  the pre-norm outputs `attn_out_pre_norm.L`, `mlp_out_pre_norm.L` (L = layer index; a range `mlp_in.0-3` names
  layers 0 to 3), resolved through the model's family entry (dictlearn/activations/families.py, which defines
  what each alias means);
- the model's own module paths with fnmatch patterns (`model.layers.*.mlp.down_proj`): the module's
  output, or its input with the suffix `:input` (`model.layers.3.mlp.down_proj:input`).

Everything here is torch-side and knows no dictionary: `capture` reads activations,
`intervene` rewrites them (splicing, steering), `capture(..., stop_early=True)` ends a forward early.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dictlearn.activations import families
from dictlearn.activations.families import ALIASES, FamilyError, HookpointError  # noqa: F401  (re-exported)
from dictlearn.hookpoint_names import expand_hookpoints  # noqa: F401  (re-exported: layer ranges, mlp_in.0-3)

_RESIDUAL_WIDTH = ("resid_pre", "resid_mid", "resid_post", "mlp_in", "mlp_out", "attn_out", "attn_out_pre_norm",
                   "mlp_out_pre_norm")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed activation is captured."""


@dataclass(frozen=True)
class Hookpoint:
    name: str  # what the user wrote (an alias like resid_post.10, or a module path)
    module_path: str  # the torch module whose input or output this is
    site: str  # "input" or "output"
    layer: int | None  # decoder block index, when known
    width: int | None = None


def decoder_layers_path(model: torch.nn.Module) -> str:
    """Module path of the list of decoder blocks (from the model's family entry)."""
    return families.family_of(model).layers


def n_layers(model: torch.nn.Module) -> int:
    return families.n_layers(model)


def valid_hookpoints_help(model: torch.nn.Module) -> str:
    try:
        count = n_layers(model)
        alias_part = f"aliases {', '.join(a + '.L' for a in ALIASES)} with L in 0..{count - 1}"
        block0 = f"{decoder_layers_path(model)}.0"
        paths = [p.replace(block0, block0[:-1] + "*", 1) for p, _ in model.named_modules() if p.startswith(block0)]
    except FamilyError:
        alias_part, paths = "no aliases (unknown layer layout)", [p for p, _ in model.named_modules() if p][:40]
    return f"valid hookpoints: {alias_part}; or module paths (optionally with ':input'), e.g. {', '.join(paths[:14])}"


def resolve(model: torch.nn.Module, names: list[str] | str, probe_widths: bool = True) -> list[Hookpoint]:
    """Turn names/patterns into Hookpoints (in the order given), failing before any work on a bad one."""
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    out: list[Hookpoint] = []
    for name in names:
        alias = families.parse_alias(name)
        if alias is not None:
            try:
                path, site = families.alias_target(model, *alias)
            except FamilyError:
                raise
            except HookpointError as e:  # a layer out of range: list what exists
                raise HookpointError(f"{e}; {valid_hookpoints_help(model)}") from e
            out.append(Hookpoint(name, path, site, alias[1]))
            continue
        pattern, site = (name[: -len(":input")], "input") if name.endswith(":input") else (name, "output")
        matches = [p for p in modules if p and fnmatch.fnmatchcase(p, pattern)]
        if not matches:
            raise HookpointError(f"unknown hookpoint {name!r} for {type(model).__name__}. {valid_hookpoints_help(model)}")
        for p in matches:
            out.append(Hookpoint(p + (":input" if site == "input" else ""), p, site, families.layer_of(model, p)))
    if len({h.name for h in out}) != len(out):
        raise HookpointError(f"hookpoints {names} name the same place twice")
    if probe_widths:
        out = _with_widths(model, out)
    return out


def _static_width(model: torch.nn.Module, h: Hookpoint) -> int | None:
    """Width read off the module's shape (linear layers, decoder blocks and their MLP / attention), or None."""
    module = model.get_submodule(h.module_path)
    if isinstance(module, torch.nn.Linear):
        return module.in_features if h.site == "input" else module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2's transposed linear
        return int(module.weight.shape[0 if h.site == "input" else 1])
    alias = families.parse_alias(h.name)
    if alias and alias[0] in _RESIDUAL_WIDTH:
        embed = model.get_input_embeddings()
        return int(embed.embedding_dim) if embed is not None else None
    return None


def _with_widths(model: torch.nn.Module, hps: list[Hookpoint]) -> list[Hookpoint]:
    """Each hookpoint's width: read off the module when that is unambiguous, else measured with a
    two-token forward (works for any module path)."""
    widths = [_static_width(model, h) for h in hps]
    if all(w is not None for w in widths):
        return [Hookpoint(h.name, h.module_path, h.site, h.layer, w) for h, w in zip(hps, widths)]
    device = next(model.parameters()).device
    with torch.no_grad(), capture(model, hps, stop_early=True) as acts:
        run_forward(model, torch.zeros((1, 2), dtype=torch.long, device=device))
    return [Hookpoint(h.name, h.module_path, h.site, h.layer, int(acts[h.name].shape[-1])) for h in hps]


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise RuntimeError("cannot find the input tensor of a hooked module")


def _output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise RuntimeError(f"cannot find the output tensor of a hooked module (got {type(output).__name__})")


def _replace_output(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    raise RuntimeError(f"cannot replace the output of type {type(output).__name__}")


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (new,) + tuple(args[1:]), kwargs
    for key in ("hidden_states", "x", "input", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: new}
    raise RuntimeError("cannot find the input tensor of a hooked module")


def _stop_module(model: torch.nn.Module, hps: list[Hookpoint]) -> str | None:
    """The decoder block after which nothing more is needed (None: cannot tell, run everything)."""
    if any(h.layer is None for h in hps):
        return None
    return f"{decoder_layers_path(model)}.{max(h.layer for h in hps)}"


@contextlib.contextmanager
def capture(
    model: torch.nn.Module, hookpoints: list[Hookpoint], stop_early: bool = False, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at each hookpoint into the yielded dict (name -> (B, T, d) tensor).

    With stop_early, the forward ends (StopForward, swallowed by `run_forward`) after the last
    decoder block any hookpoint lives in: no later layers and no LM head are computed."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for h in hookpoints:
        module = model.get_submodule(h.module_path)
        if h.site == "input":
            def pre(mod, args, kwargs, name=h.name):
                t = _input_tensor(args, kwargs)
                acts[name] = t.detach() if detach else t
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, output, name=h.name):
                t = _output_tensor(output)
                acts[name] = t.detach() if detach else t
            handles.append(module.register_forward_hook(post))
    stop = _stop_module(model, hookpoints) if stop_early else None
    if stop is not None:
        def halt(mod, args, output):
            raise StopForward()
        handles.append(model.get_submodule(stop).register_forward_hook(halt))
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def intervene(
    model: torch.nn.Module, hookpoint: Hookpoint, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the activation at `hookpoint` by fn(activation) during every forward in the block.

    fn gets and returns a (B, T, d) tensor; use it to splice a reconstruction in or to steer."""
    module = model.get_submodule(hookpoint.module_path)
    if hookpoint.site == "input":
        def pre(mod, args, kwargs):
            return _replace_input(args, kwargs, fn(_input_tensor(args, kwargs)))
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(mod, args, output):
            return _replace_output(output, fn(_output_tensor(output)))
        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def run_forward(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs):
    """model(input_ids), returning None instead of raising when a hook stopped it early."""
    try:
        return model(input_ids=input_ids, use_cache=False, **kwargs)
    except StopForward:
        return None
