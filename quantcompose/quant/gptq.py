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
) -> QuantizedTensor:
    """Quantize ``weight`` (out, in) per output channel with GPTQ error compensation.

    ``hessian`` is ``XᵀX`` (in, in) of the inputs the layer sees; ``range_weight``
    (default ``weight``) sets each row's quantization range, e.g. a clipped copy.
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
    # Upper Cholesky factor of H⁻¹: row i holds the update coefficients for column i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.empty_like(w)
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    s, z = scale.reshape(-1), zero.reshape(-1)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = w[:, start:stop].clone()
        errors = torch.empty_like(w_block)
        h_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = w_block[:, i]
            code = torch.clamp(torch.round(column / s) + z, qmin, qmax)
            codes[:, start + i] = code
            error = (column - (code - z) * s) / h_block[i, i]
            w_block[:, i:].sub_(error.unsqueeze(1) * h_block[i, i:].unsqueeze(0))
            errors[:, i] = error
        w[:, stop:].sub_(errors @ hinv[start:stop, stop:])
    return QuantizedTensor(
        codes=codes.to(spec.code_dtype),
        scale=scale.float(),
        zero_point=zero.float(),
        spec=spec,
        shape=torch.Size((out_features, in_features)),
    )
