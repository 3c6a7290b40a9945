"""Q/K/V quantization inside attention (quantcompose.attention_quant)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantcompose.attention_quant import (
    AttentionQuantizationError,
    AttentionQuantizer,
    attention_quantizer_of,
    install_attention_quantization,
    qk_hadamard,
    quantized_implementation_name,
    remove_attention_quantization,
)
from quantcompose.quant import QuantSpec, fake_quantize
from quantcompose.transforms import Scale, flatten_state, unflatten_state
from realmodel import load_smollm2, requires_real_model, wikitext2_test_tokens
from toymodel import tiny_llama

HEAD_DIM = 24  # tiny_llama: hidden 96, 4 heads
SPEC4 = QuantSpec(4, False, "token", None, 1.0)


def _toy(implementation: str, kv_heads: int = 2) -> torch.nn.Module:
    model = tiny_llama(kv_heads=kv_heads)
    model.set_attn_implementation(implementation)
    return model


def _tokens(batch: int = 2, seq: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(ids, attention_mask=mask, use_cache=False).logits


# --- (a) the rotation alone is exact after RoPE --------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_qk_rotation_alone_keeps_logits(implementation: str) -> None:
    model = _toy(implementation)
    ids = _tokens()
    # Left padding in the first row: the wrapper must get the same mask the original did.
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    before = _logits(model, ids, mask)
    install_attention_quantization(model, AttentionQuantizer(qk_rotation=qk_hadamard(HEAD_DIM, seed=3)))
    assert model.config._attn_implementation == quantized_implementation_name(implementation)
    after = _logits(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-5)


def test_rotation_before_rope_would_not_be_exact() -> None:
    # Why the rotation must come after RoPE: RoPE does not commute with a Hadamard, so
    # rotating before it changes q·kᵀ. Guards (a) against passing for a trivial reason.
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 10, 96, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(hidden, torch.arange(10)[None])
    q = attn.q_proj(hidden).view(1, 10, -1, HEAD_DIM).transpose(1, 2)[:, :2]
    k = attn.k_proj(hidden).view(1, 10, -1, HEAD_DIM).transpose(1, 2)
    rot = qk_hadamard(HEAD_DIM, seed=3)
    q1, k1 = apply_rotary_pos_emb(q, k, cos, sin)
    q2, k2 = apply_rotary_pos_emb(rot(q), rot(k), cos, sin)
    gap = (q1 @ k1.transpose(-1, -2) - q2 @ k2.transpose(-1, -2)).abs().max()
    assert gap > 1e-2


# --- (b) quantization happens after RoPE, to a hand-written reference ---------------------


def _attention_reference(attn, hidden, cos, sin, q_spec, rotation, *, before_rope: bool = False) -> torch.Tensor:
    """Llama attention written out: projections, RoPE, rotation + fake-quantize, causal softmax, o_proj."""
    batch, seq, _ = hidden.shape
    shape = (batch, seq, -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden).view(shape).transpose(1, 2)

    def quantize_qk(q, k):
        if rotation is not None:
            q, k = rotation(q), rotation(k)
        return (q, k) if q_spec is None else (fake_quantize(q, q_spec), fake_quantize(k, q_spec))

    if before_rope:
        q, k = quantize_qk(q, k)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if not before_rope:
        q, k = quantize_qk(q, k)
    if q_spec is not None:
        v = fake_quantize(v, q_spec)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, -math.inf).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)
    return attn.o_proj(out)


def _capture_attention(model):
    """Per layer: the attention module's (hidden_states, position_embeddings, output), via hooks."""
    seen: dict[int, tuple] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, output, i=i):
            seen[i] = (kwargs["hidden_states"], kwargs["position_embeddings"], output[0])

        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped-query, multi-head
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_quantizes_qkv_after_rope_like_the_reference(implementation: str, kv_heads: int) -> None:
    model = _toy(implementation, kv_heads)
    ids = _tokens(batch=2, seq=16)
    plain = _logits(model, ids)
    rotation = qk_hadamard(HEAD_DIM, seed=5)
    # Layer 0 quantized, layer 1 left alone.
    install_attention_quantization(model, {0: AttentionQuantizer.uniform(4, qk_rotation=rotation)})
    seen, handles = _capture_attention(model)
    try:
        quantized = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    assert (quantized - plain).abs().max() > 1e-2

    attn0 = model.model.layers[0].self_attn
    hidden, (cos, sin), out = seen[0]
    expected = _attention_reference(attn0, hidden, cos, sin, SPEC4, rotation)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    wrong_place = _attention_reference(attn0, hidden, cos, sin, SPEC4, rotation, before_rope=True)
    assert (out - wrong_place).abs().max() > 100 * 2e-5
    unquantized = _attention_reference(attn0, hidden, cos, sin, None, None)
    assert (out - unquantized).abs().max() > 100 * 2e-5

    attn1 = model.model.layers[1].self_attn
    assert attention_quantizer_of(attn1) is None
    hidden, (cos, sin), out = seen[1]
    torch.testing.assert_close(out, _attention_reference(attn1, hidden, cos, sin, None, None), rtol=0, atol=2e-5)


def test_each_spec_acts_on_its_own_tensor() -> None:
    q, k, v = (torch.randn(2, 3, 7, HEAD_DIM, generator=torch.Generator().manual_seed(s)) for s in range(3))
    only_v = AttentionQuantizer(v_spec=SPEC4).apply(q, k, v)
    assert only_v[0] is q and only_v[1] is k
    assert torch.equal(only_v[2], fake_quantize(v, SPEC4))
    only_k = AttentionQuantizer(k_spec=SPEC4).apply(q, k, v)
    assert only_k[0] is q and only_k[2] is v
    assert torch.equal(only_k[1], fake_quantize(k, SPEC4))


# --- (c) remove restores the model ---------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_remove_restores_outputs_exactly(implementation: str) -> None:
    model = _toy(implementation)
    ids = _tokens()
    before = _logits(model, ids)
    install_attention_quantization(model, AttentionQuantizer.uniform(4, qk_rotation=qk_hadamard(HEAD_DIM)))
    # Installing twice replaces, and still remembers the implementation from before the first.
    install_attention_quantization(model, AttentionQuantizer.uniform(6))
    assert remove_attention_quantization(model) is True
    assert model.config._attn_implementation == implementation
    assert all(attention_quantizer_of(layer.self_attn) is None for layer in model.model.layers)
    assert torch.equal(_logits(model, ids), before)
    assert remove_attention_quantization(model) is False


# --- (d) generation with a KV cache --------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_generation_with_cache_matches_no_cache(implementation: str) -> None:
    model = _toy(implementation)
    ids = _tokens(batch=1, seq=12)
    install_attention_quantization(model, AttentionQuantizer.uniform(4, qk_rotation=qk_hadamard(HEAD_DIM)))
    new = 6
    gen = model.generate(
        ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    step_logits = torch.stack(gen.logits, dim=1)  # (1, new, vocab): one decoding step each
    full = _logits(model, gen.sequences[:, :-1])[:, -new:]
    # Each step re-quantizes the float cache row by row, so it computes what the full forward does;
    # what is left is float rounding of matmuls of other shapes.
    torch.testing.assert_close(step_logits, full, rtol=0, atol=1e-4)
    assert torch.equal(step_logits.argmax(-1), full.argmax(-1))


def test_requantizing_is_idempotent_without_clipping() -> None:
    x = torch.randn(2, 4, 33, 64, generator=torch.Generator().manual_seed(0)) * 3
    for symmetric in (True, False):
        spec = QuantSpec(4, symmetric, "token", None, 1.0)
        once = fake_quantize(x, spec)
        # Same scale and zero point on the second pass; float rounding may move a value by an ulp.
        torch.testing.assert_close(fake_quantize(once, spec), once, rtol=0, atol=1e-5)
    clipped = QuantSpec(4, True, "token", None, 0.8)
    once = fake_quantize(x, clipped)
    assert (fake_quantize(once, clipped) - once).abs().max() > 0.1


# --- (e) serialization ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantizer",
    [
        AttentionQuantizer(),
        AttentionQuantizer.uniform(4, qk_rotation=qk_hadamard(HEAD_DIM, seed=7)),
        AttentionQuantizer(None, QuantSpec(8, True, "token", None, 0.9), SPEC4, qk_hadamard(64).inv),
    ],
)
def test_to_dict_from_dict_round_trip(quantizer: AttentionQuantizer) -> None:
    config, tensors = flatten_state(quantizer.to_dict(), prefix="layers.3.attention.")
    config = json.loads(json.dumps(config))
    back = AttentionQuantizer.from_dict(unflatten_state(config, tensors))
    assert back == quantizer
    assert AttentionQuantizer.from_dict(quantizer.to_dict()) == quantizer


def test_seeded_hadamard_is_reproducible() -> None:
    assert qk_hadamard(64, seed=1) == qk_hadamard(64, seed=1)
    assert qk_hadamard(64, seed=1) != qk_hadamard(64, seed=2)


# --- errors --------------------------------------------------------------------------------


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(AttentionQuantizationError, match="not orthogonal"):
        AttentionQuantizer(qk_rotation=Scale(torch.full((HEAD_DIM,), 2.0)))
    with pytest.raises(AttentionQuantizationError, match="QuantSpec"):
        AttentionQuantizer(q_spec=4)  # type: ignore[arg-type]
    with pytest.raises(AttentionQuantizationError, match="unknown AttentionQuantizer keys"):
        AttentionQuantizer.from_dict({"bits": 4})
    model = tiny_llama()
    with pytest.raises(AttentionQuantizationError, match="outside 0..1"):
        install_attention_quantization(model, {2: AttentionQuantizer.uniform(4)})
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(AttentionQuantizationError, match="not supported"):
        install_attention_quantization(model, AttentionQuantizer.uniform(4))


def test_layers_may_be_modules_or_a_function() -> None:
    model = tiny_llama()
    attn = [layer.self_attn for layer in model.model.layers]
    quantizer = AttentionQuantizer.uniform(8)
    install_attention_quantization(model, {1: quantizer}, layers=attn)
    assert attention_quantizer_of(attn[0]) is None and attention_quantizer_of(attn[1]) is quantizer
    install_attention_quantization(model, quantizer, layers=lambda m: [m.model.layers[0].self_attn])
    assert attention_quantizer_of(attn[0]) is quantizer and attention_quantizer_of(attn[1]) is None
    remove_attention_quantization(model)


# --- the real model ------------------------------------------------------------------------


@pytest.mark.slow
@requires_real_model
def test_smollm2_rotation_exact_and_8bit_qkv_close() -> None:
    from quantcompose.evaluate import perplexity

    model, _ = load_smollm2()
    tokens = wikitext2_test_tokens()
    head_dim = model.model.layers[0].self_attn.head_dim
    ids = tokens[:, :128]
    try:
        before = _logits(model, ids)
        fp_ppl = perplexity(model, tokens, seqlen=512, max_windows=2, progress=False)
        install_attention_quantization(model, AttentionQuantizer(qk_rotation=qk_hadamard(head_dim)))
        rotated = _logits(model, ids)
        install_attention_quantization(model, AttentionQuantizer.uniform(8))
        q8_ppl = perplexity(model, tokens, seqlen=512, max_windows=2, progress=False)
    finally:
        remove_attention_quantization(model)
    # float32 rounding of the rotated matmuls accumulates over 30 layers: measured 6.3e-5.
    torch.testing.assert_close(rotated, before, rtol=0, atol=5e-4)
    assert torch.equal(rotated.argmax(-1), before.argmax(-1))
    assert abs(q8_ppl / fp_ppl - 1) < 0.01
    assert torch.equal(_logits(model, ids), before)
