"""QuantLinear through the Triton kernels equals its PyTorch reference path."""

from __future__ import annotations

import pytest
import torch

from quantcompose.kernel_dispatch import transform_to_kernel_args
from quantcompose.qlinear import QuantLinear
from quantcompose.quant import QuantSpec
from quantcompose.transforms import BlockRotation, Hadamard, Permutation, Scale

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _transform(n: int, g: torch.Generator):
    return (
        Scale(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
        @ BlockRotation.random(n, 64, generator=g)
        @ Permutation(torch.randperm(n, generator=g))
        @ BlockRotation.random(n, 64, generator=g)
    )


@pytest.mark.parametrize("bits, sym", [(8, False), (8, True), (4, False), (4, True)])
def test_kernel_path_matches_reference(bits, sym):
    g = torch.Generator().manual_seed(bits)
    n, out, rows = 192, 80, 37
    weight = torch.randn(out, n, generator=g)
    layer = QuantLinear(
        weight, torch.randn(out, generator=g), transform=_transform(n, g),
        act_spec=QuantSpec(bits, sym, "token"), weight_spec=QuantSpec(bits, sym, "channel"),
    ).to(DEVICE)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    x = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    layer.kernels = "never"
    expected = layer(x).float()
    layer.kernels = "always"
    assert layer._kernels_for(x) is not None, "the layer should be eligible for the kernels"
    got = layer(x).float()
    # Codes may differ by one step where x·T lands on a rounding tie in a
    # different float order; the output error stays well under one step's effect.
    rel = (got - expected).norm() / expected.norm()
    assert rel < (2e-3 if bits == 8 else 2e-2), rel


def test_ineligible_layers_fall_back_to_the_reference():
    n = 256
    layer = QuantLinear(torch.randn(8, n), transform=Hadamard(n), act_spec=QuantSpec(8, False, "token"),
                        weight_spec=QuantSpec(8, False, "channel"))
    layer.kernels = "always"
    assert transform_to_kernel_args(Hadamard(n)) is None  # 256 > the kernel's 128 block limit
    x = torch.randn(3, n)
    assert layer._kernels_for(x) is None
    assert torch.isfinite(layer(x)).all()


def test_transform_translation_keeps_order():
    g = torch.Generator().manual_seed(0)
    args = transform_to_kernel_args(_transform(128, g))
    assert set(args) == {"scale", "rot1", "perm", "rot2"}
    only_perm = transform_to_kernel_args(Permutation(torch.randperm(16, generator=g)))
    assert set(only_perm) == {"perm"}
    assert transform_to_kernel_args(Permutation(torch.arange(8)) @ Scale(torch.ones(8))) is None
