"""The data that crosses the plugin contract: what a strategy receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from quantcompose.errors import QuantSpecError
from quantcompose.quant import QuantSpec
from quantcompose.transforms import Transform

Absorbable = Literal["any", "diagonal", "none"]


@dataclass(frozen=True)
class QuantSettings:
    """Method-independent quantization settings chosen by the user.

    Defaults follow the DuQuant paper: per-token asymmetric activations and
    per-channel asymmetric weights.
    """

    wbits: int = 4
    abits: int = 4
    weight_symmetric: bool = False
    act_symmetric: bool = False
    weight_group_size: int | None = None
    kv_bits: int | None = None  # quantize the K/V cache to this width (None: keep float)
    seed: int = 0
    # Per-row weight clipping picked by an activation-weighted error search
    # (quant/clip_search.py); replaces a strategy's static weight clip ratio.
    weight_clip_search: bool = True
    # One activation clip ratio per input place, picked by the output error it
    # causes on calibration activations (quant/clip_search.py); replaces a
    # strategy's static activation clip ratio. On by default: with GPTQ it took
    # DuQuant W4A4 on SmolLM2-135M from 1.49x to 1.43x full precision.
    act_clip_search: bool = True
    # How weights are rounded: "rtn" (to nearest) or "gptq" (error-compensating,
    # Frantar et al. 2023). Applies to every strategy alike. GPTQ is the
    # default: with a calibration set whose token statistics resemble text
    # (real text, or "random-zipf" tokens) it is the largest single gain at W4.
    weight_quantizer: str = "gptq"
    # Quantize a layer's attention before calibrating its MLP, so that the MLP
    # is fitted on the activations the quantized attention really produces
    # (GPTQ's "true sequential"); costs one more attention pass per layer.
    true_sequential: bool = False

    def __post_init__(self) -> None:
        for name in ("wbits", "abits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not (2 <= value <= 16):
                raise QuantSpecError(
                    f"{name}={value!r} is out of range: use an integer from 2 to 8 "
                    "(or 16 to leave that side in floating point)."
                )
            if 8 < value < 16:
                raise QuantSpecError(
                    f"{name}={value} is not supported: use 2..8 bits, or 16 for no quantization."
                )
        if self.weight_quantizer not in ("rtn", "gptq"):
            raise QuantSpecError(
                f"weight_quantizer={self.weight_quantizer!r} is unknown: use 'rtn' or 'gptq'."
            )
        if self.kv_bits is not None and not (2 <= self.kv_bits <= 8):
            raise QuantSpecError(f"kv_bits={self.kv_bits!r} is out of range: use 2..8 or leave it unset.")

    def weight_spec(self, clip_ratio: float = 1.0) -> QuantSpec | None:
        """The per-channel (or per-group) weight quantizer, or None at 16 bits."""
        if self.wbits >= 16:
            return None
        if self.weight_group_size:
            return QuantSpec(self.wbits, self.weight_symmetric, "group", self.weight_group_size, clip_ratio)
        return QuantSpec(self.wbits, self.weight_symmetric, "channel", None, clip_ratio)

    def act_spec(self, clip_ratio: float = 1.0) -> QuantSpec | None:
        """The per-token activation quantizer, or None at 16 bits."""
        if self.abits >= 16:
            return None
        return QuantSpec(self.abits, self.act_symmetric, "token", None, clip_ratio)


@dataclass
class PlaceStats:
    """Calibration statistics for one input place of one decoder layer.

    An *input place* is the point where one activation feeds one or more
    linears (``attn_in`` → q/k/v, ``attn_out`` → o, ``mlp_in`` → gate/up,
    ``mlp_down`` → down).
    """

    layer_index: int
    place: str
    act_absmax: torch.Tensor  # (in,) max |x| per channel over all calibration tokens, float32
    act_sample: torch.Tensor  # (tokens, in) calibration activations (a subsample), float32
    weights: dict[str, torch.Tensor]  # the consuming linears' weights (out, in), float32, by name
    absorbable: Absorbable  # what the module before the place can fold exactly

    @property
    def width(self) -> int:
        return int(self.act_absmax.numel())

    def weight_absmax(self) -> torch.Tensor:
        """(in,) max |w| per input channel over all consuming linears."""
        return torch.stack([w.abs().amax(dim=0) for w in self.weights.values()]).amax(dim=0)


@dataclass
class Plan:
    """A strategy's answer for one place: the activation transform and quantizers.

    The layer will compute ``Q_a(x·T) · Q_w(W·T⁻ᵀ)ᵀ``; ``act_spec`` or
    ``weight_spec`` of ``None`` leaves that side in floating point.
    """

    transform: Transform
    act_spec: QuantSpec | None
    weight_spec: QuantSpec | None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One option a strategy accepts (shown by ``quantcompose methods``)."""

    default: Any
    help: str
    type: Callable[[str], Any] | None = None  # parser for CLI strings; defaults to type(default)

    def parse(self, text: str) -> Any:
        if self.type is not None:
            return self.type(text)
        if isinstance(self.default, bool):
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean (true/false), got {text!r}")
        if self.default is None:
            return text
        return type(self.default)(text)


@dataclass(frozen=True)
class StrategyInfo:
    """How a strategy introduces itself: its name, a line of description, its options."""

    name: str
    description: str
    options: dict[str, Option] = field(default_factory=dict)

    def resolve_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown keys raise a clear error."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise KeyError(
                f"strategy {self.name!r} has no option(s) {unknown}; "
                f"its options are {sorted(self.options)}"
            )
        resolved = {key: opt.default for key, opt in self.options.items()}
        for key, value in given.items():
            resolved[key] = self.options[key].parse(value) if isinstance(value, str) else value
        return resolved


def clip_options(act_clip: float = 1.0, weight_clip: float = 1.0) -> dict[str, Option]:
    """The two clipping options most strategies offer, with their defaults."""
    return {
        "act_clip": Option(act_clip, "activation clipping ratio in (0, 1]"),
        "weight_clip": Option(weight_clip, "weight clipping ratio in (0, 1]"),
    }


def clipped_plan(transform: Transform, options: dict[str, Any], settings: QuantSettings) -> Plan:
    """A plan with the user's quantizers, clipped by the ``act_clip`` / ``weight_clip`` options."""
    return Plan(
        transform=transform,
        act_spec=settings.act_spec(options["act_clip"]),
        weight_spec=settings.weight_spec(options["weight_clip"]),
    )
