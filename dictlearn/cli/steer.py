"""`dictlearn steer --features DIR --feature N (--alpha A | --kl TARGET) --prompt "..." [--model PATH]`

Generates a continuation of the prompt without and with feature N's steering vector added at its hookpoint
(h + alpha * v at every position), and prints the two side by side. `--alpha` multiplies the stored vector
(decoder rows have unit norm, so alpha is in the activation's units). `--kl TARGET` instead picks the
strength with the evaluation suite's calibration: alpha along the unit vector such that the mean next-token
KL(base || steered) over the prompt and a few neutral prompts hits TARGET (`--sign -1` steers against
the feature). The model defaults to the one named in DIR/features.json.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

CALIBRATION_PROMPTS = 7  # neutral prompts (the evaluation suite's) calibrated on beside the user's prompt


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


def steer_prompt(args: SteerArgs, loaded: Any = None) -> SteerResult:
    """Load features and model, check they fit, and generate both continuations. `loaded`: a LoadedModel to reuse."""
    import numpy as np

    from dictlearn.export.features import read_features
    from dictlearn.steering.steer import SteeringError, check_width, generate, resolve_hookpoint, steer

    if (args.alpha is None) == (args.kl is None):
        raise SteeringError("give exactly one of --alpha A (a fixed strength) and --kl TARGET (a calibrated one)")
    if args.sign not in (1, -1):
        raise SteeringError(f"--sign must be 1 or -1, got {args.sign}")
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
    alpha = args.alpha
    if args.kl is not None:
        from dictlearn.steering.calibrate import calibrate_alpha
        from dictlearn.eval.steering import NEUTRAL_PROMPTS

        prompts = [args.prompt, *NEUTRAL_PROMPTS[:CALIBRATION_PROMPTS]]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        calibration = calibrate_alpha(model, hp, vector, ids, target_kl=args.kl, sign=args.sign)
        alpha = calibration.alpha / norm  # the calibrated step is along the unit vector
    unsteered = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    with steer(model, hp, vector, alpha):
        steered = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    return SteerResult(unsteered, steered, float(alpha), hp.name, norm, calibration)


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
    how = f"alpha {result.alpha:.4g} x vector (norm {result.vector_norm:.3g})"
    if result.calibration is not None:
        c = result.calibration
        how += (f"; calibrated to KL {c.kl:.3f} (target {c.target_kl}) in {c.n_forwards} forward passes, "
                f"{abs(c.alpha) / c.activation_norm:.2f} of the mean activation norm {c.activation_norm:.1f}")
    print(f"prompt: {args.prompt!r}\nfeature {args.feature} at {result.hookpoint}: {how}\n")
    print(side_by_side("unsteered", args.prompt + result.unsteered, f"steered (feature {args.feature})",
                       args.prompt + result.steered, args.width))
    return 0
