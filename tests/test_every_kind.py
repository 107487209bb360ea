"""Every kind in dictlearn/decomposers, from its own `example`, end to end at tiny size: the train stage fits it
with its kind's trainer, save/load is exact, the input-scale fold round-trips, and its export format round-trips.

The list of kinds is the registry (filtered to the kinds defined in the package, so kinds that other tests
register for themselves are left out): a new kind file is picked up with no edit here. Also the transcoder
with gradient TopK: it trains with gradients, or refuses a cache without them."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn.decomposers as D
from dictlearn.decomposers import base
from dictlearn.hookpoint_names import expand_hookpoints

LAYER = 1
KINDS = sorted(k for k, cls in base.REGISTRY.items() if cls.__module__.startswith(f"{D.__name__}."))
TRAIN = {"batch_size": 64, "n_steps": 12, "lr": 3e-3, "warmup_steps": 2, "log_every": 4, "checkpoint_every": 12,
         "sample_tokens": 512, "progress": False}


def example_table(kind: str) -> dict:
    """The kind's example as a [[decomposers]] table at layer LAYER (a site-axis kind: layers LAYER to LAYER + 1)."""
    table = {"name": kind, "kind": kind, **base.REGISTRY[kind].example}
    layers = f"{LAYER}-{LAYER + 1}" if base.REGISTRY[kind].site_axis else f"{LAYER}"
    for key in ("hookpoint_in", "hookpoint_out"):
        if key in table:
            table[key] = f"{table[key]}.{layers}"
    return table


def _specs(hookpoints: dict[str, dict], root) -> dict:
    from dictlearn.trainers.spec import build_spec

    return {k: build_spec(example_table(k), hookpoints, root / k, "example") for k in KINDS}


@pytest.fixture(scope="module")
def trained(tiny_loaded, tmp_path_factory):
    """name -> (spec, trained decomposer, a held-out batch {key: array}) for every kind, from one train stage."""
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.loader import BatchLoader
    from dictlearn.trainers import train
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import train_config
    from dictlearn.trainers.spec import data_keys

    from conftest import CORPUS

    root = tmp_path_factory.mktemp("every_kind")
    sites = sorted(set(expand_hookpoints([example_table(k)[key] for k in KINDS for key in ("hookpoint_in", "hookpoint_out")
                                          if key in example_table(k)])))
    # Which sites need gradients: ask the specs themselves (built against a cache that would hold everything).
    everything = {**{s: {"width": 128} for s in sites}, **{f"{s}@grad": {"width": 128} for s in sites}}
    grads = sorted({s.config.hookpoint_out for s in _specs(everything, root / "probe").values() if s.needs_grad})
    cache = harvest(tiny_loaded, CorpusConfig(path=str(CORPUS), context_length=64),
                    HarvestConfig(hookpoints=sites, gradients=grads, n_tokens=2048, dtype="float32", batch_size=4,
                                  shard_mb=0.25, eval_fraction=0.25), root / "cache", progress=False)
    specs = _specs(cache.hookpoints, root / "decomposers")
    cfg = train_config(TRAIN)
    source = CacheSource(cache, data_keys(list(specs.values())), cfg.batch_size, cfg.seed)
    result = train(list(specs.values()), source, cfg, WandbConfig(mode="disabled"), log_dir=root)
    held = BatchLoader(cache, sorted(cache.hookpoints), 128, split="eval").batch(0)
    return {k: (specs[k], result.decomposers[k], result.logs[k], held) for k in KINDS}


def _site(held, keys: list[str], site_axis: bool) -> np.ndarray:
    """The held-out rows of one site, or of several stacked on a site axis (B, L, d)."""
    return np.stack([held[k] for k in keys], axis=1) if site_axis else held[keys[0]]


def _inputs(spec, held) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    x = jnp.asarray(_site(held, spec.x_keys, spec.site_axis))
    return x, (jnp.asarray(_site(held, spec.grad_keys, spec.site_axis)) if spec.needs_grad else None)


def _outputs(module, x, grad) -> dict[str, np.ndarray]:
    """What a decomposer computes: codes, their decoding, and (SAEs) the full call with the gradient."""
    codes = module.encode(x)
    out = {"codes": np.asarray(codes), "decoded": np.asarray(module.decode(codes))}
    if grad is not None:
        out["call"] = np.asarray(module(x, grad))
    return out


def test_kinds_are_found_and_carry_what_the_suite_needs():
    assert {"topk", "transcoder", "snmf"} <= set(KINDS)  # the package's own kinds were discovered
    for kind in KINDS:
        cls = base.REGISTRY[kind]
        assert cls.example, f"{kind}: set `example` (a tiny [[decomposers]] table) so the suite can run it"
        assert all("." not in str(cls.example.get(k, "")) for k in ("hookpoint_in", "hookpoint_out")), \
            f"{kind}: example hookpoints are alias stems without a layer"
        assert cls.trainer in ("sgd", "snmf") and isinstance(cls.export_format, str)


@pytest.mark.parametrize("kind", KINDS)
def test_trains_from_its_example(trained, kind):
    spec, module, log, held = trained[kind]
    assert module.kind == kind and type(module) is base.REGISTRY[kind]
    assert log and all(np.isfinite(r["fvu"]) for r in log if "fvu" in r), log
    x, grad = _inputs(spec, held)
    y = np.asarray(_site(held, spec.y_keys, spec.site_axis))
    y_hat = np.asarray(module(x, grad) if grad is not None else module(x))  # a skip path is in __call__
    fvu = float(np.sum((y_hat - y) ** 2) / np.sum((y - y.mean(0)) ** 2))
    assert fvu < 1.0, (kind, fvu)  # held-out raw activations: it explains variance


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_is_exact(trained, kind, tmp_path):
    spec, module, _, held = trained[kind]
    base.save(module, tmp_path / "m")
    loaded = base.load(tmp_path / "m")
    assert type(loaded) is type(module) and loaded.config == module.config
    before, after = base.state_arrays(module), base.state_arrays(loaded)
    assert before.keys() == after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    x, grad = _inputs(spec, held)
    for key, value in _outputs(module, x, grad).items():
        np.testing.assert_array_equal(_outputs(loaded, x, grad)[key], value, err_msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_fold_input_scale_round_trip(trained, kind, tmp_path):
    """Folding scale s makes the module read raw x as it read s * x (outputs / s); folding 1/s undoes it."""
    spec, module, _, held = trained[kind]
    base.save(module, tmp_path / "m")
    m = base.load(tmp_path / "m")
    x, grad = _inputs(spec, held)
    s = 0.4
    scaled = _outputs(m, x * s, None if grad is None else grad / s)
    m.fold_input_scale(s, s)
    folded = _outputs(m, x, grad)
    for key, value in scaled.items():
        np.testing.assert_allclose(folded[key], value / s, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(value).max() / s), err_msg=key)
    m.fold_input_scale(1 / s, 1 / s)
    for key, value in _outputs(module, x, grad).items():
        np.testing.assert_allclose(_outputs(m, x, grad)[key], value, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(value).max()), err_msg=key)


def _linear_round_trip(module, x, folder):
    from dictlearn.export.kinds import from_linear, to_linear
    from dictlearn.export.saelens import SaeLensFormatError, export_saelens, import_saelens

    lin = to_linear(module)
    codes = np.asarray(module.encode(x))
    np.testing.assert_allclose(lin.encode(np.asarray(x)), codes, rtol=1e-4, atol=1e-4)
    back = from_linear(lin)
    np.testing.assert_allclose(np.asarray(back.encode(x)), codes, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(back(x)), np.asarray(module(x)), rtol=1e-4, atol=1e-4)
    try:
        export_saelens(module, folder)
    except SaeLensFormatError:
        return  # SAELens has no architecture for this form (e.g. a TopK transcoder); the neutral form round-tripped
    assert json.loads((folder / "cfg.json").read_text())
    np.testing.assert_allclose(np.asarray(import_saelens(folder).encode(x)), codes, rtol=1e-4, atol=1e-4)


def _snmf_round_trip(module, x, folder):
    from dictlearn.export.snmf_format import read_snmf, write_snmf

    write_snmf(module, folder)
    np.testing.assert_array_equal(np.asarray(read_snmf(folder).encode(x)), np.asarray(module.encode(x)))


def _clt_round_trip(module, x, folder):
    """circuit-tracer's CLT layout (export/circuit_tracer.py; tests/test_export_circuit_tracer.py checks it
    fully): codes recomputed from the files as circuit-tracer does equal the module's; a TopK CLT has no form."""
    from safetensors.numpy import load_file

    from dictlearn.export.circuit_tracer import CircuitTracerFormatError, write_clt

    try:
        write_clt(module, folder)
    except CircuitTracerFormatError as e:
        assert "no TopK CLT" in str(e)
        return
    codes = np.asarray(module.encode(x))  # (B, L, F)
    first = len(list(folder.glob("W_enc_*.safetensors"))) - codes.shape[1]  # files are indexed by model layer
    for layer in range(codes.shape[1]):
        e = load_file(str(folder / f"W_enc_{first + layer}.safetensors"))
        pre = np.asarray(x)[:, layer] @ e[f"W_enc_{first + layer}"].T + e[f"b_enc_{first + layer}"]
        theirs = pre * (pre > e[f"threshold_{first + layer}"])
        np.testing.assert_allclose(theirs, codes[:, layer], rtol=1e-4, atol=1e-4)


EXPORT_CHECKS = {"linear": _linear_round_trip, "snmf": _snmf_round_trip,
                 "clt": _clt_round_trip}  # export format -> its round trip


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip(trained, kind, tmp_path):
    spec, module, _, held = trained[kind]
    fmt = module.export_format
    if not fmt:
        pytest.skip(f"{kind} declares no export format")
    assert fmt in EXPORT_CHECKS, f"{kind}: no round-trip check for export format {fmt!r}; add one to EXPORT_CHECKS"
    EXPORT_CHECKS[fmt](module, _inputs(spec, held)[0], tmp_path / "export")


# ---- the transcoder with gradient TopK (issue 12's silent bug) ------------------------------------------------------
TC_CONFIG = """
out_dir = "{out}"
[train]
cache = "{cache}"
batch_size = 64
n_steps = 10
lr = 3e-3
warmup_steps = 2
log_every = 5
checkpoint_every = 10
sample_tokens = 512
progress = false
seed = 0
[wandb]
mode = "disabled"
{tables}"""
TC_TABLE = """
[[decomposers]]
name = "{name}"
kind = "transcoder"
hookpoint_in = "mlp_in.1"
hookpoint_out = "mlp_out.1"
expansion = 2
k = 8
sparsity = "{sparsity}"
"""


def test_transcoder_with_gtopk_trains_with_gradients_or_refuses(tiny_harvest, tmp_path, capsys):
    from dictlearn.cli import main
    from dictlearn.trainers.spec import build_spec

    cache = tiny_harvest(out=tmp_path / "grad_cache", hookpoints=["mlp_in.1", "mlp_out.1"], gradients=["mlp_out.1"],
                         n_tokens=2048)
    tables = TC_TABLE.format(name="tc_gtopk", sparsity="gtopk") + TC_TABLE.format(name="tc_topk", sparsity="topk")
    config = tmp_path / "tc.toml"
    config.write_text(TC_CONFIG.format(out=tmp_path / "run", cache=cache.path, tables=tables))
    spec = build_spec({"name": "g", "kind": "transcoder", "hookpoint_in": "mlp_in.1", "hookpoint_out": "mlp_out.1",
                       "expansion": 2, "k": 8, "sparsity": "gtopk"}, cache.hookpoints, tmp_path / "g", "t")
    assert spec.needs_grad and "mlp_out.1@grad" in spec.keys()  # the gradient at what the transcoder writes
    assert main(["train", str(config)]) == 0
    g, t = (base.load(tmp_path / "run" / "decomposers" / n) for n in ("tc_gtopk", "tc_topk"))
    assert g.config.needs_grad and not t.config.needs_grad
    # Same seed, same batches, same init: only the gradient-weighted selection can make them differ.
    assert not np.allclose(np.asarray(g.W_enc[...]), np.asarray(t.W_enc[...]), atol=1e-6)

    bare = tiny_harvest(out=tmp_path / "bare_cache", hookpoints=["mlp_in.1", "mlp_out.1"], n_tokens=512)
    config.write_text(TC_CONFIG.format(out=tmp_path / "run2", cache=bare.path,
                                       tables=TC_TABLE.format(name="tc_gtopk", sparsity="gtopk")))
    capsys.readouterr()
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "needs gradients at mlp_out.1" in err and "harvest.gradients" in err, err
    assert not (tmp_path / "run2" / "decomposers" / "tc_gtopk" / base.CONFIG_FILE).exists()
