"""Architecture adapters and model loading."""

from __future__ import annotations

from torch import nn

from quantcompose.errors import UnsupportedArchitectureError
from quantcompose.models.adapter import InputPlace, ModelAdapter, get_submodule, set_submodule
from quantcompose.models.llama import LlamaAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter,)


def supported_model_types() -> list[str]:
    return sorted({t for adapter in ADAPTERS for t in adapter.model_types})


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s architecture, or a clear error naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise UnsupportedArchitectureError(
        f"no adapter for architecture {model_type!r} ({type(model).__name__}); "
        f"supported model types: {supported_model_types()}. "
        "Add one in quantcompose/models/ by listing the decoder layer's input places."
    )


__all__ = [
    "ADAPTERS",
    "InputPlace",
    "ModelAdapter",
    "LlamaAdapter",
    "get_adapter",
    "get_submodule",
    "set_submodule",
    "supported_model_types",
]
