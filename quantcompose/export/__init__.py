"""Export a quantized model to formats that serving runtimes read (compressed-tensors).

Names load on first use, so that the CLI's parser (which imports
:mod:`quantcompose.export.cli`) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportReport", "export_compressed_tensors", "is_export", "load_with_transform_config"]


def __getattr__(name: str) -> Any:
    if name == "load_with_transform_config":
        from quantcompose.export import transform_config

        return transform_config.load_with_transform_config
    if name in __all__:
        from quantcompose.export import compressed_tensors

        return getattr(compressed_tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
