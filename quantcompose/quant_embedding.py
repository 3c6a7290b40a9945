"""A weight-only quantized embedding table: integer codes per row, de-quantized only for the rows looked up.

On SmolLM2-135M the table is 49152 × 576 values, 54 MiB in float16: once
the linears are 4-bit codes it is the largest part of a model whose residual
rotation unties the LM head (QuaRot). ``QuantSettings.embedding_bits`` (8,
or 4 packed two per byte) asks the pipeline to replace it at the end of a
run (:func:`quantize_embedding`, after the model scope folded its rotation
into the table and after calibration read the float table). The codes,
scales and zero points use the layout of a :class:`~quantcompose.qlinear.QuantLinear`
weight (the table's rows are its output rows), so saving, loading and the
integrity checks treat both alike.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcompose.errors import QuantSpecError, ShapeError
from quantcompose.qlinear import stored_weight, weight_buffers, weight_layout
from quantcompose.quant import QuantSpec, dequantize, quantize

#: The code widths an embedding table can be stored in.
EMBEDDING_BITS = (4, 8)


def embedding_spec(bits: int) -> QuantSpec:
    """The quantizer of an embedding table at ``bits``: asymmetric, one scale and zero point per row (token)."""
    check_embedding_bits(bits)
    return QuantSpec(bits, symmetric=False, granularity="channel")


def check_embedding_bits(bits: object) -> None:
    """A :class:`QuantSpecError` unless ``bits`` is one of :data:`EMBEDDING_BITS`."""
    if type(bits) is not int or bits not in EMBEDDING_BITS:  # bool and 8.0 compare equal to ints
        raise QuantSpecError(
            f"embedding_bits={bits!r} is not supported: use 8 (int8 codes) or 4 (two codes per byte), "
            "or leave it unset to keep the embedding table in float."
        )


class QuantEmbedding(nn.Module):
    """An embedding table held as integer codes with per-row (or per-group) scales and zero points.

    ``forward`` gathers the codes of the looked-up rows and de-quantizes only
    those, into ``compute_dtype``; the values equal the same rows of
    :meth:`dequantized_weight` exactly.
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ShapeError(f"an embedding table is 2-D (tokens, hidden), got shape {tuple(weight.shape)}")
        rows, cols = weight.shape
        self._setup(rows, cols, spec, compute_dtype or weight.dtype)
        q = quantize(weight.detach().float(), spec)
        for name, tensor in weight_buffers(q, rows, cols).items():
            self.register_buffer(name, tensor)

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, spec: QuantSpec, compute_dtype: torch.dtype = torch.float32
    ) -> "QuantEmbedding":
        """A table with uninitialised buffers of the right shapes, to be filled by ``load_state_dict``."""
        table = cls.__new__(cls)
        nn.Module.__init__(table)
        table._setup(num_embeddings, embedding_dim, spec, compute_dtype)
        for name, (shape, dtype) in weight_layout(num_embeddings, embedding_dim, spec).items():
            table.register_buffer(name, torch.empty(shape, dtype=dtype))
        return table

    def _setup(self, rows: int, cols: int, spec: QuantSpec, compute_dtype: torch.dtype) -> None:
        if spec.granularity not in ("channel", "group"):
            raise QuantSpecError(f"an embedding table is quantized per row or per group of a row, not "
                                 f"{spec.granularity!r}: use granularity 'channel' or 'group'")
        if spec.granularity == "group" and cols % spec.group_size:
            raise ShapeError(f"group_size {spec.group_size} does not divide the embedding width {cols}")
        if not compute_dtype.is_floating_point:
            raise QuantSpecError(f"compute_dtype must be a float dtype, got {compute_dtype}")
        self.num_embeddings, self.embedding_dim = rows, cols
        self.spec = spec
        self.compute_dtype = compute_dtype

    def _rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        q = stored_weight(self.weight_codes[index], self.weight_scale[index], self.weight_zero[index], self.spec,
                          self.embedding_dim)
        return dequantize(q, self.compute_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._rows(input)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole table de-quantized into ``compute_dtype`` (made on every call, not kept)."""
        return self._rows(slice(None))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec}, compute_dtype={self.compute_dtype}"


def quantize_embedding(model: nn.Module, bits: int) -> QuantEmbedding:
    """Replace ``model``'s input embedding by a :class:`QuantEmbedding` of its table at ``bits``; returns it.

    Refuses (:class:`QuantSpecError`) when the LM head still shares the
    table's weight: it would be left reading a table that no longer exists.
    The table is quantized from the values it holds now (after any storage
    rounding) and looked up in the dtype the model computed it in.
    """
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise QuantSpecError(f"the input embedding ({type(embedding).__name__}) has no float table to quantize")
    if getattr(model.get_output_embeddings(), "weight", None) is weight:
        raise QuantSpecError(tied_head_message(bits))
    compute = getattr(embedding, "compute_dtype", weight.dtype)  # a StoredEmbedding computes in its compute dtype
    table = QuantEmbedding(weight.data, embedding_spec(bits), compute).to(weight.device)
    model.set_input_embeddings(table)
    return table


def tied_head_message(bits: int) -> str:
    """Why ``embedding_bits`` is refused for a model whose LM head stays a float view of the table."""
    return (
        f"embedding_bits={bits} would quantize the embedding table, but the LM head is tied to it and is not "
        "quantized: the head would need its own float copy of the table, which makes the model larger than "
        "keeping one float table. Quantize the LM head too (recipe: ignore = [] or a target "
        "{ match = \"lm_head\", wbits = 8 }), or leave embedding_bits unset"
    )


__all__ = ["EMBEDDING_BITS", "QuantEmbedding", "check_embedding_bits", "embedding_spec", "quantize_embedding",
           "tied_head_message"]
