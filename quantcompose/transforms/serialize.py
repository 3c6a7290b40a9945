"""Rebuilding transforms from state dicts, and splitting state into JSON + tensors.

``flatten_state`` / ``unflatten_state`` let a plan be saved as a JSON config
next to a safetensors file::

    config, tensors = flatten_state(t.state_dict())
    safetensors.torch.save_file(tensors, "t.safetensors"); json.dump(config, f)
    t2 = from_state_dict(unflatten_state(config, load_file("t.safetensors")))
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from quantcompose.errors import TransformError
from quantcompose.transforms.base import TRANSFORM_REGISTRY, Transform

#: Key marking a tensor reference in a flattened config: ``{"__tensor__": "<key>"}``.
TENSOR_REF = "__tensor__"


def from_state_dict(state: dict[str, Any]) -> Transform:
    """The transform that produced ``state`` (``Transform.state_dict()`` output)."""
    if not isinstance(state, dict) or "type" not in state:
        raise TransformError(f"A transform state must be a dict with a 'type' entry, got {type(state).__name__}.")
    # Importing the package registers every atom, even if the caller imported only this module.
    import quantcompose.transforms  # noqa: F401

    cls = TRANSFORM_REGISTRY.get(state["type"])
    if cls is None:
        known = ", ".join(sorted(TRANSFORM_REGISTRY))
        raise TransformError(f"Unknown transform type {state['type']!r}; known types: {known}.")
    return cls._from_state(state)


def state_tensors(node: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) transform state dict, in order."""
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from state_tensors(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from state_tensors(value)


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(config, tensors)``: ``state`` with each tensor replaced by ``{"__tensor__": key}``.

    Keys are dotted paths (``prefix + "transforms.0.factors"``). A tensor object
    that occurs several times (a shared rotation block) is stored once. Tensors
    are copied contiguous with their own storage (as safetensors requires); values are bitwise unchanged.
    """
    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = by_id.get(id(node))
            if key is None:
                key = path
                if key in tensors:
                    raise TransformError(f"flatten_state: duplicate tensor key {key!r}.")
                # A contiguous copy with its own storage: safetensors refuses views that share memory.
                tensors[key] = node.detach().clone(memory_format=torch.contiguous_format)
                by_id[id(node)] = key
            return {TENSOR_REF: key}
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if not isinstance(k, str):
                    raise TransformError(f"flatten_state: keys must be strings, got {k!r} at {path!r}.")
                out[k] = walk(v, f"{path}.{k}" if path else k)
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TransformError(f"flatten_state: cannot store a {type(node).__name__} at {path!r}.")

    return walk(state, prefix.rstrip(".")), tensors


def unflatten_state(config: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten_state`: put the tensors back in place of their references."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {TENSOR_REF}:
                key = node[TENSOR_REF]
                if key not in tensors:
                    raise TransformError(f"unflatten_state: tensor {key!r} is missing from the tensor file.")
                return tensors[key]
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(config)
