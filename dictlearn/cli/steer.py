"""`dictlearn steer --features DIR --feature N (--alpha A | --kl TARGET) --prompt "..." [--model PATH]`

Generates a continuation of the prompt without and with feature N's steering vector added at its hookpoint
(h + alpha * v at every position), and prints the two side by side. `--alpha` multiplies the stored vector
(decoder rows have unit norm, so alpha is in the activation's units). `--kl TARGET` instead picks the
strength by KL calibration: alpha along the unit vector such that the mean next-token KL(base || steered)
over the prompt and a few neutral prompts hits TARGET (`--sign -1` steers against the feature); when the
search runs out of forward passes first, it warns and uses the closest strength found. The model defaults
to the one named in DIR/features.json.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tyro

CALIBRATION_PROMPTS = 7  # neutral prompts (dictlearn.steering.prompts) calibrated on beside the user's prompt


@dataclass
class SteerArgs:
    features: Path
    """a folder with features.safetensors + features.json (from `dictlearn export`), or that file"""
    feature: int
    """index of the feature to steer with"""
    prompt: str
    """text to continue"""
    alpha: float | None = None
    """strength: adds alpha * vector (give this or --kl)"""
    kl: float | None = None
    """calibrate alpha so that the mean next-token KL divergence hits this target (e.g. 0.5)"""
    sign: int = 1
    """with --kl: +1 steers towards the feature, -1 away from it"""
    max_forwards: int = 16
    """with --kl: forward passes the calibration may use at most"""
    model: str | None = None
    """model (hub id, folder or .gguf); default: the one named in features.json"""
    max_new_tokens: int = 40
    """tokens to generate"""
    temperature: float = 0.0
    """0: greedy; > 0: sampled, both continuations with the same seed"""
    seed: int = 0
    """sampling seed"""
    width: int = 0
    """column width of the side-by-side print (0: fit the terminal)"""


@dataclass
class SteerResult:
    unsteered: str
    steered: str
    alpha: float  # multiplies the stored vector
    hookpoint: str
    vector_norm: float
    calibration: Any = None  # dictlearn.steering.calibrate.Calibration with --kl
    warnings: list[str] = field(default_factory=list)  # what the user should know about this result


def calibration_warning(c: Any) -> str | None:
    """The sentence to print when a KL calibration stopped before reaching its target; None when it converged."""
    if c.converged:
        return None
    return (f"the KL calibration did not converge: after {c.n_forwards} forward passes the closest strength "
            f"reaches KL {c.kl:.3f}, {c.relative_error:.0%} away from the target {c.target_kl}; the continuation "
            "below uses that strength (raise --max-forwards, or pick another --kl target)")


def steer_prompt(args: SteerArgs, loaded: Any = None) -> SteerResult:
    """Load features and model, check they fit, and generate both continuations. `loaded`: a LoadedModel to reuse."""
    import numpy as np

    from dictlearn.export.features import read_features
    from dictlearn.steering.steer import SteeringError, check_width, generate, resolve_hookpoint, steer

    if (args.alpha is None) == (args.kl is None):
        raise SteeringError("give exactly one of --alpha A (a fixed strength) and --kl TARGET (a calibrated one)")
    if args.sign not in (1, -1):
        raise SteeringError(f"--sign must be 1 or -1, got {args.sign}")
    if args.max_forwards < 1:
        raise SteeringError(f"--max-forwards must be at least 1, got {args.max_forwards}")
    fs = read_features(args.features)
    vector = fs.vector(args.feature, where=f"{args.features}")
    if loaded is None:
        name = args.model or fs.model
        if not name:
            raise SteeringError(f"{args.features}/features.json names no model; pass --model")
        from dictlearn.activations.models import load_model

        loaded = load_model(name)
    model, tok = loaded.model, loaded.tokenizer
    hp = resolve_hookpoint(model, fs.hookpoint)
    check_width(hp, fs.width, f"the features in {args.features} (hookpoint {fs.hookpoint})", model)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise SteeringError(f"feature {args.feature} of {args.features} has a zero vector: it cannot steer")
    calibration = None
    warnings: list[str] = []
    alpha = args.alpha
    if args.kl is not None:
        from dictlearn.steering.calibrate import calibrate_alpha
        from dictlearn.steering.prompts import NEUTRAL_PROMPTS
        prompts = [args.prompt, *NEUTRAL_PROMPTS[:CALIBRATION_PROMPTS]]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        calibration = calibrate_alpha(model, hp, vector, ids, target_kl=args.kl, sign=args.sign,
                                      max_forwards=args.max_forwards)
        alpha = calibration.alpha / norm  # the calibrated step is along the unit vector
        if (warning := calibration_warning(calibration)) is not None:
            warnings.append(warning)
    unsteered = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    with steer(model, hp, vector, alpha):
        steered = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    return SteerResult(unsteered, steered, float(alpha), hp.name, norm, calibration, warnings)


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 0) -> str:
    """Two wrapped text columns with titles, separated by ' | '."""
    if width <= 0:
        width = max(24, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    cols = [[t[:width], "-" * min(width, max(len(t), 1))] + (textwrap.wrap(" ".join(s.split()), width) or [""])
            for t, s in ((left_title, left), (right_title, right))]
    rows = max(len(c) for c in cols)
    for c in cols:
        c += [""] * (rows - len(c))
    return "\n".join(f"{a:<{width}} | {b}".rstrip() for a, b in zip(*cols))


def main(argv: list[str]) -> int:
    args = tyro.cli(SteerArgs, args=argv, prog="dictlearn steer")
    from dictlearn.export.features import FeaturesError
    from dictlearn.steering.steer import SteeringError

    try:
        result = steer_prompt(args)
    except (SteeringError, FeaturesError, FileNotFoundError) as e:
        print(f"dictlearn steer: {e}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"dictlearn steer: warning: {warning}", file=sys.stderr)
    how = f"alpha {result.alpha:.4g} x vector (norm {result.vector_norm:.3g})"
    if result.calibration is not None:
        c = result.calibration
        how += (f"; calibrated to KL {c.kl:.3f} (target {c.target_kl}) in {c.n_forwards} forward passes, "
                f"{abs(c.alpha) / c.activation_norm:.2f} of the mean activation norm {c.activation_norm:.1f}")
    print(f"prompt: {args.prompt!r}\nfeature {args.feature} at {result.hookpoint}: {how}\n")
    print(side_by_side("unsteered", args.prompt + result.unsteered, f"steered (feature {args.feature})",
                       args.prompt + result.steered, args.width))
    return 0
