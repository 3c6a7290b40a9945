"""SmoothQuant: migrate activation outliers into the weights with a diagonal scale.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models" (ICML 2023): ``x·diag(1/s)`` and ``diag(s)·W`` with
``s_j = max|X_j|^α / max|W_j|^(1−α)``. The scale folds into the norm (or
``up_proj``, or ``v_proj``), so nothing runs online except before ``o_proj``
under grouped-query attention, where one value head serves several query
heads and a per-channel scale cannot fold into it. ``foldable=true`` picks
scales that fold there too: each head-dim channel's statistics are maxed over
the query heads sharing a value head, so the group shares one scale that
``v_proj``'s rows absorb exactly (nothing runs online; the model exports).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from quantcompose.hookspecs import hookimpl
from quantcompose.options import Option, in_range
from quantcompose.strategy import Plan, PlaceStats, QuantSettings, Strategy, clip_options
from quantcompose.transforms import Identity, Scale

from ._duquant_rotation import smooth_factors


class SmoothQuant(Strategy):
    name = "smoothquant"
    description = "SmoothQuant: per-channel smoothing scale folded into the previous module (arXiv 2211.10438)"
    options = {
        "alpha": Option(0.5, "migration strength α in [0, 1] (paper: 0.5 for most models)", check=in_range(0.0, 1.0)),
        "foldable": Option(False, "only scales that fold into the weights (nothing online, exportable): under "
                           "grouped-query attention o_proj's scale is shared by the query heads of each value head, "
                           "from the group's maxima; false: per channel there, run online"),
        **clip_options(1.0, 1.0),
    }

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        act, weight = stats.act_absmax, stats.weight_absmax()
        if options["foldable"]:
            if stats.absorbable == "none":  # nothing before this place takes a scale: smooth nothing here
                return self.quantizer_plan(Identity(stats.width), options, settings)
            act, weight = stats.group_shared(act), stats.group_shared(weight)
        s = smooth_factors(act, weight, float(options["alpha"]))
        return self.quantizer_plan(Scale(1.0 / s), options, settings)


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield SmoothQuant()
