"""The plugin contract: the only thing a strategy needs to implement.

A strategy is a module or object registered under the entry-point group
``quantcompose.strategies`` (built-in ones too), implementing both hooks
below, each decorated with :data:`hookimpl`::

    from quantcompose.hookspecs import hookimpl
    from quantcompose.strategy import Plan, StrategyInfo

    @hookimpl
    def quantcompose_strategy_info():
        return StrategyInfo("mine", "what it does", options={})

    @hookimpl
    def quantcompose_plan(method, stats, options, settings):
        if method != "mine":
            return None
        return Plan(transform=..., act_spec=settings.act_spec(), weight_spec=settings.weight_spec())
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "quantcompose"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def quantcompose_strategy_info() -> "StrategyInfo":  # noqa: F821
    """Return the strategy's :class:`~quantcompose.strategy.StrategyInfo`.

    Called once per plugin when the manager loads it; the name must be unique
    among installed strategies.
    """


@hookspec(firstresult=True)
def quantcompose_plan(
    method: str,
    stats: "PlaceStats",  # noqa: F821
    options: dict[str, Any],
    settings: "QuantSettings",  # noqa: F821
) -> "Plan | None":  # noqa: F821
    """Return the :class:`~quantcompose.strategy.Plan` for one input place.

    Return ``None`` when ``method`` is not this strategy's name, so the next
    plugin is asked. ``options`` are the strategy's own options, already
    resolved against its defaults; ``settings`` are the user's bit widths and
    quantizer choices. A strategy must not modify the tensors in ``stats``.

    The pipeline may call this hook for the places of one layer at the same
    time, from worker threads (``quantize_model(workers=...)``), so a strategy
    must not keep mutable state between calls; derive any randomness from
    ``settings.seed`` and ``stats`` (layer index and place), as DuQuant does.
    """
