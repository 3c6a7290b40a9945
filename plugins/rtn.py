"""Round-to-nearest: no transform, just the quantizers. The floor every method must beat."""

from __future__ import annotations

from collections.abc import Iterator

from quantcompose.hookspecs import hookimpl
from quantcompose.strategy import Strategy, clip_options


class RoundToNearest(Strategy):
    """No transform: the user's quantizers alone (the base class's place plan)."""

    name = "rtn"
    description = "round-to-nearest with no transform (per-token activations, per-channel weights)"
    options = clip_options(1.0, 1.0)


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield RoundToNearest()
