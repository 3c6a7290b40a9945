"""int8 / int4 GEMM kernels == their PyTorch references.

The integer part is exact (int32 accumulation + exact zero-point correction),
and the float epilogue performs the same fp32 operations in the same order, so
under the interpreter the outputs match bit for bit; on a GPU the compiler may
fuse ``· s_w + bias`` into an FMA, hence the (tiny) stated tolerance.
"""

from __future__ import annotations

import pytest
import torch

from quantcompose_kernels import (
    fused_transform_quantize,
    int4_gemm,
    int8_gemm,
    pack_int4,
    prepare_transform,
    quantize_rows,
    reference_int4_gemm,
    reference_int8_gemm,
    weight_colsum,
)
from quantcompose_kernels.testing import block_sizes, dense_transform, random_orthogonal_blocks

pytestmark = pytest.mark.needs_triton

SIDES = [(True, True), (False, True), (True, False), (False, False)]   # (a symmetric, w symmetric)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _codes(shape, bits, sym, g):
    if sym:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)


def _operands(M, N, K, bits, a_sym, w_sym, g, lead=None):
    a = _codes((M, K), bits, a_sym, g)
    w = _codes((N, K), bits, w_sym, g)
    sa = torch.rand(M, generator=g) * 1e-2 + 1e-3
    sw = torch.rand(N, generator=g) * 1e-2 + 1e-3
    za = None if a_sym else torch.randint(0, 1 << bits, (M,), generator=g, dtype=torch.int32)
    zw = None if w_sym else torch.randint(0, 1 << bits, (N,), generator=g, dtype=torch.int32)
    return a, w, sa, sw, za, zw


def _check(y, r, out_dtype):
    assert y.dtype == out_dtype and y.shape == r.shape
    if out_dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), r, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y.cpu().float(), r.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("a_sym,w_sym", SIDES)
@pytest.mark.parametrize("M,N,K", [(37, 96, 576), (1, 64, 128), (17, 200, 96)])
def test_int8_gemm(M, N, K, a_sym, w_sym, device):
    g = _gen(M * 1000 + N)
    a, w, sa, sw, za, zw = _operands(M, N, K, 8, a_sym, w_sym, g)
    bias = torch.randn(N, generator=g)
    for out_dtype, b in [(torch.float32, bias), (torch.float16, None)]:
        r = reference_int8_gemm(a, w, sa, sw, a_zero=za, w_zero=zw, bias=b, out_dtype=out_dtype)
        d = lambda t: None if t is None else t.to(device)  # noqa: E731
        y = int8_gemm(a.to(device), w.to(device), sa.to(device), sw.to(device), a_zero=d(za), w_zero=d(zw),
                      w_colsum=d(weight_colsum(w)), bias=d(b), out_dtype=out_dtype)
        _check(y, r, out_dtype)


@pytest.mark.parametrize("a_sym,w_sym", SIDES)
@pytest.mark.parametrize("M,N,K", [(37, 96, 576), (1, 64, 128), (17, 200, 96)])
def test_int4_gemm(M, N, K, a_sym, w_sym, device):
    g = _gen(M * 1000 + N + 1)
    a, w, sa, sw, za, zw = _operands(M, N, K, 4, a_sym, w_sym, g)
    ap, wp = pack_int4(a), pack_int4(w)
    bias = torch.randn(N, generator=g).half()
    for out_dtype, b in [(torch.float32, bias), (torch.float16, None)]:
        r = reference_int4_gemm(ap, wp, sa, sw, a_zero=za, w_zero=zw, bias=b, out_dtype=out_dtype)
        d = lambda t: None if t is None else t.to(device)  # noqa: E731
        cs = weight_colsum(wp, packed=True, signed=w_sym)
        y = int4_gemm(ap.to(device), wp.to(device), sa.to(device), sw.to(device), a_zero=d(za), w_zero=d(zw),
                      w_colsum=d(cs), bias=d(b), out_dtype=out_dtype)
        _check(y, r, out_dtype)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("M,N,K", [(64, 512, 512), pytest.param(17, 256, 1536, marks=pytest.mark.slow)])
def test_gemm_larger(M, N, K, packed, device):
    g = _gen(30)
    for a_sym, w_sym in [(False, True), (False, False)]:
        a, w, sa, sw, za, zw = _operands(M, N, K, 4 if packed else 8, a_sym, w_sym, g)
        if packed:
            a, w = pack_int4(a), pack_int4(w)
            fn, ref = int4_gemm, reference_int4_gemm
        else:
            fn, ref = int8_gemm, reference_int8_gemm
        r = ref(a, w, sa, sw, a_zero=za, w_zero=zw, out_dtype=torch.float32)
        y = fn(a.to(device), w.to(device), sa.to(device), sw.to(device), a_zero=za.to(device),
               w_zero=None if zw is None else zw.to(device), out_dtype=torch.float32)   # w_colsum on the fly
        _check(y, r, torch.float32)


def test_extreme_codes_do_not_overflow(device):
    # all-255 activations with zero point 0 against all-255 weights with zero point 0: |T| = 255²·K
    M, N, K = 3, 32, 576
    a = torch.full((M, K), 255, dtype=torch.uint8)
    w = torch.full((N, K), 255, dtype=torch.uint8)
    z = torch.zeros(M, dtype=torch.int32)
    zw = torch.zeros(N, dtype=torch.int32)
    s1, s2 = torch.ones(M), torch.ones(N)
    y = int8_gemm(a.to(device), w.to(device), s1.to(device), s2.to(device), a_zero=z.to(device),
                  w_zero=zw.to(device), out_dtype=torch.float32)
    assert torch.equal(y.cpu(), torch.full((M, N), float(255 * 255 * K)))
    a8 = torch.full((M, K), -128, dtype=torch.int8)
    w8 = torch.full((N, K), -128, dtype=torch.int8)
    y = int8_gemm(a8.to(device), w8.to(device), s1.to(device), s2.to(device), out_dtype=torch.float32)
    assert torch.equal(y.cpu(), torch.full((M, N), float(128 * 128 * K)))


def test_leading_dims_and_scale_shapes(device):
    g = _gen(31)
    a, w, sa, sw, za, zw = _operands(6, 48, 64, 8, False, True, g)
    r = reference_int8_gemm(a, w, sa, sw, a_zero=za, out_dtype=torch.float32)
    y = int8_gemm(a.view(2, 3, 64).to(device), w.to(device), sa.view(2, 3, 1).to(device),
                  sw.view(48, 1).to(device), a_zero=za.view(2, 3).to(device), out_dtype=torch.float32)
    assert y.shape == (2, 3, 48)
    _check(y.reshape(6, 48), r, torch.float32)


def test_gemm_argument_errors(device):
    a = torch.zeros(2, 64, dtype=torch.int8, device=device)
    w = torch.zeros(8, 64, dtype=torch.int8, device=device)
    s2, s8 = torch.ones(2, device=device), torch.ones(8, device=device)
    with pytest.raises(TypeError):
        int8_gemm(a.float(), w, s2, s8)
    with pytest.raises(ValueError, match="shape"):
        int8_gemm(a, w[:, :32], s2, s8)
    with pytest.raises(ValueError, match="a_scale"):
        int8_gemm(a, w, s8, s8)
    with pytest.raises(TypeError):
        int4_gemm(a, w, s2, s8)
    with pytest.raises(TypeError, match="out_dtype"):
        int8_gemm(a, w, s2, s8, out_dtype=torch.int32)


@pytest.mark.parametrize("bits", [8, 4])
def test_end_to_end_quantized_linear(bits, device):
    """fused activation kernel → low-bit GEMM on the folded weight ≈ the float linear layer."""
    g = _gen(32)
    M, K, N = 37, 576, 96
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 30
    W = torch.randn(N, K, generator=g) / K ** 0.5
    bias = torch.randn(N, generator=g)
    kw = {"scale": torch.rand(K, generator=g) + 0.5,
          "rot1": random_orthogonal_blocks(block_sizes(K, 128), generator=g),
          "perm": torch.randperm(K, generator=g),
          "rot2": random_orthogonal_blocks(block_sizes(K, 64), generator=g)}
    T = dense_transform(K, **kw)
    W_fold = (W.double() @ torch.linalg.inv(T).T).float()          # layer reading x·T computes x·Wᵀ
    qw, sw, _ = quantize_rows(W_fold, bits, symmetric=True)
    plan = prepare_transform(K, **kw)
    codes, sa, za = fused_transform_quantize(x.to(device), plan=plan, bits=bits, symmetric=False)
    if bits == 8:
        y = int8_gemm(codes, qw.to(device), sa, sw.to(device), a_zero=za,
                      w_colsum=weight_colsum(qw).to(device), bias=bias.to(device), out_dtype=torch.float32)
    else:
        wp = pack_int4(qw)
        y = int4_gemm(codes, wp.to(device), sa, sw.to(device), a_zero=za,
                      w_colsum=weight_colsum(wp, packed=True, signed=True).to(device), bias=bias.to(device),
                      out_dtype=torch.float32)
    expect = x @ W.T + bias
    rel = ((y.cpu() - expect).norm() / expect.norm()).item()
    assert rel < (0.02 if bits == 8 else 0.25), rel
