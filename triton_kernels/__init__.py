"""quantcompose_kernels: Triton kernels for quantized inference (fused activation quantize, low-bit GEMMs).

Kernels (CUDA, or Triton's CPU interpreter with ``TRITON_INTERPRET=1``):

* :func:`fused_transform_quantize` — online transform ``x·diag(s)·R1·P·R2`` and
  per-token quantization (int8 codes or packed int4) in one pass;
* :func:`int8_gemm` / :func:`int4_gemm` — int32-accumulating GEMMs with the
  scale / zero-point / bias epilogue.

Pure-PyTorch references with identical signatures live in :mod:`.reference`;
:func:`prepare_transform` builds the (host-side) plan of a transform once.

The Triton modules are imported lazily, on the first kernel call: Triton decides
between compiling and interpreting when a kernel is *defined*, so this lets a
process set ``TRITON_INTERPRET=1`` after importing this package (e.g. in a test
``conftest.py``) as long as no kernel has run yet.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Union

import torch

from ._runtime import interpreting
from .plan import MAX_BLOCK, FusedTransformPlan, prepare_transform
from .reference import (
    SCALE_EPS,
    BlocksLike,
    dequantize_rows,
    pack_int4,
    quantize_rows,
    reference_int4_gemm,
    reference_int8_gemm,
    reference_transform,
    reference_transform_quantize,
    unpack_int4,
    weight_colsum,
)

__all__ = [
    "kernels_available",
    "fused_transform_quantize",
    "int8_gemm",
    "int4_gemm",
    "prepare_transform",
    "FusedTransformPlan",
    "MAX_BLOCK",
    "SCALE_EPS",
    "reference_transform",
    "reference_transform_quantize",
    "reference_int8_gemm",
    "reference_int4_gemm",
    "quantize_rows",
    "dequantize_rows",
    "pack_int4",
    "unpack_int4",
    "weight_colsum",
]


def _triton_importable() -> bool:
    if "triton" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _kernels_interpreted() -> bool:
    """Whether our kernels run in the interpreter (decided when ``.act_quant`` is first imported)."""
    mod = sys.modules.get(__name__ + ".act_quant")
    if mod is None:
        return interpreting()
    return type(mod._fused_act_quant_kernel).__name__ == "InterpretedFunction"


def kernels_available(device: Union[str, torch.device, None] = None) -> bool:
    """True when the Triton kernels can run on ``device``.

    That is: ``triton`` is importable and either ``device`` is a CUDA device
    (with CUDA available) or the kernels run in Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the first kernel call).
    """
    if not _triton_importable():
        return False
    if _kernels_interpreted():
        return True
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return dev.type == "cuda" and torch.cuda.is_available()


def fused_transform_quantize(
    x: torch.Tensor,
    *,
    scale: Optional[torch.Tensor] = None,
    rot1: Optional[BlocksLike] = None,
    perm: Optional[torch.Tensor] = None,
    rot2: Optional[BlocksLike] = None,
    bits: int = 8,
    symmetric: bool = False,
    clip_ratio: float = 1.0,
    plan: Optional[FusedTransformPlan] = None,
):
    from .act_quant import fused_transform_quantize as _impl

    return _impl(x, scale=scale, rot1=rot1, perm=perm, rot2=rot2, bits=bits, symmetric=symmetric,
                 clip_ratio=clip_ratio, plan=plan)


def int8_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    a_zero: Optional[torch.Tensor] = None,
    w_zero: Optional[torch.Tensor] = None,
    w_colsum: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    from .gemm import int8_gemm as _impl

    return _impl(a, w, a_scale, w_scale, a_zero=a_zero, w_zero=w_zero, w_colsum=w_colsum, bias=bias,
                 out_dtype=out_dtype)


def int4_gemm(
    a_packed: torch.Tensor,
    w_packed: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    a_zero: Optional[torch.Tensor] = None,
    w_zero: Optional[torch.Tensor] = None,
    w_colsum: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    from .gemm import int4_gemm as _impl

    return _impl(a_packed, w_packed, a_scale, w_scale, a_zero=a_zero, w_zero=w_zero, w_colsum=w_colsum,
                 bias=bias, out_dtype=out_dtype)


def _copy_doc(name: str, module: str) -> None:
    # Docstrings of the lazy wrappers come from the implementations' source without importing Triton.
    import ast
    import pathlib

    src = pathlib.Path(__file__).with_name(module + ".py").read_text(encoding="utf-8")
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            globals()[name].__doc__ = ast.get_docstring(node)


for _name, _mod in (("fused_transform_quantize", "act_quant"), ("int8_gemm", "gemm"), ("int4_gemm", "gemm")):
    try:
        _copy_doc(_name, _mod)
    except (OSError, SyntaxError):  # pragma: no cover - docs only
        pass
del _name, _mod
