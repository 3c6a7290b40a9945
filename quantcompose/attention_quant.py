"""Fake-quantize the inputs of attention's two matmuls: Q and K after RoPE, and V.

DuQuant (Lin et al., 2024) and OmniQuant (Shao et al., 2024), whose code it
inherits, quantize every activation, the inputs of ``Q·Kᵀ`` and of
``softmax(·)·V`` included: Q and K after the rotary embedding and V, per token
and head, at the activation bit width; the softmax output stays in 16 bits.
QuaRot (Ashkboos et al., 2024) first multiplies queries and keys by the same
online Hadamard rotation of the head dimension, after RoPE: ``(qH)(kH)ᵀ = qkᵀ``
for an orthogonal ``H``, and the rotation spreads the keys' outlier channels
before they are quantized.

The seam is transformers' pluggable attention interface: the attention
module calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with
``(module, query, key, value, attention_mask, ...)`` of shape
``(batch, heads, seq, head_dim)``, query and key already rotated by RoPE and
key / value already joined with the cache. :func:`install_attention_quantization`
registers a wrapper for the implementation the model used (``"sdpa"`` or
``"eager"``), points the attention modules' configs at it and gives each
attention module its :class:`AttentionQuantizer`; the wrapper applies it and
delegates to the original function. No module is patched or replaced.

**The KV cache.** In this transformers version the cache is updated *before*
the attention function runs, so it stores the float keys (after RoPE, before
the rotation) and values, and each decoding step rotates and quantizes all of
them again. Quantization is per token and head, a function of each row
alone, so re-quantizing the cached rows gives exactly the values that storing
their quantized form would: generation with a cache computes what the
no-cache forward does. (Were a cache to store already fake-quantized rows,
quantizing them again would change them only by float rounding when
``clip_ratio == 1``: round-to-nearest maps the range ``[lo, hi]`` of a row to
``[−z·s, (qmax − z)·s]`` with the same scale ``s`` and zero point ``z``, so a
second pass reproduces the first; with ``clip_ratio < 1`` each pass shrinks
the range again and the values drift. The tests check both.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantcompose.errors import QuantComposeError
from quantcompose.quant import QuantSpec, fake_quantize
from quantcompose.quant.spec import spec_from_dict, spec_to_dict
from quantcompose.transforms import Hadamard, Transform, from_state_dict

__all__ = [
    "AttentionQuantizationError",
    "AttentionQuantizer",
    "SUPPORTED_IMPLEMENTATIONS",
    "attention_quantizer_of",
    "default_attention_modules",
    "install_attention_quantization",
    "qk_hadamard",
    "quantized_implementation_name",
    "remove_attention_quantization",
]

#: Attention implementations the wrapper can delegate to.
SUPPORTED_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")
#: The attention submodule of a decoder layer in Llama-family models.
ATTENTION_SUBMODULE = "self_attn"

# Private attribute names: on an attention module (its quantizer) and on the model (what to undo).
_QUANTIZER_ATTR = "_quantcompose_attention_quantizer"
_STATE_ATTR = "_quantcompose_attention_install"
_NAME_PREFIX = "quantcompose_qkv_"


class AttentionQuantizationError(QuantComposeError, ValueError):
    """Attention quantization was asked for something it cannot do (wrong layers, implementation, rotation)."""


def qk_hadamard(head_dim: int, seed: int = 0) -> Hadamard:
    """A ``Hadamard(head_dim)`` with random signs drawn from ``seed`` (QuaRot's randomized rotation)."""
    return Hadamard.random(head_dim, generator=torch.Generator().manual_seed(int(seed)))


@dataclass(frozen=True)
class AttentionQuantizer:
    """What one attention layer does to the inputs of its two matmuls.

    ``qk_rotation`` (an orthogonal transform of width ``head_dim``) multiplies
    Q and K after RoPE; then ``q_spec`` / ``k_spec`` / ``v_spec`` fake-quantize
    Q, K and V over ``head_dim``, i.e. per token and head (use
    ``granularity="token"``). ``None`` leaves a tensor as it is.
    """

    q_spec: QuantSpec | None = None
    k_spec: QuantSpec | None = None
    v_spec: QuantSpec | None = None
    qk_rotation: Transform | None = None

    def __post_init__(self) -> None:
        for name in ("q_spec", "k_spec", "v_spec"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise AttentionQuantizationError(
                    f"{name} must be a QuantSpec or None, got {type(spec).__name__}."
                )
        rotation = self.qk_rotation
        if rotation is not None:
            if not isinstance(rotation, Transform):
                raise AttentionQuantizationError(
                    f"qk_rotation must be a Transform or None, got {type(rotation).__name__}."
                )
            if not rotation.is_orthogonal:
                # q·T and k·T leave Q·Kᵀ unchanged only when T·Tᵀ = I.
                raise AttentionQuantizationError(
                    f"qk_rotation {rotation!r} is not orthogonal, so it would change Q·Kᵀ: "
                    "use a Hadamard, a BlockRotation or a Permutation (or a composition of them)."
                )

    @classmethod
    def uniform(
        cls,
        bits: int,
        *,
        symmetric: bool = False,
        clip_ratio: float = 1.0,
        qk_rotation: Transform | None = None,
    ) -> "AttentionQuantizer":
        """Q, K and V all at ``bits``, per token and head (the papers' setting with ``symmetric=False``)."""
        spec = QuantSpec(bits, symmetric, "token", None, clip_ratio)
        return cls(spec, spec, spec, qk_rotation)

    def describe(self) -> str:
        """One line for reports: the specs and the rotation."""
        specs = ", ".join(f"{n}={s}" for n, s in (("Q", self.q_spec), ("K", self.k_spec), ("V", self.v_spec)) if s)
        rotation = "none" if self.qk_rotation is None else type(self.qk_rotation).__name__
        return f"{specs or 'float'}; Q/K rotation {rotation}"

    @property
    def is_identity(self) -> bool:
        """True when applying it changes nothing (no specs, no rotation)."""
        return self.q_spec is None and self.k_spec is None and self.v_spec is None and self.qk_rotation is None

    def apply(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated and fake-quantized ``(query, key, value)``, each ``(..., head_dim)``, same dtypes."""
        if self.qk_rotation is not None:
            query, key = self.qk_rotation(query), self.qk_rotation(key)
        return _maybe_quantize(query, self.q_spec), _maybe_quantize(key, self.k_spec), _maybe_quantize(value, self.v_spec)

    # --- serialization --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A nested dict of plain values and the rotation's tensors.

        Split it for saving like a transform state:
        ``config, tensors = flatten_state(q.to_dict(), prefix)`` and back with
        ``AttentionQuantizer.from_dict(unflatten_state(config, tensors))``.
        """
        return {
            "q_spec": spec_to_dict(self.q_spec),
            "k_spec": spec_to_dict(self.k_spec),
            "v_spec": spec_to_dict(self.v_spec),
            "qk_rotation": None if self.qk_rotation is None else self.qk_rotation.state_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AttentionQuantizer":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise AttentionQuantizationError(
                f"AttentionQuantizer.from_dict expects a dict, got {type(data).__name__}."
            )
        known = {"q_spec", "k_spec", "v_spec", "qk_rotation"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AttentionQuantizationError(
                f"unknown AttentionQuantizer keys {unknown}: the valid keys are {sorted(known)}."
            )
        rotation = data.get("qk_rotation")
        return cls(
            spec_from_dict(data.get("q_spec")),
            spec_from_dict(data.get("k_spec")),
            spec_from_dict(data.get("v_spec")),
            None if rotation is None else from_state_dict(rotation),
        )


def _maybe_quantize(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    return x if spec is None else fake_quantize(x, spec)


def attention_quantizer_of(attention: nn.Module) -> AttentionQuantizer | None:
    """The quantizer installed on an attention module, or ``None`` (it runs unquantized)."""
    return getattr(attention, _QUANTIZER_ATTR, None)


# --- the attention function ------------------------------------------------------------


def quantized_implementation_name(original: str) -> str:
    """The name under which the quantizing wrapper of ``original`` is registered."""
    return _NAME_PREFIX + original


def _original_function(original: str, module: nn.Module) -> Callable[..., Any]:
    if original == "eager":
        # "eager" is not in the interface: each modeling file defines its own
        # (Gemma's soft-caps, some add sinks), which the module would have called.
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise AttentionQuantizationError(
                f"{type(module).__name__} is defined in {type(module).__module__}, which has no "
                "eager_attention_forward; switch the model to sdpa before installing attention quantization."
            )
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


def _make_attention_function(original: str) -> Callable[..., Any]:
    def quantized_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        quantizer = attention_quantizer_of(module)
        if quantizer is not None:
            query, key, value = quantizer.apply(query, key, value)
        return _original_function(original, module)(module, query, key, value, attention_mask, *args, **kwargs)

    quantized_attention.__name__ = f"quantized_{original}_attention"
    return quantized_attention


def _register(original: str) -> str:
    """Register the wrapper of ``original`` and its mask function; returns the wrapper's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = quantized_implementation_name(original)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention_function(original))
    # The causal mask is built for config._attn_implementation; an unknown name gets no mask at all.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


# --- install / remove ------------------------------------------------------------------


@dataclass
class _Installed:
    """What :func:`install_attention_quantization` changed on a model, for :func:`remove_attention_quantization`."""

    modules: list[nn.Module]
    # (config, its implementation before) for each distinct config of the modules.
    configs: list[tuple[Any, str]] = field(default_factory=list)


AttentionModules = Sequence[nn.Module] | Callable[[nn.Module], Sequence[nn.Module]]


def default_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` submodule of each decoder layer the model's adapter names."""
    from quantcompose.models import get_adapter

    layers = get_adapter(model).layers()
    missing = [i for i, layer in enumerate(layers) if not hasattr(layer, ATTENTION_SUBMODULE)]
    if missing:
        raise AttentionQuantizationError(
            f"decoder layers {missing} have no {ATTENTION_SUBMODULE!r} submodule: pass the attention "
            "modules (or a function that finds them) as `layers`."
        )
    return [getattr(layer, ATTENTION_SUBMODULE) for layer in layers]


def _attention_modules(model: nn.Module, layers: AttentionModules | None) -> list[nn.Module]:
    if layers is None:
        modules = default_attention_modules(model)
    elif callable(layers) and not isinstance(layers, nn.Module):  # a ModuleList is callable too
        modules = list(layers(model))
    else:
        modules = list(layers)
    for i, module in enumerate(modules):
        if not isinstance(module, nn.Module) or getattr(module, "config", None) is None:
            raise AttentionQuantizationError(
                f"attention module {i} ({type(module).__name__}) has no `config`: pass transformers "
                "attention modules, which read config._attn_implementation to pick their function."
            )
    return modules


def _quantizer_per_module(
    quantizers: Mapping[int, AttentionQuantizer] | AttentionQuantizer, count: int
) -> dict[int, AttentionQuantizer]:
    if isinstance(quantizers, AttentionQuantizer):
        return {i: quantizers for i in range(count)}
    if not isinstance(quantizers, Mapping):
        raise AttentionQuantizationError(
            f"quantizers must be an AttentionQuantizer or a dict {{layer index: AttentionQuantizer}}, "
            f"got {type(quantizers).__name__}."
        )
    bad = sorted(str(i) for i in quantizers if not isinstance(i, int) or not 0 <= i < count)
    if bad:
        raise AttentionQuantizationError(
            f"quantizers has layer indices {bad} outside 0..{count - 1}: key it by the position of "
            "the attention module in `layers`."
        )
    for i, q in quantizers.items():
        if not isinstance(q, AttentionQuantizer):
            raise AttentionQuantizationError(
                f"quantizers[{i}] must be an AttentionQuantizer, got {type(q).__name__}."
            )
    return dict(quantizers)


def install_attention_quantization(
    model: nn.Module,
    quantizers: Mapping[int, AttentionQuantizer] | AttentionQuantizer,
    layers: AttentionModules | None = None,
) -> None:
    """Quantize Q, K, V inside the attention modules of ``model``.

    ``layers`` are the attention modules (or a function of the model that
    returns them; default: :func:`default_attention_modules`). ``quantizers``
    is one quantizer for all of them, or a dict keyed by position in
    ``layers``; a module without one runs unquantized. Each module's config
    switches to the wrapper of the implementation it used (``"sdpa"`` or
    ``"eager"``). Installing again replaces the previous installation.
    """
    modules = _attention_modules(model, layers)
    per_module = _quantizer_per_module(quantizers, len(modules))
    if getattr(model, _STATE_ATTR, None) is not None:
        remove_attention_quantization(model)

    configs: dict[int, Any] = {}
    for module in modules:
        configs.setdefault(id(module.config), module.config)
    originals: list[tuple[Any, str]] = []
    for config in configs.values():
        original = config._attn_implementation
        if original not in SUPPORTED_IMPLEMENTATIONS:
            raise AttentionQuantizationError(
                f"attention implementation {original!r} is not supported for Q/K/V quantization: "
                f"switch the model to one of {SUPPORTED_IMPLEMENTATIONS} first "
                '(model.set_attn_implementation("sdpa")).'
            )
        originals.append((config, original))

    for config, original in originals:
        # Set on the config alone, not through set_attn_implementation or the
        # recursive property setter: only the configs these modules read switch,
        # and any sub-config with its own implementation keeps it.
        config._attn_implementation_internal = _register(original)
    for i, quantizer in per_module.items():
        setattr(modules[i], _QUANTIZER_ATTR, quantizer)
    setattr(model, _STATE_ATTR, _Installed(modules, originals))


def installed_attention_modules(model: nn.Module) -> list[nn.Module] | None:
    """The attention modules an installation covers, in layer order, or None when none is installed."""
    state: _Installed | None = getattr(model, _STATE_ATTR, None)
    return None if state is None else list(state.modules)


def set_attention_quantizer(attention: nn.Module, quantizer: AttentionQuantizer | None) -> None:
    """Put ``quantizer`` on (or, with None, take it off) one attention module of an installed model.

    The module's config must already use a wrapper (see :func:`install_attention_quantization`);
    the pipeline installs once with no quantizers and sets each layer's as it quantizes it.
    """
    if not getattr(getattr(attention, "config", None), "_attn_implementation", "").startswith(_NAME_PREFIX):
        raise AttentionQuantizationError(
            "this attention module does not run a quantcompose wrapper: call install_attention_quantization first."
        )
    if quantizer is None:
        if hasattr(attention, _QUANTIZER_ATTR):
            delattr(attention, _QUANTIZER_ATTR)
        return
    if not isinstance(quantizer, AttentionQuantizer):
        raise AttentionQuantizationError(f"expected an AttentionQuantizer, got {type(quantizer).__name__}.")
    setattr(attention, _QUANTIZER_ATTR, quantizer)


def remove_attention_quantization(model: nn.Module) -> bool:
    """Undo :func:`install_attention_quantization`: quantizers off, original implementations back.

    Returns False when nothing was installed on ``model``.
    """
    state: _Installed | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return False
    for module in state.modules:
        if hasattr(module, _QUANTIZER_ATTR):
            delattr(module, _QUANTIZER_ATTR)
    for config, original in state.configs:
        config._attn_implementation_internal = original
    delattr(model, _STATE_ATTR)
    return True
