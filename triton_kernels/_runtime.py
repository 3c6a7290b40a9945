"""Small runtime helpers shared by the kernel modules (no Triton import here)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def next_pow2(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (a small constant under the interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
