"""Running a :class:`~quantcompose.qlinear.QuantLinear` through the Triton kernels.

The kernels (package ``quantcompose_kernels``) know nothing about transforms
or specs: this module translates a layer's online transform into the kernel's
``diag(s)·R1·P·R2`` arguments and its specs into bit widths, and says when a
layer cannot use them (then the PyTorch reference path runs).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from quantcompose.quant import QuantSpec, unpack_int4
from quantcompose.transforms import BlockDiagonal, Compose, Hadamard, Permutation, Scale, Transform

MAX_KERNEL_BLOCK = 128
_SLOTS = ("scale", "rot1", "perm", "rot2")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def transform_to_kernel_args(transform: Transform | None) -> dict[str, Any] | None:
    """``{scale, rot1, perm, rot2}`` for the fused kernel, or ``None`` if it cannot run ``transform``.

    The kernel runs ``diag(s)·R1·P·R2`` with block rotations of blocks ≤ 128;
    a Hadamard of width ≤ 128 is one such block.
    """
    args: dict[str, Any] = {}
    if transform is None:
        return args
    atoms = transform.transforms if isinstance(transform, Compose) else (transform,)
    slot = 0
    for atom in atoms:
        if isinstance(atom, Scale):
            kind, value = "scale", atom.factors
        elif isinstance(atom, Permutation):
            kind, value = "perm", atom.indices
        elif isinstance(atom, BlockDiagonal):
            if max(b.shape[0] for b in atom.blocks) > MAX_KERNEL_BLOCK:
                return None
            kind, value = "rot", list(atom.blocks)
        elif isinstance(atom, Hadamard) and atom.size <= MAX_KERNEL_BLOCK:
            kind, value = "rot", [atom.matrix(dtype=torch.float64)]
        else:
            return None
        # Place the atom in the first free slot that accepts it, keeping order.
        while slot < len(_SLOTS) and not _SLOTS[slot].startswith(kind):
            slot += 1
        if slot == len(_SLOTS):
            return None
        args[_SLOTS[slot]] = value
        slot += 1
    return args


@dataclass
class KernelState:
    """What a layer precomputes once for the kernels: the transform plan and weight operands."""

    plan: Any
    act_bits: int
    packed_int4: bool
    w_codes: torch.Tensor
    w_scale: torch.Tensor
    w_zero: torch.Tensor | None
    w_colsum: torch.Tensor | None


def kernel_eligible(act_spec: QuantSpec | None, weight_spec: QuantSpec | None, in_features: int) -> bool:
    """Per-token activations of 4 or 8 bits and per-channel weights are what the GEMMs implement."""
    if act_spec is None or weight_spec is None:
        return False
    if act_spec.granularity != "token" or weight_spec.granularity != "channel":
        return False
    if act_spec.bits == 8:
        return True
    return act_spec.bits == 4 and weight_spec.bits == 4 and in_features % 2 == 0


def build_kernel_state(layer: Any, device: torch.device) -> KernelState | None:
    """Prepare ``layer`` (a QuantLinear) for the kernels, or ``None`` if it cannot use them."""
    if not (triton_importable() and kernel_eligible(layer.act_spec, layer.weight_spec, layer.in_features)):
        return None
    args = transform_to_kernel_args(layer.transform)
    if args is None:
        return None
    from quantcompose_kernels import prepare_transform, weight_colsum

    plan = prepare_transform(layer.in_features, **args)
    w_spec: QuantSpec = layer.weight_spec
    packed_int4 = layer.act_spec.bits == 4
    if packed_int4:
        w_codes = layer.weight_codes
    else:
        w_codes = unpack_int4(layer.weight_codes, signed=w_spec.symmetric) if layer.packed else layer.weight_codes
    w_codes = w_codes.to(device).contiguous()
    w_zero = None if w_spec.symmetric else layer.weight_zero.reshape(-1).round().to(device, torch.int32)
    colsum = None
    if not layer.act_spec.symmetric:
        colsum = weight_colsum(w_codes, packed=packed_int4, signed=w_spec.symmetric)
        colsum = colsum.to(device) if colsum is not None else None
    return KernelState(
        plan=plan,
        act_bits=layer.act_spec.bits,
        packed_int4=packed_int4,
        w_codes=w_codes,
        w_scale=layer.weight_scale.reshape(-1).float().to(device),
        w_zero=w_zero,
        w_colsum=colsum,
    )


def kernel_forward(layer: Any, state: KernelState, x: torch.Tensor) -> torch.Tensor:
    """``y = Q_a(x·T)·Q_w(W)ᵀ + b`` with the fused quantize kernel and the low-bit GEMM."""
    from quantcompose_kernels import fused_transform_quantize, int4_gemm, int8_gemm

    spec: QuantSpec = layer.act_spec
    codes, a_scale, a_zero = fused_transform_quantize(
        x.contiguous(), plan=state.plan, bits=spec.bits, symmetric=spec.symmetric, clip_ratio=spec.clip_ratio
    )
    gemm = int4_gemm if state.packed_int4 else int8_gemm
    return gemm(
        codes, state.w_codes, a_scale, state.w_scale,
        a_zero=a_zero, w_zero=state.w_zero, w_colsum=state.w_colsum,
        bias=layer.bias, out_dtype=x.dtype,
    )
