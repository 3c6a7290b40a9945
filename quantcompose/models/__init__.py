"""Architecture adapters and model loading."""

from __future__ import annotations

from quantcompose.models.adapter import (
    InputPlace,
    ModelAdapter,
    OutputSlice,
    PrevKind,
    ResidualReader,
    RowRange,
    get_submodule,
    set_submodule,
)
from quantcompose.models.decoder import PreNormDecoderAdapter
from quantcompose.models.llama import LlamaAdapter
from quantcompose.models.phi3 import Phi3Adapter
from quantcompose.models.registry import (
    BUILTIN_ADAPTERS,
    ENTRY_POINT_GROUP,
    AdapterRegistrationError,
    AdapterRegistry,
    adapter_registry,
    check_supported,
    get_adapter,
    register_adapter,
    supported_model_types,
    unregister_adapter,
)

__all__ = [
    "BUILTIN_ADAPTERS",
    "ENTRY_POINT_GROUP",
    "AdapterRegistrationError",
    "AdapterRegistry",
    "InputPlace",
    "LlamaAdapter",
    "ModelAdapter",
    "OutputSlice",
    "Phi3Adapter",
    "PreNormDecoderAdapter",
    "PrevKind",
    "ResidualReader",
    "RowRange",
    "adapter_registry",
    "check_supported",
    "get_adapter",
    "get_submodule",
    "register_adapter",
    "set_submodule",
    "supported_model_types",
    "unregister_adapter",
]
