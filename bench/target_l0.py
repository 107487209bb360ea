"""Where the penalty kinds' L0 ends at the quickstart's budget, with and without `target_l0`.

Trains SAEs on one hookpoint of an existing cache with the quickstart's [train] settings (batch 1024, 300
steps, lr 5e-4, warm-up 50, expansion 4) through `dictlearn train`, all variants in one pass over the same
batches, and prints each one's last logged L0, running L0, FVU, dead fraction and coefficient.

    python bench/target_l0.py runs/quickstart/cache --out /tmp/target_l0 \\
        --variant relu --variant jumprelu --variant "relu target_l0=32" --variant "jumprelu target_l0=32"

A variant is a kind followed by the [[decomposers]] keys it sets (key=value, values parsed as TOML).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import tomllib
from pathlib import Path

from dictlearn.trainers.logging import read_log

TRAIN = {"batch_size": 1024, "n_steps": 300, "lr": 5e-4, "warmup_steps": 50, "log_every": 25,
         "checkpoint_every": 1000, "sample_tokens": 16384}


def _variant(text: str, hookpoint: str, expansion: int) -> dict:
    kind, *pairs = text.split()
    table = {"name": "-".join([kind, *(p.replace("=", "") for p in pairs)]).replace(".", "p"), "kind": kind,
             "hookpoint_in": hookpoint, "expansion": expansion}
    for pair in pairs:
        key, value = pair.split("=", 1)
        table[key] = tomllib.loads(f"v = {value}")["v"]
    return table


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--out", required=True, help="scratch folder (replaced)")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--hookpoint", default="resid_post.10")
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--steps", type=int, default=TRAIN["n_steps"])
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tables = [_variant(v, args.hookpoint, args.expansion) for v in args.variant]
    lines = [f'out_dir = "{out}"', "[train]", f'cache = "{Path(args.cache).resolve()}"', "progress = false",
             *(f"{k} = {_toml(v)}" for k, v in {**TRAIN, "n_steps": args.steps}.items()),
             "[wandb]", 'mode = "disabled"']
    for table in tables:
        lines += ["[[decomposers]]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    config = out / "config.toml"
    config.write_text("\n".join(lines) + "\n")

    from dictlearn.cli import main as cli

    tic = time.perf_counter()
    if cli(["train", str(config)]) != 0:
        raise SystemExit("training failed")
    seconds = time.perf_counter() - tic
    print(f"\n{args.steps} steps of {TRAIN['batch_size']} tokens, {args.hookpoint}, expansion {args.expansion}: "
          f"{seconds:.0f} s for {len(tables)} variants")
    print(f"{'variant':34} {'L0':>7} {'L0 ema':>7} {'FVU':>6} {'dead':>5} {'coefficient':>11}")
    for table in tables:
        last = read_log(out / "decomposers" / table["name"] / "train_log.jsonl")[-1]
        coef = last.get("l1_coefficient", last.get("l0_coefficient", float("nan")))
        print(f"{table['name']:34} {last['l0']:7.1f} {last.get('l0_ema', float('nan')):7.1f} {last['fvu']:6.3f} "
              f"{last.get('dead_frac', 0.0):5.2f} {coef:11.4g}")


if __name__ == "__main__":
    main()
