"""Adapter for decoders with separate q, k, v, gate and up projections: Llama (and SmolLM2), Mistral, Qwen2.

Qwen2's q, k and v projections carry biases; folding a scale into v's rows
scales its bias with them, so the same places and rules hold.
"""

from __future__ import annotations

from quantcompose.models.adapter import OutputSlice
from quantcompose.models.decoder import PreNormDecoderAdapter

_SEPARATE = {
    "q": OutputSlice("self_attn.q_proj", None),
    "k": OutputSlice("self_attn.k_proj", None),
    "v": OutputSlice("self_attn.v_proj", None),
    "gate": OutputSlice("mlp.gate_proj", None),
    "up": OutputSlice("mlp.up_proj", None),
}


class LlamaAdapter(PreNormDecoderAdapter):
    """Llama-shaped decoders, each projection its own linear."""

    model_types = ("llama", "mistral", "qwen2")

    def projections(self) -> dict[str, OutputSlice]:
        return dict(_SEPARATE)
