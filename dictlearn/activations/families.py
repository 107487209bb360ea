"""Model families: where each named activation lives in a Hugging Face decoder, one entry per family.

Everything dictlearn knows about a model's layout is in the `FAMILIES` table below (matched by the HF config's
`model_type`; an unknown type that is structurally Llama-like gets the Llama entry). Hookpoint aliases, the
resumed downstream forward, the logit lens, feature cards, steering and the SAELens hook names all read it.
A new family is one `Family(...)` entry; `docs/families.md` is generated from the table
(`family_table_markdown()`).

Aliases (L = decoder block index); in every family `resid_pre.L + attn_out.L + mlp_out.L == resid_post.L`:

  resid_pre.L          input of block L (the residual stream before it)
  resid_mid.L          the residual stream between attention and MLP (= resid_pre.L + attn_out.L), read at the
                       input of the MLP's pre-norm (at the MLP's input in OLMo 2, which has none); refused in
                       parallel blocks, whose MLP reads resid_pre.L (see below)
  resid_post.L         output of block L
  attn_out.L           what the attention sub-block adds to the residual stream: the attention output after its
                       post-norm in post-norm families (Gemma 2/3: post_attention_layernorm, OLMo 2:
                       post_attention_layernorm), the attention module's output elsewhere
  attn_out_pre_norm.L  the attention module's own output, before any post-norm (the same tensor as attn_out.L in
                       families without post-norms)
  mlp_in.L             input of the MLP module (after its pre-norm, if any)
  mlp_hidden.L         input of the MLP's output projection (down_proj, c_proj, dense_4h_to_h)
  mlp_out.L            what the MLP sub-block adds to the residual stream: after post_feedforward_layernorm in
                       Gemma 2/3 and OLMo 2, the MLP module's output elsewhere; TransformerLens `hook_mlp_out`
  mlp_out_pre_norm.L   the MLP module's own output (= mlp_hidden.L @ W_out + bias), before any post-norm

Splicing and steering at an alias act on exactly that tensor (for post-norm families, `attn_out` / `mlp_out` hook
the post-norm module's output, so what is added there is not renormalised away). One exception: no module of a
Hugging Face block outputs the mid-block stream, so a splice or steer at `resid_mid.L` changes what the MLP reads
while the block's skip connection still carries the unchanged stream on to resid_post.L (to change the stream
itself, splice at resid_pre.L or resid_post.L). Reading resid_mid.L, e.g. as a transcoder's input, is exact.

Parallel blocks (GPT-NeoX with use_parallel_residual): attention and MLP both read resid_pre.L and
resid_post.L = resid_pre.L + attn_out.L + mlp_out.L. There is no stream between attention and MLP there, so
resid_mid.L raises HookpointError naming resid_pre.L (what the MLP reads) instead of quietly aliasing it.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch


class HookpointError(ValueError):
    """A hookpoint the model does not have."""


class FamilyError(HookpointError):
    """A model whose layout dictlearn does not know; the message names what is missing."""


ALIASES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "attn_out_pre_norm", "mlp_in", "mlp_hidden",
           "mlp_out", "mlp_out_pre_norm")
RESIDUAL_ALIASES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # in the residual stream's space
SEQUENTIAL_ONLY = ("resid_mid",)  # aliases a parallel block (attention and MLP reading one input) does not have
_ALIAS_RE = re.compile(r"([a-z_]+)\.(\d+)")


@dataclass(frozen=True)
class Family:
    """One model family's layout. Module names are relative: `attn`, `mlp` and the norms to a decoder block,
    `out_proj` to the MLP; `layers`, `final_norm` and `unembed` are paths from the model root."""

    name: str
    model_types: tuple[str, ...]  # HF config model_type values this entry serves
    layers: str  # the ModuleList of decoder blocks
    attn: str
    mlp: str
    out_proj: str  # the MLP's output projection; its input is mlp_hidden.L
    final_norm: str
    unembed: str = "lm_head"
    attn_pre_norm: str | None = None  # norm on the attention's input
    mlp_pre_norm: str | None = None  # norm on the MLP's input
    attn_post_norm: str | None = None  # norm on the attention's output, before the residual add
    mlp_post_norm: str | None = None  # norm on the MLP's output, before the residual add
    out_proj_weight_in_out: bool = False  # GPT-2's Conv1D stores (in, out); torch Linear stores (out, in)
    gain_offset: float = 0.0  # RMSNorm multiplies by (gain_offset + weight): 1.0 for Gemma's (1 + w)
    parallel_flag: str | None = None  # config attribute that, when true, makes attention and MLP read one input
    logit_softcap: str | None = None  # config attribute: logits = cap * tanh(logits / cap) when set
    load_options: tuple[tuple[str, str], ...] = ()  # from_pretrained options the family needs

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def is_parallel(self, model: torch.nn.Module) -> bool:
        return bool(self.parallel_flag and getattr(getattr(model, "config", None), self.parallel_flag, False))

    def site(self, alias: str, layer: int) -> tuple[str, str]:
        """(module path, "input" | "output") of an alias at a layer (no range check)."""
        b = self.block(layer)
        attn, mlp = f"{b}.{self.attn}", f"{b}.{self.mlp}"
        sites = {
            "resid_pre": (b, "input"),
            "resid_mid": (f"{b}.{self.mlp_pre_norm}" if self.mlp_pre_norm else mlp, "input"),
            "resid_post": (b, "output"),
            "attn_out": (f"{b}.{self.attn_post_norm}" if self.attn_post_norm else attn, "output"),
            "attn_out_pre_norm": (attn, "output"),
            "mlp_in": (mlp, "input"),
            "mlp_hidden": (f"{mlp}.{self.out_proj}", "input"),
            "mlp_out": (f"{b}.{self.mlp_post_norm}" if self.mlp_post_norm else mlp, "output"),
            "mlp_out_pre_norm": (mlp, "output"),
        }
        if alias not in sites:
            raise HookpointError(f"unknown alias {alias!r}; aliases are {', '.join(ALIASES)}")
        return sites[alias]

    def required_modules(self) -> list[str]:
        """Module paths (block 0 standing for every block) this entry expects the model to have."""
        b = self.block(0)
        rel = [self.attn, self.mlp, f"{self.mlp}.{self.out_proj}"] + [
            n for n in (self.attn_pre_norm, self.mlp_pre_norm, self.attn_post_norm, self.mlp_post_norm) if n]
        return [self.layers, b] + [f"{b}.{r}" for r in rel] + [self.final_norm, self.unembed]

    def missing(self, model: torch.nn.Module) -> list[str]:
        modules = dict(model.named_modules())
        if not isinstance(modules.get(self.layers), torch.nn.ModuleList):  # no blocks: their modules go unsaid
            return [f"{self.layers} (the list of decoder blocks)"] + [
                p for p in (self.final_norm, self.unembed) if p not in modules]
        return [p for p in self.required_modules() if p not in modules]

    def post_norm_of(self, alias: str) -> str | None:
        """The post-norm between a pre-norm output alias and the residual stream (None without post-norms)."""
        return {"attn_out_pre_norm": self.attn_post_norm, "mlp_out_pre_norm": self.mlp_post_norm}.get(alias)


# --- the table ---------------------------------------------------------------------------------------------------
_LLAMA_LIKE = dict(layers="model.layers", attn="self_attn", mlp="mlp", out_proj="down_proj", final_norm="model.norm",
                   attn_pre_norm="input_layernorm", mlp_pre_norm="post_attention_layernorm")
_GEMMA = dict(layers="model.layers", attn="self_attn", mlp="mlp", out_proj="down_proj", final_norm="model.norm",
              attn_pre_norm="input_layernorm", attn_post_norm="post_attention_layernorm",
              mlp_pre_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm",
              gain_offset=1.0, logit_softcap="final_logit_softcapping")

LLAMA = Family("Llama", ("llama",), **_LLAMA_LIKE)
FAMILIES: tuple[Family, ...] = (
    Family("GPT-2", ("gpt2",), layers="transformer.h", attn="attn", mlp="mlp", out_proj="c_proj",
           final_norm="transformer.ln_f", attn_pre_norm="ln_1", mlp_pre_norm="ln_2", out_proj_weight_in_out=True),
    Family("GPT-NeoX", ("gpt_neox",), layers="gpt_neox.layers", attn="attention", mlp="mlp",
           out_proj="dense_4h_to_h", final_norm="gpt_neox.final_layer_norm", attn_pre_norm="input_layernorm",
           mlp_pre_norm="post_attention_layernorm", parallel_flag="use_parallel_residual"),
    LLAMA,
    Family("Mistral", ("mistral",), **_LLAMA_LIKE),
    Family("Qwen2", ("qwen2",), **_LLAMA_LIKE),
    Family("Qwen3", ("qwen3",), **_LLAMA_LIKE),
    Family("Phi-3", ("phi3",), **_LLAMA_LIKE),
    # transformers refuses sdpa for Gemma 2 (it cannot softcap attention logits): eager attention
    Family("Gemma 2", ("gemma2",), **_GEMMA, load_options=(("attn_implementation", "eager"),)),
    Family("Gemma 3 (text)", ("gemma3_text",), **_GEMMA),
    Family("Gemma 3 (multimodal, its language model)", ("gemma3",),
           **{**_GEMMA, "layers": "model.language_model.layers", "final_norm": "model.language_model.norm"}),
    Family("OLMo 2", ("olmo2",), layers="model.layers", attn="self_attn", mlp="mlp", out_proj="down_proj",
           final_norm="model.norm", attn_post_norm="post_attention_layernorm",
           mlp_post_norm="post_feedforward_layernorm"),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_KNOWN_NORMS = {"input_layernorm", "post_attention_layernorm"}  # what a Llama-like block may hold as norms


def model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def load_options(model_type_name: str) -> dict[str, str]:
    """from_pretrained options a family needs (e.g. Gemma 2: attn_implementation="eager"); {} when none."""
    family = _BY_TYPE.get(model_type_name)
    return dict(family.load_options) if family else {}


def _llama_like(model: torch.nn.Module, mtype: str) -> tuple[Family | None, list[str]]:
    """The Llama entry under this model's name when its structure is Llama's exactly, else what differs."""
    family = replace(LLAMA, name=f"{mtype or type(model).__name__} (Llama-like)", model_types=(mtype,))
    missing = family.missing(model)
    if missing:
        return None, missing
    block = model.get_submodule(family.block(0))
    extra = [n for n, _ in block.named_children() if "norm" in n.lower() and n not in _KNOWN_NORMS]
    if extra:
        return None, [f"(it has norms a Llama block lacks: {', '.join(extra)})"]
    return family, []


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, Family]" = weakref.WeakKeyDictionary()


def family_of(model: torch.nn.Module) -> Family:
    """The model's Family; FamilyError naming the missing modules when its layout is not one dictlearn knows."""
    if model in _CACHE:
        return _CACHE[model]
    mtype = model_type(model)
    known = _BY_TYPE.get(mtype)
    if known is not None:
        missing = known.missing(model)
        if missing:
            raise FamilyError(f"{type(model).__name__} (model_type {mtype!r}) should be a {known.name} model but lacks "
                              f"{', '.join(missing)}; aliases cannot be used on it (name hookpoints by module path)")
        family = known
    else:
        family, missing = _llama_like(model, mtype)
        if family is None:
            names = ", ".join(f.name for f in FAMILIES)
            raise FamilyError(
                f"{type(model).__name__} (model_type {mtype!r}) is not a supported family ({names}) and is not "
                f"Llama-like: missing {', '.join(missing)}. Name hookpoints by module path, or add a Family entry "
                "for it in dictlearn/activations/families.py")
    _CACHE[model] = family
    return family


def n_layers(model: torch.nn.Module) -> int:
    return len(model.get_submodule(family_of(model).layers))


def parse_alias(name: str) -> tuple[str, int] | None:
    """("mlp_out", 6) for "mlp_out.6"; None for anything that is not an alias name."""
    m = _ALIAS_RE.fullmatch(name or "")
    return (m.group(1), int(m.group(2))) if m and m.group(1) in ALIASES else None


def alias_target(model: torch.nn.Module, alias: str, layer: int) -> tuple[str, str]:
    """(module path, site) of `alias.layer` in this model, with the layer range checked."""
    family = family_of(model)
    count = len(model.get_submodule(family.layers))
    if not 0 <= layer < count:
        raise HookpointError(f"hookpoint {alias}.{layer}: layer {layer} is out of range (the model has {count} "
                             f"decoder blocks, 0..{count - 1})")
    if alias in SEQUENTIAL_ONLY and family.is_parallel(model):
        raise HookpointError(
            f"hookpoint {alias}.{layer}: this {family.name} model has parallel blocks ({family.parallel_flag} is "
            f"true): attention and MLP both read the block input, so there is no residual stream between them. "
            f"The MLP reads resid_pre.{layer} (through its pre-norm: mlp_in.{layer}); use one of those")
    return family.site(alias, layer)


def layer_of(model: torch.nn.Module, module_path: str) -> int | None:
    """Decoder block index a module path lives in (None outside the blocks or for an unknown family)."""
    try:
        layers = family_of(model).layers
    except FamilyError:
        return None
    m = re.match(re.escape(layers) + r"\.(\d+)(\.|$)", module_path)
    return int(m.group(1)) if m else None


def alias_of(model: torch.nn.Module, hookpoint: str) -> tuple[str, int] | None:
    """The alias (and layer) a hookpoint name stands for: alias names directly, module paths when they are the
    module an alias hooks (the residual-stream alias first when two share one) or the MLP output projection's
    output (the MLP's own output). None otherwise."""
    parsed = parse_alias(hookpoint)
    if parsed is not None:
        return parsed
    path, site = (hookpoint[: -len(":input")], "input") if hookpoint.endswith(":input") else (hookpoint, "output")
    layer = layer_of(model, path)
    if layer is None:
        return None
    family = family_of(model)
    aliases = [a for a in ALIASES if not (a in SEQUENTIAL_ONLY and family.is_parallel(model))]
    found = next(((a, layer) for a in aliases if family.site(a, layer) == (path, site)), None)
    if found is None and (path, site) == (family.site("mlp_hidden", layer)[0], "output"):
        found = ("mlp_out_pre_norm", layer)  # the output projection's output is the MLP's own output
    return found


# --- the MLP's output projection and the residual stream ---------------------------------------------------------
def _projection_weight(module: torch.nn.Module, weight_in_out: bool) -> np.ndarray:
    w = module.weight.detach().float().cpu().numpy()
    return np.ascontiguousarray(w if weight_in_out else w.T, dtype=np.float32)


def output_projection(model: torch.nn.Module, hookpoint: str) -> tuple[np.ndarray, str]:
    """(W_out (d_hidden, d_model) float32, hookpoint where hidden @ W_out (+ bias) appears) of an MLP hidden site.

    The site is `mlp_hidden.L` or an output projection's input named by module path (`...down_proj:input`).
    The output appears at `mlp_out.L` in families without an MLP post-norm and at `mlp_out_pre_norm.L` in those
    with one (Gemma 2/3, OLMo 2): the post-norm comes after the projection."""
    found = alias_of(model, hookpoint)
    if found is not None and found[0] == "mlp_hidden":
        family, layer = family_of(model), found[1]
        path = family.site("mlp_hidden", layer)[0]
        out = f"{'mlp_out_pre_norm' if family.mlp_post_norm else 'mlp_out'}.{layer}"
        return _projection_weight(model.get_submodule(path), family.out_proj_weight_in_out), out
    if hookpoint.endswith(":input"):
        path = hookpoint[: -len(":input")]
        module = dict(model.named_modules()).get(path)
        if isinstance(module, torch.nn.Linear):
            return _projection_weight(module, False), path
        if type(module).__name__ == "Conv1D":  # GPT-2-style transposed linear
            return _projection_weight(module, True), path
    raise HookpointError(f"{hookpoint!r} is not an MLP hidden site (mlp_hidden.L, or the input of a linear output "
                         "projection named by module path with ':input'), so it has no output projection")


def is_hidden_site(model: torch.nn.Module, hookpoint: str) -> bool:
    try:
        output_projection(model, hookpoint)
    except HookpointError:
        return False
    return True


def to_residual(model: torch.nn.Module, hookpoint: str, directions: Any) -> tuple[str, np.ndarray]:
    """(hookpoint, (n, d_model) directions) where `directions` written at `hookpoint` add to the model.

    Identity except for MLP hidden sites, whose directions f map to f @ W_out at the projection's output: adding
    alpha * f @ W_out there is exactly adding alpha * f to the hidden layer."""
    d = np.asarray(directions, dtype=np.float32)
    if not is_hidden_site(model, hookpoint):
        return hookpoint, d
    w_out, out = output_projection(model, hookpoint)
    if d.ndim != 2 or d.shape[1] != w_out.shape[0]:
        raise HookpointError(f"directions at {hookpoint} must be (n, {w_out.shape[0]}), got shape {tuple(d.shape)}")
    return out, (d @ w_out).astype(np.float32)


# --- norms, the logit lens and the unembedding -------------------------------------------------------------------
def norm_gain(model: torch.nn.Module, path: str) -> np.ndarray | None:
    """The elementwise gain a norm module applies (weight, or gain_offset + weight for Gemma); None if it has none."""
    weight = getattr(model.get_submodule(path), "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return (weight.detach().float().cpu().numpy() + family_of(model).gain_offset).astype(np.float32)


def lens_gain(model: torch.nn.Module, hookpoint: str) -> np.ndarray:
    """(d_model,) product of every norm gain between `hookpoint` and the logits along the direct path.

    Residual-stream aliases (and module paths of width d_model that are no alias) get the final norm's gain;
    pre-norm outputs also get their post-norm's. Raises for sites that do not reach the logits linearly."""
    family = family_of(model)
    found = alias_of(model, hookpoint)
    gain = norm_gain(model, family.final_norm)
    d_model = int(model.get_output_embeddings().weight.shape[1])
    gain = np.ones(d_model, np.float32) if gain is None else gain
    if found is None or found[0] in RESIDUAL_ALIASES:
        return gain
    alias, layer = found
    if alias in ("attn_out_pre_norm", "mlp_out_pre_norm"):
        post = family.post_norm_of(alias)
        post_gain = norm_gain(model, f"{family.block(layer)}.{post}") if post else None
        return gain if post_gain is None else gain * post_gain
    raise HookpointError(f"{hookpoint} ({alias}) is not in the residual stream's space; map its directions first "
                         "(to_residual) or project a residual-stream hookpoint")


@dataclass(frozen=True)
class LogitLens:
    """Directions at one hookpoint -> the logits they add along the direct path: W_U (gain * v)."""

    gain: np.ndarray  # (d_model,)
    unembed: torch.Tensor  # (vocab, d_model) float32

    def __call__(self, directions: Any) -> np.ndarray:
        d = np.atleast_2d(np.asarray(directions, np.float32))
        if d.shape[1] != self.gain.shape[0]:
            raise HookpointError(f"directions have width {d.shape[1]}; the residual stream has {self.gain.shape[0]}")
        return (torch.from_numpy(np.ascontiguousarray(d * self.gain)) @ self.unembed.T).numpy()

    def top_tokens(self, directions: Any, k: int = 10, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(token ids (n, k), logits (n, k)) each direction raises most, chunked over directions."""
        d = np.atleast_2d(np.asarray(directions, np.float32))
        ids, vals = [], []
        for i in range(0, len(d), chunk):
            v, j = torch.topk(torch.from_numpy(self(d[i : i + chunk])), min(k, self.unembed.shape[0]), dim=1)
            ids.append(j.numpy())
            vals.append(v.numpy())
        return np.concatenate(ids), np.concatenate(vals)


def logit_lens(model: torch.nn.Module, hookpoint: str) -> LogitLens:
    """The logit lens of a residual-space hookpoint (every gain between it and the logits, then W_U)."""
    unembed = model.get_output_embeddings().weight.detach().float().cpu()
    return LogitLens(lens_gain(model, hookpoint), unembed)


def unembed_directions(model: torch.nn.Module, hookpoint: str, directions: Any) -> np.ndarray:
    """(n, vocab) logits that directions written at `hookpoint` add along the direct path (MLP hidden sites are
    mapped through the output projection first)."""
    where, d = to_residual(model, hookpoint, directions)
    return logit_lens(model, where)(d)


def final_logits(model: torch.nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """Logits from the last block's output: final norm, unembedding, and the family's logit softcap if set."""
    family = family_of(model)
    logits = model.get_submodule(family.unembed)(model.get_submodule(family.final_norm)(residual))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, family.logit_softcap, None) if family.logit_softcap else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# --- TransformerLens / SAELens hook names ------------------------------------------------------------------------
# TransformerLens's hook_attn_out / hook_mlp_out are what the block adds to the residual stream (after ln1_post /
# ln2_post in post-norm models), i.e. dictlearn's attn_out / mlp_out. The pre-norm outputs have no TL hook.
TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
    "mlp_in": "ln2.hook_normalized",
}


def tl_hook_name(hookpoint: str) -> str | None:
    """TransformerLens hook name of a dictlearn alias (`mlp_out.6` -> `blocks.6.hook_mlp_out`), or None."""
    parsed = parse_alias(hookpoint)
    if parsed is None or parsed[0] not in TL_HOOKS:
        return None
    return f"blocks.{parsed[1]}.{TL_HOOKS[parsed[0]]}"


def hookpoint_from_tl(hook_name: str) -> str | None:
    """dictlearn alias of a TransformerLens hook name (`blocks.6.hook_mlp_out` -> `mlp_out.6`), or None."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name or "")
    if not m:
        return None
    alias = next((a for a, h in TL_HOOKS.items() if h == m.group(2)), None)
    return f"{alias}.{m.group(1)}" if alias else None


# --- circuit-tracer hook names -----------------------------------------------------------------------------------
# circuit-tracer's config.yaml names where transcoders read and write by TransformerLens hook names relative to a
# block (`feature_input_hook`, `feature_output_hook`). It loads models with fold_ln=False, so TL's
# `ln2.hook_normalized` is the RMSNorm's output *before* its gain, not the MLP's input; the MLP's input is the
# `mlp.hook_in` of its wrapped MLP, and `mlp.hook_out` is the MLP module's own output. `hook_mlp_out` is what the
# block adds to the residual stream (after a post-norm). In families without an MLP post-norm the two outputs are one
# tensor, named `mlp.hook_out` there as circuit-tracer's published Llama and Qwen3 sets do (its nnsight Qwen3 map
# knows no `hook_mlp_out`); without a family, `hook_mlp_out`, which every family has on its TransformerLens backend.
def circuit_tracer_hook(alias: str, family: Family | None = None) -> str | None:
    """circuit-tracer's hook name (relative to block L) for a dictlearn alias stem, or None if it has none."""
    no_post_norm = family is not None and family.mlp_post_norm is None
    names = {"mlp_in": "mlp.hook_in", "mlp_out_pre_norm": "mlp.hook_out",
             "mlp_out": "mlp.hook_out" if no_post_norm else "hook_mlp_out"}
    return names.get(alias)


# --- the documentation table -------------------------------------------------------------------------------------
def family_table_markdown() -> str:
    """docs/families.md: for each family, the module behind each alias (block L's modules relative to the block)."""
    lines = [
        "# Model families", "",
        "Generated from `FAMILIES` in `dictlearn/activations/families.py` by `family_table_markdown()`; a test keeps",
        "this file equal to it. Module names under a block are relative to block L (`<layers>.L`); `:input` means",
        "the module's input, otherwise its output. In every family `resid_pre.L + attn_out.L + mlp_out.L ==",
        "resid_post.L`: `attn_out` / `mlp_out` are what the block adds to the residual stream, after any post-norm;",
        "`attn_out_pre_norm` / `mlp_out_pre_norm` are the attention / MLP modules' own outputs. `resid_mid` is",
        "`resid_pre + attn_out`, read where the MLP's pre-norm takes it; splicing there changes what the MLP reads,",
        "not the stream the skip connection carries on.", "",
        "| family | model_type | blocks | " + " | ".join(ALIASES) + " | final norm | gain | notes |",
        "|" + "---|" * (len(ALIASES) + 6),
    ]
    for f in FAMILIES:
        cells = []
        for alias in ALIASES:
            path, site = f.site(alias, 0)
            rel = path[len(f.block(0)) + 1 :] if path != f.block(0) else "(block)"
            cells.append(f"`{rel}{':input' if site == 'input' else ''}`")
        notes = []
        if f.parallel_flag:
            notes.append(f"parallel attention and MLP when `{f.parallel_flag}` (then no "
                         f"{', '.join(SEQUENTIAL_ONLY)}: the MLP reads resid_pre)")
        if f.logit_softcap:
            notes.append(f"logit softcap `{f.logit_softcap}`")
        notes += [f"loads with {k}={v!r}" for k, v in f.load_options]
        gain = "1 + w" if f.gain_offset == 1.0 else "w"
        lines.append(f"| {f.name} | {', '.join(f.model_types)} | `{f.layers}` | " + " | ".join(cells)
                     + f" | `{f.final_norm}` | {gain} | {'; '.join(notes)} |")
    lines += ["", "Another `model_type` whose blocks have exactly Llama's modules (`self_attn`, `mlp.down_proj`,",
              "`input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`) is served by the Llama entry;",
              "anything else fails before any work with an error naming the missing modules (module-path",
              "hookpoints still work on it).", ""]
    return "\n".join(lines)
