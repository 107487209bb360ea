"""The documentation stays true to the code: the configuration reference is regenerated and compared, every
relative link in README.md and docs/ reaches a file (and a heading, for `#anchor` links), and the README's
set-up commands are the ones CI runs."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@functools.cache
def generator():
    """docs/make_config_reference.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_config_reference", ROOT / "docs" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (repeated headings get -1, -2, ...)."""
    gen = generator()
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        slug = gen.anchor(m.group(1).replace("`", ""))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_configuration_reference_is_current():
    gen = generator()
    current = gen.PAGE.read_text() if gen.PAGE.is_file() else ""
    assert current == gen.render(), f"docs/configuration.md is stale; regenerate it with: {gen.COMMAND}"


def test_configuration_reference_reads_field_comments():
    """Known answers from the source: a trailing comment, a comment block above a field, a default factory."""
    gen = generator()
    from dictlearn.activations.harvest import HarvestConfig
    from dictlearn.decomposers.sae import SparseCoderConfig

    keys = {k.name: k for k in gen.keys_of(HarvestConfig)}
    assert keys["dtype"].comment == "storage dtype: float16, bfloat16 or float32"
    assert keys["dtype"].default == '`"bfloat16"`' and keys["dtype"].type == "str"
    assert keys["hookpoints"].default == "required"
    assert keys["gradients"].default == "`[]`"
    above = {k.name: k for k in gen.keys_of(SparseCoderConfig)}["encoder_init_norm"]
    assert above.comment.startswith("Norm of the encoder's rows at initialisation")
    assert above.default == "unset"


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{fragment} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n[ok](#title) [bad](missing.md) [x](https://example.org)\n```\n[in code](nope.md)\n```\n")
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    assert targets == ["#title", "missing.md", "https://example.org"]
    assert anchors(page) == {"title"}


def ci_commands() -> tuple[str, str]:
    """(test command, quickstart command) as .ci/run runs them, without pip's -q."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test = next(line for line in lines if "-m pytest" in line and "--nbmake" not in line)
    quick = next(line for line in lines if "dictlearn run " in line)
    return test.replace("pip install -q ", "pip install ").strip(), quick.strip()


@pytest.mark.parametrize("which", [0, 1], ids=["tests", "quickstart"])
def test_readme_setup_commands_are_what_ci_runs(which):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    command = ci_commands()[which]
    assert any(command in block for block in blocks), (
        f"README.md has no set-up command containing {command!r} (the command .ci/run runs); keep them identical")


def test_readme_config_is_a_valid_run_config():
    """The README's one config parses table by table with the classes the reference documents."""
    import tomllib

    from dictlearn.config import from_dict
    from dictlearn.decomposers.base import REGISTRY

    gen = generator()
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.S)
    data = tomllib.loads(block)
    for section, class_name, _ in gen.SECTIONS:
        table = data
        for part in section.split("."):
            table = table.get(part, {})
        from_dict(gen.find_class(class_name), table, where=f"README [{section}]")
    table_keys = {name for name, *_ in gen.TABLE_KEYS}
    for table in data["decomposers"]:
        cls = REGISTRY[table["kind"]]
        rest = {k: v for k, v in table.items() if k not in table_keys}
        rest.update(d_in=576, d_out=576, n_features=int(table["expansion"] * 576))
        from_dict(cls.config_cls, rest, where=f"README [[decomposers]] {table['name']!r}")


def table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the markdown table right under `heading` (header and rule rows left out)."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_readme_headline_figures_match_the_benchmark_log():
    """Each headline row's command is in docs/benchmarks.md and every number it quotes is in that row."""
    readme = (ROOT / "README.md").read_text()
    log = {row[-1]: row for row in table_rows((ROOT / "docs" / "benchmarks.md").read_text(), "# Benchmarks")}
    headline = table_rows(readme, "## Headline figures")
    assert headline
    for what, figure, command in headline:
        assert command in log, f"README headline {what!r}: command {command} is not in docs/benchmarks.md"
        numbers = set(re.findall(r"\d[\d,.]*\d|\d", figure))
        missing = sorted(n for n in numbers if n not in log[command][1])
        assert not missing, f"README headline {what!r} quotes {missing}, which docs/benchmarks.md's row lacks"


def test_python_snippets_parse_and_their_dictlearn_imports_resolve():
    """Every ```python block in README.md and docs/ is valid Python whose `from dictlearn... import` names exist."""
    import importlib

    stale = []
    for page in pages():
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            tree = ast.parse(block, filename=str(page))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dictlearn":
                    module = importlib.import_module(node.module)
                    stale += [f"{page.relative_to(ROOT)}: from {node.module} import {a.name}"
                              for a in node.names if not hasattr(module, a.name)]
    assert not stale, "snippets import names that no longer exist:\n" + "\n".join(stale)
