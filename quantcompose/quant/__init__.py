"""Quantizer specs, the reference quantize / dequantize / fake-quantize, and int4 packing."""

from quantcompose.quant.functional import (
    QuantizedTensor,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
)
from quantcompose.quant.clip_search import (
    clamp_rows,
    clamp_to_ratios,
    row_clip_ratios,
    search_act_clip_ratio,
    search_clip_ratios,
    searched_act_spec,
)
from quantcompose.quant.packing import pack_int4, unpack_int4
from quantcompose.quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "QuantizedTensor",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "unpack_int4",
    "search_clip_ratios",
    "search_act_clip_ratio",
    "clamp_rows",
    "clamp_to_ratios",
    "row_clip_ratios",
    "searched_act_spec",
]
