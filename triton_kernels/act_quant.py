"""Fused online transform + per-token activation quantization (one Triton kernel).

``fused_transform_quantize(x, scale=, rot1=, perm=, rot2=, bits=, symmetric=)``
computes ``u = x · diag(scale) · blockdiag(rot1) · P(perm) · blockdiag(rot2)``
and quantizes every row of ``u`` (see :mod:`.reference` for the exact
quantizer) in one launch.  Each program owns ``BLOCK_M`` rows and the full
width; the transform is evaluated per output block (see :mod:`.plan` for the
three modes and why) and never written to HBM:

1. (mode *general* only) ``y = x · diag(scale) · rot1`` block by block with
   ``tl.dot`` into a per-program, channel-major staging buffer that stays in
   L2; CTA barrier.
2. pass 1: for every output block, ``u_blk = source_blk · C_blk`` (``tl.dot``;
   source = contiguous input slice, gathered input channels, or gathered
   staging channels) and a running row min / max (or |max|).
3. per-row scale / zero point.
4. pass 2: recompute ``u_blk`` (cheaper than keeping a full row in registers:
   one more tensor-core dot per block, inputs come from L1/L2), quantize with
   IEEE division and round-half-to-even, write int8 codes or int4 nibbles
   packed two per byte.

Dot operands are in the input dtype (fp16 / bf16 on GPU: tensor cores, fp32
accumulation; fp32 inputs use ``input_precision="ieee"``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._runtime import interpreting, next_pow2, sm_count
from .plan import MODE_GENERAL, FusedTransformPlan, prepare_transform
from .reference import SCALE_EPS, BlocksLike

__all__ = ["fused_transform_quantize"]

_RNE_MAGIC = 12582912.0      # 1.5 · 2^23: (z + M) − M rounds |z| < 2^22 half-to-even in fp32
_Z_LIMIT = 4194304.0         # 2^22


@triton.jit
def _stage2_tile(j, x_ptr, stride_xm, rows64, rmask, scratch_ptr, slot_off, m_idx,
                 o_start_ptr, o_width_ptr, src_start_ptr, gidx_ptr, c2_ptr, mul_ptr,
                 BLOCK_M: tl.constexpr, OW: tl.constexpr, MODE: tl.constexpr,
                 HAS_C2: tl.constexpr, HAS_MUL: tl.constexpr, DOT_PREC: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 tile ``u`` (BLOCK_M, OW) of output block ``j``; padded columns are exactly 0."""
    cols = tl.arange(0, OW)
    width = tl.load(o_width_ptr + j)
    cmask = cols < width
    if MODE == 0:
        src = tl.load(src_start_ptr + j)
        if ALIGNED:
            src = tl.multiple_of(src, 16)
        z = tl.load(x_ptr + rows64[:, None] * stride_xm + (src + cols)[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
    elif MODE == 1:
        g = tl.load(gidx_ptr + j * OW + cols, mask=cmask, other=0)
        z = tl.load(x_ptr + rows64[:, None] * stride_xm + g[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
    else:
        g = tl.load(gidx_ptr + j * OW + cols, mask=cmask, other=0)
        z = tl.load(scratch_ptr + slot_off + g[None, :].to(tl.int64) * BLOCK_M + m_idx[:, None],
                    mask=cmask[None, :], other=0.0)
    if HAS_C2:
        r = tl.arange(0, OW)
        c = tl.load(c2_ptr + j * OW * OW + r[:, None] * OW + cols[None, :])
        u = tl.dot(z.to(c.dtype), c, input_precision=DOT_PREC)
    else:
        u = z.to(tl.float32)
        if HAS_MUL:
            o = tl.load(o_start_ptr + j)
            u = u * tl.load(mul_ptr + o + cols, mask=cmask, other=0.0)[None, :]
    return u, cols, cmask


@triton.jit
def _fused_act_quant_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, scratch_ptr,
    c1_ptr, b1_start_ptr, b1_width_ptr,
    c2_ptr, o_start_ptr, o_width_ptr, src_start_ptr, gidx_ptr, mul_ptr,
    M, N, stride_xm, stride_cm, NB1, NB2, M_BUCKET, clip,
    SB1: tl.constexpr, OW: tl.constexpr, MODE: tl.constexpr,
    HAS_C2: tl.constexpr, HAS_MUL: tl.constexpr, DOT_PREC: tl.constexpr,
    BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr,
    PACK: tl.constexpr, EPS: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = tl.cdiv(M, BLOCK_M)
    m_idx = tl.arange(0, BLOCK_M)
    slot_off = pid.to(tl.int64) * N * BLOCK_M
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_M + m_idx
        rmask = rows < M
        rows64 = rows.to(tl.int64)

        # ---- stage 1 (mode general): y = x · diag(s) · rot1 into the staging buffer
        if MODE == 2:
            tl.debug_barrier()          # previous tile's gathers are done (WAR)
            r1 = tl.arange(0, SB1)
            for k in range(NB1):
                st = tl.load(b1_start_ptr + k)
                if ALIGNED:
                    st = tl.multiple_of(st, 16)
                wd = tl.load(b1_width_ptr + k)
                km = r1 < wd
                xk = tl.load(x_ptr + rows64[:, None] * stride_xm + (st + r1)[None, :],
                             mask=rmask[:, None] & km[None, :], other=0.0)
                ck = tl.load(c1_ptr + k * SB1 * SB1 + r1[:, None] * SB1 + r1[None, :])
                yk = tl.dot(xk.to(ck.dtype), ck, input_precision=DOT_PREC)
                tl.store(scratch_ptr + slot_off + (st + r1)[None, :].to(tl.int64) * BLOCK_M + m_idx[:, None],
                         yk.to(scratch_ptr.dtype.element_ty), mask=km[None, :])
            tl.debug_barrier()          # staging buffer visible to the whole CTA (RAW)

        # ---- pass 1: row range (0 is always inside it; padded entries are 0)
        lo = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in range(NB2):
            u, cols, cmask = _stage2_tile(j, x_ptr, stride_xm, rows64, rmask, scratch_ptr, slot_off, m_idx,
                                          o_start_ptr, o_width_ptr, src_start_ptr, gidx_ptr, c2_ptr, mul_ptr,
                                          BLOCK_M, OW, MODE, HAS_C2, HAS_MUL, DOT_PREC, ALIGNED)
            if SYMMETRIC:
                hi = tl.maximum(hi, tl.max(tl.abs(u), axis=1))
            else:
                lo = tl.minimum(lo, tl.min(u, axis=1))
                hi = tl.maximum(hi, tl.max(u, axis=1))

        # ---- quantizer parameters (same fp32 ops as reference.quantize_rows)
        if SYMMETRIC:
            scale = tl.maximum(tl.math.div_rn(hi * clip, QMAX * 1.0), EPS)
            zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            lo = lo * clip
            hi = hi * clip
            scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), EPS)
            zero = tl.math.div_rn(-lo, scale)
            zero = (zero + 12582912.0) - 12582912.0
            zero = tl.minimum(tl.maximum(zero, 0.0), QMAX * 1.0)
        tl.store(scales_ptr + rows, scale, mask=rmask)
        if not SYMMETRIC:
            tl.store(zeros_ptr + rows, zero.to(tl.int32), mask=rmask)

        # ---- pass 2: quantize and store
        for j in range(NB2):
            u, cols, cmask = _stage2_tile(j, x_ptr, stride_xm, rows64, rmask, scratch_ptr, slot_off, m_idx,
                                          o_start_ptr, o_width_ptr, src_start_ptr, gidx_ptr, c2_ptr, mul_ptr,
                                          BLOCK_M, OW, MODE, HAS_C2, HAS_MUL, DOT_PREC, ALIGNED)
            zq = tl.math.div_rn(u, scale[:, None])
            zq = tl.minimum(tl.maximum(zq, -4194304.0), 4194304.0)
            q = (zq + 12582912.0) - 12582912.0 + zero[:, None]
            q = tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0).to(tl.int32)
            o = tl.load(o_start_ptr + j)
            if ALIGNED:
                o = tl.multiple_of(o, 16)
            width = tl.load(o_width_ptr + j)
            if PACK:
                pairs = tl.reshape(q, (BLOCK_M, OW // 2, 2))
                q_lo, q_hi = tl.split(pairs)
                byte = (q_lo & 15) | ((q_hi & 15) << 4)
                pc = tl.arange(0, OW // 2)
                tl.store(codes_ptr + rows64[:, None] * stride_cm + (o // 2 + pc)[None, :],
                         byte.to(tl.uint8), mask=rmask[:, None] & (pc < width // 2)[None, :])
            else:
                tl.store(codes_ptr + rows64[:, None] * stride_cm + (o + cols)[None, :],
                         q.to(codes_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------- autotuning


def _configs(block_ms):
    """Configs over BLOCK_M (``block_ms``), or without BLOCK_M (``None``: the wrapper passes it)."""
    if interpreting():
        return [triton.Config({} if block_ms is None else {"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    if block_ms is None:
        return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm in block_ms for w in (4, 8) for s in (1, 2)]


def _prune(configs, named_args, **kwargs):
    mb = max(16, int(named_args["M_BUCKET"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= mb]
    return kept or configs[:1]


_KEY = ["M_BUCKET", "N", "NB2", "OW", "MODE", "HAS_C2", "BITS", "SYMMETRIC"]
# modes local / gather: nothing staged, large row tiles amortize the block matrices.
_act_kernel = triton.autotune(configs=_configs((16, 32, 64, 128)), key=_KEY,
                              prune_configs_by={"early_config_prune": _prune})(_fused_act_quant_kernel)
# mode general: the staging buffer is BLOCK_M × N per resident program (one per SM), so BLOCK_M is
# chosen by the wrapper (16 or 32) to keep it L2-sized, and only warps / stages are tuned.
_act_kernel_general = triton.autotune(configs=_configs(None), key=_KEY + ["BLOCK_M"])(_fused_act_quant_kernel)


def _general_block_m(M: int, n: int, slots: int, itemsize: int) -> int:
    if interpreting() or M <= 16 * slots:
        return 16
    # 32-row tiles amortize the block matrices better, if the staging buffers stay well inside L2
    return 32 if slots * 32 * n * itemsize <= 32 * 2**20 else 16


# --------------------------------------------------------------------------- wrapper


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
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Transform ``x`` online and quantize it per token, in one kernel.

    ``x``: ``(..., n)`` float16 / bfloat16 / float32, last dim contiguous.
    ``scale`` ``(n,)``, ``rot1`` / ``rot2`` (list of square blocks ≤ 128, or a
    ``(nblocks, b, b)`` tensor), ``perm`` ``(n,)`` int: see
    :func:`quantcompose_kernels.plan.prepare_transform`; or pass a prebuilt
    ``plan=prepare_transform(n, ...)`` (recommended: building the plan is host
    work done once per layer) and leave the four transform arguments ``None``.

    Returns ``(codes, scales, zeros)``:

    * ``codes``: ``(..., n)`` ``uint8`` (asymmetric, ``[0, 2^b−1]``) / ``int8``
      (symmetric, ``[−2^(b−1), 2^(b−1)−1]``), or for ``bits == 4`` ``uint8``
      ``(..., n/2)`` with two codes per byte (element ``2i`` low nibble);
    * ``scales``: float32 ``(...)``;
    * ``zeros``: int32 ``(...)`` in ``[0, 2^b−1]``, or ``None`` if symmetric.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not (2 <= bits <= 8):
        raise ValueError(f"bits={bits!r} is not supported: use an integer from 2 to 8 (4 is packed).")
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio={clip_ratio!r} must be in (0, 1].")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}.")
    n = x.shape[-1]
    if plan is None:
        plan = prepare_transform(n, scale=scale, rot1=rot1, perm=perm, rot2=rot2)
    elif any(a is not None for a in (scale, rot1, perm, rot2)):
        raise ValueError("pass either plan= or the transform tensors (scale/rot1/perm/rot2), not both.")
    if plan.n != n:
        raise ValueError(f"the plan is for width {plan.n}, but x has width {n}.")
    pack = bits == 4
    if pack and (n % 2 or not plan.int4_ok):
        raise ValueError("int4 packing needs an even width and transform blocks that start on even channels.")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    dev = x.device
    t = plan.tensors(dev, x.dtype)
    code_dtype = torch.uint8 if (pack or not symmetric) else torch.int8
    codes = torch.empty((M, n // 2 if pack else n), dtype=code_dtype, device=dev)
    scales = torch.empty((M,), dtype=torch.float32, device=dev)
    zeros = None if symmetric else torch.empty((M,), dtype=torch.int32, device=dev)
    if M == 0:
        return codes.reshape(*lead, codes.shape[-1]), scales.reshape(lead), \
            (None if zeros is None else zeros.reshape(lead))

    general = plan.mode == MODE_GENERAL
    nb1 = int(plan.b1_start.numel()) if general else 0
    common = dict(
        SB1=plan.sb1, OW=plan.ow, MODE=plan.mode, HAS_C2=plan.c2 is not None,
        HAS_MUL=plan.mul is not None and plan.c2 is None,
        # fp32 inputs: exact-ish fp32 products (3×TF32 tensor-core passes on a GPU, plain fp32 in the
        # interpreter); fp16/bf16 operands ignore the setting.
        DOT_PREC=("tf32x3" if (x.is_cuda and not interpreting()) else "ieee") if x.dtype == torch.float32
        else "tf32",
        BITS=bits, QMIN=-(1 << (bits - 1)) if symmetric else 0,
        QMAX=(1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1,
        SYMMETRIC=bool(symmetric), PACK=pack, EPS=SCALE_EPS, ALIGNED=plan.aligned16,
    )
    num_tiles = lambda bm: triton.cdiv(M, bm)  # noqa: E731
    if general:
        bm = _general_block_m(M, n, sm_count(dev), x.element_size())
        slots = max(1, min(num_tiles(bm), sm_count(dev)))
        scratch = torch.empty((slots * bm * n,), dtype=x.dtype, device=dev)
        grid = (slots,)
        common["BLOCK_M"] = bm
        kernel = _act_kernel_general
    else:
        scratch = None
        grid = lambda meta: (num_tiles(meta["BLOCK_M"]),)  # noqa: E731
        kernel = _act_kernel
    kernel[grid](
        x2, codes, scales, zeros, scratch,
        t["c1"], t["b1_start"], t["b1_width"],
        t["c2"], t["o_start"], t["o_width"], t["src_start"], t["gidx"], t["mul"],
        M, n, x2.stride(0), codes.stride(0), nb1, plan.num_out_blocks, next_pow2(M), float(clip_ratio),
        # no FMA contraction: the quantizer must round exactly like reference.quantize_rows
        enable_fp_fusion=False,
        **common,
    )
    return (codes.reshape(*lead, codes.shape[-1]), scales.reshape(lead),
            None if zeros is None else zeros.reshape(lead))

