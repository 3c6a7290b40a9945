"""How a weight becomes integer codes: one interface, round-to-nearest and GPTQ behind it.

The pipeline hands a place's stacked sibling weights (q/k/v, gate/up) to one
:class:`WeightQuantizer`, with the range to quantize (possibly clipped) and,
for quantizers that want it, the Hessian of the inputs the weights will see.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from quantcompose.errors import QuantSpecError
from quantcompose.quant.functional import QuantizedTensor, quantize
from quantcompose.quant.gptq import gptq_quantize
from quantcompose.quant.spec import QuantSpec


class WeightQuantizer(ABC):
    """Turns an (out, in) float weight into a :class:`QuantizedTensor` under ``spec``."""

    name: str
    #: Whether :meth:`quantize` reads ``hessian`` (the pipeline only accumulates XᵀX when it does).
    needs_hessian: bool = False

    @abstractmethod
    def quantize(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        *,
        range_weight: torch.Tensor,
        hessian: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Codes for ``weight``; ``range_weight`` (same shape) sets the quantization ranges."""


class RoundToNearestWeights(WeightQuantizer):
    """Each weight rounded to the nearest code of its row's (or group's) grid."""

    name = "rtn"

    def quantize(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        *,
        range_weight: torch.Tensor,
        hessian: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        # The clamped copy has the same grid, and its values outside the range
        # round to the end codes exactly as the original's would.
        return quantize(range_weight.float(), spec)


class GPTQWeights(WeightQuantizer):
    """GPTQ (Frantar et al., ICLR 2023): column-wise rounding that compensates each column's error."""

    name = "gptq"
    needs_hessian = True

    def quantize(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        *,
        range_weight: torch.Tensor,
        hessian: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        if hessian is None:
            raise QuantSpecError("GPTQ needs the Hessian of the layer's inputs; none was collected")
        return gptq_quantize(weight, hessian, spec, range_weight=range_weight)


WEIGHT_QUANTIZERS: dict[str, type[WeightQuantizer]] = {"rtn": RoundToNearestWeights, "gptq": GPTQWeights}


def get_weight_quantizer(name: str) -> WeightQuantizer:
    """The weight quantizer called ``name`` (``"rtn"`` or ``"gptq"``)."""
    if name not in WEIGHT_QUANTIZERS:
        raise QuantSpecError(f"weight quantizer {name!r} is unknown: use one of {sorted(WEIGHT_QUANTIZERS)}")
    return WEIGHT_QUANTIZERS[name]()


__all__ = ["GPTQWeights", "RoundToNearestWeights", "WEIGHT_QUANTIZERS", "WeightQuantizer", "get_weight_quantizer"]
