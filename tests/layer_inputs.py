"""What one decoder layer of a float model receives and returns, for tests of the layer scope."""

from __future__ import annotations

from typing import Any

import torch

from quantcompose.models import get_adapter
from quantcompose.pipeline import capture_first_layer_inputs


def layer_output(result: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's result (transformers returns a tensor or a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


def float_layer_inputs(model, tokens: torch.Tensor, index: int, batch_size: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """The (hidden, kwargs) batches layer ``index`` sees: ``tokens`` run through the float layers before it.

    Read-only use of ``model`` (no grad, nothing changed), so a shared session model may be passed.
    """
    layers = get_adapter(model).layers()
    with torch.no_grad():
        inputs = capture_first_layer_inputs(model, layers, tokens, batch_size=batch_size)
        for layer in layers[:index]:
            inputs = [(layer_output(layer(h, **kw)), kw) for h, kw in inputs]
    return inputs
