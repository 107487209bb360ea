"""Transcoders: read one hookpoint (e.g. mlp_in.L), write another (e.g. mlp_out.L).

Same core as the SAEs, with a separate input bias b_in (the input is not centred by the output
bias) and any sparsity mechanism, picked by `sparsity`. The skip transcoder adds a linear path
x @ W_skip, initialised at zero, so the sparse latents only explain what a linear map cannot.
With sparsity "gtopk" the module needs "grad" (the gradient at hookpoint_out) in its batches.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.batchtopk import BatchTopKFields, BatchTopKSparsity
from dictlearn.decomposers.gtopk import GTopKFields, GTopKSparsity
from dictlearn.decomposers.jumprelu import JumpReLUFields, JumpReLUSparsity
from dictlearn.decomposers.relu import ReLUFields, ReLUSparsity
from dictlearn.decomposers.sae import SparseCoder, SparseCoderConfig, Sparsity, check
from dictlearn.decomposers.topk import TopKFields, TopKSparsity

SPARSITIES: dict[str, type[Sparsity]] = {
    cls.name: cls for cls in (TopKSparsity, BatchTopKSparsity, JumpReLUSparsity, ReLUSparsity, GTopKSparsity)
}


@dataclasses.dataclass
class TranscoderConfig(GTopKFields, BatchTopKFields, JumpReLUFields, ReLUFields, TopKFields, SparseCoderConfig):
    """Transcoder config: `sparsity` picks the mechanism; only that mechanism's fields are used."""

    sparsity: str = "topk"  # topk | batchtopk | jumprelu | relu | gtopk

    @property
    def needs_grad(self) -> bool:
        return SPARSITIES.get(self.sparsity, Sparsity).needs_grad

    def topk_family(self) -> bool:
        return issubclass(SPARSITIES.get(self.sparsity, Sparsity), TopKSparsity)

    def default_encoder_init_norm(self) -> float:
        return TopKFields.default_encoder_init_norm(self) if self.topk_family() else 1.0

    def validate(self) -> None:
        super().validate()
        check(self.sparsity in SPARSITIES,
              f"unknown sparsity {self.sparsity!r}; choose one of: {', '.join(sorted(SPARSITIES))}")
        if self.topk_family():
            self.validate_topk()
        {"batchtopk": self.validate_batchtopk, "jumprelu": self.validate_jumprelu,
         "relu": self.validate_relu, "gtopk": self.validate_gtopk}.get(self.sparsity, lambda: None)()


@register
class Transcoder(SparseCoder):
    """Sparse transcoder: y_hat = codes @ W_dec + b_dec, codes from (x - b_in)."""

    kind: ClassVar[str] = "transcoder"
    config_cls: ClassVar[type[DecomposerConfig]] = TranscoderConfig
    transcoder: ClassVar[bool] = True

    def make_sparsity(self, config) -> Sparsity:
        return SPARSITIES[config.sparsity](config)


@register
class SkipTranscoder(Transcoder):
    """Transcoder with a linear skip path: y_hat = codes @ W_dec + b_dec + x @ W_skip."""

    kind: ClassVar[str] = "skip_transcoder"
    skip: ClassVar[bool] = True
