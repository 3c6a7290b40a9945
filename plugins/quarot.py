"""QuaRot: a rotated residual stream, and Hadamards online only where the paper puts them.

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"
(NeurIPS 2024, arXiv 2404.00456). ``quarot`` does what the paper does:

* model scope: every RMSNorm's weight fused into its readers, the tied
  embedding untied, a randomized Hadamard ``Q`` of the full hidden width
  folded into the embedding, every residual writer (``o_proj``,
  ``down_proj``) and every reader (q/k/v, gate/up, LM head); a head-wise
  Hadamard ``H_d`` folded into each value head and ``o_proj``'s input;
* place scope: nothing online at the attention and MLP inputs (the residual
  rotation already spread their outliers); an online randomized Hadamard of
  the MLP width before ``down_proj``; before ``o_proj`` the small
  across-heads mix ``H_heads ⊗ I_d`` (with ``H_d`` folded, the two make a
  full ``H_heads ⊗ H_d`` rotation of o_proj's input);
* inside attention, when Q/K/V are quantized: an online randomized Hadamard
  of the head size on queries and keys after RoPE, so the K cache is
  quantized in a rotated basis (Q·Kᵀ is unchanged).

A width with no Hadamard matrix (9 heads in SmolLM2-135M) gets the
documented fallback of :func:`~quantcompose.transforms.hadamard_like`: a
block Hadamard, or a seeded random orthogonal mix where no block fits.

``online_hadamards=false`` keeps only the folded part (the residual and
value-head rotations; nothing online at any place, no Q/K rotation): not the
paper's QuaRot, but a model whose every transform is in its weights, which
exports to formats that cannot run online transforms.

``quarot-online`` is the earlier stand-in, kept as an ablation: no model
scope, a randomized Hadamard online at every input place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from quantcompose.hookspecs import hookimpl
from quantcompose.model_scope import seeded_generator
from quantcompose.options import Option
from quantcompose.strategy import ModelFacts, ModelPlan, Plan, PlaceStats, QuantSettings, Strategy, clip_options
from quantcompose.transforms import BlockRotation, Compose, Identity, Permutation, Transform, hadamard_like


def rotation(size: int, seed: int, *salt: object, random_signs: bool = True) -> Transform:
    """A (randomized) Hadamard of ``size``, or the documented fallback where no Hadamard matrix exists.

    The fallback (:func:`~quantcompose.transforms.hadamard_like`, ``"block"``)
    is a block-diagonal Hadamard of the largest supported size dividing
    ``size``, or a seeded random orthogonal block when none above 1 does
    (9 heads). ``salt`` names the draw, so each place gets its own signs.
    """
    generator = seeded_generator(seed, *salt) if random_signs else None
    return hadamard_like(size, generator=generator, fallback="block")


def across_heads(num_heads: int, head_dim: int, mix: Transform) -> Transform:
    """``mix`` applied across heads, the same for each position within a head: ``mix ⊗ I_d``.

    Built from atoms: view ``(heads, d)`` as ``(d, heads)`` (a permutation),
    one ``heads×heads`` block per position, and back.
    """
    width = num_heads * head_dim
    index = torch.arange(width).reshape(num_heads, head_dim).T.reshape(-1)
    to_positions = Permutation(index)
    block = mix.matrix(torch.float64)
    return Compose([to_positions, BlockRotation([block] * head_dim), to_positions.inv])


OPTIONS: dict[str, Option] = {
    "random_signs": Option(True, "multiply by random ±1 signs before each Hadamard (the randomized Hadamard)"),
    **clip_options(1.0, 1.0),
}


class QuaRot(Strategy):
    name = "quarot"
    description = (
        "QuaRot: fused norms, Hadamard-rotated residual stream, online Hadamards only before "
        "down_proj and across heads before o_proj (arXiv 2404.00456)"
    )
    options = {
        **OPTIONS,
        "online_hadamards": Option(True, "the paper's online Hadamards (before down_proj, across heads before "
                                   "o_proj, on Q/K after RoPE); false: only the folded rotations (exportable)"),
    }

    def model_plan(self, model: ModelFacts, options: dict[str, Any], settings: QuantSettings) -> ModelPlan:
        signs = bool(options["random_signs"])
        online = bool(options["online_hadamards"])
        return ModelPlan(
            fuse_norms=True,
            residual=rotation(model.hidden_size, settings.seed, "residual", random_signs=signs),
            value_head=rotation(model.head_dim, settings.seed, "value-head", random_signs=signs),
            # Online after RoPE, used when Q/K/V are quantized (the KV cache's Hadamard).
            qk_rotation=rotation(model.head_dim, settings.seed, "query-key", random_signs=signs) if online else None,
        )

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        signs = bool(options["random_signs"])
        if not options["online_hadamards"]:
            transform: Transform = Identity(stats.width)
        elif stats.place == "mlp_down":
            transform = rotation(stats.width, settings.seed, stats.layer_index, stats.place, random_signs=signs)
        elif stats.place == "attn_out":
            facts = stats.model
            if facts is None:
                raise ValueError("quarot's attn_out plan needs the model's head layout (PlaceStats.model)")
            mix = rotation(facts.num_heads, settings.seed, stats.layer_index, stats.place, random_signs=signs)
            transform = across_heads(facts.num_heads, facts.head_dim, mix)
        else:
            transform = Identity(stats.width)
        return self.quantizer_plan(transform, options, settings)


class QuaRotOnline(Strategy):
    name = "quarot-online"
    description = "QuaRot ablation: a randomized Hadamard online at every input place, no model-scope rotation"
    options = OPTIONS

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        transform = rotation(
            stats.width, settings.seed, stats.layer_index, stats.place, random_signs=bool(options["random_signs"])
        )
        return self.quantizer_plan(transform, options, settings)


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield QuaRot()
    yield QuaRotOnline()
