"""The storage dtype (quantcompose/storage.py): 16-bit transforms and embeddings, still exact where promised."""

from __future__ import annotations

import copy

import pytest
import torch

from quantcompose.errors import QuantSpecError
from quantcompose.pipeline import quantize_model
from quantcompose.qlinear import QuantLinear
from quantcompose.storage import round_float_weights, stored_transform
from quantcompose.strategy import QuantSettings
from quantcompose.transforms import BlockLinear, BlockRotation, Compose, Hadamard, Permutation, Scale
from quantcompose.transforms.serialize import state_tensors
from tests.toymodel import tiny_llama


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_rounded_rotation_is_a_block_linear_whose_inverse_is_exact():
    rotation = BlockRotation.random(40, 16, _gen(0))
    stored = stored_transform(rotation, torch.float16)
    assert isinstance(stored, BlockLinear) and not stored.is_orthogonal
    assert all(b.dtype == torch.float16 for b in stored.blocks)
    x = torch.randn(5, 40, dtype=torch.float64, generator=_gen(1))
    # The rounded map is not orthogonal: its transpose is off by the rounding, its inverse is not.
    assert (stored.T.forward(stored.forward(x)) - x).abs().max() > 1e-5
    torch.testing.assert_close(stored.inv.forward(stored.forward(x)), x, rtol=0, atol=1e-12)
    weight = torch.randn(7, 40, dtype=torch.float64, generator=_gen(2))
    folded, _ = stored.fold_into_weight(weight)
    torch.testing.assert_close(stored.forward(x) @ folded.T, x @ weight.T, rtol=0, atol=1e-11)


def test_stored_transform_rounds_scales_and_rotations_and_keeps_exact_atoms():
    t = Compose([
        Scale(torch.rand(32, dtype=torch.float64, generator=_gen(0)) + 0.5),
        BlockRotation.random(32, 8, _gen(1)),
        Permutation(torch.randperm(32, generator=_gen(2))),
        Hadamard(32, torch.ones(32, dtype=torch.float64)),
    ])
    stored = stored_transform(t, torch.float16)
    kinds = [type(a) for a in stored.transforms]
    assert kinds == [Scale, BlockLinear, Permutation, Hadamard]
    assert {x.dtype for x in state_tensors(stored.state_dict()) if x.is_floating_point()} == {torch.float16}
    assert stored_transform(t, torch.float32) is t


def test_a_scale_that_float16_cannot_hold_stays_float32():
    factors = torch.tensor([1e5, 1.0, 2.0, 1e-9], dtype=torch.float64)  # overflows, and underflows to 0
    stored = stored_transform(Scale(factors), torch.float16)
    assert stored.factors.dtype == torch.float32
    torch.testing.assert_close(stored.factors, factors.float())


def test_unknown_storage_dtype_is_a_clear_error():
    with pytest.raises(QuantSpecError, match="storage_dtype='int8' is unknown: use one of float16, bfloat16, float32"):
        QuantSettings(storage_dtype="int8")


@pytest.mark.parametrize("method", ["duquant", "smoothquant"])
def test_float16_storage_keeps_the_fold_exact_and_rounds_only_the_embeddings(method):
    """At 16 bits with the default storage the model equals the one with float16-rounded embeddings."""
    model = tiny_llama().double()
    reference = copy.deepcopy(model)
    round_float_weights(reference.get_input_embeddings(), reference.get_output_embeddings(), torch.float16)
    tokens = torch.randint(0, 128, (2, 20), generator=_gen(3))
    with torch.no_grad():
        expected = reference(tokens).logits
    options = {"block_size": 32, "steps": 2} if method == "duquant" else {}
    quantize_model(model, torch.randint(0, 128, (2, 16), generator=_gen(4)), method,
                   QuantSettings(wbits=16, abits=16), options, progress=False)
    transforms = [m.transform for m in model.modules() if isinstance(m, QuantLinear) and m.transform is not None]
    assert transforms, "the strategy left no online transform to store"
    stored = {t.dtype for tr in transforms for t in state_tensors(tr.state_dict()) if t.is_floating_point()}
    assert stored == {torch.float64}  # a float64 model computes its transforms in float64 ...
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight.to(torch.float16).double(), weight)  # ... and holds float16-exact embeddings
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_a_quantized_and_a_reloaded_model_hold_16_bit_embeddings_and_no_float_weight_copy(tmp_path):
    from quantcompose.saving import load_quantized, save_quantized
    from quantcompose.storage import StoredEmbedding, StoredLinear, resident_bytes

    model = tiny_llama()  # tied embeddings, float32
    tokens = torch.randint(0, 128, (2, 12), generator=_gen(5))
    quantize_model(model, torch.randint(0, 128, (2, 16), generator=_gen(6)), "duquant",
                   QuantSettings(wbits=4, abits=4), {"block_size": 32, "steps": 2}, progress=False)
    with torch.no_grad():
        expected = model(tokens).logits
    save_quantized(model, tmp_path / "m")
    loaded, _ = load_quantized(tmp_path / "m")
    for m in (model, loaded):
        embedding, head = m.get_input_embeddings(), m.get_output_embeddings()
        assert isinstance(embedding, StoredEmbedding) and embedding.weight.dtype == torch.float16
        assert isinstance(head, StoredLinear) and head.weight is embedding.weight  # still tied
        with torch.no_grad():
            logits = m(tokens).logits
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        held = resident_bytes(m)
        # Nothing float32 of the size of a linear's weight survives the forward pass.
        for layer in m.modules():
            if isinstance(layer, QuantLinear):
                assert not any(t.dtype == torch.float32 and t.numel() >= layer.in_features * layer.out_features
                               for t in [*layer.parameters(), *layer.buffers()])
        assert held["transforms"] > 0
    assert resident_bytes(loaded) == resident_bytes(model)
