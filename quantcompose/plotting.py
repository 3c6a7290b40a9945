"""matplotlib on demand: pictures are an optional extra (``pip install 'quantcompose[plot]'``)."""

from __future__ import annotations

from typing import Any

from quantcompose.errors import QuantComposeError


class PlotDependencyError(QuantComposeError, ImportError):
    """A picture was asked for and matplotlib is not installed."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotDependencyError(
            "drawing pictures needs matplotlib, which is not installed; "
            "run `pip install 'quantcompose[plot]'` (or `pip install matplotlib`)"
        ) from exc
    # Agg writes files and never needs a display, so the CLI works on a headless machine.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
