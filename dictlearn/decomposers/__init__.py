"""Decomposers: one protocol (base.Decomposer), one file per architecture; importing this package
registers every kind in base.REGISTRY."""

from dictlearn.decomposers import batchtopk, gtopk, jumprelu, relu, topk, transcoder  # noqa: F401  (register kinds)
from dictlearn.decomposers.base import REGISTRY, Decomposer, DecomposerConfig, build, load, register, save

__all__ = ["REGISTRY", "Decomposer", "DecomposerConfig", "build", "load", "register", "save"]
from dictlearn.decomposers import snmf  # noqa: F401  (registers "snmf")
