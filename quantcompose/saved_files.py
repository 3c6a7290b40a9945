"""Which file of a saved model holds which tensor, and each file's size and sha256, read in chunks.

Format 3 (:mod:`quantcompose.saving`) stores the tensors in shards, as the
Hugging Face hub does (``model-00001-of-00031.safetensors``, ...): one per
decoder layer, holding the layer's parameters and buffers and its online
transforms, and a last one for everything outside the layers (embedding,
final norm, LM head, the attention quantizers). The manifest's ``weight_files``
section maps every tensor to its file; inside a file a transform tensor's
name carries the prefix :data:`TRANSFORM_KEY`, which no module name holds.
Format 2 kept every parameter in ``model.safetensors`` and every transform in
``transforms.safetensors``; :func:`weight_files_of` gives its map too, so both
load through one path.

Files are hashed in chunks, so neither writing nor checking holds a whole
file's bytes beside the tensors they came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: The manifest section mapping ``{"tensors": {name: file}, "transform_tensors": {name: file}}`` (format 3).
WEIGHT_FILES_SECTION = "weight_files"
#: Prefix of a transform tensor's name inside a shard (model tensor names are dotted module paths).
TRANSFORM_KEY = "transforms/"
#: Format 2's two tensor files.
V2_WEIGHTS_NAME = "model.safetensors"
V2_TRANSFORMS_NAME = "transforms.safetensors"
_CHUNK = 8 * 2**20


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (from 0) of ``count``, numbered from 1 as the hub does."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def is_shard_name(name: str) -> bool:
    """Whether ``name`` looks like a file :func:`shard_name` gives."""
    parts = name.removesuffix(".safetensors").split("-")
    return (name.endswith(".safetensors") and len(parts) == 4 and parts[0] == "model" and parts[2] == "of"
            and parts[1].isdigit() and parts[3].isdigit())


def file_record(path: Path) -> dict[str, Any]:
    """``{"sha256": ..., "size": ...}`` of the file at ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def weight_files_of(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The manifest's map of tensors to files; format 2's fixed two files when it has none."""
    recorded = manifest.get(WEIGHT_FILES_SECTION)
    if recorded is not None:
        return recorded
    return {"tensors": dict.fromkeys(manifest["tensors"], V2_WEIGHTS_NAME),
            "transform_tensors": dict.fromkeys(manifest["transform_tensors"], V2_TRANSFORMS_NAME)}


def tensor_files(manifest: dict[str, Any]) -> list[str]:
    """Every file that holds tensors, in the order the manifest maps them (format 2: both, even if empty)."""
    weight_files = weight_files_of(manifest)
    if WEIGHT_FILES_SECTION not in manifest:
        return [V2_WEIGHTS_NAME, V2_TRANSFORMS_NAME]
    return list(dict.fromkeys([*weight_files["tensors"].values(), *weight_files["transform_tensors"].values()]))


def file_of(manifest: dict[str, Any], section: str, name: str) -> str:
    """The file holding tensor ``name`` of ``section`` (``tensors`` or ``transform_tensors``)."""
    default = V2_WEIGHTS_NAME if section == "tensors" else V2_TRANSFORMS_NAME
    return weight_files_of(manifest)[section].get(name, default)


def transform_file(manifest: dict[str, Any], key: str) -> str:
    """The file holding the tensors of transform ``key`` (the first one's, they are written together).

    Format 2's transforms file where the manifest lists no transform tensors (a work folder's layer).
    """
    if "transform_tensors" not in manifest:
        return V2_TRANSFORMS_NAME
    names = weight_files_of(manifest)["transform_tensors"]
    return next((file for name, file in names.items() if name.startswith(f"{key}.")), V2_TRANSFORMS_NAME)


__all__ = ["TRANSFORM_KEY", "WEIGHT_FILES_SECTION", "file_of", "file_record", "is_shard_name", "shard_name",
           "tensor_files", "transform_file", "weight_files_of"]
