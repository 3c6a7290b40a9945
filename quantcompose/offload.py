"""Quantize a model larger than memory: one decoder layer in memory at a time, resumable.

:func:`quantize_offloaded` reads a safetensors checkpoint folder lazily. The
model's skeleton lives on the ``meta`` device; only the embedding, the final
norm and the LM head are loaded whole (calibration needs them before the
first layer and after the last). Then, for each decoder layer, its tensors
alone are read onto the working device, the layer is quantized by the very
code of the in-memory pipeline (:func:`quantcompose.pipeline.quantize_layer_step`),
run to give the next layer's calibration inputs, written to the work folder
(:mod:`quantcompose.work_folder`) and moved off the working device. The
result is the ordinary saved-model format that
:func:`~quantcompose.saving.load_quantized` reads, written shard by shard:
each finished layer is read back from the work folder, written and freed
before the next, so the save never holds more than one layer either.

Strategies with a model-scope plan (QuaRot's residual rotation, fused norms,
``residual_rotation``) rewrite every layer at once before calibration and
are refused here with :class:`~quantcompose.errors.OffloadError`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcompose import __version__, pipeline
from quantcompose.api import RECIPE_ATTRIBUTE, QuantizeReport, tokens_digest, prepare_quantization
from quantcompose.attention_quant import set_attention_quantizer
from quantcompose.checkpoint import Checkpoint, load_into
from quantcompose.errors import ModelLoadError, OffloadError
from quantcompose.model_scope import model_facts
from quantcompose.models import get_adapter
from quantcompose.qlinear import QuantLinear
from quantcompose.saving import check_save_target, save_quantized
from quantcompose.work_folder import WorkFolder, work_folder_for

#: Called with a layer's index once that layer is quantized and written (tests interrupt a run with it).
LayerCallback = Callable[[int], None]


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _meta_names(module: nn.Module) -> list[str]:
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _release(layer: nn.Module) -> None:
    """Free a finished layer (back to meta), keeping its modules and what hangs on them (attention quantizers).

    A freshly quantized layer still holds what folding needed (the float64 inverses cached on its
    transforms, often more than its codes); the work folder's file holds what runs, read back to save.
    """
    for module in layer.modules():
        if isinstance(module, QuantLinear):
            module.transform = None  # a transform cannot be built on meta, and is read back with the layer
    layer.to("meta")
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand memory freed by the layer's work back to the system (glibc keeps it in per-thread arenas).

    Without it the resident size creeps up layer after layer though no tensor outlives its layer.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _read_back(work: WorkFolder) -> Callable[[int, nn.Module], Any]:
    """The save's ``layer_source``: finished layer ``index`` from the work folder, freed once written."""

    @contextmanager
    def materialized(index: int, layer: nn.Module) -> Iterator[None]:
        work.load_layer(index, layer)
        try:
            yield
        finally:
            _release(layer)

    return materialized


def _refuse_model_plan(run_parts: tuple[Any, Any, dict[str, Any]], settings: Any) -> None:
    adapter, strategy, options = run_parts
    if pipeline.model_plan_for(strategy, model_facts(adapter), options, settings) is not None:
        raise OffloadError(
            f"strategy {strategy.name!r} (or residual_rotation) rewrites the whole model before calibration "
            "(fused norms, a residual-stream rotation), which offloaded quantization does not support yet; "
            "quantize in memory, or choose a strategy without a model-scope plan (duquant, smoothquant, "
            "quarot-online, rtn, omniquant) and no residual_rotation"
        )


def _arguments_hash(checkpoint: Checkpoint, recipe: Any, tokens: torch.Tensor, device: torch.device,
                    dtype: torch.dtype, batch_size: int) -> str:
    """What makes two runs the same run: a resumed one must continue exactly where the other stopped."""
    arguments = {
        "version": __version__,
        "source": checkpoint.fingerprint(),
        "recipe": recipe.to_dict(),
        "tokens": tokens_digest(tokens),
        "device": str(device),
        "dtype": str(dtype),
        "batch_size": batch_size,
    }
    return hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()


def _load_outside_layers(checkpoint: Checkpoint, model: nn.Module, prefix: str, dtype: torch.dtype,
                         device: torch.device) -> None:
    """The embedding, final norm and LM head (everything but the decoder layers) onto ``device``."""
    names = [name for name in checkpoint.files if not name.startswith(prefix)]
    load_into(model, checkpoint.read(names, dtype), device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name in _meta_names(model) if not name.startswith(prefix)]
    if missing:
        raise ModelLoadError(
            f"{checkpoint.folder}: the checkpoint has no tensor {missing[0]!r}; it does not match its "
            "config.json: write it again with save_pretrained"
        )


def quantize_offloaded(
    source: str | os.PathLike,
    output: str | os.PathLike,
    recipe: Any = None,
    calibration: Any = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
    manager: Any = None,
    batch_size: int = 4,
    after_layer: LayerCallback | None = None,
    **overrides: Any,
) -> QuantizeReport:
    """Quantize the checkpoint folder ``source`` layer by layer and save the result to ``output``.

    ``source`` holds ``config.json`` and ``model.safetensors`` (or an index
    and shards), as ``save_pretrained`` writes them. ``recipe``,
    ``calibration`` and ``overrides`` mean what they mean for
    :func:`quantcompose.quantize`; the result equals what
    :func:`quantcompose.quantize` gives on the whole model in memory with the
    same arguments. Only one decoder layer's weights and the calibration
    activations are on ``device`` at a time; finished layers wait in the work
    folder and are read back one at a time (as
    :func:`~quantcompose.saving.load_quantized` would build them) to be
    written to their shards of the saved model.

    Finished layers are written to a work folder beside ``output``
    (``.NAME.qc-offload``): a run restarted with the same arguments after
    an interruption continues after the last finished layer, and the folder
    is removed once the model is saved. A work folder left by other
    arguments raises :class:`~quantcompose.errors.OffloadError` unless
    ``restart`` discards it.
    """
    from quantcompose.plugin_manager import get_plugin_manager

    checkpoint = Checkpoint(source)
    target = check_save_target(output, overwrite)
    device = torch.device(device)
    manager = manager or get_plugin_manager()
    model = checkpoint.skeleton(dtype)
    prepared = prepare_quantization(model, tokenizer, recipe, calibration, manager=manager, **overrides)
    recipe, settings, tokens = prepared.recipe, prepared.recipe.settings(), prepared.calib_tokens
    _refuse_model_plan(pipeline.prepare(model, recipe.method, settings, dict(recipe.options), manager), settings)

    layers = get_adapter(model).layers()
    prefix = _module_name(model, layers) + "."
    _load_outside_layers(checkpoint, model, prefix, dtype, device)
    work = WorkFolder(work_folder_for(target), _arguments_hash(checkpoint, recipe, tokens, device, dtype, batch_size),
                      len(layers))
    done = work.open(restart)

    torch.manual_seed(recipe.seed)  # as quantcompose.quantize does, so both paths draw the same numbers
    run = pipeline.start_run(model, tokens, recipe.method, settings, dict(recipe.options), manager=manager,
                             progress=progress, targets=prepared.targets)
    with torch.no_grad():
        inputs = pipeline.capture_first_layer_inputs(model, layers, tokens, batch_size)
        for index in tqdm(range(len(layers)), desc=f"{recipe.method} layers (offloaded)", disable=not progress):
            layer = layers[index]
            if index < done:
                # Finished before an interruption: read back, and only run to rebuild the next layer's inputs.
                run.report.places += work.load_layer(index, layer, run.generator)
                layer.to(device)
                if run.attention_quantizers[index] is not None:
                    set_attention_quantizer(run.adapter.attention(layer), run.attention_quantizers[index])
                inputs = pipeline.run_layer(layer, inputs)
            else:
                names = list(layer.state_dict())
                tensors = checkpoint.read([f"{prefix}{index}.{name}" for name in names], dtype)
                load_into(layer, {name: tensors[f"{prefix}{index}.{name}"] for name in names}, device)
                del tensors
                first = len(run.report.places)
                inputs = pipeline.quantize_layer_step(run, index, layer, inputs)
                work.save_layer(index, layer, run.generator, run.report.places[first:])
                if after_layer is not None:
                    after_layer(index)
            _release(layer)
        pipeline.finish_run(run, inputs)
        del inputs
    # The layers wait on meta; the save copies every tensor to the CPU as it writes it.
    setattr(model, RECIPE_ATTRIBUTE, recipe)
    save_quantized(model, target, tokenizer=tokenizer, overwrite=overwrite, recipe=recipe,
                   layer_source=_read_back(work))
    work.remove()
    return QuantizeReport(recipe, run.report)


__all__ = ["LayerCallback", "quantize_offloaded"]
