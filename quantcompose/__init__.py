"""quantcompose: weight-activation quantization of LLMs as an algebra of exact transforms.

The public entry points are re-exported lazily so that ``import quantcompose``
stays cheap; see ``docs/user-guide.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "QuantSpec": "quantcompose.quant",
    "QuantSettings": "quantcompose.strategy",
    "PlaceStats": "quantcompose.strategy",
    "Plan": "quantcompose.strategy",
    "StrategyInfo": "quantcompose.strategy",
    "Option": "quantcompose.strategy",
    "get_plugin_manager": "quantcompose.plugin_manager",
    "hookimpl": "quantcompose.hookspecs",
    "quantize": "quantcompose.api",
    "Recipe": "quantcompose.recipe",
    "load_recipe": "quantcompose.recipe",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantcompose' has no attribute {name!r}")
