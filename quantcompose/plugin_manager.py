"""Loading strategy plugins: built-in and third-party ones through one entry point."""

from __future__ import annotations

from typing import Any

import pluggy

from quantcompose import hookspecs
from quantcompose.errors import UnknownStrategyError
from quantcompose.strategy import Plan, PlaceStats, QuantSettings, Strategy, StrategyInfo

ENTRY_POINT_GROUP = "quantcompose.strategies"


class StrategyManager:
    """A pluggy manager that knows the installed strategies by name and dispatches to them."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._by_name: dict[str, Strategy] = {}
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self._collect()

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a strategy plugin (a module or object with the hook) by hand: tests, notebooks."""
        self.pm.register(plugin, name=name)
        try:
            self._collect()
        except Exception:
            self.pm.unregister(plugin)
            self._collect()
            raise

    def unregister(self, plugin: object) -> None:
        self.pm.unregister(plugin)
        self._collect()

    def _collect(self) -> None:
        by_name: dict[str, Strategy] = {}
        for provided in self.pm.hook.quantcompose_strategies():
            for strategy in provided or ():
                if not isinstance(strategy, Strategy):
                    raise TypeError(
                        f"a quantcompose_strategies hook yielded {strategy!r}; it must yield "
                        "quantcompose.strategy.Strategy instances"
                    )
                if strategy.name in by_name:
                    raise ValueError(f"two installed plugins claim the strategy name {strategy.name!r}")
                by_name[strategy.name] = strategy
        self._by_name = by_name

    def strategies(self) -> dict[str, StrategyInfo]:
        """Installed strategies by name."""
        return {name: strategy.info for name, strategy in sorted(self._by_name.items())}

    def get(self, method: str) -> Strategy:
        """The strategy named ``method``, or a clear error listing the installed ones."""
        if method not in self._by_name:
            raise UnknownStrategyError(
                f"unknown method {method!r}; installed strategies are {sorted(self._by_name)}. "
                "A third-party strategy appears here once its package registers an entry point "
                f"in the {ENTRY_POINT_GROUP!r} group."
            )
        return self._by_name[method]

    def info(self, method: str) -> StrategyInfo:
        """The named strategy's info, or a clear error listing the installed ones."""
        return self.get(method).info

    def resolve(self, method: str, options: dict[str, Any] | None, settings: QuantSettings) -> dict[str, Any]:
        """The named strategy's options, parsed and checked against ``settings`` (before calibration)."""
        return self.get(method).resolve(options, settings)

    def plan(
        self, method: str, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings
    ) -> Plan:
        """Ask the strategy named ``method`` for the plan of one input place."""
        plan = self.get(method).plan(stats, options, settings)
        check_plan(method, plan, stats.place, stats.width)
        return plan


def check_plan(method: str, plan: Any, place: str, width: int) -> None:
    """A plan must be a :class:`Plan` whose transform matches the place's width."""
    if not isinstance(plan, Plan):
        raise TypeError(f"strategy {method!r} returned {type(plan).__name__} for place {place!r}, not a Plan")
    if plan.transform.size != width:
        raise ValueError(
            f"strategy {method!r} returned a transform of width {plan.transform.size} for "
            f"place {place!r} of width {width}; a plan must match the place's width."
        )


def get_plugin_manager() -> StrategyManager:
    """A manager with every strategy installed through the entry-point group."""
    return StrategyManager(load_entry_points=True)
