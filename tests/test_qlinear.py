"""QuantLinear: exact without quantizers, packed storage, shared input work."""

from __future__ import annotations

import torch

from quantcompose.qlinear import QuantLinear, SharedInput
from quantcompose.quant import QuantSpec
from quantcompose.transforms import BlockRotation


def test_float_layer_with_folded_transform_is_exact():
    torch.manual_seed(0)
    w, b = torch.randn(12, 64, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    t = BlockRotation.random(64, 16)
    folded, _ = t.fold_into_weight(w)
    layer = QuantLinear(folded, b, transform=t)
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T + b, rtol=1e-12, atol=1e-12)


def test_packed_int4_storage_is_half_of_int8():
    w = torch.randn(16, 64)
    four = QuantLinear(w, weight_spec=QuantSpec(4, False, "channel"))
    eight = QuantLinear(w, weight_spec=QuantSpec(8, False, "channel"))
    assert four.weight_codes.numel() * 2 == eight.weight_codes.numel()
    assert four.weight_nbytes() < eight.weight_nbytes()


def test_siblings_share_the_quantized_input_and_notice_changes():
    torch.manual_seed(0)
    t = BlockRotation.random(32, 8)
    spec = QuantSpec(8, False, "token")
    shared = SharedInput()
    a = QuantLinear(torch.randn(4, 32), transform=t, act_spec=spec)
    b = QuantLinear(torch.randn(6, 32), transform=t, act_spec=spec)
    a.shared_input = b.shared_input = shared
    x = torch.randn(3, 32)
    with torch.no_grad():
        ya = a(x)
        assert shared.hit(x)
        yb = b(x)
        # The last of the two readers took it: nothing outlives the forward pass.
        assert not shared.hit(x) and shared.output is None
        b.shared_input = None
        torch.testing.assert_close(yb, b(x), rtol=0, atol=0)
        x.mul_(2)  # in-place change: the cache must not be used
        assert not shared.hit(x)
        assert not torch.equal(a(x), ya)
