"""Write docs/configuration.md, the reference of every run-config key, from the config dataclasses.

Run it after changing a config field:  .venv/bin/python docs/make_config_reference.py
(`--check` only compares and exits 1 when the page is stale; tests/test_docs.py does the same).

Every key's documentation lives once, beside the field in the source: its type annotation, its default and
the trailing `# comment` on the field's line (or the comment lines just above the field). This script only
reads them: the dataclasses are imported for their fields and defaults, and their source is parsed with
`ast` and `tokenize` for the comments. Classes are found by name anywhere in the installed packages (the
list in pyproject.toml), so a config class may move between modules without touching this script; the
decomposer kinds come from `dictlearn.decomposers.base.REGISTRY`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import inspect
import io
import math
import pkgutil
import re
import sys
import tokenize
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python docs/make_config_reference.py"

# The tables of a run config, in file order: (table, class holding its keys, one line on what it is for).
SECTIONS = [
    ("model", "ModelConfig", "the language model"),
    ("corpus", "CorpusConfig", "the text run through the model"),
    ("harvest", "HarvestConfig", "which activations are cached, and how"),
    ("train", "TrainConfig", "options shared by every dictionary trained in one pass"),
    ("eval", "EvalConfig", "the evaluation suite"),
    ("eval.steering", "SteeringConfig", "the steering evaluation (absent: not run)"),
    ("eval.probing", "ProbingConfig", "sparse probing (absent: not run)"),
    ("eval.absorption", "AbsorptionConfig", "first-letter feature absorption (absent: not run)"),
    ("eval.matching", "MatchingConfig", "feature matching between dictionaries (absent: not run)"),
    ("export", "ExportConfig", "export options"),
    ("wandb", "WandbConfig", "training logs sent to Weights & Biases"),
]
BASE_DECOMPOSER_CONFIG = "DecomposerConfig"
# `[[decomposers]]` keys that the train stage reads itself; every other key belongs to the kind's config.
TABLE_KEYS = [
    ("name", "str", "required", "the dictionary's folder name under `<out_dir>/decomposers/` (letters, digits, `.`, `_`, `-`)"),
    ("kind", "str", "required", "one of the kinds below"),
    ("expansion", "float", "", "n_features = expansion * d_in; give this or `n_features`"),
    ("lr", "float", "`[train]` lr", "this dictionary's own peak learning rate"),
]


# --------------------------------------------------------------------------------------------- finding classes
def package_names() -> list[str]:
    """The installed packages, as pyproject.toml lists them (one source of truth for the layout)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["tool"]["setuptools"]["packages"])


@cache
def module_files() -> dict[str, Path]:
    """module name -> source file for every module of every package, found without importing the modules."""
    found: dict[str, Path] = {}
    for package in package_names():
        pkg = importlib.import_module(package)
        found[package] = Path(pkg.__file__)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.ispkg:
                continue
            name = f"{package}.{info.name}"
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                found[name] = Path(spec.origin)
    return found


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def find_class(name: str) -> type:
    """The dataclass called `name` in the project's packages (its module imported); an error if none or several."""
    hits = []
    for module, path in sorted(module_files().items()):
        for node in parsed(path).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                hits.append(module)
    if not hits:
        raise SystemExit(f"make_config_reference: no class {name!r} in the packages {', '.join(package_names())}; "
                         f"if it was renamed, update SECTIONS in {Path(__file__).name}")
    if len(hits) > 1:
        raise SystemExit(f"make_config_reference: class {name!r} is defined in several modules ({', '.join(hits)}); "
                         f"config class names must be unique")
    cls = getattr(importlib.import_module(hits[0]), name)
    if not dataclasses.is_dataclass(cls):
        raise SystemExit(f"make_config_reference: {hits[0]}.{name} is not a dataclass")
    return cls


# ------------------------------------------------------------------------------------------- reading a field
@dataclasses.dataclass
class Key:
    name: str
    type: str
    default: str
    comment: str


def _class_node(cls: type) -> tuple[ast.ClassDef, list[str]] | None:
    try:
        path = Path(inspect.getsourcefile(cls))
    except TypeError:
        return None
    lines = path.read_text().splitlines()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node, lines
    return None


def _comment_in(lines: list[str]) -> str:
    """Text of the first `#` comment in these source lines ('' if none)."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return ""


def _comment_above(lines: list[str], lineno: int) -> str:
    """The block of whole-line comments right above line `lineno` (1-based), joined."""
    block = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(block)


def field_source(cls: type, name: str) -> tuple[str, str]:
    """(annotation as written, comment) for field `name`, from the most derived class that declares it."""
    for klass in cls.__mro__:
        if name not in klass.__dict__.get("__annotations__", {}):
            continue
        found = _class_node(klass)
        if found is None:
            break
        node, lines = found
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                comment = _comment_in(lines[stmt.lineno - 1: stmt.end_lineno]) or _comment_above(lines, stmt.lineno)
                return ast.unparse(stmt.annotation), comment
        break
    return "", ""


def defining_class(cls: type, name: str) -> type:
    """The most derived class in cls's MRO that declares field `name`."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e6:
            return f"{value:.1f}"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    return f"`{_toml(value)}`"


def keys_of(cls: type, names: list[str] | None = None) -> list[Key]:
    """The user-settable fields of dataclass `cls` (all, or just `names`), in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or (names is not None and f.name not in names):
            continue
        annotation, comment = field_source(cls, f.name)
        out.append(Key(f.name, annotation or str(f.type), default_text(f), comment))
    return out


# --------------------------------------------------------------------------------------------------- writing
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k.name}` | `{_cell(k.type)}` | {_cell(k.default)} | {_cell(k.comment)} |" for k in keys]
    return rows


def summary(cls: type) -> str:
    """First paragraph of the class's own docstring, on one line ('' for none or dataclass's generated one)."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return slug.replace(" ", "-")


def trainer_options(kind_cls: type) -> type | None:
    """The dataclass of per-table options of the trainer that fits this kind (`OPTIONS` in
    dictlearn.trainers.<trainer>, the trainer named by the kind's `trainer` attribute), if the code has one;
    else a dataclass whose docstring declares itself the `[[decomposers]]` table of this kind."""
    name = getattr(kind_cls, "trainer", "sgd")
    try:
        options = getattr(importlib.import_module(f"dictlearn.trainers.{name}"), "OPTIONS", None)
    except ImportError:
        options = None
    if options is not None and dataclasses.is_dataclass(options):
        return options
    pattern = re.compile(r"`\[\[decomposers\]\]` table with kind = \"" + re.escape(kind_cls.kind) + "\"")
    for module, path in sorted(module_files().items()):
        for node in parsed(path).body:
            if isinstance(node, ast.ClassDef) and pattern.search(ast.get_docstring(node) or ""):
                cls = getattr(importlib.import_module(module), node.name)
                if dataclasses.is_dataclass(cls):
                    return cls
    return None


def stage_keys(options: list[type | None]) -> list[tuple[str, str, str, str]]:
    """The table keys the train stage reads itself; `lr` only where no trainer's options declare it."""
    declared = {f.name for o in options if o is not None for f in dataclasses.fields(o)}
    return [k for k in TABLE_KEYS if k[0] not in declared or k[0] in ("name", "kind", "expansion")]


def kind_sections(lines: list[str]) -> None:
    import dictlearn.decomposers  # noqa: F401  (registers every kind)
    from dictlearn.decomposers.base import REGISTRY

    base_cls = find_class(BASE_DECOMPOSER_CONFIG)
    base_names = [f.name for f in dataclasses.fields(base_cls) if f.init]
    kinds = sorted(REGISTRY)
    options = {kind: trainer_options(REGISTRY[kind]) for kind in kinds}
    table_keys = stage_keys(list(options.values()))
    skip = set(base_names) | {k[0] for k in table_keys}
    # Keys grouped by the class that declares them (a config mixin, or a trainer's options); a group used by
    # two or more kinds is written once. group -> (class to read the keys from, key names).
    groups: dict[type, tuple[type, list[str]]] = {}
    users: dict[type, list[str]] = {}
    per_kind: dict[str, list[type]] = {}
    for kind in kinds:
        cfg = REGISTRY[kind].config_cls
        order: list[type] = []
        seen: set[str] = set()
        sources = [(cfg, True)] + ([(options[kind], False)] if options[kind] is not None else [])
        for source, is_config in sources:
            for f in dataclasses.fields(source):
                if not f.init or f.name in skip or f.name in seen:
                    continue
                seen.add(f.name)
                owner = defining_class(source, f.name) if is_config else source
                names = groups.setdefault(owner, (source, []))[1]
                if f.name not in names:
                    names.append(f.name)
                if owner not in order:
                    order.append(owner)
        per_kind[kind] = order
        for owner in order:
            users.setdefault(owner, []).append(kind)
    shared = [g for g in groups if len(users[g]) > 1]
    shared.sort(key=lambda g: (-len(users[g]), g.__name__))

    lines += ["## `[[decomposers]]`", "",
              "One table per dictionary to train. Keys read by the train stage itself:", "",
              "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | `{t}` | {d or '—'} | {c} |" for n, t, d, c in table_keys]
    lines += ["", f"Keys of every kind (`{base_cls.__name__}`; `d_in` and `d_out` are filled in from the cache's "
              "hookpoint widths, and `n_features` may be given as `expansion`):", ""]
    lines += table(keys_of(base_cls))
    lines.append("")
    for group in shared:
        source, names = groups[group]
        lines += [f"### Shared keys: {group.__name__}", "",
                  f"Used by {', '.join(f'`{k}`' for k in users[group])}. {summary(group)}".strip(), ""]
        lines += table(keys_of(source, names)) + [""]
    for kind in kinds:
        cls = REGISTRY[kind]
        lines += [f'### kind = "{kind}"', "",
                  f"`{cls.__module__}.{cls.__name__}`, config `{cls.config_cls.__name__}`. {summary(cls)}".strip(), ""]
        also = [g for g in per_kind[kind] if g in shared]
        if also:
            lines += ["Also takes the shared keys of " + ", ".join(
                f"[{g.__name__}](#{anchor(f'Shared keys: {g.__name__}')})" for g in also) + ".", ""]
        keys = [k for g in per_kind[kind] if g not in shared for k in keys_of(groups[g][0], groups[g][1])]
        lines += table(keys) if keys else ["No keys of its own."]
        lines.append("")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the config dataclasses' field comments; do not edit by hand. -->",
        "",
        "A run config is one TOML file read by every `dictlearn` command. An unknown key anywhere is an error that",
        "names it and lists the valid ones; every key can be overridden on the command line with",
        "`--set table.key=value`. Types are the Python annotations; \"unset\" is a key left out (None).",
        "",
        "| table | what | class |",
        "|---|---|---|",
        "| `out_dir` | where every stage writes (`cache/`, `decomposers/`, `eval/`, `export/`); default `runs/<config stem>` | |",
    ]
    classes = {section: find_class(name) for section, name, _ in SECTIONS}
    for section, _, what in SECTIONS[:4]:
        cls = classes[section]
        lines.append(f"| [`[{section}]`](#{anchor(f'[{section}]')}) | {what} | `{cls.__module__}.{cls.__name__}` |")
    lines.append("| [`[[decomposers]]`](#decomposers) | one table per dictionary | the kind's config |")
    for section, _, what in SECTIONS[4:]:
        cls = classes[section]
        lines.append(f"| [`[{section}]`](#{anchor(f'[{section}]')}) | {what} | `{cls.__module__}.{cls.__name__}` |")
    lines.append("")
    for section, _, _ in SECTIONS[:4]:
        lines += [f"## `[{section}]`", "", summary(classes[section]), ""] + table(keys_of(classes[section])) + [""]
    kind_sections(lines)
    for section, _, _ in SECTIONS[4:]:
        lines += [f"## `[{section}]`", "", summary(classes[section]), ""] + table(keys_of(classes[section])) + [""]
    return "\n".join(lines).rstrip() + "\n"


def undocumented(text: str) -> list[str]:
    """Keys whose row has an empty meaning: fields that want a `# comment` in the source."""
    return re.findall(r"^\| `([^`]+)` \|[^\n]*\|  \|$", text, flags=re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text() if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is stale; regenerate it with: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    missing = undocumented(text)
    if missing:
        print(f"{len(missing)} keys have no comment in the source: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
