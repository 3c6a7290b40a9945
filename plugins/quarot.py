"""QuaRot-style Hadamard rotation of every linear's input.

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"
(NeurIPS 2024) rotates with randomized Hadamard matrices so that no channel
keeps an outlier. QuaRot itself folds one rotation into the residual stream
(after folding the norms' weights into the next linears) and runs Hadamards
online only before ``down_proj`` and inside attention; this baseline runs a
randomized Hadamard online at every input place instead. The quantizers see
the same kind of rotated activations; the difference is where the rotation is
computed, not what it does to outliers.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from quantcompose.hookspecs import hookimpl
from quantcompose.strategy import Option, Plan, PlaceStats, QuantSettings, StrategyInfo, clip_options, clipped_plan
from quantcompose.transforms import Hadamard

NAME = "quarot"


@hookimpl
def quantcompose_strategy_info() -> StrategyInfo:
    return StrategyInfo(
        NAME,
        "QuaRot-style randomized Hadamard rotation, online at every input place (arXiv 2404.00456)",
        options={
            "random_signs": Option(True, "multiply by random ±1 signs before the Hadamard"),
            **clip_options(1.0, 1.0),
        },
    )


@hookimpl
def quantcompose_plan(
    method: str, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings
) -> Plan | None:
    if method != NAME:
        return None
    if options["random_signs"]:
        seed = zlib.crc32(f"{settings.seed}/{stats.layer_index}/{stats.place}".encode())
        transform = Hadamard.random(stats.width, generator=torch.Generator().manual_seed(seed))
    else:
        transform = Hadamard(stats.width)
    return clipped_plan(transform, options, settings)
