"""Strategy options: declared once with their type and range, validated before any work starts."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from quantcompose.errors import OptionError

#: A check returns ``None`` when the value is fine, else what the value must be.
Check = Callable[[Any], "str | None"]


def parse_bool(text: str) -> bool:
    """``true/yes/on/1`` or ``false/no/off/0`` (any case); anything else is an error."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_optional_bool(text: str) -> bool | None:
    """A boolean, or ``None`` for ``auto`` / ``none`` / ``default`` / empty."""
    if text.strip().lower() in ("", "none", "auto", "default"):
        return None
    return parse_bool(text)


def parse_optional_int(text: str) -> int | None:
    """An integer, or ``None`` for ``auto`` / ``none`` / ``default`` / empty."""
    return None if text.strip().lower() in ("", "none", "auto", "default") else int(text)


def parse_optional_float(text: str) -> float | None:
    """A float, or ``None`` for ``auto`` / ``none`` / ``search`` / empty."""
    return None if text.strip().lower() in ("", "none", "auto", "search") else float(text)


def in_range(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Check:
    """A number in ``[low, high]`` (``(low, high]`` with ``low_open``); ``None`` bounds are open-ended."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return "a finite number"
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            left = "(" if low_open else "["
            return f"a number in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        return None

    return check


def integer_at_least(low: int) -> Check:
    """An integer (not a bool) ``>= low``."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            return f"an integer >= {low}"
        return None

    return check


def one_of(*choices: str) -> Check:
    """One of the strings ``choices``."""

    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(choices)

    return check


def optional(check: Check) -> Check:
    """``None`` or a value that passes ``check``."""

    def wrapped(value: Any) -> str | None:
        if value is None:
            return None
        reason = check(value)
        return None if reason is None else f"{reason} (or unset)"

    return wrapped


@dataclass(frozen=True)
class Option:
    """One option a strategy accepts (shown by ``quantcompose methods``).

    ``type`` parses a CLI string (default: from the type of ``default``);
    ``check`` validates the parsed value. Both run in :meth:`StrategyInfo.resolve_options`,
    once, before calibration starts.
    """

    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    check: Check | None = None

    def parse(self, text: str) -> Any:
        if self.type is not None:
            return self.type(text)
        if isinstance(self.default, bool):
            return parse_bool(text)
        if self.default is None:
            return text
        return type(self.default)(text)

    def validate(self, strategy: str, key: str, value: Any) -> Any:
        """``value`` parsed (when a string) and checked; an :class:`OptionError` otherwise."""
        if isinstance(value, str) and not (self.default is None and self.type is None):
            try:
                value = self.parse(value)
            except (TypeError, ValueError) as error:
                raise OptionError(
                    f"{strategy} option {key}={value!r} cannot be read: {error}. {key}: {self.help}"
                ) from None
        expected = type(self.default)
        if self.check is None and self.default is not None and not _fits_type(value, expected):
            raise OptionError(
                f"{strategy} option {key}={value!r} must be of type {expected.__name__}. {key}: {self.help}"
            )
        reason = None if self.check is None else self.check(value)
        if reason is not None:
            raise OptionError(f"{strategy} option {key}={value!r} must be {reason}. {key}: {self.help}")
        return value


def _fits_type(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, expected)


def resolve_options(strategy: str, declared: dict[str, Option], given: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``given``, each value parsed and checked; unknown keys are an error."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise OptionError(
            f"strategy {strategy!r} has no option(s) {unknown}; its options are {sorted(declared)} "
            "(see `quantcompose methods`)"
        )
    resolved = {key: opt.default for key, opt in declared.items()}
    for key, value in given.items():
        resolved[key] = declared[key].validate(strategy, key, value)
    return resolved


__all__ = [
    "Check",
    "Option",
    "in_range",
    "integer_at_least",
    "one_of",
    "optional",
    "parse_bool",
    "parse_optional_bool",
    "parse_optional_float",
    "parse_optional_int",
    "resolve_options",
]
