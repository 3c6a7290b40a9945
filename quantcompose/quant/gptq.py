"""GPTQ: quantize a weight column by column, compensating each column's error.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023). With ``H = XᵀX`` of the layer's inputs,
quantizing column ``i`` and spreading its error over the columns not yet
quantized through the inverse Hessian minimises ``‖X(W − Q)ᵀ‖²`` greedily.
The per-row scales and zero points are fixed up front (from the possibly
clipped weight), so the result is an ordinary per-channel quantized tensor.
"""

from __future__ import annotations

import torch

from quantcompose.errors import ShapeError
from quantcompose.quant.functional import QuantizedTensor, compute_qparams
from quantcompose.quant.spec import QuantSpec


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    range_weight: torch.Tensor | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> QuantizedTensor:
    """Quantize ``weight`` (out, in) per output channel with GPTQ error compensation.

    ``hessian`` is ``XᵀX`` (in, in) of the inputs the layer sees; ``range_weight``
    (default ``weight``) sets each row's quantization range, e.g. a clipped copy.
    ``act_order`` quantizes the columns with the largest ``H`` diagonal first, so
    the error of the channels that matter most is spread over the most others
    (GPTQ's "act-order"); the scales are per row, so the order changes nothing else.
    """
    if spec.granularity != "channel":
        raise ShapeError(f"GPTQ here quantizes per output channel; got a {spec.granularity!r} quantizer")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ShapeError(f"hessian must be ({in_features}, {in_features}), got {tuple(hessian.shape)}")
    w = weight.detach().to(torch.float64).clone()
    scale, zero = compute_qparams((weight if range_weight is None else range_weight).detach().double(), spec)
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H⁻¹: row i holds the update coefficients for column i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # The factorisation needs float64; the column sweep does not, and runs twice as fast in float32.
    w, hinv = w.float(), hinv.float()

    codes = torch.empty_like(w)
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    s, z = scale.reshape(-1).float(), zero.reshape(-1).float()
    inv_s = 1.0 / s
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = w[:, start:stop].clone()
        errors = torch.empty_like(w_block)
        h_block = hinv[start:stop, start:stop]
        inv_diag = 1.0 / torch.diagonal(h_block)
        for i in range(stop - start):
            column = w_block[:, i]
            code = torch.round(column * inv_s).add_(z).clamp_(qmin, qmax)
            codes[:, start + i] = code
            error = torch.sub(column, (code - z) * s).mul_(inv_diag[i])
            # One rank-1 update spreads this column's error over the columns not yet quantized.
            w_block[:, i:].addr_(error, h_block[i, i:], alpha=-1.0)
            errors[:, i] = error
        w[:, stop:].sub_(errors @ hinv[start:stop, stop:])
    codes = codes[:, torch.argsort(order)]
    return QuantizedTensor(
        codes=codes.to(spec.code_dtype),
        scale=scale.float(),
        zero_point=zero.float(),
        spec=spec,
        shape=torch.Size((out_features, in_features)),
    )
