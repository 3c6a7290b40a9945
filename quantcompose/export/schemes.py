"""Which quantcompose quantizer settings compressed-tensors runtimes execute, as their schemes.

The runtimes that read compressed-tensors checkpoints (vLLM's kernels, and
transformers through the compressed-tensors package) execute integer
weight-only schemes and int8 weight-and-activation with dynamic per-token
activation scales. This module maps a :class:`QuantLinear`'s specs onto a
``QuantizationScheme`` or says, naming the layer, why it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcompose.errors import UnsupportedExportSettingsError
from quantcompose.quant import QuantSpec
from quantcompose.strategy import QuantSettings

SUPPORTED = (
    "W8A8 (8-bit symmetric per-channel weights, 8-bit symmetric dynamic per-token activations) and "
    "W4A16 / W8A16 (4- or 8-bit per-channel or per-group weights, symmetric or asymmetric, float activations)"
)
#: The settings that give an exportable W8A8 model, as ``quantcompose quantize`` flags.
W8A8_FLAGS = "--wbits 8 --abits 8 --weight-sym --act-sym --qkv-bits 16 --no-act-clip-search"


@dataclass(frozen=True)
class LayerScheme:
    """The compressed-tensors view of one layer's quantizers (hashable: layers group by it)."""

    weight: QuantSpec
    activation: QuantSpec | None

    def weight_args(self) -> dict:
        """Keyword arguments of ``compressed_tensors.quantization.QuantizationArgs`` for the weight."""
        args = {"num_bits": self.weight.bits, "type": "int", "symmetric": self.weight.symmetric, "dynamic": False}
        if self.weight.granularity == "group":
            return {**args, "strategy": "group", "group_size": self.weight.group_size}
        return {**args, "strategy": "channel"}

    def activation_args(self) -> dict | None:
        """``QuantizationArgs`` keyword arguments for the dynamic per-token input quantizer (None: float)."""
        if self.activation is None:
            return None
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

    def label(self) -> str:
        """``W8A8`` / ``W4A16`` / ``W8A16``, with the weight granularity."""
        abits = 16 if self.activation is None else self.activation.bits
        group = f"g{self.weight.group_size}" if self.weight.granularity == "group" else "per-channel"
        return f"W{self.weight.bits}A{abits} ({group}, {'sym' if self.weight.symmetric else 'asym'} weights)"


def unsupported_setting(layer: str, what: str, hint: str) -> UnsupportedExportSettingsError:
    """The error for ``what`` at ``layer`` (a module path or "the quantization settings"), with a fix."""
    return UnsupportedExportSettingsError(
        f"{layer}: cannot export {what} to compressed-tensors; the runtimes that read it execute {SUPPORTED}. {hint}"
    )


def layer_scheme(
    layer: str, weight: QuantSpec | None, activation: QuantSpec | None, output: QuantSpec | None
) -> LayerScheme | None:
    """The scheme of the linear at module path ``layer``, or None for a float linear.

    Raises :class:`UnsupportedExportSettingsError` naming the layer, the setting
    and the supported ones for anything else (W4A4, asymmetric or clipped
    activations, per-tensor weights, output quantization, 2- or 3-bit weights).
    """
    if output is not None:
        raise unsupported_setting(layer, f"output quantization ({output}, the K/V cache quantizer)",
                                  "Quantize with --qkv-bits 16.")
    if weight is None:
        if activation is not None:
            raise unsupported_setting(layer, f"activation quantization ({activation}) with a float weight",
                                      "Quantize the weights too (--wbits 4 or 8).")
        return None
    if weight.granularity not in ("channel", "group"):
        raise unsupported_setting(layer, f"the weight quantizer {weight}", "Quantize weights per channel or per group.")
    if activation is None:
        if weight.bits not in (4, 8):
            raise unsupported_setting(layer, f"W{weight.bits}A16", "Use --wbits 4 or 8.")
        return LayerScheme(weight, None)
    setting = f"W{weight.bits}A{activation.bits} (weights {weight}, activations {activation})"
    if weight.bits != 8 or activation.bits != 8:
        raise unsupported_setting(layer, setting, f"Quantize with {W8A8_FLAGS}, or with --abits 16 for weight-only.")
    if not weight.symmetric or weight.granularity != "channel":
        raise unsupported_setting(layer, f"{setting}, whose weights are not symmetric per-channel (what int8 "
                                  "W8A8 kernels take)", f"Quantize with {W8A8_FLAGS}.")
    if not activation.symmetric or activation.granularity != "token":
        raise unsupported_setting(layer, f"{setting}, whose activations are not symmetric per token",
                                  f"Quantize with {W8A8_FLAGS}.")
    if activation.clip_ratio != 1.0:
        raise unsupported_setting(layer, f"{setting}, whose activation clip ratio {activation.clip_ratio:g} has no "
                                  "place in a dynamic per-token scheme (its scale is each token's absolute maximum)",
                                  "Quantize with --no-act-clip-search and without an act_clip option below 1.")
    return LayerScheme(weight, activation)


#: compressed-tensors schemes quantize Linear modules; a checkpoint has no place for an embedding
#: table's codes that the runtimes reading it would de-quantize, so such a model is refused.
EMBEDDING_HINT = "Quantize without embedding_bits (--embedding-bits) to export; the table then stays float16."


def check_settings(settings: QuantSettings) -> None:
    """Raise before quantizing when ``settings`` cannot give an exportable model (``quantize --export``).

    The same rules as :func:`layer_scheme`, applied to the specs the settings
    ask for; a strategy may still pick others, which the export then reports.
    """
    where = "the quantization settings"
    if settings.embedding_bits is not None:
        raise unsupported_setting(where, f"a quantized embedding table (embedding_bits={settings.embedding_bits})",
                                  EMBEDDING_HINT)
    weight = None
    if settings.wbits < 16:
        group = settings.weight_group_size
        weight = QuantSpec(settings.wbits, settings.weight_symmetric, "group" if group else "channel", group)
    act = None if settings.abits >= 16 else QuantSpec(settings.abits, settings.act_symmetric, "token")
    layer_scheme(where, weight, act, None)
    if act is not None:
        qkv = settings.abits if settings.qkv_bits is None else settings.qkv_bits
        if qkv < 16:
            raise unsupported_setting(where, f"attention Q/K/V quantization at {qkv} bits",
                                      "Quantize with --qkv-bits 16.")
        if settings.act_clip_search:
            raise unsupported_setting(where, "the activation clip search (it sets clip ratios below 1, which dynamic "
                                      "per-token activations do not have)", "Quantize with --no-act-clip-search.")
