"""`QuantSpec`: what one quantizer does (bit width, sign, granularity, clipping)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from quantcompose.errors import QuantSpecError

Granularity = Literal["tensor", "channel", "token", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "token", "group")

MIN_BITS = 2
MAX_BITS = 8  # codes live in one (u)int8


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but QuantSpec(True, ...) is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """A uniform integer quantizer.

    Field order is part of the API: ``QuantSpec(bits, symmetric, granularity,
    group_size, clip_ratio)`` is called positionally (see ``strategy.py``).

    * ``bits``: code width, 2..8.
    * ``symmetric``: signed codes with zero point 0 (``torch.int8``) instead of
      unsigned codes with a zero point (``torch.uint8``).
    * ``granularity``: what one scale covers; all reduce over the last dim
      (``"token"`` and ``"channel"`` are the same reduction, one scale per row;
      ``"group"`` splits each row into groups of ``group_size``).
    * ``clip_ratio``: shrink the range to ``clip_ratio`` × (min, max) before
      computing the scale, in (0, 1].
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = "token"
    group_size: int | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not (MIN_BITS <= self.bits <= MAX_BITS):
            raise QuantSpecError(
                f"bits={self.bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}."
            )
        # Normalize numpy integers etc. so to_dict() stays JSON-friendly.
        object.__setattr__(self, "bits", int(self.bits))

        if not isinstance(self.symmetric, bool):
            raise QuantSpecError(f"symmetric={self.symmetric!r} must be True or False.")

        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            raise QuantSpecError(
                f"granularity={self.granularity!r} is unknown: use one of "
                + ", ".join(repr(g) for g in GRANULARITIES)
                + "."
            )

        if self.granularity == "group":
            if self.group_size is None:
                raise QuantSpecError(
                    'granularity="group" needs group_size: set it to the number of '
                    "consecutive last-dim elements that share one scale (e.g. 128)."
                )
            if not _is_int(self.group_size) or self.group_size < 1:
                raise QuantSpecError(
                    f"group_size={self.group_size!r} is invalid: use a positive integer."
                )
            object.__setattr__(self, "group_size", int(self.group_size))
        elif self.group_size is not None:
            raise QuantSpecError(
                f"group_size={self.group_size!r} only applies to granularity='group': "
                f"drop it, or use granularity='group' instead of {self.granularity!r}."
            )

        clip = self.clip_ratio
        if not isinstance(clip, numbers.Real) or isinstance(clip, bool) or not (0.0 < float(clip) <= 1.0):
            # `not (0 < c <= 1)` also rejects NaN.
            raise QuantSpecError(
                f"clip_ratio={clip!r} is out of range: use a number in (0, 1] (1.0 means no clipping)."
            )
        object.__setattr__(self, "clip_ratio", float(clip))

    # --- code range -----------------------------------------------------------------

    @property
    def qmin(self) -> int:
        """Smallest code: 0 (asymmetric) or −2^(b−1) (symmetric)."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: 2^b − 1 (asymmetric) or 2^(b−1) − 1 (symmetric)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """``torch.int8`` for symmetric codes, ``torch.uint8`` for asymmetric ones."""
        return torch.int8 if self.symmetric else torch.uint8

    # --- serialization --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict; ``QuantSpec.from_dict(s.to_dict()) == s``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        """Inverse of :meth:`to_dict`; missing keys take their defaults."""
        if not isinstance(data, dict):
            raise QuantSpecError(f"QuantSpec.from_dict expects a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantSpecError(
                f"unknown QuantSpec keys {unknown}: the valid keys are {sorted(known)}."
            )
        return cls(**data)

    def __str__(self) -> str:
        # "w" for the weight-style granularities, "a" for per-token activations,
        # "int" when the granularity says nothing about which side it is.
        prefix = {"channel": "w", "group": "w", "token": "a"}.get(self.granularity, "int")
        gran = f"per-group({self.group_size})" if self.granularity == "group" else f"per-{self.granularity}"
        text = f"{prefix}{self.bits} {'sym' if self.symmetric else 'asym'} {gran}"
        if self.clip_ratio != 1.0:
            text += f" clip={self.clip_ratio:g}"
        return text



def spec_to_dict(spec: QuantSpec | None) -> dict[str, Any] | None:
    """``spec.to_dict()``, with ``None`` (no quantizer) kept as ``None``: the saved form."""
    return None if spec is None else spec.to_dict()


def spec_from_dict(data: Any) -> QuantSpec | None:
    """Inverse of :func:`spec_to_dict`."""
    return None if data is None else QuantSpec.from_dict(dict(data))
