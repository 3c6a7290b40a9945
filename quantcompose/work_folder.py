"""The work folder of an offloaded quantization: finished layers on disk, so an interrupted run can resume.

Beside the output ``DIR`` lies ``.DIR.qc-offload/``::

    state.json            {"arguments": sha256 of the run's arguments, "layers_done": k, "num_layers": n}
    layer-0000.safetensors  layer 0 quantized: its state dict, its transforms, the RNG state after it,
                            its report lines (JSON in the file's metadata)
    ...

Each file is written under a temporary name, flushed and renamed into
place, and ``state.json`` is rewritten only after the layer's file is
complete, so a kill at any moment leaves a state naming only layers whose
files are whole. Restarting with the same arguments (the same hash)
continues after the last finished layer; other arguments are refused
(:class:`~quantcompose.errors.OffloadError`) unless the run is asked to
start afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantcompose.errors import OffloadError
from quantcompose.saving import build_transforms, describe_quantized, rebuild_quantized

STATE_NAME = "state.json"
WORK_TAG = ".qc-offload"
_STATE_PREFIX = "state."
_TRANSFORM_PREFIX = "transform."
_GENERATOR = "generator_state"


def work_folder_for(output: Path) -> Path:
    """The work folder that belongs to the output directory ``output``."""
    return output.parent / f".{output.name}{WORK_TAG}"


def _write_atomically(path: Path, write: Any) -> None:
    """``write(temporary path)``, then flush it and rename it to ``path`` (a reader sees all or nothing)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


class WorkFolder:
    """Finished layers of one offloaded run, keyed by the hash of its arguments."""

    def __init__(self, path: Path, arguments: str, num_layers: int) -> None:
        self.path = path
        self.arguments = arguments
        self.num_layers = num_layers

    def open(self, restart: bool) -> int:
        """Create the folder or take up the run it holds; returns how many layers are already done.

        With ``restart`` a folder left by other arguments is emptied; without, it is an error.
        """
        state_file = self.path / STATE_NAME
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
                done, arguments = int(state["layers_done"]), state["arguments"]
            except (ValueError, KeyError, TypeError) as exc:
                raise OffloadError(f"{state_file} is damaged ({exc}); delete {self.path} to start afresh") from None
            if arguments == self.arguments and state.get("num_layers") == self.num_layers:
                return done
            if not restart:
                raise OffloadError(
                    f"{self.path} holds an interrupted offloaded quantization ({done} layers done) with other "
                    "arguments (model, recipe, calibration or device); rerun with the same arguments to resume it, "
                    "or pass restart=True (--restart) to discard it and start afresh"
                )
        self.remove()
        self.path.mkdir(parents=True)
        self._write_state(0)
        return 0

    def _write_state(self, done: int) -> None:
        state = {"arguments": self.arguments, "layers_done": done, "num_layers": self.num_layers}
        _write_atomically(self.path / STATE_NAME, lambda p: p.write_text(json.dumps(state), encoding="utf-8"))

    def _layer_file(self, index: int) -> Path:
        return self.path / f"layer-{index:04d}.safetensors"

    def save_layer(self, index: int, layer: nn.Module, generator: torch.Generator, report: list[dict[str, Any]]) -> None:
        """Write quantized layer ``index`` and the RNG state after it, then mark it done."""
        layers, transforms, transform_tensors = describe_quantized(layer)
        tensors = {_STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        tensors.update({_TRANSFORM_PREFIX + k: v for k, v in transform_tensors.items()})
        tensors[_GENERATOR] = generator.get_state()
        metadata = {"layers": json.dumps(layers), "transforms": json.dumps(transforms),
                    "report": json.dumps(report, default=str)}
        _write_atomically(self._layer_file(index), lambda p: save_file(tensors, str(p), metadata=metadata))
        self._write_state(index + 1)

    def load_layer(
        self, index: int, layer: nn.Module, generator: torch.Generator | None = None
    ) -> list[dict[str, Any]]:
        """Fill the skeleton ``layer`` with finished layer ``index`` (on the CPU); returns its report lines.

        ``generator`` (when given) is set to the state the run's generator had after that layer.
        """
        from safetensors import safe_open

        file = self._layer_file(index)
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(file))
        transform_tensors = {k[len(_TRANSFORM_PREFIX):]: v for k, v in tensors.items() if k.startswith(_TRANSFORM_PREFIX)}
        manifest = {"transforms": json.loads(metadata["transforms"]), "quantized_layers": json.loads(metadata["layers"])}
        transforms = build_transforms(file, manifest, transform_tensors)
        rebuild_quantized(file, layer, manifest["quantized_layers"], transforms)
        state = {k[len(_STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_STATE_PREFIX)}
        layer.load_state_dict(state, strict=True, assign=True)
        if generator is not None:
            generator.set_state(tensors[_GENERATOR])
        return json.loads(metadata["report"])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["STATE_NAME", "WorkFolder", "work_folder_for"]
