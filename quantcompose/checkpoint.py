"""A hub-style safetensors checkpoint read lazily, tensor by tensor.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` (or
shards named by ``model.safetensors.index.json``), as ``save_pretrained``
writes it. :class:`Checkpoint` builds the model's skeleton on the ``meta``
device (no memory for weights) and reads only the tensors asked for, so that
one decoder layer at a time can be brought into memory
(:mod:`quantcompose.offload`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from quantcompose.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, by name, read on demand."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        if not (self.folder / "config.json").is_file():
            raise ModelLoadError(
                f"{self.folder} is not a safetensors checkpoint (no config.json); offloaded quantization reads a "
                "folder written by save_pretrained (config.json + model.safetensors): save the model so first"
            )
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: not a safetensors index ({exc}); write the checkpoint again") from None
            return {name: self.folder / file for name, file in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            raise ModelLoadError(
                f"{self.folder} holds no {SINGLE_FILE} (nor {INDEX_FILE}); offloaded quantization reads "
                "safetensors weights: save the model with save_pretrained(..., safe_serialization=True)"
            )
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}

    def config(self) -> Any:
        """The model's ``transformers`` config."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.folder))

    def skeleton(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with every parameter on the ``meta`` device (buffers such as RoPE's are real)."""
        try:
            from accelerate import init_empty_weights
        except ImportError:
            raise ModelLoadError(
                "offloaded quantization needs the accelerate package: pip install 'quantcompose[offload]'"
            ) from None
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(self.config(), dtype=dtype)
        model.name_or_path = str(self.folder)
        return model.eval()

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (and only those) from disk, cast to ``dtype`` when given."""
        from safetensors import safe_open

        wanted = list(names)
        missing = [n for n in wanted if n not in self.files]
        if missing:
            raise ModelLoadError(
                f"{self.folder}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing); "
                "it does not match its config.json: write it again with save_pretrained"
            )
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in group:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        return tensors

    def fingerprint(self) -> str:
        """sha256 of the config and of each weight file's name, size and modification time.

        Cheap (no weight is read) and changes whenever the checkpoint is written again.
        """
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for file in sorted(set(self.files.values())):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


def write_checkpoint(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` as a safetensors checkpoint folder that :class:`Checkpoint` reads; returns the folder.

    ``save_pretrained`` does the same for most models, but refuses one loaded
    from GGUF (the built-in SmolLM2): its config still names the GGUF
    quantization its weights were de-quantized from. Tied tensors are
    written once, as ``save_pretrained`` writes them.
    """
    import copy

    from safetensors.torch import save_file

    target = Path(folder).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are plain floats
    config.save_pretrained(str(target))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(target / SINGLE_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    return target


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str) -> None:
    """Replace ``module``'s parameters and buffers named in ``tensors`` (meta or not) by them, on ``device``."""
    state = {name: tensor.to(device) for name, tensor in tensors.items()}
    module.load_state_dict(state, strict=False, assign=True)


__all__ = ["Checkpoint", "INDEX_FILE", "SINGLE_FILE", "load_into", "write_checkpoint"]
