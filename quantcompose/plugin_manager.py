"""Loading strategy plugins: built-in and third-party ones through one entry point."""

from __future__ import annotations

from typing import Any

import pluggy

from quantcompose import hookspecs
from quantcompose.errors import UnknownStrategyError
from quantcompose.strategy import Plan, PlaceStats, QuantSettings, StrategyInfo

ENTRY_POINT_GROUP = "quantcompose.strategies"


class StrategyManager:
    """A pluggy manager that knows the installed strategies by name."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a strategy module or object by hand (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        self._check_unique()

    def unregister(self, plugin: object) -> None:
        self.pm.unregister(plugin)

    def strategies(self) -> dict[str, StrategyInfo]:
        """Installed strategies by name."""
        infos = self.pm.hook.quantcompose_strategy_info()
        return {info.name: info for info in infos}

    def info(self, method: str) -> StrategyInfo:
        """The named strategy's info, or a clear error listing the installed ones."""
        known = self.strategies()
        if method not in known:
            raise UnknownStrategyError(
                f"unknown method {method!r}; installed strategies are {sorted(known)}. "
                "A third-party strategy appears here once its package registers an entry point "
                f"in the {ENTRY_POINT_GROUP!r} group."
            )
        return known[method]

    def plan(
        self, method: str, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings
    ) -> Plan:
        """Ask the strategy named ``method`` for the plan of one input place."""
        plan = self.pm.hook.quantcompose_plan(
            method=method, stats=stats, options=options, settings=settings
        )
        if plan is None:
            raise UnknownStrategyError(
                f"no installed strategy answered for method {method!r}; installed: {sorted(self.strategies())}"
            )
        if plan.transform.size != stats.width:
            raise ValueError(
                f"strategy {method!r} returned a transform of width {plan.transform.size} for "
                f"place {stats.place!r} of width {stats.width}; a plan must match the place's width."
            )
        return plan

    def _check_unique(self) -> None:
        names = [info.name for info in self.pm.hook.quantcompose_strategy_info()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two installed plugins claim the strategy name(s) {duplicates}")


def get_plugin_manager() -> StrategyManager:
    """A manager with every strategy installed through the entry-point group."""
    return StrategyManager(load_entry_points=True)
