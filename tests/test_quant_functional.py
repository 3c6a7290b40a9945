"""Reference quantize / dequantize / fake_quantize: the issue's acceptance criteria."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcompose.errors import CalibrationError, ShapeError
from quantcompose.quant import (
    QuantizedTensor,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
)

EPS = 1e-8


# --- an independent float64 reference -----------------------------------------------


def ref_rows(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``x`` as a 2-D array whose rows are the units that share one scale."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    width = spec.group_size if spec.granularity == "group" else x.shape[-1]
    return x.reshape(-1, width)


def ref_qparams(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-element (scale, zero, clipped lo, clipped hi), straight from the formulas."""
    rows = ref_rows(x.astype(np.float64), spec)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    c = spec.clip_ratio
    if spec.symmetric:
        a = np.maximum(np.abs(lo), np.abs(hi)) * c
        scale = np.maximum(a / (2 ** (spec.bits - 1) - 1), EPS)
        zero = np.zeros_like(scale)
        # Signed codes reach one step further down (-2^(b-1)), so values below
        # -a clamp to -(qmax + 1) * scale, not to -a.
        clo, chi = -(2 ** (spec.bits - 1)) * scale, a
    else:
        chi = np.maximum(hi, 0) * c
        clo = np.minimum(lo, 0) * c
        scale = np.maximum((chi - clo) / (2**spec.bits - 1), EPS)
        zero = np.clip(np.round(-clo / scale), 0, 2**spec.bits - 1)
    per_elem = [np.broadcast_to(v[:, None], rows.shape).reshape(x.shape) for v in (scale, zero, clo, chi)]
    return tuple(per_elem)  # type: ignore[return-value]


def per_element(t: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Expand a scale / zero point from the documented layout to ``x``'s shape."""
    if spec.granularity == "group":
        g = spec.group_size
        return t.expand(*x.shape[:-1], x.shape[-1] // g, g).reshape(x.shape)
    return t.expand(x.shape)


# --- hypothesis strategies ----------------------------------------------------------


@st.composite
def spec_and_input(draw: st.DrawFn, clip: bool = True) -> tuple[QuantSpec, torch.Tensor]:
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    granularity = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    width = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32]))
    group_size = None
    if granularity == "group":
        group_size = draw(st.sampled_from([d for d in range(1, width + 1) if width % d == 0]))
    clip_ratio = draw(st.sampled_from([1.0, 1.0, 0.9, 0.5])) if clip else 1.0
    spec = QuantSpec(bits, symmetric, granularity, group_size, clip_ratio)

    shape = (*lead, width)
    kind = draw(st.sampled_from(["normal", "positive", "negative", "outliers", "hypothesis"]))
    if kind == "hypothesis":
        n = int(np.prod(shape))
        vals = draw(
            st.lists(
                st.floats(-1e4, 1e4, width=32, allow_subnormal=False), min_size=n, max_size=n
            )
        )
        x = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        x = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
        if kind == "positive":
            x = x.abs() + 0.1
        elif kind == "negative":
            x = -x.abs() - 0.1
        elif kind == "outliers":
            x[..., 0] *= 100.0
    return spec, x


HYP = settings(max_examples=50, deadline=None)


# --- properties ---------------------------------------------------------------------


@HYP
@given(spec_and_input())
def test_qparams_match_reference(case: tuple[QuantSpec, torch.Tensor]) -> None:
    spec, x = case
    scale, zero = compute_qparams(x, spec)
    assert scale.dtype == torch.float32 and zero.dtype == torch.float32
    rscale, rzero, _, _ = ref_qparams(x.numpy(), spec)
    np.testing.assert_allclose(per_element(scale, x, spec).numpy(), rscale, rtol=1e-5)
    # The zero point may differ by one only where -xmin/scale sits on a .5 tie in
    # one precision but not the other; it must hold an integer in range.
    z = per_element(zero, x, spec).numpy()
    assert np.all(z == np.round(z)) and z.min() >= spec.qmin and z.max() <= spec.qmax
    assert np.all(np.abs(z - rzero) <= 1)


@HYP
@given(spec_and_input())
def test_round_trip_error_at_most_half_a_step(case: tuple[QuantSpec, torch.Tensor]) -> None:
    spec, x = case
    q = quantize(x, spec)
    deq = dequantize(q)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    scale = per_element(q.scale, x, spec).double()
    _, _, clo, chi = ref_qparams(x.numpy(), spec)
    # Inside the clipped range the error is at most scale/2; outside it the value
    # clamps to the edge of the range, so compare with x clamped to the range.
    target = torch.minimum(torch.maximum(x.double(), torch.tensor(clo)), torch.tensor(chi))
    err = (deq.double() - target).abs()
    slack = 1e-4 * scale + 1e-6 * x.double().abs().max()
    assert torch.all(err <= scale / 2 + slack), f"max err/scale {(err / scale).max():.4f} for {spec}"


@HYP
@given(spec_and_input())
def test_codes_in_range_and_dtype(case: tuple[QuantSpec, torch.Tensor]) -> None:
    spec, x = case
    q = quantize(x, spec)
    assert isinstance(q, QuantizedTensor)
    assert q.codes.dtype == spec.code_dtype
    assert q.codes.shape == x.shape and q.shape == x.shape and q.spec == spec
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax


@HYP
@given(spec_and_input())
def test_fake_quantize_equals_dequantize_quantize(case: tuple[QuantSpec, torch.Tensor]) -> None:
    spec, x = case
    fq = fake_quantize(x, spec)
    assert fq.dtype == x.dtype and fq.shape == x.shape
    assert torch.equal(fq, dequantize(quantize(x, spec)))
    # Same with autograd on: the STE must not perturb the forward value.
    xg = x.clone().requires_grad_(True)
    assert torch.equal(fake_quantize(xg, spec).detach(), fq)


@HYP
@given(spec_and_input())
def test_ste_gradient_is_identity(case: tuple[QuantSpec, torch.Tensor]) -> None:
    spec, x = case
    x = x.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (fake_quantize(x, spec) * w).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, w)


@HYP
@given(spec_and_input(clip=False))
def test_fake_quantize_is_idempotent_on_its_grid(case: tuple[QuantSpec, torch.Tensor]) -> None:
    # With the per-row range kept, quantizing an already-quantized tensor moves
    # no value by more than a fraction of a step (it lands on the same grid up to
    # fp error), a sanity check of scale/zero-point consistency.
    spec, x = case
    fq = fake_quantize(x, spec)
    fq2 = fake_quantize(fq, spec)
    scale = per_element(compute_qparams(fq, spec)[0], fq, spec)
    assert torch.all((fq2 - fq).abs() <= scale / 2 + 1e-4 * scale + 1e-6 * fq.abs().max())


# --- explicit examples ----------------------------------------------------------------


def test_hand_computed_asymmetric() -> None:
    x = torch.tensor([[-1.0, 0.0, 2.0]])
    scale, zero = compute_qparams(x, QuantSpec(2, False, "token"))
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[1.0]]
    q = quantize(x, QuantSpec(2, False, "token"))
    assert q.codes.tolist() == [[0, 1, 3]] and q.codes.dtype == torch.uint8
    assert dequantize(q).tolist() == [[-1.0, 0.0, 2.0]]


def test_hand_computed_symmetric() -> None:
    x = torch.tensor([[-4.0, 1.0, 3.0]])
    q = quantize(x, QuantSpec(3, True, "channel"))
    assert torch.allclose(q.scale, torch.tensor([[4.0 / 3.0]]))
    assert q.zero_point.tolist() == [[0.0]]
    assert q.codes.tolist() == [[-3, 1, 2]] and q.codes.dtype == torch.int8


def test_round_half_to_even() -> None:
    # absmax 127 with 8-bit symmetric gives scale exactly 1, so x/scale = x.
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    q = quantize(x, QuantSpec(8, True, "tensor"))
    assert q.scale.item() == 1.0
    assert q.codes.tolist() == [127, 0, 2, 2, 0, -2, -2]


def test_per_row_scales_are_independent() -> None:
    x = torch.tensor([[1.0, -1.0], [100.0, -100.0]])
    scale, _ = compute_qparams(x, QuantSpec(8, True, "token"))
    assert torch.allclose(scale.flatten(), torch.tensor([1.0, 100.0]) / 127)
    scale_t, _ = compute_qparams(x, QuantSpec(8, True, "tensor"))
    assert scale_t.shape == (1, 1) and torch.allclose(scale_t, torch.tensor(100.0 / 127))


def test_qparam_layouts() -> None:
    x = torch.randn(2, 3, 8)
    assert compute_qparams(x, QuantSpec(4, False, "tensor"))[0].shape == (1, 1, 1)
    assert compute_qparams(x, QuantSpec(4, False, "token"))[0].shape == (2, 3, 1)
    assert compute_qparams(x, QuantSpec(4, False, "channel"))[0].shape == (2, 3, 1)
    assert compute_qparams(x, QuantSpec(4, False, "group", 4))[0].shape == (2, 3, 2, 1)


def test_token_and_channel_are_the_same_reduction() -> None:
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    a = quantize(x, QuantSpec(4, False, "token"))
    b = quantize(x, QuantSpec(4, False, "channel"))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_group_equals_token_on_reshaped_rows() -> None:
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    g = fake_quantize(x, QuantSpec(4, True, "group", 8))
    t = fake_quantize(x.reshape(3, 4, 8), QuantSpec(4, True, "token")).reshape(3, 32)
    assert torch.equal(g, t)
    # A whole-row group is per-token quantization.
    assert torch.equal(
        fake_quantize(x, QuantSpec(4, False, "group", 32)), fake_quantize(x, QuantSpec(4, False, "token"))
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_ratio_clamps(symmetric: bool) -> None:
    x = torch.linspace(-10, 10, 41).reshape(1, -1)
    spec = QuantSpec(8, symmetric, "token", None, 0.5)
    deq = dequantize(quantize(x, spec))
    step = compute_qparams(x, spec)[0].item()
    assert step < 20 / 255  # the clipped range is finer than the full one
    lo = -5 * 128 / 127 if symmetric else -5  # signed codes have one extra negative step
    assert deq.max() <= 5 + step / 2 + 1e-6 and deq.min() >= lo - step / 2 - 1e-6
    # Everything beyond the clipped range lands on the same (edge) code.
    q = quantize(x, spec)
    assert len(set(q.codes[0, -10:].tolist())) == 1 and len(set(q.codes[0, :10].tolist())) == 1
    # And the unclipped quantizer does reach ±10.
    assert dequantize(quantize(x, QuantSpec(8, symmetric, "token"))).abs().max() > 9.9


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("token", None), ("group", 4)])
def test_all_zero_input(symmetric: bool, granularity: str, group_size: int | None) -> None:
    x = torch.zeros(3, 8)
    spec = QuantSpec(4, symmetric, granularity, group_size)  # type: ignore[arg-type]
    q = quantize(x, spec)
    assert torch.all(torch.isfinite(q.scale)) and torch.all(q.scale > 0)
    assert torch.all(q.codes.to(torch.float32) == per_element(q.zero_point, x, spec))
    assert torch.equal(dequantize(q), x)
    assert torch.equal(fake_quantize(x, spec), x)


def test_one_zero_row_among_others() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 0.5]])
    fq = fake_quantize(x, QuantSpec(4, False, "token"))
    assert torch.equal(fq[0], x[0]) and torch.all(torch.isfinite(fq))


def test_zero_is_exact() -> None:
    # Zeros (padding, pruned weights) must survive quantization exactly.
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5)) + 3.0  # all-positive rows
    x[:, ::3] = 0.0
    for spec in (QuantSpec(4, False, "token"), QuantSpec(3, True, "group", 8), QuantSpec(2, False, "tensor")):
        assert torch.all(fake_quantize(x, spec)[:, ::3] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6)).to(dtype)
    spec = QuantSpec(4, False, "group", 8)
    scale, zero = compute_qparams(x, spec)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert scale.dtype == want and zero.dtype == want
    fq = fake_quantize(x, spec)
    assert fq.dtype == dtype
    assert torch.equal(fq, dequantize(quantize(x, spec), dtype=dtype))


def test_ste_passes_gradient_through_clipped_values() -> None:
    x = torch.linspace(-10, 10, 21).reshape(1, -1).requires_grad_(True)
    fake_quantize(x, QuantSpec(4, True, "token", None, 0.5)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_ste_forward_is_bit_exact() -> None:
    # The textbook STE x + (fq - x).detach() is off by an ulp on some inputs
    # (e.g. clipped values); the forward value with autograd must equal fq exactly.
    spec = QuantSpec(4, False, "token", None, 0.5)
    for seed in range(10):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
        with_grad = fake_quantize(x.clone().requires_grad_(True), spec)
        assert torch.equal(with_grad.detach(), fake_quantize(x, spec))


def test_no_graph_without_requires_grad() -> None:
    x = torch.randn(2, 8)
    assert fake_quantize(x, QuantSpec(4)).grad_fn is None
    with torch.no_grad():
        assert fake_quantize(x.requires_grad_(True), QuantSpec(4)).grad_fn is None


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [compute_qparams, quantize, fake_quantize])
def test_group_size_must_divide_width(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShapeError) as info:
        fn(torch.randn(4, 10), QuantSpec(4, False, "group", 4))
    assert "10" in str(info.value) and "4" in str(info.value)
    with pytest.raises(ShapeError):
        fn(torch.randn(4, 8), QuantSpec(4, False, "group", 16))


@pytest.mark.parametrize("fn", [compute_qparams, quantize, fake_quantize])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(fn, bad: float) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(3, 8)
    x[1, 5] = bad
    with pytest.raises(CalibrationError, match="NaN/inf"):
        fn(x, QuantSpec(4))


@pytest.mark.parametrize("fn", [compute_qparams, quantize, fake_quantize])
@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.zeros(0), torch.zeros(3, 0), torch.zeros(0, 4)])
def test_zero_dim_and_empty(fn, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShapeError):
        fn(x, QuantSpec(4, False, "tensor"))


def test_integer_input_rejected() -> None:
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.arange(8), QuantSpec(4))
