"""What the subcommands share: reading a run config (dictlearn.run holds the rules) and turning the
errors a user can fix into one line on stderr and exit code 1."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable

from dictlearn.run import SECTIONS, read_run_config  # noqa: F401 (the subcommands' import point)


def out_dir(data: dict[str, Any], config_path: str | Path) -> Path:
    """The run's output folder (default: runs/<config file stem>)."""
    return Path(data.get("out_dir") or Path("runs") / Path(config_path).stem)


def _error_classes(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """'module:Class' names imported now (so a subcommand loads only what it uses)."""
    out = []
    for name in names:
        module, _, cls = name.partition(":")
        try:
            out.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def report_errors(prog: str, errors: tuple[str, ...], work: Callable[[], Any]) -> int:
    """Run `work`; an error of the listed kinds becomes `prog: message` on stderr and exit code 1."""
    try:
        work()
    except BaseException as e:
        if not isinstance(e, _error_classes(errors)):
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0
