"""Pure-PyTorch references for every kernel in :mod:`quantcompose_kernels`.

The references define the semantics; the Triton kernels are tested against
them.  They take plain tensors (a scale vector, lists of block matrices, a
permutation index tensor) and never import ``quantcompose.transforms`` /
``quantcompose.quant``, so the kernels stay independent of strategies.

Conventions (docs/architecture.md):

* transforms act on the last dim, row-vector convention ``u = x·T``;
  ``T = diag(scale) · blockdiag(rot1) · P(perm) · blockdiag(rot2)`` where
  ``(x·P)[..., c] = x[..., perm[c]]`` (``Permutation.indices``);
* quantization reduces over the last dim (one scale per token/row);
* asymmetric codes: ``uint8`` in ``[0, 2^b − 1]`` with an integer zero point,
  symmetric codes: ``int8`` in ``[−2^(b−1), 2^(b−1) − 1]``; round half to even;
* int4 packing: element ``2i`` in the low nibble, ``2i+1`` in the high nibble
  of byte ``i`` (symmetric codes as two's-complement nibbles).

Quantizer parameters (per row of ``u``, all in float32; the kernel performs the
very same float32 operations in the same order, with IEEE division):

asymmetric (``qmax = 2^b − 1``)::

    lo    = min(min(u), 0) · clip_ratio         hi = max(max(u), 0) · clip_ratio
    scale = max((hi − lo) / qmax, SCALE_EPS)
    zero  = clamp(round(−lo / scale), 0, qmax)                         (int32)
    code  = clamp(round(u / scale) + zero, 0, qmax)                    (uint8)

symmetric (``qmax = 2^(b−1) − 1``)::

    scale = max(max(|u|) · clip_ratio / qmax, SCALE_EPS)
    code  = clamp(round(u / scale), −qmax − 1, qmax)                   (int8)

The range always contains 0, so the zero point is an integer in
``[0, qmax]`` and ``dequant = (code − zero) · scale``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = [
    "SCALE_EPS",
    "BlocksLike",
    "normalize_blocks",
    "dense_block_diag",
    "apply_blocks",
    "reference_transform",
    "quantize_rows",
    "dequantize_rows",
    "pack_int4",
    "unpack_int4",
    "reference_transform_quantize",
    "weight_colsum",
    "reference_int8_gemm",
    "reference_int4_gemm",
]

#: lower bound of every scale (an all-zero row gets this scale and codes == zero point).
SCALE_EPS = 1e-8

#: rot1 / rot2 may be a list of square blocks (``BlockRotation.blocks``; the last
#: may be shorter), a ``(nblocks, b, b)`` tensor, or one square matrix.
BlocksLike = Union[Sequence[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- transforms


def normalize_blocks(blocks: Optional[BlocksLike], n: int, name: str = "rot") -> Optional[list[torch.Tensor]]:
    """Return ``blocks`` as a list of square 2-D tensors whose sizes sum to ``n``."""
    if blocks is None:
        return None
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() == 2:
            blocks = [blocks]
        elif blocks.dim() == 3:
            blocks = list(blocks.unbind(0))
        else:
            raise ValueError(f"{name}: expected a list of square blocks, a (nblocks, b, b) tensor or a square matrix, "
                             f"got a tensor of shape {tuple(blocks.shape)}.")
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[0] != b.shape[1] or b.shape[0] == 0:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{name}: block {i} must be a non-empty square matrix, got {shape}.")
        out.append(b)
    total = sum(b.shape[0] for b in out)
    if total != n:
        raise ValueError(f"{name}: block sizes {[b.shape[0] for b in out]} sum to {total}, but the width is {n}.")
    return out


def dense_block_diag(blocks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``n×n`` matrix with ``blocks`` along the diagonal."""
    return torch.block_diag(*[b.to(dtype) for b in blocks])


def apply_blocks(u: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``u · blockdiag(blocks)`` on the last dim, block by block, in ``u.dtype``."""
    outs, start = [], 0
    for b in blocks:
        w = b.shape[0]
        outs.append(u[..., start:start + w] @ b.to(device=u.device, dtype=u.dtype))
        start += w
    return torch.cat(outs, dim=-1)


def reference_transform(
    x: torch.Tensor,
    *,
    scale: Optional[torch.Tensor] = None,
    rot1: Optional[BlocksLike] = None,
    perm: Optional[torch.Tensor] = None,
    rot2: Optional[BlocksLike] = None,
) -> torch.Tensor:
    """``x · diag(scale) · blockdiag(rot1) · P(perm) · blockdiag(rot2)`` in float32, step by step."""
    n = x.shape[-1]
    u = x.to(torch.float32)
    if scale is not None:
        if scale.shape != (n,):
            raise ValueError(f"scale must have shape ({n},), got {tuple(scale.shape)}.")
        u = u * scale.to(device=u.device, dtype=torch.float32)
    r1 = normalize_blocks(rot1, n, "rot1")
    if r1 is not None:
        u = apply_blocks(u, r1)
    if perm is not None:
        if perm.shape != (n,):
            raise ValueError(f"perm must have shape ({n},), got {tuple(perm.shape)}.")
        u = u[..., perm.to(device=u.device, dtype=torch.long)]
    r2 = normalize_blocks(rot2, n, "rot2")
    if r2 is not None:
        u = apply_blocks(u, r2)
    return u


# --------------------------------------------------------------------------- quantizer


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not (2 <= bits <= 8):
        raise ValueError(f"bits={bits!r} is not supported: use an integer from 2 to 8.")


def quantize_rows(
    u: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-row (last-dim) quantization of float32 ``u``; see the module docstring.

    Returns ``(codes, scales, zeros)``: codes ``uint8`` (asymmetric) / ``int8``
    (symmetric) of ``u``'s shape, float32 scales and int32 zero points of shape
    ``u.shape[:-1]`` (``zeros`` is ``None`` for symmetric).
    """
    _check_bits(bits)
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio={clip_ratio!r} must be in (0, 1].")
    u = u.to(torch.float32)
    clip = torch.tensor(float(clip_ratio), dtype=torch.float32, device=u.device)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        amax = u.abs().amax(dim=-1) * clip
        scale = torch.clamp(amax / torch.tensor(float(qmax), device=u.device), min=SCALE_EPS)
        codes = torch.clamp(torch.round(u / scale[..., None]), -qmax - 1, qmax).to(torch.int8)
        return codes, scale, None
    qmax = (1 << bits) - 1
    lo = torch.clamp(u.amin(dim=-1), max=0.0) * clip
    hi = torch.clamp(u.amax(dim=-1), min=0.0) * clip
    scale = torch.clamp((hi - lo) / torch.tensor(float(qmax), device=u.device), min=SCALE_EPS)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    codes = torch.clamp(torch.round(u / scale[..., None]) + zero[..., None], 0, qmax).to(torch.uint8)
    return codes, scale, zero.to(torch.int32)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor]) -> torch.Tensor:
    """``(codes − zero) · scale`` in float32 (unpacked codes)."""
    q = codes.to(torch.float32)
    if zeros is not None:
        q = q - zeros.to(torch.float32)[..., None]
    return q * scales.to(torch.float32)[..., None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (``uint8`` 0..15 or ``int8`` −8..7) two per byte along the last dim."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {codes.shape[-1]}.")
    c = codes.to(torch.int32) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``int8`` (two's complement nibbles) if ``signed`` else ``uint8``."""
    p = packed.to(torch.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    if signed:
        lo = torch.where(lo >= 8, lo - 16, lo)
        hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)
    return out.to(torch.int8 if signed else torch.uint8)


def reference_transform_quantize(
    x: torch.Tensor,
    *,
    scale: Optional[torch.Tensor] = None,
    rot1: Optional[BlocksLike] = None,
    perm: Optional[torch.Tensor] = None,
    rot2: Optional[BlocksLike] = None,
    bits: int = 8,
    symmetric: bool = False,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Reference of :func:`quantcompose_kernels.fused_transform_quantize`.

    ``x (..., n)`` → transform (float32) → per-token quantization.  Returns
    ``(codes, scales, zeros)``: codes ``(..., n)`` (``uint8`` asym / ``int8``
    sym), or for ``bits == 4`` packed ``uint8 (..., n/2)``; scales float32
    ``(...)``; zeros int32 ``(...)`` or ``None`` when symmetric.
    """
    u = reference_transform(x, scale=scale, rot1=rot1, perm=perm, rot2=rot2)
    codes, scales, zeros = quantize_rows(u, bits, symmetric, clip_ratio)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scales, zeros


# --------------------------------------------------------------------------- GEMM


def weight_colsum(w: torch.Tensor, *, packed: bool = False, signed: Optional[bool] = None) -> torch.Tensor:
    """``Σ_k w[n, k]`` of the stored weight codes as int32 ``(N,)``.

    Unpacked weights: the dtype says how to read the codes (``int8`` signed,
    ``uint8`` unsigned).  Packed int4 weights ``(N, K/2)``: pass ``signed=True``
    for symmetric (two's-complement nibble) codes, ``False`` for asymmetric ones.
    Compute it once when the weight is loaded and pass it as ``w_colsum`` to the
    GEMMs (it is needed whenever the activations are asymmetric).
    """
    if packed:
        if signed is None:
            raise ValueError("weight_colsum(packed=True) needs signed=True (symmetric) or False (asymmetric).")
        return unpack_int4(w, signed=signed).to(torch.int32).sum(dim=-1).to(torch.int32)
    return w.to(torch.int32).sum(dim=-1).to(torch.int32)


def _gemm_epilogue(t: torch.Tensor, a_scale, w_scale, bias, out_dtype) -> torch.Tensor:
    # Same float32 operation order as the kernel: ((T · s_a) · s_w) + bias.
    y = t.to(torch.float32) * a_scale.to(torch.float32)[:, None]
    y = y * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return y.to(out_dtype)


def _exact_int_matmul(qa: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    # float64 holds every partial sum exactly (|products| ≤ 2^16, K ≤ 2^30).
    return (qa.to(torch.float64) @ qw.to(torch.float64).T).round().to(torch.int64)


def reference_int8_gemm(
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
    """``y[m, n] = s_a[m] · s_w[n] · Σ_k (a[m,k] − z_a[m]) (w[n,k] − z_w[n]) + bias[n]``.

    ``a (..., K)`` int8/uint8 codes, ``w (N, K)``; ``w_colsum`` is accepted for
    signature parity (the reference does not need it).  Output ``(..., N)``.
    """
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1]).to(torch.int64)
    qa = a2 - (a_zero.reshape(-1).to(torch.int64)[:, None] if a_zero is not None else 0)
    qw = w.to(torch.int64) - (w_zero.reshape(-1).to(torch.int64)[:, None] if w_zero is not None else 0)
    t = _exact_int_matmul(qa, qw)
    y = _gemm_epilogue(t, a_scale.reshape(-1), w_scale.reshape(-1), bias, out_dtype)
    return y.reshape(*lead, w.shape[0])


def reference_int4_gemm(
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
    """int4 version of :func:`reference_int8_gemm` on packed operands.

    ``a_packed (..., K/2)`` / ``w_packed (N, K/2)`` uint8; a side's codes are
    signed (symmetric) exactly when its zero point is ``None``.
    """
    a = unpack_int4(a_packed, signed=a_zero is None)
    w = unpack_int4(w_packed, signed=w_zero is None)
    return reference_int8_gemm(a, w, a_scale, w_scale, a_zero=a_zero, w_zero=w_zero,
                               bias=bias, out_dtype=out_dtype)
