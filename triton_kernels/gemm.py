"""Low-bit GEMMs: int8 × int8 and packed int4 × int4, int32 accumulation on tensor cores.

``y[m, n] = s_a[m] · s_w[n] · Σ_k (a[m,k] − z_a[m]) · (w[n,k] − z_w[n]) + bias[n]``

with ``a (M, K)`` activation codes (one scale / zero point per token) and
``w (N, K)`` weight codes in ``nn.Linear`` layout (one scale / zero point per
output channel).  A side is asymmetric exactly when its zero point is given.

Signed int8 operands for ``tl.dot`` (Hopper's int8 MMA is signed × signed):

* 8-bit asymmetric codes (``uint8``, ``[0, 255]``) are shifted **in the
  kernel** by ``c = 128`` (a free XOR of the sign bit on the int8 view of the
  bytes) so ``q − 128`` fits int8; nothing is rewritten on the host.
* 4-bit codes are unpacked in registers (low nibble = element ``2i``, high =
  ``2i+1``; symmetric codes sign-extended with shifts) straight to int8.
  Asymmetric int4 weights subtract their zero point while unpacking
  (``q − z ∈ [−15, 15]``).  Because the K order of a dot product does not
  matter, the even and odd elements are fed to two ``tl.dot`` calls (low
  nibbles × low nibbles + high × high) instead of being re-interleaved.
  Hopper has no int4 tensor cores, so this is int8 MMA on unpacked tiles.

With ``a' = q_a − c_a`` and ``w' = q_w − c_w`` the kernel accumulates
``acc = Σ a'w'`` and corrects it exactly in int32 in the epilogue::

    Σ (q_a − z_a)(q_w − z_w) = acc + α·Σ_k w' + β·Σ_k a' + K·α·β,
    α = c_a − z_a,  β = c_w − z_w,  Σ_k w' = colsum(q_w) − K·c_w

``colsum(q_w)`` (``w_colsum``) is precomputed once per weight
(:func:`quantcompose_kernels.weight_colsum`); ``Σ_k a'`` is accumulated in the
kernel only for 8-bit asymmetric weights (the one case with ``β ≠ 0``).
Intermediate int32 overflow wraps and cancels, the final sum is exact.
Then ``y = ((float(T) · s_a) · s_w) + bias`` in float32, stored as
``out_dtype``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._runtime import interpreting, next_pow2
from .reference import weight_colsum

__all__ = ["int8_gemm", "int4_gemm"]


@triton.jit
def _unpack_nibbles(p, SIGNED: tl.constexpr):
    """uint8 tile → (even, odd) int8 tiles."""
    if SIGNED:
        lo = (p << 4).to(tl.int8, bitcast=True) >> 4
        hi = p.to(tl.int8, bitcast=True) >> 4
    else:
        lo = (p & 15).to(tl.int8)
        hi = (p >> 4).to(tl.int8)
    return lo, hi


@triton.jit
def _lowbit_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr,
    M, N, K, KS, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    PACKED: tl.constexpr, A_XOR: tl.constexpr, W_XOR: tl.constexpr,
    A_SIGNED: tl.constexpr, W_SIGNED: tl.constexpr,
    A_ZP: tl.constexpr, W_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # K: logical reduction length; KS: stored bytes per row (K, or K/2 when PACKED).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M          # wrapped rows / cols: unmasked loads, masked store
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

    # Which shifts are in play (see module docstring).
    SUBZ: tl.constexpr = PACKED and W_ZP                 # int4 asym weights: w' = q_w − z_w
    HAS_ALPHA: tl.constexpr = A_XOR or A_ZP
    HAS_BETA: tl.constexpr = (not PACKED) and (W_XOR or W_ZP)
    if SUBZ:
        zw8 = tl.load(w_zero_ptr + rn).to(tl.int8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rs = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for kk in range(0, tl.cdiv(KS, BLOCK_K)):
        kmask = offs_k < KS - kk * BLOCK_K
        if PACKED:
            pa = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            pw = tl.load(w_ptrs, mask=kmask[:, None], other=0)
            a_lo, a_hi = _unpack_nibbles(pa, A_SIGNED)
            w_lo, w_hi = _unpack_nibbles(pw, W_SIGNED)
            if SUBZ:
                w_lo = w_lo - zw8[None, :]
                w_hi = w_hi - zw8[None, :]
            acc = tl.dot(a_lo, w_lo, acc)
            acc = tl.dot(a_hi, w_hi, acc)
        else:
            # masked bytes read as −128 under XOR so that the shifted value is 0
            if A_XOR:
                a = tl.load(a_ptrs, mask=kmask[None, :], other=-128) ^ -128
            else:
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            if W_XOR:
                w = tl.load(w_ptrs, mask=kmask[:, None], other=-128) ^ -128
            else:
                w = tl.load(w_ptrs, mask=kmask[:, None], other=0)
            acc = tl.dot(a, w, acc)
            if HAS_BETA:
                rs += tl.sum(a.to(tl.int32), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # ---- exact integer correction for zero points / shifts
    t = acc
    if HAS_ALPHA or HAS_BETA:
        if A_XOR:
            alpha = tl.full((BLOCK_M,), 128, tl.int32)
        else:
            alpha = tl.zeros((BLOCK_M,), dtype=tl.int32)
        if A_ZP:
            alpha -= tl.load(a_zero_ptr + rm)
        if W_XOR:
            cw = tl.full((BLOCK_N,), 128, tl.int32)
        else:
            cw = tl.zeros((BLOCK_N,), dtype=tl.int32)
        if W_ZP:
            zw = tl.load(w_zero_ptr + rn)
        else:
            zw = tl.zeros((BLOCK_N,), dtype=tl.int32)
        if SUBZ:
            cw = zw
        if HAS_ALPHA:
            wsum = tl.load(w_colsum_ptr + rn) - K * cw
            t += alpha[:, None] * wsum[None, :]
        if HAS_BETA:
            beta = cw - zw
            t += rs[:, None] * beta[None, :]
            if HAS_ALPHA:
                t += K * (alpha[:, None] * beta[None, :])

    # ---- float epilogue
    sa = tl.load(a_scale_ptr + rm)
    sw = tl.load(w_scale_ptr + rn)
    y = t.to(tl.float32) * sa[:, None]
    y = y * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# --------------------------------------------------------------------------- autotuning

def _gemm_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [
        # (BM, BN, BK, warps, stages): large-M tiles (wgmma-sized) ...
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 3), (128, 128, 128, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (64, 64, 128, 4, 5),
        # ... and decode / small-M tiles (weight-bandwidth bound: more CTAs along N)
        (32, 128, 128, 4, 4), (32, 64, 256, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 4),
        (16, 32, 256, 4, 4), (16, 128, 256, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    mb = int(named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb)]
    if mb >= 1024:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or kept
    kept = kept or configs[:1]
    if kwargs.get("PACKED") and not interpreting():
        # BLOCK_K counts stored bytes: a packed tile unpacks to 2·BLOCK_K codes, so halve it to keep the
        # same K per iteration (and registers / shared memory) as the int8 config.
        seen, packed = set(), []
        for c in kept:
            kw = dict(c.kwargs, BLOCK_K=max(32, c.kwargs["BLOCK_K"] // 2))
            key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                packed.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        kept = packed
    return kept


# M is bucketed to a power of two so that decode steps of varying length reuse a tuning.
_gemm = triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "PACKED"],
                        prune_configs_by={"early_config_prune": _prune})(_lowbit_gemm_kernel)


# --------------------------------------------------------------------------- wrappers

def _vec(t: Optional[torch.Tensor], n: int, name: str, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor.")
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} elements, got shape {tuple(t.shape)}.")
    return t.reshape(n).to(device=device, dtype=dtype).contiguous()


def _launch(a2, w2, a_scale, w_scale, a_zero, w_zero, w_colsum, bias, out_dtype, *, K, packed,
            a_xor, w_xor, a_signed, w_signed):
    M, N = a2.shape[0], w2.shape[0]
    dev = a2.device
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}.")
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    sa = _vec(a_scale, M, "a_scale", torch.float32, dev)
    sw = _vec(w_scale, N, "w_scale", torch.float32, dev)
    za = _vec(a_zero, M, "a_zero", torch.int32, dev)
    zw = _vec(w_zero, N, "w_zero", torch.int32, dev)
    b = _vec(bias, N, "bias", bias.dtype if bias is not None else torch.float32, dev)
    if a_xor or za is not None:
        if w_colsum is None:
            # Slow path (one extra pass over the weight): precompute it once with weight_colsum().
            w_colsum = weight_colsum(w2, packed=packed, signed=w_signed) if packed else \
                weight_colsum(w2.view(torch.uint8) if w_xor else w2)
        cs = _vec(w_colsum, N, "w_colsum", torch.int32, dev)
    else:
        cs = None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm[grid](
        a2, w2, out, sa, sw, za, zw, cs, b,
        M, N, K, a2.shape[1], next_pow2(M),
        a2.stride(0), a2.stride(1), w2.stride(0), w2.stride(1), out.stride(0), out.stride(1),
        PACKED=packed, A_XOR=a_xor, W_XOR=w_xor, A_SIGNED=a_signed, W_SIGNED=w_signed,
        A_ZP=za is not None, W_ZP=zw is not None, HAS_BIAS=b is not None,
    )
    return out


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
    """int8 × int8 → int32 GEMM with the quantization epilogue; returns ``(..., N)``.

    * ``a``: ``(..., K)`` codes, ``int8`` (symmetric) or ``uint8`` (asymmetric).
    * ``w``: ``(N, K)`` codes, ``int8`` or ``uint8`` (``nn.Linear`` layout).
    * ``a_scale``: float32 ``(...)`` per token; ``w_scale``: float32 ``(N,)``.
    * ``a_zero``: int ``(...)`` per-token zero points (asymmetric activations),
      ``w_zero``: int ``(N,)``; ``None`` means zero point 0.
    * ``w_colsum``: int32 ``(N,)`` = ``weight_colsum(w)``; needed when the
      activations are asymmetric (computed on the fly, slowly, if omitted).
    * ``bias``: ``(N,)`` any float dtype.  ``out_dtype``: fp16 (default), bf16, fp32.
    """
    if a.dtype not in (torch.int8, torch.uint8) or w.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"int8_gemm needs int8/uint8 codes, got a={a.dtype}, w={w.dtype}.")
    if w.dim() != 2 or a.shape[-1] != w.shape[1]:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)} vs w {tuple(w.shape)} (expected (N, K)).")
    K = w.shape[1]
    lead = a.shape[:-1]
    a2 = a.reshape(-1, K)
    out = _launch(a2.view(torch.int8), w.view(torch.int8), a_scale, w_scale, a_zero, w_zero, w_colsum, bias,
                  out_dtype, K=K, packed=False, a_xor=a.dtype == torch.uint8, w_xor=w.dtype == torch.uint8,
                  a_signed=True, w_signed=True)
    return out.reshape(*lead, w.shape[0])


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
    """W4A4 GEMM on packed operands; returns ``(..., N)`` with ``K = 2 · a_packed.shape[-1]``.

    * ``a_packed``: ``uint8 (..., K/2)``, ``w_packed``: ``uint8 (N, K/2)``; two
      codes per byte, element ``2i`` in the low nibble.  A side's codes are
      signed two's-complement nibbles (symmetric) exactly when its zero point
      is ``None``, unsigned ``[0, 15]`` otherwise.
    * scales / zeros / bias / ``out_dtype`` as in :func:`int8_gemm`;
      ``w_colsum = weight_colsum(w_packed, packed=True, signed=w_zero is None)``.
    """
    if a_packed.dtype != torch.uint8 or w_packed.dtype != torch.uint8:
        raise TypeError(f"int4_gemm needs uint8 packed codes, got a={a_packed.dtype}, w={w_packed.dtype}.")
    if w_packed.dim() != 2 or a_packed.shape[-1] != w_packed.shape[1]:
        raise ValueError(f"shape mismatch: a_packed {tuple(a_packed.shape)} vs w_packed {tuple(w_packed.shape)}.")
    KS = w_packed.shape[1]
    lead = a_packed.shape[:-1]
    a2 = a_packed.reshape(-1, KS)
    out = _launch(a2, w_packed, a_scale, w_scale, a_zero, w_zero, w_colsum, bias, out_dtype,
                  K=2 * KS, packed=True, a_xor=False, w_xor=False,
                  a_signed=a_zero is None, w_signed=w_zero is None)
    return out.reshape(*lead, w_packed.shape[0])
