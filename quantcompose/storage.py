"""The precision a quantized model keeps its float parts in: online transforms and embeddings.

A W4A4 model is mostly 4-bit codes, but two float parts can outweigh them:
the embedding table (28 M values on SmolLM2-135M) and each linear's online
transform (DuQuant's two block rotations at every place: 24 M values). Kept
in float32 they made a saved W4A4 DuQuant SmolLM2 as large as the float16
model. ``QuantSettings.storage_dtype`` (default ``"float16"``, the precision
every deployed checkpoint keeps its embeddings in) is the one owner of that
choice, and it is applied *before* the weights are folded and quantized:

- an online transform is rounded atom by atom (:func:`stored_transform`),
  and the weight is folded with the exact inverse of the *rounded* map (a
  rounded rotation becomes a :class:`~quantcompose.transforms.BlockLinear`
  whose inverse is computed, not transposed), so the layer stays exact for
  the map that really runs;
- the embedding table and a float LM head are rounded to the storage dtype's
  values before calibration (:func:`round_float_weights`), so calibration sees
  what the model will run.

Saving then writes those tensors in 16 bits without loss (``saving.py``).
``"float32"`` keeps everything as computed (the 16-bit exactness tests use it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantcompose.errors import QuantSpecError, TransformError
from quantcompose.transforms import BlockLinear, BlockRotation, Compose, Scale, Transform
from quantcompose.transforms.serialize import state_tensors

#: The storage dtypes a user may choose, by name.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage dtype name, or a QuantSpecError listing the choices."""
    dtype = STORAGE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise QuantSpecError(
            f"storage_dtype={name!r} is unknown: use one of {', '.join(STORAGE_DTYPES)} "
            "(the precision of the embeddings and online transforms a quantized model keeps)."
        )
    return dtype


def _rounded(values: torch.Tensor, dtype: torch.dtype, keep_nonzero: bool = True) -> torch.Tensor | None:
    """``values`` in ``dtype``, or None when rounding overflows (or, with ``keep_nonzero``, turns a
    nonzero value into zero, which would make a scale singular)."""
    out = values.to(dtype)
    if not bool(torch.isfinite(out).all()):
        return None
    if keep_nonzero and bool(((out == 0) & (values != 0)).any()):
        return None
    return out


def _tensors_exact_in(atom: Transform, dtype: torch.dtype) -> bool:
    """Whether every float tensor of ``atom`` is representable in ``dtype`` (Hadamard signs are)."""
    return all(
        bool(torch.equal(t.to(dtype).to(t.dtype), t))
        for t in state_tensors(atom.state_dict())
        if t.is_floating_point()
    )


def _stored_atom(atom: Transform, dtype: torch.dtype) -> Transform:
    if _tensors_exact_in(atom, dtype):  # Hadamard signs, ±1/2 head rotations: nothing to round
        return atom.to(dtype=dtype)
    if isinstance(atom, Scale):
        factors = _rounded(atom.factors, dtype)
        if factors is not None:
            return Scale(factors)
    elif isinstance(atom, BlockRotation):
        blocks = atom._map_blocks(lambda b: _rounded(b, dtype))
        if all(b is not None for b in blocks):
            rounded = BlockLinear._trusted(blocks)
            try:
                rounded.inv  # noqa: B018 - computed now so a singular rounding falls back here
            except TransformError:
                pass
            else:
                return rounded
    # What cannot be rounded without loss of invertibility stays in float32.
    return atom.to(dtype=torch.float32)


def stored_transform(transform: Transform, dtype: torch.dtype) -> Transform:
    """``transform`` as a quantized linear keeps and runs it in ``dtype`` storage.

    Scales and block rotations are rounded to ``dtype`` (a rotation then
    becomes a :class:`BlockLinear`, whose inverse is exact for the rounded
    blocks); atoms whose tensors ``dtype`` already represents (Hadamard signs,
    permutations) are cast; an atom that would overflow or lose its
    invertibility stays float32. With ``dtype=torch.float32`` the transform is
    returned as it is.
    """
    if dtype == torch.float32:
        return transform
    if isinstance(transform, Compose):
        return Compose([_stored_atom(atom, dtype) for atom in transform.transforms])
    return _stored_atom(transform, dtype)


def round_float_weights(embedding: torch.nn.Module, head: torch.nn.Module | None, dtype: torch.dtype) -> None:
    """Round the embedding table and a float LM head to ``dtype``'s values, in place (their dtype stays)."""
    for module in (embedding, head):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dtype != dtype:
            rounded = _rounded(weight.data, dtype, keep_nonzero=False) if torch.finfo(weight.dtype).bits > torch.finfo(dtype).bits else None
            if rounded is not None:  # a table dtype cannot hold stays as it is (and is saved so)
                weight.data.copy_(rounded)


def narrowest_exact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float16 or bfloat16 when that holds every value exactly, else as it is."""
    if tensor.dtype not in (torch.float32, torch.float64):
        return tensor
    for narrow in (torch.float16, torch.bfloat16):
        cast = tensor.to(narrow)
        if torch.equal(cast.to(tensor.dtype), tensor):
            return cast
    return tensor


class StoredEmbedding(nn.Embedding):
    """An embedding table held in a 16-bit storage dtype, looked up in the model's compute dtype."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).to(self.compute_dtype)


class StoredLinear(nn.Linear):
    """A float linear (the LM head) whose weight is held in a storage dtype and multiplied in the input's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.weight.to(input.dtype), bias)


def hold_in_storage(model: nn.Module) -> None:
    """Keep the embedding table and a float LM head in 16 bits where that is exact, computing as before.

    The storage dtype rounded their values already (:func:`round_float_weights`),
    so holding them in that dtype loses nothing and halves the largest float
    tensor a quantized model keeps. A tied head keeps sharing the table.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    # A quantized head has codes and a quantized table (QuantEmbedding) has codes, no weight.
    tied = getattr(embedding, "weight", None) is not None and getattr(head, "weight", None) is embedding.weight
    if type(embedding) is nn.Embedding:
        weight = embedding.weight
        narrow = narrowest_exact(weight.data)
        if narrow.dtype != weight.dtype:
            compute = weight.dtype
            embedding.weight = nn.Parameter(narrow, requires_grad=False)
            embedding.__class__ = StoredEmbedding
            embedding.compute_dtype = compute
            if tied:
                head.weight = embedding.weight
    elif tied:
        return  # a tied head follows the table, which this function does not hold
    if head is not None and type(head) is nn.Linear:
        if not tied:
            narrow_head = narrowest_exact(head.weight.data)
            if narrow_head.dtype == head.weight.dtype:
                return
            head.weight = nn.Parameter(narrow_head, requires_grad=False)
        if head.weight.dtype in (torch.float16, torch.bfloat16):
            head.__class__ = StoredLinear


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a model holds between forward passes, by kind; each tensor counted once.

    ``parameters`` and ``buffers`` are the module state (codes, scales, float
    weights); ``transforms`` the online transforms the quantized linears and
    attention quantizers hold outside it.
    """
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    from quantcompose.attention_quant import attention_quantizer_of

    transforms = []
    for module in model.modules():
        quantizer = attention_quantizer_of(module)
        for candidate in (getattr(module, "transform", None), getattr(quantizer, "qk_rotation", None)):
            if isinstance(candidate, Transform):
                # With what it caches: an inverse kept after the weight fold counts too.
                for held in (candidate, *candidate.derived()):
                    transforms.extend(state_tensors(held.state_dict()))
    return {
        "parameters": size(model.parameters()),
        "buffers": size(model.buffers()),
        "transforms": size(transforms),
    }
