"""Hookpoint names as text: the layer-range syntax `mlp_in.0-3` (mlp_in.0, mlp_in.1, mlp_in.2, mlp_in.3).

Pure string work with no model and no torch, so the harvest config, the train stage and a decomposer's
config (a cross-layer transcoder's sites) all expand ranges with this one function.
`dictlearn.activations.hookpoints.expand_hookpoints` is the same function.
"""

from __future__ import annotations

import re

# A range is the last dotted part of a name: "<stem>.<first>-<last>". Parts holding fnmatch wildcards or the
# ":input" suffix are module-path patterns, never ranges.
_RANGE_RE = re.compile(r"(?P<stem>.+)\.(?P<span>[^.\[\]*?:]*-[^.\[\]*?:]*)")
_SPAN_RE = re.compile(r"(\d+)-(\d+)")


def expand_hookpoints(names: list[str] | str) -> list[str]:
    """Every name with its layer range written out, in the order given: ["mlp_in.0-2", "resid_post.5"] ->
    ["mlp_in.0", "mlp_in.1", "mlp_in.2", "resid_post.5"]. A name without a range is kept as it is.

    Raises ValueError, naming the fix, for a range that is not two whole numbers or runs backwards."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        m = _RANGE_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            out.append(name)
            continue
        stem, span = m.group("stem"), m.group("span")
        numbers = _SPAN_RE.fullmatch(span)
        if numbers is None:
            raise ValueError(f"hookpoint {name!r}: the layer range {span!r} must be two whole numbers, first and last "
                             f"layer, e.g. {stem}.0-3 for layers 0 to 3")
        first, last = int(numbers.group(1)), int(numbers.group(2))
        if first > last:
            raise ValueError(f"hookpoint {name!r}: the layer range runs backwards; write the lower layer first, "
                             f"{stem}.{last}-{first}")
        out.extend(f"{stem}.{layer}" for layer in range(first, last + 1))
    return out
