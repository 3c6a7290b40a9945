"""Write a quantcompose model as a compressed-tensors checkpoint (what vLLM and transformers read).

The folder holds ``config.json`` with a ``quantization_config`` written by the
compressed-tensors package itself, ``model.safetensors`` in the format's
compressed layout, the tokenizer files, and ``quantcompose-export.json``
(what was exported, written last: its presence marks a complete export).

Weights move code for code, never re-rounded: a quantcompose code ``c`` with
zero point ``z`` (unsigned for asymmetric specs) becomes the format's signed
code ``c − 2^(b−1)`` with zero point ``z − 2^(b−1)``, so ``(c − z)·s`` is
unchanged; int4 codes are re-packed into the format's int32 words with the
package's own packer. Online transforms have no place in a checkpoint that
transformers runs (its compressed-tensors loader does not apply a
``transform_config``), so a diagonal :class:`Scale` on the input of q/k/v or
gate/up is folded into the RMSNorm before it (exact: the norm's output is
multiplied elementwise) and every other online transform is an error naming
the layer, the transform and why it cannot fold, unless the caller asks for
them in the format's ``transform_config``
(:mod:`quantcompose.export.transform_config`). (The pipeline already folds
every scale a linear before a place can absorb: ``up_proj`` for ``down_proj``,
``v_proj`` for ``o_proj``, under grouped-query attention only a scale the
query heads of each value head share.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quantcompose.atomic_dir import write_directory
from quantcompose.errors import ExportError, UnexportableTransformError
from quantcompose.export.schemes import EMBEDDING_HINT, LayerScheme, layer_scheme, unsupported_setting
from quantcompose.export.transform_config import (
    OnlineGroup,
    check_online_choice,
    group_online,
    transform_config_of,
    transform_tensors,
)
from quantcompose.qlinear import QuantLinear
from quantcompose.quant import unpack_int4
from quantcompose.quant_embedding import QuantEmbedding
from quantcompose.saving import check_save_target, directory_size
from quantcompose.transforms import Compose, Scale, Transform

MARKER = "quantcompose-export.json"
WEIGHTS = "model.safetensors"
FORMAT = "compressed-tensors"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_compressed_tensors` wrote."""

    directory: Path
    compression_format: str  # "int-quantized", "pack-quantized" or "mixed-precision"
    schemes: dict[str, int]  # scheme label -> number of linears
    folded: tuple[str, ...] = field(default=())  # norms that absorbed an online Scale
    float_linears: tuple[str, ...] = field(default=())  # linears left in float (the LM head)
    size_bytes: int = 0
    online_transforms: int = 0  # distinct online transforms written to the transform_config

    def format(self) -> str:
        """One line for the CLI."""
        schemes = ", ".join(f"{n} x {label}" for label, n in self.schemes.items())
        folded = f"; online scales folded into {len(self.folded)} norms" if self.folded else ""
        if self.online_transforms:
            folded += f"; {self.online_transforms} online transforms in the transform_config"
        return (f"exported to {self.directory} ({FORMAT}, {self.compression_format}): {schemes}{folded}; "
                f"{self.size_bytes / 2**20:.1f} MiB")


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export_compressed_tensors`."""
    return (Path(path) / MARKER).is_file()


def check_export_target(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """:class:`SaveError` unless an export can be written at ``directory`` (``overwrite``: a previous export)."""
    return check_save_target(directory, overwrite, replaceable=is_export, kind=f"compressed-tensors export (no {MARKER})")


def _require_package() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError("exporting to compressed-tensors needs the compressed-tensors package: "
                          "pip install 'quantcompose[export]'") from None


# ------------------------------------------------------------------ transforms
def describe_transform(transform: Transform) -> str:
    """``Compose(Scale, BlockRotation, ...)`` or the atom's class name."""
    if isinstance(transform, Compose):
        return f"Compose({', '.join(describe_transform(t) for t in transform.transforms)})"
    return type(transform).__name__


def _same_scale(transforms: list[Transform | None]) -> Scale | None:
    """The one Scale every sibling runs online, or None when they do not all run the same one."""
    first = transforms[0]
    if not isinstance(first, Scale):
        return None
    for other in transforms[1:]:
        if other is not first and not (isinstance(other, Scale) and torch.equal(other.factors, first.factors)):
            return None
    return first


#: The quantize options whose models fold every transform into their weights.
EXPORTABLE_METHODS = ("rtn; smoothquant with --opt foldable=true; quarot with --opt online_hadamards=false "
                      "(its folded rotations only)")


def _unexportable(layer: str, transform: Transform, why: str) -> UnexportableTransformError:
    return UnexportableTransformError(
        f"{layer} runs the online transform {describe_transform(transform)} on its input, which a "
        f"checkpoint that plain transformers runs cannot carry: {why}. transformers does not apply the format's "
        "transform_config when it loads a checkpoint, so one is written only on request: export with "
        "online_transforms='transform-config' (CLI: --online-transforms transform-config) for a consumer that "
        "applies it (compressed-tensors' apply_transform_config), export a model whose transforms fold entirely "
        f"({EXPORTABLE_METHODS}), or serve it with quantcompose itself."
    )


def _why_not_foldable(place: Any, transform: Transform, shared: bool) -> str:
    """Why the online ``transform`` at ``place`` has no exact fold into what comes before it."""
    if not isinstance(transform, Scale):
        before = f"the {place.prev_kind} {place.prev} before it" if place.prev else "anything before it"
        return f"it is not diagonal, and only a diagonal scale folds exactly into {before}"
    if not shared:
        return f"it is not one Scale shared by {', '.join(place.linears)}, which all read the same activation"
    if place.absorbable == "shared_diagonal" and place.prev_factors(transform.factors) is None:
        return (f"under grouped-query attention {place.prev} absorbs a scale only when the query heads that share "
                "a value head share its factors, and these differ between them (smoothquant --opt foldable=true "
                "picks shared ones)")
    if place.prev_kind == "linear":
        return f"the linear {place.prev} before it is already quantized (the pipeline would have folded it)"
    return "nothing before it can absorb it"


def fold_online_scales(
    model: nn.Module, keep_online: bool = False
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], dict[str, Transform]]:
    """``({norm weight name: folded weight}, folded norm paths, {linear: transform left online})``.

    An online :class:`Scale` shared by every linear that reads a norm's output
    moves into that norm's weight (the model itself is left unchanged). Any
    other online transform raises :class:`UnexportableTransformError` naming
    the linear, the transform and why it cannot fold, unless ``keep_online``:
    then it is returned, for the export's transform config.
    """
    from quantcompose.models import get_adapter

    online = {name: m.transform for name, m in model.named_modules()
              if isinstance(m, QuantLinear) and m.transform is not None}
    if not online:
        return {}, (), {}
    names = {id(m): name for name, m in model.named_modules()}
    adapter = get_adapter(model)
    overrides: dict[str, torch.Tensor] = {}
    kept: dict[str, Transform] = {}
    for layer in adapter.layers():
        prefix = names[id(layer)]
        for place in adapter.places(layer):
            paths = [f"{prefix}.{p}" for p in place.linears]
            transforms = [online.pop(p, None) for p in paths]
            if all(t is None for t in transforms):
                continue
            path, transform = next((p, t) for p, t in zip(paths, transforms) if t is not None)
            scale = _same_scale(transforms)
            if scale is None or place.prev_kind != "norm":
                if not keep_online:
                    raise _unexportable(path, transform, _why_not_foldable(place, transform, scale is not None))
                kept.update((p, t) for p, t in zip(paths, transforms) if t is not None)
                continue
            norm = f"{prefix}.{place.prev}"
            weight = model.get_submodule(norm).weight
            overrides[f"{norm}.weight"] = (weight.detach() * scale.factors.to(weight.device, weight.dtype)).cpu()
    for path, transform in online.items():
        if not keep_online:
            raise _unexportable(path, transform, "it is not at an input place of a decoder layer")
        kept[path] = transform
    return overrides, tuple(sorted(name.removesuffix(".weight") for name in overrides)), kept


# ------------------------------------------------------------------ weights
def _codes(layer: QuantLinear) -> torch.Tensor:
    """The layer's weight codes, unpacked, ``(out, in)``."""
    if layer.packed:
        return unpack_int4(layer.weight_codes, signed=layer.weight_spec.symmetric)
    return layer.weight_codes


def _params_2d(tensor: torch.Tensor, out_features: int) -> torch.Tensor:
    # quantcompose keeps group parameters as (out, groups, 1); the format stores (out, groups)
    return tensor.reshape(out_features, -1)


def compressed_tensors_of(layer: QuantLinear, scheme: Any, compression_format: str) -> dict[str, torch.Tensor]:
    """The tensors (local names) the format stores for ``layer`` under ``scheme``; codes map exactly."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    spec = layer.weight_spec
    offset = 0 if spec.symmetric else 1 << (spec.bits - 1)
    codes = (_codes(layer).to(torch.int16) - offset).to(torch.int8)
    tensors: dict[str, torch.Tensor] = {"weight_scale": _params_2d(layer.weight_scale, layer.out_features)}
    zero = None if spec.symmetric else (_params_2d(layer.weight_zero, layer.out_features) - offset).to(torch.int8)
    if compression_format == "pack-quantized":
        tensors["weight_packed"] = pack_to_int32(codes, spec.bits)
        tensors["weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        if zero is not None:
            tensors["weight_zero_point"] = pack_to_int32(zero, spec.bits, packed_dim=0)
    elif compression_format == "int-quantized":
        tensors["weight"] = codes
        if zero is not None:
            tensors["weight_zero_point"] = zero
    else:
        raise ExportError(f"compressed-tensors chose the {compression_format!r} format for {spec}, which this "
                          "exporter does not write; report it as a bug")
    expected = set(BaseCompressor.get_value_from_registry(compression_format).compression_param_names(scheme))
    if set(tensors) != expected:  # the package's own list of what it stores
        raise ExportError(f"the {compression_format} layout is {sorted(expected)} in this compressed-tensors "
                          f"version but the exporter wrote {sorted(tensors)}; pin compressed-tensors==0.20.*")
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# ------------------------------------------------------------------ config
def _schemes_of(model: nn.Module) -> tuple[dict[LayerScheme, list[str]], list[str]]:
    """``({scheme: quantized linear paths}, float linear paths)``; raises for unsupported settings."""
    from quantcompose.attention_quant import attention_quantizer_of, installed_attention_modules

    for attention in installed_attention_modules(model) or []:
        quantizer = attention_quantizer_of(attention)
        if quantizer is not None:
            raise unsupported_setting(next(n for n, m in model.named_modules() if m is attention),
                               "attention Q/K/V quantization", "Quantize with --qkv-bits 16.")
    groups: dict[LayerScheme, list[str]] = {}
    floats: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            raise unsupported_setting(name, f"a quantized embedding table ({module.spec}, embedding_bits)",
                                      EMBEDDING_HINT)
        if isinstance(module, QuantLinear):
            scheme = layer_scheme(name, module.weight_spec, module.act_spec, module.output_spec)
            if scheme is None:
                floats.append(name)
            else:
                groups.setdefault(scheme, []).append(name)
        elif isinstance(module, nn.Linear):
            floats.append(name)
    if not groups:
        raise ExportError("the model has no quantized linear layers; quantize it first (quantcompose quantize)")
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(head, QuantLinear) and head.weight_spec:
        # transformers would re-tie the head to the float embedding on load, dropping its quantized weight
        raise ExportError("the LM head is quantized but the config ties it to the embedding; untie it before "
                          "quantizing the head (config.tie_word_embeddings = False)")
    return groups, floats


def _ct_schemes(groups: dict[LayerScheme, list[str]]) -> dict[str, tuple[Any, str, list[str]]]:
    """``{group name: (QuantizationScheme, its compression format, linears)}``."""
    import compressed_tensors.quantization as ctq
    from compressed_tensors.compressors.format import infer_module_format

    single = len(groups) == 1
    result = {}
    for index, (scheme, linears) in enumerate(groups.items()):
        act = scheme.activation_args()
        ct_scheme = ctq.QuantizationScheme(
            # one scheme: every Linear not in `ignore`; several: each names its own linears
            targets=["Linear"] if single else linears,
            weights=ctq.QuantizationArgs(**scheme.weight_args()),
            input_activations=None if act is None else ctq.QuantizationArgs(**act),
        )
        compression_format = infer_module_format(nn.Linear, ct_scheme).value
        ct_scheme.format = compression_format if not single else None
        result[f"group_{index}"] = (ct_scheme, compression_format, linears)
    return result


def _write(model: nn.Module, tokenizer: Any, staging: Path, groups, floats, overrides, folded,
           online: list[OnlineGroup]) -> tuple[str, dict]:
    import compressed_tensors.quantization as ctq
    from compressed_tensors.compressors import ModelCompressor

    schemes = _ct_schemes(groups)
    formats = {fmt for _, fmt, _ in schemes.values()}
    compression_format = formats.pop() if len(formats) == 1 else "mixed-precision"
    quantized = {name: (ct, fmt) for ct, fmt, linears in schemes.values() for name in linears}

    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name, (ct_scheme, fmt) in quantized.items():
        for key, tensor in compressed_tensors_of(modules[name], ct_scheme, fmt).items():
            tensors[f"{name}.{key}"] = tensor
    skip = tuple(f"{name}." for name in quantized)
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = next((n for n, m in modules.items() if m is model.get_output_embeddings()), None)
    # One float dtype for the checkpoint, the one the model computes in: the embedding a quantized
    # model holds in its 16-bit storage dtype (quantcompose/storage.py) goes back to it exactly.
    compute = next(m._float_dtype for m in modules.values() if isinstance(m, QuantLinear))
    for key, tensor in model.state_dict().items():
        if key.startswith(skip) or (tied and key == f"{head}.weight"):
            continue
        if isinstance(modules.get(key.rpartition(".")[0]), QuantLinear) and key.endswith(".weight"):
            tensor = modules[key.rpartition(".")[0]].dequantized_weight()  # a float QuantLinear
        tensor = overrides.get(key, tensor)
        if tensor.is_floating_point() and tensor.dtype != compute:
            tensor = tensor.to(compute)
        tensors[key] = tensor.detach().cpu().contiguous().clone()
    tensors.update(transform_tensors(online, compute))
    save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})

    model.config.to_json_file(str(staging / "config.json"))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(staging))
    config = ctq.QuantizationConfig(
        config_groups={name: ct for name, (ct, _, _) in schemes.items()},
        format=compression_format,
        quantization_status=ctq.QuantizationStatus.COMPRESSED,
        ignore=floats,
    )
    transforms = transform_config_of(online) if online else None
    ModelCompressor(quantization_config=config, transform_config=transforms).update_config(str(staging))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    labels = {scheme.label(): len(linears) for scheme, linears in groups.items()}
    from quantcompose import __version__

    (staging / MARKER).write_text(json.dumps({
        "quantcompose_version": __version__, "format": FORMAT, "compression_format": compression_format,
        "schemes": labels,
        "folded_online_scales": list(folded), "float_linears": floats,
        "online_transforms": {g.name: list(g.linears) for g in online},
    }, indent=1))
    return compression_format, labels


def export_compressed_tensors(
    model: nn.Module, tokenizer: Any, directory: str | os.PathLike, *, overwrite: bool = False,
    online_transforms: str = "refuse",
) -> ExportReport:
    """Write ``model`` (quantized by quantcompose) as a compressed-tensors checkpoint in ``directory``.

    Everything is checked before anything is written: an unsupported setting
    raises :class:`UnsupportedExportSettingsError`, an online transform that
    cannot fold raises :class:`UnexportableTransformError`, both naming the
    layer. The folder appears complete or not at all (see
    :mod:`quantcompose.atomic_dir`); ``overwrite`` replaces only a previous
    export (or an empty folder).

    ``online_transforms="transform-config"`` writes each online transform that
    does not fold as a dense matrix in the format's ``transform_config``
    (:mod:`quantcompose.export.transform_config`) instead of refusing it. The
    checkpoint is then exact only for a consumer that applies that config
    (compressed-tensors' ``apply_transform_config``); plain ``transformers``
    ignores it.
    """
    check_online_choice(online_transforms)
    _require_package()
    groups, floats = _schemes_of(model)
    overrides, folded, kept = fold_online_scales(model, keep_online=online_transforms == "transform-config")
    online = group_online(kept)
    target = check_export_target(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}

    def write(staging: Path) -> None:
        written["format"], written["labels"] = _write(
            model, tokenizer, staging, groups, floats, overrides, folded, online)

    write_directory(target, write, marker=MARKER, replace=overwrite)
    return ExportReport(target, written["format"], written["labels"], folded, tuple(floats), directory_size(target),
                        online_transforms=len(online))
