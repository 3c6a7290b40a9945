"""Round-to-nearest: no transform, just the quantizers. The floor every method must beat."""

from __future__ import annotations

from typing import Any

from quantcompose.hookspecs import hookimpl
from quantcompose.strategy import Option, Plan, PlaceStats, QuantSettings, StrategyInfo
from quantcompose.transforms import Identity

NAME = "rtn"


@hookimpl
def quantcompose_strategy_info() -> StrategyInfo:
    return StrategyInfo(
        NAME,
        "round-to-nearest with no transform (per-token activations, per-channel weights)",
        options={
            "act_clip": Option(1.0, "activation clipping ratio in (0, 1]"),
            "weight_clip": Option(1.0, "weight clipping ratio in (0, 1]"),
        },
    )


@hookimpl
def quantcompose_plan(
    method: str, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings
) -> Plan | None:
    if method != NAME:
        return None
    return Plan(
        transform=Identity(stats.width),
        act_spec=settings.act_spec(options["act_clip"]),
        weight_spec=settings.weight_spec(options["weight_clip"]),
    )
