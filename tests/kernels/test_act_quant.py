"""Fused transform + per-token quantization kernel == its PyTorch reference.

Exactness: with *dyadic* data (inputs ``k/4``, matrices with entries in
{0, ±1/2, ±1}, power-of-two scales) every product and sum of the transform is
exact in fp32 and fp16, so kernel and reference see the same ``u`` and — doing
the same IEEE fp32 quantizer operations — must agree bit for bit on codes,
packed bytes, scales and zero points.  With random real-valued rotations the
two differ only by float summation order (fp32) or by fp16 dot operands, which
can move a value across a rounding boundary: there we bound the code
differences (≤ 1, rare) and compare scales to a relative tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

import quantcompose_kernels as qk
from quantcompose_kernels import (
    SCALE_EPS,
    fused_transform_quantize,
    kernels_available,
    prepare_transform,
    reference_transform_quantize,
    unpack_int4,
)
from quantcompose_kernels.testing import (
    block_sizes,
    dyadic_blocks,
    dyadic_input,
    hadamard_blocks,
    random_orthogonal_blocks,
)

pytestmark = pytest.mark.needs_triton

QUANT = [(8, False), (8, True), (4, False), (4, True)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pow2_scale(n, g):
    return 2.0 ** torch.randint(-1, 2, (n,), generator=g).to(torch.float32)


def _dyadic_transform(combo, n, g, b1=128, b2=64):
    kw = {}
    if "scale" in combo:
        kw["scale"] = _pow2_scale(n, g)
    if "rot1" in combo:
        kw["rot1"] = dyadic_blocks(block_sizes(n, b1), generator=g)
    if "perm" in combo:
        kw["perm"] = torch.randperm(n, generator=g)
    if "rot2" in combo:
        kw["rot2"] = dyadic_blocks(block_sizes(n, b2), generator=g)
    return kw


def _to(kw, device):
    out = {}
    for k, v in kw.items():
        out[k] = [b.to(device) for b in v] if isinstance(v, list) else v.to(device)
    return out


def _assert_exact(got, ref):
    codes, scales, zeros = got
    rcodes, rscales, rzeros = ref
    assert codes.dtype == rcodes.dtype and codes.shape == rcodes.shape
    assert torch.equal(codes.cpu(), rcodes), "codes / packed bytes differ"
    assert torch.equal(scales.cpu(), rscales), "scales differ"
    if rzeros is None:
        assert zeros is None
    else:
        assert zeros.dtype == torch.int32 and torch.equal(zeros.cpu(), rzeros)


def test_interpreter_mode_is_active(device):
    # conftest sets TRITON_INTERPRET=1 before the kernels are defined when there is no GPU.
    assert kernels_available(device)
    if device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        from quantcompose_kernels import act_quant, gemm

        assert type(act_quant._fused_act_quant_kernel).__name__ == "InterpretedFunction"
        assert type(gemm._lowbit_gemm_kernel).__name__ == "InterpretedFunction"


COMBOS = [
    ("none", "local"),
    ("scale", "local"),
    ("rot1", "local"),
    ("scale+rot1+rot2", "local"),
    ("perm", "gather"),
    ("scale+perm+rot2", "gather"),
    ("rot1+perm", "general"),
    ("scale+rot1+perm+rot2", "general"),
]


@pytest.mark.parametrize("combo,mode", COMBOS)
@pytest.mark.parametrize("bits,symmetric", QUANT)
def test_exact_fp32_width_576(combo, mode, bits, symmetric, device):
    g = _gen(10)
    n, M = 576, 37                      # 4 full 128-blocks + a 64 tail; rows not a tile multiple
    kw = _dyadic_transform(combo, n, g)
    x = dyadic_input((M, n), generator=g)
    plan = prepare_transform(n, **kw)
    assert plan.mode_name == mode
    ref = reference_transform_quantize(x, bits=bits, symmetric=symmetric, **kw)
    got = fused_transform_quantize(x.to(device), bits=bits, symmetric=symmetric, plan=plan)
    _assert_exact(got, ref)
    # the convenience path (no prebuilt plan) is the same kernel
    if combo == "scale+rot1+perm+rot2" and bits == 8:
        _assert_exact(fused_transform_quantize(x.to(device), bits=bits, symmetric=symmetric, **_to(kw, device)),
                      ref)


@pytest.mark.parametrize("combo", ["scale+rot1+rot2", "scale+perm+rot2", "scale+rot1+perm+rot2"])
@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, True)])
def test_exact_fp16_input(combo, bits, symmetric, device):
    g = _gen(11)
    n, M = 576, 17
    kw = _dyadic_transform(combo, n, g)
    x = dyadic_input((M, n), generator=g, dtype=torch.float16)
    ref = reference_transform_quantize(x, bits=bits, symmetric=symmetric, **kw)
    got = fused_transform_quantize(x.to(device), bits=bits, symmetric=symmetric, **kw)
    _assert_exact(got, ref)


@pytest.mark.parametrize("combo", ["scale+rot1+rot2", "scale+rot1+perm+rot2"])
def test_exact_width_1536(combo, device):
    g = _gen(12)
    n, M = 1536, 5
    kw = _dyadic_transform(combo, n, g, b1=128, b2=128)
    x = dyadic_input((M, n), generator=g)
    for bits, sym in [(8, False), (4, True)]:
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        _assert_exact(fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw), ref)


@pytest.mark.slow
def test_exact_width_1536_more_rows(device):
    g = _gen(18)
    n, M = 1536, 40
    kw = _dyadic_transform("scale+rot1+perm+rot2", n, g, b1=64, b2=128)
    x = dyadic_input((M, n), generator=g)
    for bits, sym in QUANT:
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        _assert_exact(fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw), ref)


def test_exact_hadamard_quarot_style(device):
    # QuaRot's online Hadamard: block rotation with ±H/√b blocks (exact in fp32 for b = 16, 64)
    g = _gen(13)
    n, M = 320, 9
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    rot = hadamard_blocks([64] * 5, signs=signs)
    x = dyadic_input((M, n), generator=g)
    plan = prepare_transform(n, rot1=rot)
    assert plan.mode_name == "local" and plan.ow == 64
    for bits, sym in QUANT:
        ref = reference_transform_quantize(x, rot1=rot, bits=bits, symmetric=sym)
        _assert_exact(fused_transform_quantize(x.to(device), plan=plan, bits=bits, symmetric=sym), ref)


def test_exact_misaligned_blocks_and_other_bits(device):
    # rot1 blocks of 96, rot2 blocks of 128: no permutation, but the general path is needed
    g = _gen(14)
    n, M = 384, 19
    kw = {"rot1": dyadic_blocks([96] * 4, generator=g), "rot2": dyadic_blocks([128] * 3, generator=g)}
    x = dyadic_input((M, n), generator=g)
    assert prepare_transform(n, **kw).mode_name == "general"
    for bits, sym in [(8, True), (6, False), (3, True)]:      # bits ≠ 4 are stored unpacked
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        _assert_exact(fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw), ref)


def test_general_path_persistent_loop(device):
    # more row tiles than resident programs: each program loops over tiles, reusing its staging buffer
    g = _gen(17)
    n, M = 192, 150
    kw = _dyadic_transform("scale+rot1+perm+rot2", n, g, b1=64, b2=32)
    x = dyadic_input((M, n), generator=g)
    for bits, sym in [(8, False), (4, True)]:
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        _assert_exact(fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw), ref)


def test_leading_dims_clip_ratio_and_zero_rows(device):
    g = _gen(15)
    n = 128
    kw = {"scale": _pow2_scale(n, g), "rot1": dyadic_blocks([64, 64], generator=g)}
    x = dyadic_input((2, 3, n), generator=g)
    x[1, 2] = 0.0
    for bits, sym in QUANT:
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, clip_ratio=0.75, **kw)
        got = fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, clip_ratio=0.75, **kw)
        assert got[0].shape[:2] == (2, 3) and got[1].shape == (2, 3)
        _assert_exact(got, ref)
        assert got[1][1, 2].item() == pytest.approx(SCALE_EPS)


def test_single_row_and_empty(device):
    g = _gen(16)
    x = dyadic_input((1, 64), generator=g)
    ref = reference_transform_quantize(x, bits=8)
    _assert_exact(fused_transform_quantize(x.to(device), bits=8), ref)
    codes, scales, zeros = fused_transform_quantize(torch.zeros(0, 64, device=device), bits=4)
    assert codes.shape == (0, 32) and scales.shape == (0,) and zeros.shape == (0,)


# --------------------------------------------------------------------------- real-valued data


def _close_codes(got, ref, bits, sym, max_frac):
    """Zero-point-adjusted codes ``q − z`` differ by at most 1, in at most ``max_frac`` of the entries."""
    codes, rcodes = got[0].cpu(), ref[0]
    if bits == 4:
        codes, rcodes = unpack_int4(codes, signed=sym), unpack_int4(rcodes, signed=sym)
    q, rq = codes.to(torch.int32), rcodes.to(torch.int32)
    if not sym:
        q, rq = q - got[2].cpu()[..., None], rq - ref[2][..., None]
    diff = (q - rq).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= max_frac


@pytest.mark.parametrize("combo", ["scale+rot1+rot2", "scale+perm+rot2", "scale+rot1+perm+rot2"])
def test_random_rotations_fp32(combo, device):
    g = _gen(20)
    n, M = 576, 37
    kw = {"scale": torch.rand(n, generator=g) + 0.5}
    if "rot1" in combo:
        kw["rot1"] = random_orthogonal_blocks(block_sizes(n, 128), generator=g)
    if "perm" in combo:
        kw["perm"] = torch.randperm(n, generator=g)
    kw["rot2"] = random_orthogonal_blocks(block_sizes(n, 64), generator=g)
    x = torch.randn(M, n, generator=g) * 3
    x[:, 7] *= 40                       # an outlier channel
    for bits, sym in QUANT:
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        got = fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw)
        torch.testing.assert_close(got[1].cpu(), ref[1], rtol=1e-5, atol=0)
        if not sym:
            assert (got[2].cpu() - ref[2]).abs().max().item() <= 1
        _close_codes(got, ref, bits, sym, max_frac=1e-3)


@pytest.mark.parametrize("combo", ["scale+rot1+rot2", "scale+rot1+perm+rot2"])
def test_random_rotations_fp16(combo, device):
    # fp16 activations: the kernel feeds the tensor cores fp16 operands (the folded block matrices, and in
    # the general path the intermediate y, are rounded to fp16); the reference works in fp32.
    g = _gen(21)
    n, M = 576, 17
    kw = {"scale": torch.rand(n, generator=g) + 0.5,
          "rot1": random_orthogonal_blocks(block_sizes(n, 128), generator=g),
          "perm": torch.randperm(n, generator=g),
          "rot2": random_orthogonal_blocks(block_sizes(n, 128), generator=g)}
    if "perm" not in combo:
        del kw["perm"]
    x = (torch.randn(M, n, generator=g) * 3).half()
    for bits, sym in QUANT:
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        got = fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw)
        torch.testing.assert_close(got[1].cpu(), ref[1], rtol=2e-3, atol=0)
        if not sym:
            assert (got[2].cpu() - ref[2]).abs().max().item() <= 1
        _close_codes(got, ref, bits, sym, max_frac=0.05 if bits == 8 else 0.01)


def test_random_structures_small(device):
    """Many random block partitions / permutations / combinations at small widths, exact data."""
    g = _gen(22)
    for trial in range(12):
        n = int(torch.randint(2, 20, (1,), generator=g)) * 8
        def sizes():
            b = [16, 32, 64][int(torch.randint(0, 3, (1,), generator=g))]
            return block_sizes(n, b)
        kw = {}
        if torch.rand(1, generator=g) < 0.5:
            kw["scale"] = _pow2_scale(n, g)
        if torch.rand(1, generator=g) < 0.6:
            kw["rot1"] = dyadic_blocks(sizes(), generator=g, density=0.5)
        if torch.rand(1, generator=g) < 0.5:
            kw["perm"] = torch.randperm(n, generator=g)
        if torch.rand(1, generator=g) < 0.6:
            kw["rot2"] = dyadic_blocks(sizes(), generator=g, density=0.5)
        M = int(torch.randint(1, 40, (1,), generator=g))
        x = dyadic_input((M, n), generator=g)
        bits, sym = QUANT[trial % 4]
        ref = reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        _assert_exact(fused_transform_quantize(x.to(device), bits=bits, symmetric=sym, **kw), ref)


# --------------------------------------------------------------------------- errors


def test_argument_errors(device):
    x = torch.zeros(2, 64, device=device)
    with pytest.raises(ValueError, match="bits"):
        fused_transform_quantize(x, bits=9)
    with pytest.raises(ValueError, match="width"):
        fused_transform_quantize(x, plan=prepare_transform(32))
    with pytest.raises(ValueError, match="not both"):
        fused_transform_quantize(x, plan=prepare_transform(64), scale=torch.ones(64))
    with pytest.raises(ValueError, match="even"):
        fused_transform_quantize(torch.zeros(2, 63, device=device), bits=4)
    with pytest.raises(TypeError):
        fused_transform_quantize(x.to(torch.int32))
    with pytest.raises(ValueError, match="up to 128"):
        fused_transform_quantize(torch.zeros(2, 256, device=device), rot1=[torch.eye(256)])


def test_lazy_wrappers_keep_signatures():
    import inspect

    from quantcompose_kernels import act_quant, reference

    top = inspect.signature(qk.fused_transform_quantize).parameters
    impl = inspect.signature(act_quant.fused_transform_quantize).parameters
    ref = inspect.signature(reference.reference_transform_quantize).parameters
    assert list(top) == list(impl)
    assert list(ref) == [p for p in impl if p != "plan"]
    assert "Returns" in (qk.fused_transform_quantize.__doc__ or "")
