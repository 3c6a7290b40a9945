"""The shape Llama, Mistral, Qwen2 and Phi-3 share: pre-norm attention and a gated MLP.

Each layer computes ``h = x + o_proj(attn(q, k, v))`` with q, k, v read from
``input_layernorm(x)``, then ``h + down_proj(act(gate)·up)`` with gate, up read
from ``post_attention_layernorm(h)``. The architectures differ only in which
linear produces each of q, k, v, gate and up (separate projections, or rows
of a fused one); a subclass states that in ``projections()`` and everything
else follows from it.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import nn

from quantcompose.models.adapter import InputPlace, ModelAdapter, OutputSlice, ResidualReader

ATTENTION = "self_attn"
ATTENTION_NORM = "input_layernorm"
MLP_NORM = "post_attention_layernorm"
ATTENTION_OUT = "self_attn.o_proj"
MLP_OUT = "mlp.down_proj"


class PreNormDecoderAdapter(ModelAdapter):
    """Places and what absorbs a transform before them:

    * ``attn_in`` (the q, k, v projections) after ``input_layernorm``: a
      diagonal scale, into the norm's weight.
    * ``attn_out`` (``o_proj``) after attention, whose values come from the v
      projection: a diagonal scale folds into v's rows when every query head
      has its own value head; with grouped-query attention one value head
      serves several query heads, so only a scale that repeats across the
      query heads of each group folds (``"shared_diagonal"``); any other
      transform there runs online.
    * ``mlp_in`` (the gate and up projections) after
      ``post_attention_layernorm``: a diagonal scale, into the norm's weight.
    * ``mlp_down`` (``down_proj``) after ``act(gate)·up``: a diagonal scale
      folds into up's rows; the element-wise product stops anything more.
    """

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @abstractmethod
    def projections(self) -> dict[str, OutputSlice]:
        """Which linear (and which rows of it) produces each of ``q, k, v, gate, up``."""

    def _readers(self, names: str) -> tuple[str, ...]:
        # a fused projection serves several names but is one linear
        return tuple(dict.fromkeys(self.projections()[n].linear for n in names))

    def places(self, layer: nn.Module) -> list[InputPlace]:
        value, up = self.projections()["v"], self.projections()["up"]
        own_value_heads = self.num_kv_heads == self.num_heads
        return [
            InputPlace("attn_in", self._readers("qkv"), ATTENTION_NORM, "norm", "diagonal", "attention"),
            InputPlace(
                "attn_out",
                (ATTENTION_OUT,),
                value.linear,
                "linear",
                "diagonal" if own_value_heads else "shared_diagonal",
                "attention",
                value.rows,
                None if own_value_heads else (self.num_heads // self.num_kv_heads, self.head_dim),
            ),
            InputPlace("mlp_in", self._readers(("gate", "up")), MLP_NORM, "norm", "diagonal", "mlp"),
            InputPlace("mlp_down", (MLP_OUT,), up.linear, "linear", "diagonal", "mlp", up.rows),
        ]

    def residual_readers(self, layer: nn.Module) -> tuple[ResidualReader, ...]:
        return (
            ResidualReader(ATTENTION_NORM, self._readers("qkv")),
            ResidualReader(MLP_NORM, self._readers(("gate", "up"))),
        )

    def residual_writers(self, layer: nn.Module) -> tuple[str, ...]:
        return (ATTENTION_OUT, MLP_OUT)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(ATTENTION)

    def kv_outputs(self, layer: nn.Module) -> dict[str, OutputSlice]:
        projections = self.projections()
        return {"k": projections["k"], "v": projections["v"]}
