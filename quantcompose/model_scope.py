"""Model-scope rewrites: fused norms, an untied head, a rotated residual stream, rotated value heads.

A strategy describes these as a :class:`~quantcompose.strategy.ModelPlan`;
:func:`apply_model_plan` carries it out through the model's adapter, exactly
(float64 arithmetic, written back in each parameter's dtype), before any
calibration. The residual-stream rotation is QuaRot's (Ashkboos et al.,
NeurIPS 2024, Sec. 4): with every RMSNorm's weight fused into the linears it
feeds, ``RMSNorm(x·Q) = RMSNorm(x)·Q`` for an orthogonal ``Q``, so rotating
the embedding, every writer's output and every reader's input leaves the
model's function unchanged.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from quantcompose.errors import TransformError
from quantcompose.models import ModelAdapter, get_submodule
from quantcompose.models.adapter import RowRange
from quantcompose.strategy import ModelFacts, ModelPlan
from quantcompose.transforms import BlockRotation, Hadamard, Scale, Transform


def model_facts(adapter: ModelAdapter) -> ModelFacts:
    """The adapter's statement of the model's shape."""
    return ModelFacts(
        model_type=str(getattr(adapter.model.config, "model_type", "")),
        num_layers=len(adapter.layers()),
        hidden_size=adapter.hidden_size,
        head_dim=adapter.head_dim,
        num_heads=adapter.num_heads,
        num_kv_heads=adapter.num_kv_heads,
        tied_embeddings=adapter.tied_embeddings(),
    )


def seeded_generator(seed: int, *salt: object) -> torch.Generator:
    """A generator for one named random draw: the same seed and salt give the same draw."""
    mixed = zlib.crc32("/".join(str(s) for s in salt).encode())
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + mixed) % (2**63))


def residual_hadamard_plan(facts: ModelFacts, seed: int, random_signs: bool = True) -> ModelPlan:
    """Fused norms and a (randomized) Hadamard of the full hidden width on the residual stream."""
    size = facts.hidden_size
    residual = Hadamard.random(size, seeded_generator(seed, "residual")) if random_signs else Hadamard(size)
    return ModelPlan(fuse_norms=True, residual=residual)


def _check_plan(adapter: ModelAdapter, plan: ModelPlan) -> None:
    if plan.residual is not None:
        if not plan.fuse_norms:
            raise TransformError(
                "a residual-stream rotation needs fuse_norms=True: an RMSNorm with a weight does not "
                "commute with a rotation, so the norms' weights must be fused into their readers first."
            )
        if plan.residual.size != adapter.hidden_size:
            raise TransformError(
                f"the residual transform has width {plan.residual.size}; the model's hidden size is "
                f"{adapter.hidden_size}."
            )
        if not plan.residual.is_orthogonal:
            raise TransformError(
                f"the residual transform {type(plan.residual).__name__} is not orthogonal; RMSNorm only "
                "commutes with orthogonal maps (use a Hadamard or a BlockRotation)."
            )
    if plan.value_head is not None:
        if plan.value_head.size != adapter.head_dim:
            raise TransformError(
                f"the value-head transform has width {plan.value_head.size}; the head size is {adapter.head_dim}."
            )
        if not plan.value_head.is_orthogonal:
            raise TransformError("the value-head transform must be orthogonal (a Hadamard or BlockRotation).")


def apply_model_plan(adapter: ModelAdapter, plan: ModelPlan) -> None:
    """Carry out ``plan`` on ``adapter.model`` in place; the model computes what it did before."""
    _check_plan(adapter, plan)
    with torch.no_grad():
        if plan.fuse_norms:
            adapter.untie_embeddings()  # the final norm folds into the head, not into the embedding
            fuse_norms(adapter)
        if plan.residual is not None:
            rotate_residual(adapter, plan.residual)
        if plan.value_head is not None:
            rotate_value_heads(adapter, plan.value_head)


def _write(param: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _fold_input(linear: nn.Module, transform: Transform) -> None:
    """``linear`` now reads ``x·T`` and computes what it computed on ``x``."""
    weight, _ = transform.to(dtype=torch.float64).fold_into_weight(linear.weight.data.double())
    _write(linear.weight, weight)


def _fold_output(linear: nn.Module, transform: Transform, rows: RowRange | None = None) -> None:
    """``linear``'s output (or its ``rows``) becomes ``y·T``."""
    start, stop = rows if rows is not None else (0, linear.weight.shape[0])
    weight = linear.weight.data[start:stop].double()
    bias = None if linear.bias is None else linear.bias.data[start:stop].double()
    new_w, new_b = transform.to(dtype=torch.float64).fold_into_output(weight, bias)
    _write(linear.weight.data[start:stop], new_w)
    if new_b is not None:
        _write(linear.bias.data[start:stop], new_b)


def _norm_weight(norm: nn.Module, where: str) -> torch.Tensor:
    if getattr(norm, "bias", None) is not None:
        raise TransformError(
            f"{where} has a bias; only RMSNorm-style norms (weight, no bias) can be fused into their readers."
        )
    return norm.weight.data


def fuse_norms(adapter: ModelAdapter) -> None:
    """Fold each RMSNorm's weight into the linears that read it, leaving unit weights.

    The LM head must be untied from the embedding first (the final norm folds into it).
    """
    if adapter.tied_embeddings():
        raise TransformError("fusing the final norm into a tied LM head would change the embedding; untie first")
    for index, layer in enumerate(adapter.layers()):
        for reader in adapter.residual_readers(layer):
            norm = get_submodule(layer, reader.norm)
            weight = _norm_weight(norm, f"layer {index} {reader.norm}")
            scale = Scale(weight.double())
            for name in reader.linears:
                # x·diag(w) read by W is x read by W·diag(w): fold the inverse map's transpose.
                _fold_input(get_submodule(layer, name), scale.inv)
            norm.weight.data.fill_(1.0)
    norm = adapter.final_norm()
    scale = Scale(_norm_weight(norm, "the final norm").double())
    _fold_input(adapter.lm_head(), scale.inv)
    norm.weight.data.fill_(1.0)


def rotate_residual(adapter: ModelAdapter, rotation: Transform) -> None:
    """The residual stream becomes ``h·Q``: embedding and writers rotate it, readers undo it."""
    embedding = adapter.embedding()
    _write(embedding.weight, rotation.to(dtype=torch.float64).forward(embedding.weight.data.double()))
    for layer in adapter.layers():
        for reader in adapter.residual_readers(layer):
            for name in reader.linears:
                _fold_input(get_submodule(layer, name), rotation)
        for name in adapter.residual_writers(layer):
            _fold_output(get_submodule(layer, name), rotation)
    _fold_input(adapter.lm_head(), rotation)


def rotate_value_heads(adapter: ModelAdapter, head: Transform) -> None:
    """Each value head's output becomes ``v·H`` and ``o_proj`` reads each head's block through ``H``.

    Exact under grouped-query attention: attention mixes value vectors of one
    head linearly, and every query head reading a value head sees the same ``H``.
    """
    block = head.matrix(torch.float64)
    values = BlockRotation([block] * adapter.num_kv_heads)
    outputs = BlockRotation([block] * adapter.num_heads)
    for layer in adapter.layers():
        v = adapter.kv_outputs(layer)["v"]
        _fold_output(get_submodule(layer, v.linear), values, v.rows)
        # The attention output place's linear (o_proj) reads the heads' concatenated outputs.
        (o_proj,) = next(p for p in adapter.places(layer) if p.name == "attn_out").linears
        _fold_input(get_submodule(layer, o_proj), outputs)


__all__ = [
    "apply_model_plan",
    "fuse_norms",
    "model_facts",
    "residual_hadamard_plan",
    "rotate_residual",
    "rotate_value_heads",
    "seeded_generator",
]
