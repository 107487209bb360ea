"""Transcoders: read one hookpoint (e.g. mlp_in.L), write another (e.g. mlp_out.L).

Same core as the SAEs, with a separate input bias b_in (the input is not centred by the output
bias) and any sparsity mechanism, picked by `sparsity`. The skip transcoder adds a linear path
x @ W_skip, initialised at zero, so the sparse latents only explain what a linear map cannot.
With sparsity "gtopk" the module needs "grad" (the gradient at hookpoint_out) in its batches.

Everything mechanism-specific (its fields, their validation, the encoder's starting norm, whether it
needs gradients, its export form) comes from the Sparsity classes in MECHANISMS: offering a new
mechanism to transcoders is one entry there.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dictlearn.decomposers.base import DecomposerConfig, register
from dictlearn.decomposers.batchtopk import BatchTopKSparsity
from dictlearn.decomposers.gtopk import GTopKSparsity
from dictlearn.decomposers.jumprelu import JumpReLUSparsity
from dictlearn.decomposers.relu import ReLUSparsity
from dictlearn.decomposers.sae import SparseCoder, SparseCoderConfig, Sparsity
from dictlearn.decomposers.topk import TopKSparsity

MECHANISMS: tuple[type[Sparsity], ...] = (TopKSparsity, BatchTopKSparsity, JumpReLUSparsity, ReLUSparsity, GTopKSparsity)
SPARSITIES: dict[str, type[Sparsity]] = {cls.name: cls for cls in MECHANISMS}
# Every mechanism's field mixins, each once; reversed so the config's fields read in MECHANISMS order.
_FIELD_MIXINS = tuple(reversed(dict.fromkeys(f for cls in MECHANISMS for f in reversed(cls.fields))))


@dataclasses.dataclass
class TranscoderConfig(*_FIELD_MIXINS, SparseCoderConfig):
    """Transcoder config: `sparsity` picks the mechanism; only that mechanism's fields are used."""

    sparsity: str = "topk"  # one of MECHANISMS' names: topk | batchtopk | jumprelu | relu | gtopk

    def mechanism(self) -> type[Sparsity]:
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"unknown sparsity {self.sparsity!r}; choose one of: {', '.join(sorted(SPARSITIES))}")
        return SPARSITIES[self.sparsity]


@register
class Transcoder(SparseCoder):
    """Sparse transcoder: y_hat = codes @ W_dec + b_dec, codes from (x - b_in)."""

    kind: ClassVar[str] = "transcoder"
    config_cls: ClassVar[type[DecomposerConfig]] = TranscoderConfig
    example: ClassVar[dict] = {"hookpoint_in": "mlp_in", "hookpoint_out": "mlp_out", "expansion": 2, "k": 8}
    transcoder: ClassVar[bool] = True


@register
class SkipTranscoder(Transcoder):
    """Transcoder with a linear skip path: y_hat = codes @ W_dec + b_dec + x @ W_skip."""

    kind: ClassVar[str] = "skip_transcoder"
    skip: ClassVar[bool] = True
