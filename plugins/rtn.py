"""Round-to-nearest: no transform, just the quantizers. The floor every method must beat."""

from __future__ import annotations

from typing import Any

from quantcompose.hookspecs import hookimpl
from quantcompose.strategy import Plan, PlaceStats, QuantSettings, StrategyInfo, clip_options, clipped_plan
from quantcompose.transforms import Identity

NAME = "rtn"


@hookimpl
def quantcompose_strategy_info() -> StrategyInfo:
    return StrategyInfo(
        NAME,
        "round-to-nearest with no transform (per-token activations, per-channel weights)",
        options={
            **clip_options(1.0, 1.0),
        },
    )


@hookimpl
def quantcompose_plan(
    method: str, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings
) -> Plan | None:
    if method != NAME:
        return None
    return clipped_plan(Identity(stats.width), options, settings)
