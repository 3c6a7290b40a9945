"""SmoothQuant: migrate activation outliers into the weights with a diagonal scale.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models" (ICML 2023): ``x·diag(1/s)`` and ``diag(s)·W`` with
``s_j = max|X_j|^α / max|W_j|^(1−α)``. The scale folds into the norm (or
``up_proj``), so nothing runs online except where grouped-query attention
stops ``v_proj`` from absorbing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from quantcompose.hookspecs import hookimpl
from quantcompose.options import Option, in_range
from quantcompose.strategy import Plan, PlaceStats, QuantSettings, Strategy, clip_options
from quantcompose.transforms import Scale

from ._duquant_rotation import smooth_factors


class SmoothQuant(Strategy):
    name = "smoothquant"
    description = "SmoothQuant: per-channel smoothing scale folded into the previous module (arXiv 2211.10438)"
    options = {
        "alpha": Option(0.5, "migration strength α in [0, 1] (paper: 0.5 for most models)", check=in_range(0.0, 1.0)),
        **clip_options(1.0, 1.0),
    }

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        s = smooth_factors(stats.act_absmax, stats.weight_absmax(), float(options["alpha"]))
        return self.quantizer_plan(Scale(1.0 / s), options, settings)


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield SmoothQuant()
