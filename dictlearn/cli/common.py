"""What the subcommands share (the run config and its rules live in dictlearn.run): turning the
errors a user can fix into one line on stderr and exit code 1."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable



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
