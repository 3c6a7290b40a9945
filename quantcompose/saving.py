"""Save and load a quantized model: safetensors for tensors, JSON for the rest.

A saved model is a directory::

    quantcompose.json        format version, model config, per-layer specs and transforms
    model.safetensors        every parameter and buffer (packed int4 weight codes included)
    transforms.safetensors   the tensors of the online transforms
    tokenizer files          when a tokenizer was given

Everything is written into a temporary directory beside the target and
renamed into place at the end, so a save that fails midway leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from quantcompose.errors import ModelLoadError
from quantcompose.models import set_submodule
from quantcompose.qlinear import QuantLinear
from quantcompose.quant import QuantSpec
from quantcompose.transforms import flatten_state, from_state_dict, unflatten_state

FORMAT_VERSION = 1
CONFIG_NAME = "quantcompose.json"
WEIGHTS_NAME = "model.safetensors"
TRANSFORMS_NAME = "transforms.safetensors"


def _spec(spec: QuantSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.to_dict()


def _unspec(data: dict[str, Any] | None) -> QuantSpec | None:
    return None if data is None else QuantSpec.from_dict(data)


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> int:
    """Write ``model`` (with its :class:`QuantLinear` layers) to the directory ``path``.

    Returns the size on disk in bytes. Refuses to replace an existing
    directory unless ``overwrite`` is set.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another path or pass overwrite=True (--overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    layers: dict[str, Any] = {}
    transform_tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        transform = None
        if module.transform is not None:
            transform, tensors = flatten_state(module.transform.state_dict(), prefix=f"{name}.")
            transform_tensors.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        layers[name] = {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "act_spec": _spec(module.act_spec),
            "weight_spec": _spec(module.weight_spec),
            "output_spec": _spec(module.output_spec),
            "transform": transform,
        }
    attention, attention_tensors = attention_state(model)
    transform_tensors.update(attention_tensors)
    config = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_config": model.config.to_dict(),
        "quantized_layers": layers,
        "attention": attention,
        "metadata": metadata or {},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model(model, str(staging / WEIGHTS_NAME))
        save_file(transform_tensors, str(staging / TRANSFORMS_NAME))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory_size(target)


def attention_state(model: nn.Module) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """The Q/K/V quantizers of each layer's attention, as JSON config and tensors (None: not installed)."""
    from quantcompose.attention_quant import attention_quantizer_of, installed_attention_modules

    modules = installed_attention_modules(model)
    if modules is None:
        return None, {}
    config: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        quantizer = attention_quantizer_of(module)
        if quantizer is None:
            continue
        state, flat = flatten_state(quantizer.to_dict(), prefix=f"attention.{index}.")
        config[str(index)] = state
        tensors.update({k: v.detach().cpu().contiguous() for k, v in flat.items()})
    return {"layers": config}, tensors


def restore_attention(model: nn.Module, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> None:
    """Install the saved Q/K/V quantizers (see :func:`attention_state`)."""
    if config is None:
        return
    from quantcompose.attention_quant import AttentionQuantizer, install_attention_quantization

    quantizers = {
        int(index): AttentionQuantizer.from_dict(unflatten_state(state, tensors))
        for index, state in config["layers"].items()
    }
    install_attention_quantization(model, quantizers)


def directory_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load a model saved by :func:`save_quantized`; returns ``(model, tokenizer or None)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(path)
    config_file = source / CONFIG_NAME
    if not config_file.is_file():
        raise ModelLoadError(
            f"{source} is not a saved quantcompose model (no {CONFIG_NAME}); "
            "save one with `quantcompose quantize ... --save DIR`."
        )
    config = json.loads(config_file.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{source} has format version {config.get('format_version')}; this quantcompose reads {FORMAT_VERSION}"
        )
    model_config = dict(config["model_config"])
    hf_config = AutoConfig.for_model(model_config.pop("model_type"), **model_config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    transform_tensors = load_file(str(source / TRANSFORMS_NAME))
    for name, layer in config["quantized_layers"].items():
        transform = None
        if layer["transform"] is not None:
            transform = from_state_dict(unflatten_state(layer["transform"], transform_tensors))
        placeholder = torch.zeros(layer["out_features"], layer["in_features"])
        module = QuantLinear(
            placeholder,
            torch.zeros(layer["out_features"]) if layer["bias"] else None,
            transform=transform,
            act_spec=_unspec(layer["act_spec"]),
            weight_spec=_unspec(layer["weight_spec"]),
            output_spec=_unspec(layer["output_spec"]),
        )
        set_submodule(model, name, module)
    load_model(model, str(source / WEIGHTS_NAME), strict=True)
    restore_attention(model, config.get("attention"), transform_tensors)
    model.eval().to(device)
    tokenizer = None
    if (source / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model, tokenizer
