"""Small random causal LMs for fast unit tests (accuracy claims need the real model)."""

from __future__ import annotations

import torch
import transformers
from transformers import LlamaForCausalLM


def tiny_llama(kv_heads: int = 2, hidden: int = 96, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama with tied embeddings (``tiny_model("llama", ...)``)."""
    return tiny_model("llama", kv_heads=kv_heads, hidden=hidden, layers=layers, seed=seed)


_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # Phi3Config's default pad and eos ids (32000) lie outside a toy vocabulary
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None, "eos_token_id": None}),
}
TOY_ARCHS = tuple(_ARCHS)


def tiny_model(
    arch: str, *, tied: bool = True, kv_heads: int = 2, hidden: int = 96, layers: int = 2, seed: int = 0
) -> torch.nn.Module:
    """A small random causal LM of architecture ``arch`` (one of ``TOY_ARCHS``), 4 attention heads.

    Norm weights and biases are drawn away from their defaults (ones, zeros)
    so that transforms folded into them are exercised; Qwen2's q/k/v biases
    are therefore non-zero.
    """
    config_name, model_name, extra = _ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        **extra,
    )
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    return model


class CharTokenizer:
    """One token per character: enough for the CLI's data paths on the toy model (vocabulary 128)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def __len__(self):
        return 128

    def save_pretrained(self, directory):
        pass
