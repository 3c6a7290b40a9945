"""The quantized linear layer: online transform, activation quantizer, quantized weight."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantcompose.quant import QuantSpec, dequantize, fake_quantize, pack_int4, quantize, unpack_int4
from quantcompose.quant.functional import QuantizedTensor
from quantcompose.transforms import Identity, Transform


class SharedInput:
    """Remembers the last ``Q_a(x·T)`` so sibling linears reading the same ``x`` reuse it."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._source: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def hit(self, x: torch.Tensor) -> bool:
        # Same tensor object, unmodified since (its version counter), and no autograd.
        return self._source is x and self._key == (id(x), x._version) and not torch.is_grad_enabled()

    def store(self, x: torch.Tensor, output: torch.Tensor) -> None:
        self._source, self._key, self.output = x, (id(x), x._version), output

    def clear(self) -> None:
        self._source = self.output = self._key = None


class QuantLinear(nn.Module):
    """``y = Q_a(x·T) · Q_w(W')ᵀ + b``, where ``W'`` already holds ``T⁻ᵀ``.

    ``transform`` is the part of the method's transform that could not be
    folded into the module before this layer (``None`` when all of it was).
    Weights are stored as integer codes — int4 packed two per byte — with
    their scales and zero points; ``weight_spec=None`` keeps a float weight.
    ``quantized_weight`` passes codes made elsewhere (GPTQ) instead of
    rounding ``weight`` to nearest.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        transform: Transform | None = None,
        act_spec: QuantSpec | None = None,
        weight_spec: QuantSpec | None = None,
        output_spec: QuantSpec | None = None,
        quantized_weight: QuantizedTensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if transform is not None and transform.size != self.in_features:
            raise ValueError(
                f"transform width {transform.size} does not match the layer's input width {self.in_features}"
            )
        if isinstance(transform, Identity):
            transform = None
        self.transform = transform
        self.act_spec = act_spec
        self.weight_spec = weight_spec
        # Fake-quantizes the output (K/V cache quantization on k_proj / v_proj).
        self.output_spec = output_spec
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._float_dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self._weight_cache: torch.Tensor | None = None
        # "auto": Triton kernels on CUDA, PyTorch reference elsewhere; "always":
        # kernels wherever Triton runs (the CPU interpreter too); "never".
        self.kernels = "auto"
        self._kernel_state: Any = None
        # Set by the pipeline on linears that read the same activation with the
        # same transform and quantizer; not saved (a loaded model recomputes).
        self.shared_input: SharedInput | None = None
        self._kernel_state_device: torch.device | None = None
        if weight_spec is None:
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.packed = False
        else:
            # A weight quantizer such as GPTQ may hand over its own codes.
            q = quantized_weight if quantized_weight is not None else quantize(weight.detach().float(), weight_spec)
            codes = q.codes.reshape(self.out_features, self.in_features)
            self.packed = weight_spec.bits <= 4 and self.in_features % 2 == 0
            if self.packed:
                codes = pack_int4(codes, signed=weight_spec.symmetric)
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", q.scale.float())
            self.register_buffer("weight_zero", q.zero_point.float())

    # -- weights ---------------------------------------------------------------
    def _codes(self) -> torch.Tensor:
        if self.packed:
            return unpack_int4(self.weight_codes, signed=self.weight_spec.symmetric)
        return self.weight_codes

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer multiplies by (cached; rebuilt after moves)."""
        if self.weight_spec is None:
            return self.weight
        if self._weight_cache is None or self._weight_cache.device != self.weight_codes.device:
            q = QuantizedTensor(
                codes=self._codes(),
                scale=self.weight_scale,
                zero_point=self.weight_zero,
                spec=self.weight_spec,
                shape=torch.Size((self.out_features, self.in_features)),
            )
            self._weight_cache = dequantize(q).reshape(self.out_features, self.in_features).to(self._float_dtype)
        return self._weight_cache

    def _apply(self, fn, recurse=True):  # drop the caches on .to()/.half()/.cuda()
        self._weight_cache = None
        self._kernel_state = self._kernel_state_device = None
        result = super()._apply(fn, recurse)
        reference = next(iter([*self.parameters(), *self.buffers()]), None)
        if self.transform is not None and reference is not None:
            self.transform = self.transform.to(device=reference.device)
        return result

    def weight_nbytes(self) -> int:
        """Bytes the stored weight takes (codes + scales + zero points, or the float weight)."""
        if self.weight_spec is None:
            return self.weight.numel() * self.weight.element_size()
        return sum(t.numel() * t.element_size() for t in (self.weight_codes, self.weight_scale, self.weight_zero))

    # -- forward ---------------------------------------------------------------
    def _kernels_for(self, x: torch.Tensor) -> Any:
        """The prepared kernel operands for ``x``'s device, or None to run the reference path."""
        if self.kernels == "never" or (self.kernels == "auto" and not x.is_cuda):
            return None
        if self._kernel_state_device != x.device:
            from quantcompose.kernel_dispatch import build_kernel_state

            self._kernel_state = build_kernel_state(self, x.device)
            self._kernel_state_device = x.device
        return self._kernel_state

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_a(x·T)``; linears that share an input (q/k/v, gate/up) share the work."""
        shared = self.shared_input
        if shared is not None and shared.hit(x):
            return shared.output
        if self.transform is not None:
            x_in, x = x, self.transform(x)
        else:
            x_in = x
        if self.act_spec is not None:
            x = fake_quantize(x, self.act_spec)
        if shared is not None:
            shared.store(x_in, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._kernels_for(x)
        if state is not None:
            from quantcompose.kernel_dispatch import kernel_forward

            y = kernel_forward(self, state, x)
            return fake_quantize(y, self.output_spec) if self.output_spec is not None else y
        x = self.quantize_input(x)
        weight = self.dequantized_weight()
        bias = self.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        y = F.linear(x, weight, bias)
        if self.output_spec is not None:
            y = fake_quantize(y, self.output_spec)
        return y

    def extra_repr(self) -> str:
        t = "none" if self.transform is None else type(self.transform).__name__
        return (
            f"in={self.in_features}, out={self.out_features}, online_transform={t}, "
            f"act={self.act_spec}, weight={self.weight_spec}, packed={self.packed}"
        )
