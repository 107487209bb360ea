"""`dictlearn` command line: one module per subcommand, imported only when used (torch/jax load lazily).

Each subcommand module `dictlearn/cli/<name>.py` exposes `main(argv: list[str]) -> int` and parses its own
flags with tyro. The run config and its rules live in `dictlearn/run.py`; `cli/common.py` turns fixable errors into one line.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "harvest": ("harvest", "harvest activations from a model into an on-disk cache"),
    "cache": ("cache", "inspect, verify or merge an activation cache: `cache info DIR`, `cache verify DIR`, `cache merge DIR`"),
    "train": ("train", "train the decomposers a config lists on its cache"),
    "eval": ("evaluate", "score every trained decomposer and write the comparison report"),
    "export": ("export", "export decomposers as SAELens folders and steering vectors; import others"),
    "steer": ("steer", "generate with and without a feature added to the model"),
    "run": ("run", "harvest, train, evaluate and export in one go, skipping finished stages"),
}


def usage() -> str:
    lines = ["usage: dictlearn COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dictlearn COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"dictlearn: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"dictlearn.cli.{COMMANDS[name][0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
