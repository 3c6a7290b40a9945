"""Adapter for the Llama family in transformers (Llama, Mistral, Qwen2, SmolLM2)."""

from __future__ import annotations

from torch import nn

from quantcompose.models.adapter import InputPlace, ModelAdapter, OutputSlice, ResidualReader


class LlamaAdapter(ModelAdapter):
    """Llama-shaped decoders: pre-norm attention and a gated MLP.

    Places and what absorbs a transform before them:

    * ``attn_in`` (q, k, v) after ``input_layernorm``: a diagonal scale.
    * ``attn_out`` (o) after attention, whose values come from ``v_proj``: a
      diagonal scale folds into ``v_proj``'s output only when every query head
      has its own value head; with grouped-query attention one value head
      serves several query heads with different scales, so the transform runs
      online instead.
    * ``mlp_in`` (gate, up) after ``post_attention_layernorm``: a diagonal scale.
    * ``mlp_down`` (down) after ``act(gate)·up``: a diagonal scale folds into
      ``up_proj``'s output; the element-wise product stops anything more.
    """

    model_types = ("llama", "mistral", "qwen2", "smollm2")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def places(self, layer: nn.Module) -> list[InputPlace]:
        config = self.model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        attn_out_absorbs = "diagonal" if kv_heads == heads else "none"
        return [
            InputPlace(
                "attn_in",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "input_layernorm",
                "norm",
                "diagonal",
                "attention",
            ),
            InputPlace(
                "attn_out",
                ("self_attn.o_proj",),
                "self_attn.v_proj" if attn_out_absorbs != "none" else None,
                "linear" if attn_out_absorbs != "none" else "none",
                attn_out_absorbs,
                "attention",
            ),
            InputPlace(
                "mlp_in",
                ("mlp.gate_proj", "mlp.up_proj"),
                "post_attention_layernorm",
                "norm",
                "diagonal",
                "mlp",
            ),
            InputPlace("mlp_down", ("mlp.down_proj",), "mlp.up_proj", "linear", "diagonal", "mlp"),
        ]

    def embedding(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def residual_readers(self, layer: nn.Module) -> tuple[ResidualReader, ...]:
        return (
            ResidualReader("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ResidualReader("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        )

    def residual_writers(self, layer: nn.Module) -> tuple[str, ...]:
        return ("self_attn.o_proj", "mlp.down_proj")

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def kv_outputs(self, layer: nn.Module) -> dict[str, OutputSlice]:
        return {"k": OutputSlice("self_attn.k_proj"), "v": OutputSlice("self_attn.v_proj")}
