"""GPTQ and the per-row clip search: they must lower the output error they target."""

from __future__ import annotations

import pytest
import torch

from quantcompose.errors import ShapeError
from quantcompose.quant import QuantSpec, clamp_rows, compute_qparams, search_act_clip_ratio, dequantize, fake_quantize, search_clip_ratios
from quantcompose.quant.gptq import gptq_quantize

SPEC = QuantSpec(4, False, "channel", None, 1.0)


def correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated channels and a few large ones, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5
    x = torch.randn(rows, width, generator=g, dtype=torch.float64) @ (torch.eye(width, dtype=torch.float64) + 2 * mix)
    x[:, :3] *= 8.0
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).T).pow(2).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_data_it_saw(act_order):
    x = correlated_inputs(512, 96)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = gptq_quantize(w, x.T @ x, SPEC, block=32, act_order=act_order)
    assert q.codes.shape == w.shape and q.codes.min() >= SPEC.qmin and q.codes.max() <= SPEC.qmax
    rtn = fake_quantize(w, SPEC)
    assert output_error(x, w, dequantize(q).double()) < 0.7 * output_error(x, w, rtn)


def test_gptq_rows_are_independent_so_siblings_can_be_stacked():
    # The pipeline quantizes q/k/v (and gate/up) as one stacked matrix: that
    # must give each the codes it would get alone.
    x = correlated_inputs(256, 64, seed=2)
    h = x.T @ x
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 64, generator=g, dtype=torch.float64), torch.randn(7, 64, generator=g, dtype=torch.float64)
    together = gptq_quantize(torch.cat([a, b]), h, SPEC)
    assert torch.equal(together.codes[:10], gptq_quantize(a, h, SPEC).codes)
    assert torch.equal(together.codes[10:], gptq_quantize(b, h, SPEC).codes)


def test_gptq_uses_the_clipped_range():
    x = correlated_inputs(256, 32, seed=4)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    clipped = clamp_rows(w, torch.full((8,), 0.5, dtype=torch.float64))
    q = gptq_quantize(w, x.T @ x, SPEC, range_weight=clipped)
    scale, zero = compute_qparams(clipped, SPEC)
    assert torch.allclose(q.scale.double(), scale) and torch.equal(q.zero_point.double(), zero)


def test_gptq_bad_shapes_are_clear_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ShapeError, match="hessian must be"):
        gptq_quantize(w, torch.eye(7), SPEC)
    with pytest.raises(ShapeError, match="per output channel or per group"):
        gptq_quantize(w, torch.eye(8), QuantSpec(4, False, "tensor", None, 1.0))
    with pytest.raises(ShapeError, match="not divisible by group_size"):
        gptq_quantize(w, torch.eye(8), QuantSpec(4, False, "group", 3, 1.0))


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_per_group_runs_gptq_not_round_to_nearest(act_order):
    """Per-group GPTQ keeps each group's static scales and beats rounding to nearest on its data."""
    spec = QuantSpec(4, False, "group", 16, 1.0)
    x = correlated_inputs(512, 64)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q = gptq_quantize(w, x.T @ x, spec, act_order=act_order)
    scale, zero = compute_qparams(w, spec)
    assert q.scale.shape == (24, 4, 1) and torch.allclose(q.scale.double(), scale)
    assert torch.equal(q.zero_point.double(), zero)
    assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax
    rtn = fake_quantize(w, spec)
    gptq = dequantize(q, torch.float64)
    assert not torch.equal(gptq, rtn)  # GPTQ moved codes: it did not fall back to rounding
    assert output_error(x, w, gptq) < 0.8 * output_error(x, w, rtn)


def test_clip_search_never_does_worse_than_no_clipping():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, 64, generator=g)
    w[:, 0] *= 10  # one large weight per row stretches the grid
    importance = torch.rand(64, generator=g)
    ratios = search_clip_ratios(w, SPEC, importance)
    assert ratios.min() >= 0.5 and ratios.max() <= 1.0 and (ratios < 1.0).any()
    for row in range(32):
        def err(ratio: float) -> float:
            spec = QuantSpec(4, False, "channel", None, ratio)
            return float(((fake_quantize(w[row : row + 1], spec) - w[row]).pow(2) * importance).sum())
        assert err(float(ratios[row])) <= err(1.0) + 1e-6


def test_act_clip_search_picks_the_ratio_with_least_output_error():
    g = torch.Generator().manual_seed(7)
    # Gaussian tokens over many channels: the extremes are rare, and clipping
    # them buys a finer grid for the bulk (the MSE-optimal 4-bit range is well below the max).
    x = torch.randn(128, 512, generator=g)
    w = torch.randn(20, 512, generator=g)
    spec = QuantSpec(4, False, "token", None, 1.0)
    grid = (1.0, 0.9, 0.8, 0.7, 0.6)
    best = search_act_clip_ratio(x, spec, w, grid)
    # Wide consumers go through WᵀW instead of W: the same choice.
    assert search_act_clip_ratio(x, spec, torch.cat([w] * 30), grid) == best

    def err(ratio: float) -> float:
        return float(((fake_quantize(x, QuantSpec(4, False, "token", None, ratio)) - x) @ w.T).pow(2).sum())

    assert best in grid and best < 1.0
    assert err(best) <= min(err(r) for r in grid) * (1 + 1e-5)
    with pytest.raises(ShapeError, match="per token"):
        search_act_clip_ratio(x, SPEC, w)


def test_upper_cholesky_of_inverse_factors_the_inverse():
    from quantcompose.quant.gptq import upper_cholesky_of_inverse

    x = correlated_inputs(400, 48, seed=6)
    h = x.T @ x + 1e-3 * torch.eye(48, dtype=torch.float64)
    u = upper_cholesky_of_inverse(h)
    assert torch.equal(u, u.triu()) and bool((torch.diagonal(u) > 0).all())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-12)
    # the same factor GPTQ's reference recipe (factor, invert, factor again) gives
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(u, reference, rtol=1e-9, atol=1e-12)
