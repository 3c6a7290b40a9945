"""Adapter for Phi-3: Llama-shaped, with fused ``qkv_proj`` and ``gate_up_proj``.

Row order, as transformers' ``Phi3Attention`` and ``Phi3MLP`` split the fused
outputs: ``qkv_proj`` is q (heads·head_dim rows), then k, then v (kv_heads·head_dim
rows each); ``gate_up_proj`` is gate (intermediate rows), then up, and the down
projection reads ``up·act(gate)``.
"""

from __future__ import annotations

from quantcompose.models.adapter import OutputSlice
from quantcompose.models.decoder import PreNormDecoderAdapter

QKV = "self_attn.qkv_proj"
GATE_UP = "mlp.gate_up_proj"


class Phi3Adapter(PreNormDecoderAdapter):
    """Phi-3 (``model_type`` ``"phi3"``)."""

    model_types = ("phi3",)

    def projections(self) -> dict[str, OutputSlice]:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        hidden = self.intermediate_size
        return {
            "q": OutputSlice(QKV, (0, q)),
            "k": OutputSlice(QKV, (q, q + kv)),
            "v": OutputSlice(QKV, (q + kv, q + 2 * kv)),
            "gate": OutputSlice(GATE_UP, (0, hidden)),
            "up": OutputSlice(GATE_UP, (hidden, 2 * hidden)),
        }
