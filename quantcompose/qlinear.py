"""The quantized linear layer: online transform, activation quantizer, quantized weight."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantcompose.errors import ShapeError
from quantcompose.quant import QuantSpec, dequantize, fake_quantize, pack_int4, quantize, unpack_int4
from quantcompose.quant.functional import QuantizedTensor
from quantcompose.transforms import Identity, Transform
from quantcompose.transforms.serialize import state_tensors


def is_packed(spec: QuantSpec, in_features: int) -> bool:
    """Whether weight codes of ``spec`` are stored two per byte (int4 packing needs an even width)."""
    return spec.bits <= 4 and in_features % 2 == 0


def weight_layout(
    out_features: int, in_features: int, spec: QuantSpec | None, float_dtype: torch.dtype = torch.float32
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → ``(shape, dtype)`` of the weight tensors a :class:`QuantLinear` stores for ``spec``.

    Codes are ``(out, in/2)`` ``uint8`` when packed, else ``(out, in)`` of the
    spec's code dtype; scale and zero point follow the granularity of a
    quantizer reducing over the ``in`` dimension (see ``quant/functional.py``).
    """
    if spec is None:
        return {"weight": ((out_features, in_features), float_dtype)}
    if is_packed(spec, in_features):
        codes = ((out_features, in_features // 2), torch.uint8)
    else:
        codes = ((out_features, in_features), spec.code_dtype)
    if spec.granularity == "tensor":
        params: tuple[int, ...] = (1, 1)
    elif spec.granularity == "group":
        params = (out_features, in_features // spec.group_size, 1)
    else:
        params = (out_features, 1)
    return {"weight_codes": codes, "weight_scale": (params, torch.float32), "weight_zero": (params, torch.float32)}


def weight_buffers(q: QuantizedTensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """The buffers a ``(rows, cols)`` weight quantized as ``q`` is stored in (the names of :func:`weight_layout`).

    Codes are int4-packed two per byte where :func:`is_packed` says so; scales and zero points float32.
    """
    codes = q.codes.reshape(rows, cols)
    if is_packed(q.spec, cols):
        codes = pack_int4(codes, signed=q.spec.symmetric)
    return {"weight_codes": codes, "weight_scale": q.scale.float(), "weight_zero": q.zero_point.float()}


def stored_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, cols: int
) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of stored weight rows (any leading shape, ``cols`` wide), codes unpacked."""
    if is_packed(spec, cols):
        codes = unpack_int4(codes, signed=spec.symmetric)
    return QuantizedTensor(codes=codes, scale=scale, zero_point=zero, spec=spec, shape=codes.shape)


# id(source) -> (weak reference to source, {(device, dtype): cast}). Sibling
# linears (q/k/v, gate/up) receive one online transform object; casting or
# moving it through this cache keeps them sharing one copy, in memory and on disk.
_CASTS: dict[int, tuple[weakref.ref, dict[tuple[Any, Any], Transform]]] = {}


def shared_cast(
    transform: Transform, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Transform:
    """``transform.to(device, dtype)``, returning the same object for the same source and target.

    Returns ``transform`` itself when it already has that dtype and device.
    """
    tensors = list(state_tensors(transform.state_dict()))
    needs_dtype = dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors)
    needs_device = device is not None and any(t.device != torch.device(device) for t in tensors)
    if not needs_dtype and not needs_device:
        return transform
    key = (None if device is None else str(torch.device(device)), dtype)
    entry = _CASTS.get(id(transform))
    if entry is None or entry[0]() is not transform:
        source_id = id(transform)
        entry = (weakref.ref(transform, lambda _ref: _CASTS.pop(source_id, None)), {})
        _CASTS[source_id] = entry
    cast = entry[1].get(key)
    if cast is None:
        cast = entry[1][key] = transform.to(device=device, dtype=dtype)
    return cast


class SharedInput:
    """Remembers the last ``Q_a(x·T)`` so sibling linears reading the same ``x`` reuse it.

    ``readers`` is how many linears share it: once the last of them has read
    the stored batch it is dropped, so no activation outlives the forward pass.
    """

    def __init__(self, readers: int = 2) -> None:
        self.readers = readers
        self._left = 0
        self._key: tuple[int, int] | None = None
        self._source: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def hit(self, x: torch.Tensor) -> bool:
        # Same tensor object, unmodified since (its version counter), and no autograd.
        return self._source is x and self._key == (id(x), x._version) and not torch.is_grad_enabled()

    def store(self, x: torch.Tensor, output: torch.Tensor) -> None:
        self._source, self._key, self.output = x, (id(x), x._version), output
        self._left = self.readers - 1

    def take(self) -> torch.Tensor:
        """The stored batch, for one more reader; forgotten after the last."""
        output = self.output
        self._left -= 1
        if self._left <= 0:
            self.clear()
        return output

    def clear(self) -> None:
        self._source = self.output = self._key = None
        self._left = 0


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
        out_features, in_features = weight.shape
        float_dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self._setup(in_features, out_features, bias, transform, act_spec, weight_spec, output_spec, float_dtype)
        if weight_spec is None:
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        else:
            # A weight quantizer such as GPTQ may hand over its own codes.
            q = quantized_weight if quantized_weight is not None else quantize(weight.detach().float(), weight_spec)
            for name, tensor in weight_buffers(q, self.out_features, self.in_features).items():
                self.register_buffer(name, tensor)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        transform: Transform | None = None,
        act_spec: QuantSpec | None = None,
        weight_spec: QuantSpec | None = None,
        output_spec: QuantSpec | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "QuantLinear":
        """A layer with uninitialised buffers of the right shapes, to be filled by ``load_state_dict``.

        Loading a saved model uses it so that no placeholder weight is quantized only to be overwritten.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        empty_bias = torch.empty(out_features, dtype=dtype) if bias else None
        layer._setup(in_features, out_features, empty_bias, transform, act_spec, weight_spec, output_spec, dtype)
        for name, (shape, buffer_dtype) in weight_layout(out_features, in_features, weight_spec, dtype).items():
            tensor = torch.empty(shape, dtype=buffer_dtype)
            if weight_spec is None:
                setattr(layer, name, nn.Parameter(tensor, requires_grad=False))
            else:
                layer.register_buffer(name, tensor)
        return layer

    def _setup(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        transform: Transform | None,
        act_spec: QuantSpec | None,
        weight_spec: QuantSpec | None,
        output_spec: QuantSpec | None,
        float_dtype: torch.dtype,
    ) -> None:
        """Everything but the weight: shared by ``__init__`` and :meth:`empty`."""
        self.out_features, self.in_features = out_features, in_features
        if transform is not None and transform.size != self.in_features:
            raise ShapeError(
                f"transform width {transform.size} does not match the layer's input width {self.in_features}"
            )
        if isinstance(transform, Identity):
            transform = None
        # Cast once, here, and only float64 tensors (to float32; everything to float64
        # in a float64 layer): the reference path computes in the activation's dtype
        # anyway, a transform the pipeline rounded to a 16-bit storage dtype
        # (quantcompose.storage) stays that small, and a saved model stores exactly what runs.
        if transform is not None and (float_dtype == torch.float64 or any(
            t.dtype == torch.float64 for t in state_tensors(transform.state_dict())
        )):
            transform = shared_cast(transform, dtype=torch.float64 if float_dtype == torch.float64 else torch.float32)
        self.transform = transform
        self.act_spec = act_spec
        self.weight_spec = weight_spec
        # Fake-quantizes the output (K/V cache quantization on k_proj / v_proj).
        self.output_spec = output_spec
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._float_dtype = float_dtype
        # "auto": Triton kernels on CUDA, PyTorch reference elsewhere; "always":
        # kernels wherever Triton runs (the CPU interpreter too); "never".
        self.kernels = "auto"
        self._kernel_state: Any = None
        # Set by the pipeline on linears that read the same activation with the
        # same transform and quantizer; not saved (a loaded model recomputes).
        self.shared_input: SharedInput | None = None
        self._kernel_state_device: torch.device | None = None
        self.packed = weight_spec is not None and is_packed(weight_spec, in_features)

    # -- weights ---------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer multiplies by, de-quantized from the codes on every call.

        Nothing is cached: a model keeps only its codes between forward passes
        (a cache of every layer's float weight was 2.5× the model's own size),
        and one layer's weight exists only while that layer runs.
        """
        if self.weight_spec is None:
            return self.weight
        q = stored_weight(self.weight_codes, self.weight_scale, self.weight_zero, self.weight_spec, self.in_features)
        return dequantize(q).reshape(self.out_features, self.in_features).to(self._float_dtype)

    def _apply(self, fn, recurse=True):  # drop the kernel operands on .to()/.half()/.cuda()
        self._kernel_state = self._kernel_state_device = None
        result = super()._apply(fn, recurse)
        reference = next(iter([*self.parameters(), *self.buffers()]), None)
        if self.transform is not None and reference is not None:
            self.transform = shared_cast(self.transform, device=reference.device)
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
            return shared.take()
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
