"""Small helpers shared by the atoms: tensor coercion and dtype-aware tolerances."""

from __future__ import annotations

from typing import Any

import torch

from quantcompose.errors import TransformError


def as_float_tensor(values: Any, what: str) -> torch.Tensor:
    """``values`` as a detached floating tensor (lists and ints become float64).

    float64 is the default for non-tensor input so that exactness tests can
    reach 1e-10; tensors keep their floating dtype and device.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if not (t.is_floating_point()):
            if t.is_complex():
                raise TransformError(f"{what} must be real, got a {t.dtype} tensor.")
            t = t.to(torch.float64)
        # Contiguous storage: results must not depend on how the caller laid the tensor out.
        return t.clone(memory_format=torch.contiguous_format)
    try:
        return torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TransformError(f"{what} must be a tensor or a sequence of numbers: {exc}") from exc


def orthogonality_tolerance(dtype: torch.dtype) -> float:
    """Max allowed ``|B·Bᵀ − I|`` entry (computed in float64) for a block stored in ``dtype``.

    1e-6 in float64 catches any real mistake; lower precisions get 1e-3 or,
    for the 16-bit types, a few units of their rounding error.
    """
    if dtype == torch.float64:
        return 1e-6
    return max(1e-3, 8 * torch.finfo(dtype).eps)


def format_indices(idx: torch.Tensor, limit: int = 8) -> str:
    """``[3, 17, ...]``: the first few indices of a boolean mask or index tensor."""
    if idx.dtype == torch.bool:
        idx = torch.nonzero(idx.flatten()).flatten()
    items = [int(i) for i in idx[:limit].tolist()]
    more = ", …" if idx.numel() > limit else ""
    return "[" + ", ".join(map(str, items)) + more + "]"
