"""Packaging: the design card's top-level `eval/` and `trainers/` install as dictlearn.eval and
dictlearn.trainers, every package folder is listed in pyproject.toml, and no bare `eval` or `trainers`
import name is installed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    table = _setuptools()
    folders = {v: k for k, v in table["package-dir"].items()}  # folder -> import name
    found = set()
    for top, name in folders.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert found == set(table["packages"]), f"pyproject.toml lists {sorted(table['packages'])}, the tree has {sorted(found)}"


def test_no_bare_eval_or_trainers_module_outside_the_repo(tmp_path):
    code = ("import importlib.util, dictlearn.eval.suite, dictlearn.trainers.sgd;"
            "print(importlib.util.find_spec('eval'), importlib.util.find_spec('trainers'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"], out.stdout
