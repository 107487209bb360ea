"""Decomposers: one protocol (base.Decomposer), one file per kind. Importing this package imports every
module in its folder, so each `@register`ed kind is in base.REGISTRY, a new file dropped here included."""

import importlib
import pkgutil

from dictlearn.decomposers.base import REGISTRY, Decomposer, DecomposerConfig, build, load, register, save

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Decomposer", "DecomposerConfig", "build", "load", "register", "save"]
