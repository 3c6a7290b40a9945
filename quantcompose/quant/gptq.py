"""GPTQ: quantize a weight column by column, compensating each column's error.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023). With ``H = XᵀX`` of the layer's inputs,
quantizing column ``i`` and spreading its error over the columns not yet
quantized through the inverse Hessian minimises ``‖X(W − Q)ᵀ‖²`` greedily.
The scales and zero points are fixed up front (from the possibly clipped
weight), per row or per group of columns ("static groups"), so the result is
an ordinary per-channel or per-group quantized tensor.
"""

from __future__ import annotations

import torch
from scipy.linalg import lapack

from quantcompose.errors import ShapeError
from quantcompose.threads import limited_threads
from quantcompose.quant.functional import QuantizedTensor, compute_qparams
from quantcompose.quant.spec import QuantSpec

#: Intra-op threads for the column sweep: its ops are small and sequential.
SWEEP_THREADS: int | None = 1


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """The upper triangular ``U`` with ``UᵀU = H⁻¹``, for a symmetric positive definite ``H``.

    With ``J`` the order reversal, ``JHJ = LLᵀ`` gives ``H⁻¹ = (JL⁻¹J)ᵀ(JL⁻¹J)``
    and ``JL⁻¹J`` is upper triangular: one Cholesky and one triangular
    inverse (⅔n³ flops) instead of factor, invert, factor again (⁵⁄₃n³).
    """
    lower = torch.linalg.cholesky(h.flip(0, 1))
    inverse, info = lapack.dtrtri(lower.cpu().numpy(), lower=1)  # LAPACK runs on the CPU
    if info != 0:
        raise torch.linalg.LinAlgError(f"triangular inverse failed (LAPACK info={info})")
    return torch.from_numpy(inverse).flip(0, 1).to(h.device)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    range_weight: torch.Tensor | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> QuantizedTensor:
    """Quantize ``weight`` (out, in) per output channel or per group with GPTQ error compensation.

    ``hessian`` is ``XᵀX`` (in, in) of the inputs the layer sees; ``range_weight``
    (default ``weight``) sets each row's quantization range, e.g. a clipped copy.
    ``act_order`` quantizes the columns with the largest ``H`` diagonal first, so
    the error of the channels that matter most is spread over the most others
    (GPTQ's "act-order"). Group scales are computed before the sweep from
    ``range_weight``'s groups of consecutive columns, so act-order only changes
    the order in which columns are rounded, never which scale a column uses.
    """
    if spec.granularity not in ("channel", "group"):
        raise ShapeError(f"GPTQ quantizes per output channel or per group; got a {spec.granularity!r} quantizer")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ShapeError(f"hessian must be ({in_features}, {in_features}), got {tuple(hessian.shape)}")
    w = weight.detach().to(torch.float64).clone()
    scale, zero = compute_qparams((weight if range_weight is None else range_weight).detach().double(), spec)
    grouped = spec.granularity == "group"
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H⁻¹: row i holds the update coefficients for column i.
    hinv = upper_cholesky_of_inverse(h)
    # The factorisation needs float64; the column sweep does not, and runs twice as fast in float32.
    w, hinv = w.float().contiguous(), hinv.float().contiguous()

    with limited_threads(SWEEP_THREADS):
        if grouped:
            # Column j uses group j // group_size: one (in, out) row of scales per permuted column.
            group_of = order // int(spec.group_size)
            s = scale.squeeze(-1).float()[:, group_of].T.contiguous()
            z = zero.squeeze(-1).float()[:, group_of].T.contiguous()
        else:
            s, z = scale.reshape(-1).float(), zero.reshape(-1).float()
        codes = _sweep(w, hinv, s, z, int(spec.qmin), int(spec.qmax), block)
    codes = codes[:, torch.argsort(order)]
    return QuantizedTensor(
        codes=codes.to(spec.code_dtype),
        scale=scale.float(),
        zero_point=zero.float(),
        spec=spec,
        shape=torch.Size((out_features, in_features)),
    )


def _sweep(
    w: torch.Tensor, hinv: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, block: int
) -> torch.Tensor:
    """GPTQ's column sweep on float32 tensors; returns the integer codes (float32).

    ``w`` (out, in) is updated in place; ``hinv`` is the upper Cholesky factor
    of ``H⁻¹``. ``s`` / ``z`` are per row (out,) or per column (in, out). The loop is inherently sequential (each column is rounded
    after the errors of all earlier ones reach it), so its cost is mostly
    per-call overhead: one fused fake-quantize per column, a rank-1 update
    of the block's later columns, and one matrix product per block. A column
    is never touched again once rounded, so the block's codes are computed
    from it in one pass at the end.
    """
    out_features, in_features = w.shape
    codes = torch.empty_like(w)
    per_column = s.dim() == 2
    zero_int = z.round().to(torch.int32)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        # Column-major, so that each column and each trailing slice is contiguous.
        w_block = w[:, start:stop].T.contiguous().T
        errors = torch.empty_like(w_block)
        h_block = hinv[start:stop, start:stop]
        inv_diag = (1.0 / torch.diagonal(h_block)).tolist()
        width = stop - start
        for i in range(width):
            column = w_block[:, i]
            if per_column:
                j = start + i
                rounded = torch.fake_quantize_per_channel_affine(column, s[j], zero_int[j], 0, qmin, qmax)
            else:
                rounded = torch.fake_quantize_per_channel_affine(column, s, zero_int, 0, qmin, qmax)
            error = errors[:, i]
            torch.sub(column, rounded, out=error)
            error.mul_(inv_diag[i])
            if i + 1 < width:
                w_block[:, i + 1 :].addr_(error, h_block[i, i + 1 :], alpha=-1.0)
        # x·(1/s), not x/s: the rounding fake_quantize_per_channel_affine did, so codes match the errors spread.
        if per_column:
            inv_s, z_block = (1.0 / s[start:stop]).T, z[start:stop].T
        else:
            inv_s, z_block = (1.0 / s)[:, None], z[:, None]
        codes[:, start:stop] = torch.round(w_block * inv_s).add_(z_block).clamp_(qmin, qmax)
        if stop < in_features:
            w[:, stop:].sub_(errors @ hinv[start:stop, stop:])
    return codes
