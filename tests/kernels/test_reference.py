"""The PyTorch references are themselves checked against straightforward dense computations.

No Triton needed here.
"""

from __future__ import annotations

import pytest
import torch

from quantcompose_kernels import (
    SCALE_EPS,
    dequantize_rows,
    pack_int4,
    prepare_transform,
    quantize_rows,
    reference_int4_gemm,
    reference_int8_gemm,
    reference_transform,
    reference_transform_quantize,
    unpack_int4,
    weight_colsum,
)
from quantcompose_kernels.testing import (
    apply_dense,
    block_sizes,
    dense_transform,
    hadamard_blocks,
    perm_matrix,
    random_orthogonal_blocks,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


COMBOS = ["scale", "rot1", "perm", "rot2", "scale+rot1+perm+rot2", "rot1+rot2", "perm+rot2"]


def _transform(combo: str, n: int, g: torch.Generator, b1=128, b2=64):
    kw = {}
    if "scale" in combo:
        kw["scale"] = torch.rand(n, generator=g) + 0.5
    if "rot1" in combo:
        kw["rot1"] = random_orthogonal_blocks(block_sizes(n, b1), generator=g)
    if "perm" in combo:
        kw["perm"] = torch.randperm(n, generator=g)
    if "rot2" in combo:
        kw["rot2"] = random_orthogonal_blocks(block_sizes(n, b2), generator=g)
    return kw


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("n", [576, 1536])
def test_reference_transform_equals_dense_matrix(combo, n):
    g = _gen(1)
    kw = _transform(combo, n, g)
    x = torch.randn(5, n, generator=g)
    expect = apply_dense(x, **kw)
    got = reference_transform(x, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, atol=2e-5, rtol=1e-5)


def test_permutation_convention_matches_architecture_doc():
    # Permutation.forward(x) = x[..., indices]
    perm = torch.tensor([2, 0, 3, 1])
    x = torch.arange(4.0)[None]
    assert torch.equal(reference_transform(x, perm=perm), x[..., perm])
    assert torch.equal((x.double() @ perm_matrix(perm)).float(), x[..., perm])


def test_block_formats_are_equivalent():
    g = _gen(2)
    blocks = random_orthogonal_blocks([64, 64], generator=g)
    x = torch.randn(3, 128, generator=g)
    a = reference_transform(x, rot1=blocks)
    b = reference_transform(x, rot1=torch.stack(blocks))
    c = reference_transform(x, rot1=torch.block_diag(*blocks))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_hadamard_blocks_are_orthonormal():
    for h in hadamard_blocks([16, 64, 128], signs=torch.randint(0, 2, (208,)) * 2.0 - 1):
        torch.testing.assert_close(h.double() @ h.double().T, torch.eye(h.shape[0], dtype=torch.float64))


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="sum to"):
        reference_transform(torch.zeros(1, 10), rot1=[torch.eye(4)])
    with pytest.raises(ValueError, match="square"):
        reference_transform(torch.zeros(1, 4), rot1=[torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="scale"):
        reference_transform(torch.zeros(1, 4), scale=torch.ones(3))


# ----------------------------------------------------------------------------- quantizer


def test_quantize_rows_hand_example_asymmetric():
    u = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    codes, scale, zero = quantize_rows(u, 8, symmetric=False)
    s = torch.tensor(4.0) / torch.tensor(255.0)
    assert scale.item() == s.item()
    assert zero.item() == 64           # round(1 / (4/255)) = round(63.75)
    expect = torch.clamp(torch.round(u / s) + 64, 0, 255).to(torch.uint8)
    assert torch.equal(codes, expect)
    assert codes.dtype == torch.uint8 and zero.dtype == torch.int32
    assert codes[0, 1].item() == 64     # 0 is exactly representable
    assert codes[0, 3].item() == 255


def test_quantize_rows_hand_example_symmetric_half_to_even():
    # max|u| = 127 → scale 1; 2.5 → 2, 3.5 → 4, −2.5 → −2 (half to even)
    u = torch.tensor([[127.0, 2.5, 3.5, -2.5, -200.0 / 2]])
    codes, scale, zero = quantize_rows(u, 8, symmetric=True)
    assert zero is None and scale.item() == 1.0
    assert codes.tolist() == [[127, 2, 4, -2, -100]]
    assert codes.dtype == torch.int8


def test_quantize_rows_properties_and_dequant_error():
    g = _gen(3)
    u = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 10
    for bits in (2, 4, 6, 8):
        for sym in (False, True):
            codes, scale, zero = quantize_rows(u, bits, sym)
            q = codes.to(torch.int32)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
            assert q.min() >= lo and q.max() <= hi
            err = (dequantize_rows(codes, scale, zero) - u).abs()
            # within half a step (plus float slack) everywhere: no clipping at clip_ratio = 1
            assert bool((err <= scale[:, None] * 0.5001 + 1e-6).all()), (bits, sym)


def test_quantize_rows_clip_ratio_and_zero_rows():
    u = torch.zeros(2, 8)
    u[1] = torch.linspace(-4, 4, 8)
    codes, scale, zero = quantize_rows(u, 8, False, clip_ratio=0.5)
    assert scale[0].item() == pytest.approx(SCALE_EPS)
    assert bool((codes[0] == zero[0].to(torch.uint8)).all())
    assert scale[1].item() == pytest.approx(4.0 / 255)
    assert codes[1, 0].item() == 0 and codes[1, -1].item() == 255   # clipped ends saturate


def test_int4_packing_nibble_order_and_roundtrip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F]]
    g = _gen(4)
    u = torch.randint(0, 16, (7, 34), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(u), signed=False), u)
    s = torch.randint(-8, 8, (7, 34), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(s), signed=True), s)
    assert pack_int4(torch.tensor([[-1, -8]], dtype=torch.int8)).tolist() == [[0x8F]]


def test_reference_transform_quantize_equals_dense_pipeline():
    g = _gen(5)
    n = 576
    kw = _transform("scale+rot1+perm+rot2", n, g)
    x = torch.randn(9, n, generator=g)
    u = apply_dense(x, **kw).float()
    for bits, sym in [(8, False), (8, True), (4, False), (4, True)]:
        codes, scales, zeros = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        rc, rs, rz = quantize_rows(u, bits, sym)
        torch.testing.assert_close(scales, rs, rtol=1e-5, atol=0)
        got = unpack_int4(codes, signed=sym) if bits == 4 else codes
        # float rounding of the two evaluation orders may move a value across a rounding boundary
        diff = (got.to(torch.int32) - rc.to(torch.int32)).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# ----------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("a_sym,w_sym", [(True, True), (False, True), (True, False), (False, False)])
def test_reference_gemms_equal_dequantized_float_matmul(a_sym, w_sym):
    g = _gen(6)
    M, N, K = 11, 24, 96
    a_f = torch.randn(M, K, generator=g)
    w_f = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    for bits in (8, 4):
        qa, sa, za = quantize_rows(a_f, bits, a_sym)
        qw, sw, zw = quantize_rows(w_f, bits, w_sym)
        expect = dequantize_rows(qa, sa, za).double() @ dequantize_rows(qw, sw, zw).double().T + bias.double()
        if bits == 8:
            y = reference_int8_gemm(qa, qw, sa, sw, a_zero=za, w_zero=zw, bias=bias, out_dtype=torch.float32)
        else:
            y = reference_int4_gemm(pack_int4(qa), pack_int4(qw), sa, sw, a_zero=za, w_zero=zw, bias=bias,
                                    out_dtype=torch.float32)
        torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-4)


def test_weight_colsum():
    w = torch.tensor([[1, 2, 3], [250, 0, 1]], dtype=torch.uint8)
    assert weight_colsum(w).tolist() == [6, 251]
    s = torch.tensor([[-1, 7], [-8, -8]], dtype=torch.int8)
    assert weight_colsum(pack_int4(s), packed=True, signed=True).tolist() == [6, -16]
    with pytest.raises(ValueError):
        weight_colsum(pack_int4(s), packed=True)


# ----------------------------------------------------------------------------- plan (host side)


def _plan_dense(plan) -> torch.Tensor:
    """Re-assemble the dense matrix a plan encodes (checks the plan tables independently of Triton)."""
    n = plan.n
    if plan.mode == 2:
        first = torch.zeros(n, n, dtype=torch.float64)
        for k in range(plan.b1_start.numel()):
            s, w = int(plan.b1_start[k]), int(plan.b1_width[k])
            first[s:s + w, s:s + w] = plan.c1[k, :w, :w]
    else:
        first = torch.eye(n, dtype=torch.float64)
    m = torch.zeros(n, n, dtype=torch.float64)
    for j in range(plan.num_out_blocks):
        o, w = int(plan.o_start[j]), int(plan.o_width[j])
        src = (torch.arange(int(plan.src_start[j]), int(plan.src_start[j]) + w) if plan.mode == 0
               else plan.gidx[j, :w])
        sel = torch.zeros(n, w, dtype=torch.float64)
        sel[src, torch.arange(w)] = 1.0
        if plan.c2 is not None:
            blk = sel @ plan.c2[j, :w, :w]
        else:
            blk = sel * (plan.mul[o:o + w].double()[None, :] if plan.mul is not None else 1.0)
        m[:, o:o + w] = first @ blk
    return m


@pytest.mark.parametrize("combo,expect_mode", [
    ("none", "local"), ("scale", "local"), ("rot1", "local"), ("rot2", "local"), ("rot1+rot2", "local"),
    ("scale+rot1+rot2", "local"), ("perm", "gather"), ("perm+rot2", "gather"), ("scale+perm+rot2", "gather"),
    ("rot1+perm", "general"), ("scale+rot1+perm+rot2", "general"),
])
@pytest.mark.parametrize("n", [576, 200])
def test_plan_encodes_the_transform(combo, expect_mode, n):
    g = _gen(7)
    kw = _transform(combo, n, g, b1=128 if n == 576 else 64, b2=64 if n == 576 else 32)
    plan = prepare_transform(n, **kw)
    assert plan.mode_name == expect_mode
    torch.testing.assert_close(_plan_dense(plan), dense_transform(n, **kw), atol=1e-12, rtol=1e-12)


def test_plan_detects_block_local_permutations():
    g = _gen(8)
    n = 256
    r1 = random_orthogonal_blocks([64] * 4, generator=g)
    r2 = random_orthogonal_blocks([64] * 4, generator=g)
    # permutation inside each 64-block, then whole blocks swapped: still block-local
    inner = torch.cat([torch.randperm(64, generator=g) + 64 * i for i in range(4)])
    perm = inner.view(4, 64)[torch.tensor([2, 0, 3, 1])].reshape(-1)
    plan = prepare_transform(n, rot1=r1, perm=perm, rot2=r2)
    assert plan.mode_name == "local" and plan.ow == 64
    torch.testing.assert_close(_plan_dense(plan), dense_transform(n, rot1=r1, perm=perm, rot2=r2))
    # misaligned block sizes (96 vs 128) without a permutation need the general path
    r96 = random_orthogonal_blocks([96] * 4, generator=g)
    r128 = random_orthogonal_blocks([128] * 3, generator=g)
    plan = prepare_transform(384, rot1=r96, rot2=r128)
    assert plan.mode_name == "general"
    torch.testing.assert_close(_plan_dense(plan), dense_transform(384, rot1=r96, rot2=r128))


def test_plan_rejects_bad_inputs():
    with pytest.raises(ValueError, match="up to 128"):
        prepare_transform(256, rot1=[torch.eye(256)])
    with pytest.raises(ValueError, match="not a permutation"):
        prepare_transform(4, perm=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        prepare_transform(4, scale=torch.ones(5))
