"""The data that crosses the plugin contract: what a strategy receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from quantcompose.errors import OptionError, QuantSpecError
from quantcompose.options import Option, resolve_options
from quantcompose.quant import QuantSpec
from quantcompose.transforms import Identity, Transform

#: What the module before an input place can fold exactly: any transform, a diagonal scale, a diagonal
#: scale equal across the query heads that share one value head (``o_proj``'s input under grouped-query
#: attention: ``v_proj``'s rows absorb it), or nothing.
Absorbable = Literal["any", "diagonal", "shared_diagonal", "none"]

#: The values of ``QuantSettings.refine`` (quantcompose/learning/refine.py carries them out).
REFINE_METHODS = ("lwc",)


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
    # Bits of the attention matmuls' inputs: Q and K after RoPE, and V, per
    # token and head (the KV cache among them). None: the activation bits, as
    # the DuQuant and QuaRot papers quantize "all activations"; 16: float (the
    # lighter setting that quantizes only the linears' inputs).
    qkv_bits: int | None = None
    seed: int = 0
    # Per-row weight clipping picked by an activation-weighted error search
    # (quant/clip_search.py). The search owns the weight clip ratio: a strategy
    # option ``weight_clip`` set while it is on is an error, not ignored.
    weight_clip_search: bool = True
    # One activation clip ratio per input place, picked by the output error it
    # causes on calibration activations (quant/clip_search.py). On by default:
    # with GPTQ it took DuQuant W4A4 on SmolLM2-135M from 1.49x to 1.43x full
    # precision. Like the weight search, it owns the ratio (``act_clip``).
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
    # Rotate the residual stream once for the whole model (fused norms, a
    # randomized Hadamard folded into every reader and writer of the stream)
    # before any other strategy's transforms: QuaRot's model scope, composed
    # with whichever place-scope strategy is chosen.
    residual_rotation: bool = False
    # The precision the quantized model keeps its embeddings and online
    # transforms in (quantcompose/storage.py): "float16" by default, as every
    # deployed checkpoint keeps its float parts; "float32" keeps them as computed.
    storage_dtype: str = "float16"
    # Bits of the embedding table's codes (quantcompose/quant_embedding.py): 8, or 4 packed two
    # per byte, one scale and zero point per row, quantized at the end of the run (after the model
    # scope rotated the table and calibration read it in float). None keeps the table in float.
    embedding_bits: int | None = None
    # Learned refinement on top of a place-scope strategy's closed-form plans
    # (quantcompose/learning/refine.py): "lwc" trains OmniQuant's learnable
    # weight clipping (and one activation clip per place) against each layer's
    # full-precision output. The learned clips replace the clip searches,
    # whose results are only its starting point. None: no refinement.
    refine: str | None = None
    # The refinement's training, used only with ``refine`` set (left at these
    # defaults otherwise): epochs over the calibration sequences it trains on,
    # how many of them (the first ones; 0: all), AdamW's learning rate of the
    # clip logits. Sized for SmolLM2-135M on 2 CPU cores (docs/benchmarks.md).
    refine_epochs: int = 1
    refine_samples: int = 2
    refine_lr: float = 0.3

    def __post_init__(self) -> None:
        from quantcompose.quant_embedding import check_embedding_bits
        from quantcompose.storage import storage_dtype

        storage_dtype(self.storage_dtype)
        if self.embedding_bits is not None:
            check_embedding_bits(self.embedding_bits)
        self._check_refine()
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
        if self.weight_group_size is not None and (
            isinstance(self.weight_group_size, bool)
            or not isinstance(self.weight_group_size, int)
            or self.weight_group_size < 1
        ):
            raise QuantSpecError(
                f"weight_group_size={self.weight_group_size!r} must be a positive integer (e.g. 128), "
                "or None for one scale per output channel."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (0 <= self.seed < 2**63):
            raise QuantSpecError(f"seed={self.seed!r} must be an integer in [0, 2**63).")
        if self.qkv_bits is not None and (
            isinstance(self.qkv_bits, bool) or not isinstance(self.qkv_bits, int)
            or not (2 <= self.qkv_bits <= 8 or self.qkv_bits == 16)
        ):
            raise QuantSpecError(
                f"qkv_bits={self.qkv_bits!r} is out of range: use 2..8, 16 for float Q/K/V, "
                "or leave it unset to follow the activation bits."
            )

    def _check_refine(self) -> None:
        if self.refine is not None and self.refine not in REFINE_METHODS:
            raise QuantSpecError(
                f"refine={self.refine!r} is unknown: use one of {', '.join(map(repr, REFINE_METHODS))}, "
                "or None for no refinement."
            )
        for name, minimum in (("refine_epochs", 1), ("refine_samples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise QuantSpecError(f"{name}={value!r} must be an integer of at least {minimum}.")
        lr = self.refine_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < float("inf")):
            raise QuantSpecError(f"refine_lr={lr!r} must be a positive finite number (e.g. 0.1).")
        if self.refine is None:
            changed = [f.name for f in fields(self) if f.name.startswith("refine_")
                       and getattr(self, f.name) != f.default]
            if changed:
                raise QuantSpecError(
                    f"{', '.join(changed)} set, but refine is None, so nothing would use them; "
                    "set refine='lwc' (CLI --refine lwc) or drop them."
                )

    def weight_spec(self, clip_ratio: float = 1.0) -> QuantSpec | None:
        """The per-channel (or per-group) weight quantizer, or None at 16 bits."""
        if self.wbits >= 16:
            return None
        if self.weight_group_size:
            return QuantSpec(self.wbits, self.weight_symmetric, "group", self.weight_group_size, clip_ratio)
        return QuantSpec(self.wbits, self.weight_symmetric, "channel", None, clip_ratio)

    @property
    def effective_qkv_bits(self) -> int:
        """The bits Q, K and V are quantized to (16: left in float)."""
        return self.abits if self.qkv_bits is None else self.qkv_bits

    def qkv_spec(self) -> QuantSpec | None:
        """The per-token-and-head quantizer of Q, K and V, or None when they stay in float."""
        if self.effective_qkv_bits >= 16:
            return None
        return QuantSpec(self.effective_qkv_bits, self.act_symmetric, "token", None, 1.0)

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
    model: "ModelFacts | None" = None  # the model's shape (heads, head size), for head-aware transforms
    # With absorbable "shared_diagonal": (query heads per value head, head size), heads grouped
    # contiguously (query head h reads value head h // group); a scale folds when it repeats per group.
    shared_heads: tuple[int, int] | None = None

    @property
    def width(self) -> int:
        return int(self.act_absmax.numel())

    def weight_absmax(self) -> torch.Tensor:
        """(in,) max |w| per input channel over all consuming linears."""
        return torch.stack([w.abs().amax(dim=0) for w in self.weights.values()]).amax(dim=0)

    def group_shared(self, per_channel: torch.Tensor) -> torch.Tensor:
        """(in,) ``per_channel`` replaced by its maximum over the query heads sharing each value head.

        The statistic a ``"shared_diagonal"`` place's foldable scale is built from; unchanged elsewhere.
        """
        if self.absorbable != "shared_diagonal" or self.shared_heads is None:
            return per_channel
        group, head_dim = self.shared_heads
        grouped = per_channel.reshape(-1, group, head_dim)
        return grouped.amax(dim=1, keepdim=True).expand_as(grouped).reshape(-1).clone()


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
    # The pipeline picks the clip ratio by search instead of using the spec's
    # ``clip_ratio`` (which is then 1.0). The plan is the only place this is decided.
    search_act_clip: bool = False
    search_weight_clip: bool = False
    # Fixed per-row weight clipping, e.g. frozen from learned clipping
    # (quantcompose.learning): (rows, groups, 2) lower and upper ratios for the
    # place's linears stacked in order (one group for a per-channel quantizer).
    # Exclusive with ``search_weight_clip``; ``weight_spec.clip_ratio`` is then unused.
    weight_clip_rows: torch.Tensor | None = None



@dataclass(frozen=True)
class ModelFacts:
    """The shape of the model being quantized, as its adapter states it (never read from module paths)."""

    model_type: str
    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    tied_embeddings: bool


@dataclass(frozen=True)
class ModelPlan:
    """A model-scope strategy's answer: exact model-wide rewrites, applied before calibration.

    * ``fuse_norms``: fold every RMSNorm's weight into the linears it feeds
      (the final norm into the LM head, which is untied from the embedding
      first when they are tied), leaving unit-weight norms.
    * ``residual``: an orthogonal transform of the residual stream, folded
      into the embedding, every residual writer's output (``o_proj``,
      ``down_proj``) and every reader's input (q/k/v, gate/up, LM head).
      RMSNorm commutes only with orthogonal maps, so it needs ``fuse_norms``.
    * ``value_head``: a ``head_dim``-wide transform folded into each value
      head's output rows and each query head's block of ``o_proj``'s input,
      exact under grouped-query attention because every head shares it.
    * ``qk_rotation``: see below; the only part that runs online.
    """

    fuse_norms: bool = False
    residual: Transform | None = None
    value_head: Transform | None = None
    # Online, inside attention: an orthogonal head_dim-wide map on Q and K
    # after RoPE (Q·Kᵀ is unchanged) before they are quantized. QuaRot's
    # Hadamard for the KV cache; used only when Q/K/V are quantized.
    qk_rotation: Transform | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    """What a layer-scope strategy sees for one decoder layer.

    ``layer`` is the full-precision layer with the earlier scopes' transforms
    folded; a strategy may run it (or a copy) but must not modify it.
    ``fp_outputs[i]`` is what ``layer`` returns for ``inputs[i]``.
    ``plans`` are the strategy's own place-scope plans, the starting point
    for refinement; ``stats`` the statistics they were fitted on.
    """

    index: int
    layer: nn.Module
    places: list[Any]  # list[quantcompose.models.InputPlace]
    inputs: list[tuple[torch.Tensor, dict[str, Any]]]
    fp_outputs: list[torch.Tensor]
    stats: dict[str, PlaceStats]
    plans: dict[str, Plan]
    model: ModelFacts | None = None
    progress: bool = True  # whether a strategy that trains may show a progress bar


@dataclass(frozen=True)
class StrategyInfo:
    """How a strategy introduces itself: its name, a line of description, its options."""

    name: str
    description: str
    options: dict[str, Option] = field(default_factory=dict)
    scopes: tuple[str, ...] = ("place",)

    def resolve_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``, parsed and range-checked; an :class:`OptionError` otherwise."""
        return resolve_options(self.name, self.options, given)


def clip_options(act_clip: float = 1.0, weight_clip: float = 1.0) -> dict[str, Option]:
    """The two clipping options most strategies offer.

    Both default to unset: the clip searches (on by default) then pick the
    ratios; with a search turned off, the strategy's own default (the values
    given here) applies. Setting one while its search is on is an error.
    """
    from quantcompose.options import in_range, optional, parse_optional_float

    def option(side: str, per: str, default: float) -> Option:
        return Option(
            None,
            f"fixed {side} clipping ratio in (0, 1]; needs the {side} clip search off "
            f"(default: searched per {per}, {default} with the search off)",
            type=parse_optional_float,
            check=optional(in_range(0.0, 1.0, low_open=True)),
        )

    return {"act_clip": option("activation", "place", act_clip), "weight_clip": option("weight", "row", weight_clip)}


class Strategy:
    """A quantization method: subclass, set the class attributes, override the scopes it acts at.

    The three scopes, called in this order by the pipeline:

    * :meth:`model_plan` (model scope), once before calibration;
    * :meth:`plan` (place scope), for each input place of each layer, possibly
      concurrently from worker threads (keep no mutable state; derive any
      randomness from ``settings.seed`` and the place);
    * :meth:`fit_layer` (layer scope), for each layer after its place plans,
      with the layer's calibration inputs and full-precision outputs.

    A strategy never edits the model: it returns plans, and the pipeline
    folds and quantizes them.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    #: Clip ratios used when the user turns a clip search off and leaves the option unset.
    act_clip_default: ClassVar[float] = 1.0
    weight_clip_default: ClassVar[float] = 1.0

    @property
    def info(self) -> StrategyInfo:
        return StrategyInfo(self.name, self.description, dict(self.options), self.scopes())

    @classmethod
    def scopes(cls) -> tuple[str, ...]:
        """The scopes this strategy acts at (the methods it overrides)."""
        acts = [
            ("model", "model_plan"),
            ("layer", "fit_layer"),
            ("place", "plan"),
        ]
        return tuple(scope for scope, method in acts if getattr(cls, method) is not getattr(Strategy, method))

    def resolve(self, given: dict[str, Any] | None, settings: "QuantSettings") -> dict[str, Any]:
        """Options parsed, range-checked and checked against ``settings``: call before calibration."""
        options = resolve_options(self.name, self.options, given)
        self.check(options, settings)
        return options

    def check(self, options: dict[str, Any], settings: "QuantSettings") -> None:
        """Raise :class:`OptionError` for options that conflict with each other or with ``settings``."""
        for key, search, setting, flag in (
            ("act_clip", settings.act_clip_search and settings.abits < 16, "act_clip_search", "--no-act-clip-search"),
            ("weight_clip", settings.weight_clip_search and settings.wbits < 16, "weight_clip_search", "--no-clip-search"),
        ):
            if options.get(key) is not None and search:
                raise OptionError(
                    f"{self.name} option {key}={options[key]} fixes a clip ratio, but the clip search that "
                    f"owns it is on (QuantSettings.{setting}, the default). Turn the search off "
                    f"({setting}=False, CLI {flag}) to use a fixed ratio, or drop the option."
                )

    # -- the three scopes ------------------------------------------------------------
    def model_plan(self, model: ModelFacts, options: dict[str, Any], settings: "QuantSettings") -> ModelPlan | None:
        """Model scope: exact model-wide rewrites before calibration, or ``None``."""
        return None

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: "QuantSettings") -> Plan:
        """Place scope: the transform and quantizers of one input place (default: none, just quantizers)."""
        return self.quantizer_plan(Identity(stats.width), options, settings)

    def fit_layer(
        self, layer: LayerContext, options: dict[str, Any], settings: "QuantSettings"
    ) -> dict[str, Plan] | None:
        """Layer scope: refined plans by place name (``None``: keep ``layer.plans``)."""
        return None

    # -- helpers for subclasses ---------------------------------------------------------
    def quantizer_plan(
        self,
        transform: Transform,
        options: dict[str, Any],
        settings: "QuantSettings",
        notes: dict[str, Any] | None = None,
    ) -> Plan:
        """A plan with the user's quantizers and this strategy's clip decision.

        An unset ``act_clip`` / ``weight_clip`` option means: searched when the
        settings' search is on, else this strategy's default ratio.
        """
        act_clip, weight_clip = options.get("act_clip"), options.get("weight_clip")
        search_act = act_clip is None and settings.act_clip_search and settings.abits < 16
        search_weight = weight_clip is None and settings.weight_clip_search and settings.wbits < 16
        act_ratio = 1.0 if search_act else (self.act_clip_default if act_clip is None else float(act_clip))
        weight_ratio = 1.0 if search_weight else (self.weight_clip_default if weight_clip is None else float(weight_clip))
        return Plan(
            transform=transform,
            act_spec=settings.act_spec(act_ratio),
            weight_spec=settings.weight_spec(weight_ratio),
            notes=dict(notes or {}),
            search_act_clip=search_act,
            search_weight_clip=search_weight,
        )
