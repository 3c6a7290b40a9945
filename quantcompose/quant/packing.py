"""Two int4 codes per byte: element ``2i`` in the low nibble, ``2i+1`` in the high nibble."""

from __future__ import annotations

import torch

from quantcompose.errors import QuantSpecError, ShapeError

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def pack_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Pack integer codes of shape ``(..., n)`` (``n`` even) into ``uint8`` of shape ``(..., n/2)``.

    Signed codes must lie in [−8, 7] (stored as two's-complement nibbles),
    unsigned codes in [0, 15].
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _INT_DTYPES:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"pack_int4 expects an integer tensor of codes, got {got}.")
    if codes.dim() == 0:
        raise ShapeError("pack_int4 needs at least one dimension: pack codes of shape (..., n).")
    n = codes.shape[-1]
    if n % 2 != 0:
        raise ShapeError(f"pack_int4 needs an even last dimension (two codes per byte), got {n}: pad it by one.")
    lo_ok, hi_ok = (-8, 7) if signed else (0, 15)
    if codes.numel() > 0:
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo_ok or cmax > hi_ok:
            kind = "signed" if signed else "unsigned"
            raise QuantSpecError(
                f"codes span [{cmin}, {cmax}] but {kind} int4 holds [{lo_ok}, {hi_ok}]: "
                "quantize with bits<=4, or pass the matching `signed`."
            )
    # int16 holds both ranges; `& 0xF` turns a negative code into its two's-complement nibble.
    nib = codes.to(torch.int16) & 0xF
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 (..., m)`` → codes ``(..., 2m)``.

    Returns ``torch.int8`` codes in [−8, 7] when ``signed``, else ``torch.uint8`` in [0, 15].
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"unpack_int4 expects a torch.uint8 tensor (the output of pack_int4), got {got}.")
    if packed.dim() == 0:
        raise ShapeError("unpack_int4 needs at least one dimension: unpack bytes of shape (..., m).")
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    if signed:
        # Sign-extend a 4-bit two's-complement value: 8..15 → −8..−1.
        return ((nib ^ 8) - 8).to(torch.int8)
    return nib.to(torch.uint8)
