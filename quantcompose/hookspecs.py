"""The plugin contract: the single hook a strategy plugin implements.

A plugin is a module or object registered under the entry-point group
``quantcompose.strategies`` (the built-in strategies too). It yields the
strategies it provides; the manager knows them by name and dispatches to the
named one, so no strategy ever checks whether a call is meant for it::

    from quantcompose.hookspecs import hookimpl
    from quantcompose.strategy import Strategy

    class Mine(Strategy):
        name = "mine"
        description = "what it does"

        def plan(self, stats, options, settings):
            return self.quantizer_plan(my_transform(stats), options, settings)

    @hookimpl
    def quantcompose_strategies():
        yield Mine()

See :class:`quantcompose.strategy.Strategy` for the three scopes (model,
layer, place) a strategy may act at.
"""

from __future__ import annotations

from typing import Iterable

import pluggy

PROJECT = "quantcompose"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def quantcompose_strategies() -> "Iterable[Strategy]":  # noqa: F821
    """Return or yield the :class:`~quantcompose.strategy.Strategy` objects this plugin provides.

    Called once when the plugin is registered. Each name must be unique among
    the installed strategies. Strategies' :meth:`~quantcompose.strategy.Strategy.plan`
    may be called for the places of one layer at the same time, from worker
    threads, so a strategy keeps no mutable state between calls.
    """
