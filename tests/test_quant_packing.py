"""int4 packing: layout, round trip, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcompose.errors import QuantSpecError, ShapeError
from quantcompose.quant import QuantSpec, pack_int4, quantize, unpack_int4


def test_known_bytes_unsigned() -> None:
    assert pack_int4(torch.tensor([1, 2]), signed=False).tolist() == [0x21]
    assert pack_int4(torch.tensor([15, 0, 0, 15, 10, 11]), signed=False).tolist() == [0x0F, 0xF0, 0xBA]


def test_known_bytes_signed() -> None:
    assert pack_int4(torch.tensor([-1, 0]), signed=True).tolist() == [0x0F]
    assert pack_int4(torch.tensor([0, -1]), signed=True).tolist() == [0xF0]
    assert pack_int4(torch.tensor([-8, 7]), signed=True).tolist() == [0x78]
    assert pack_int4(torch.tensor([7, -8, -2, 1]), signed=True).tolist() == [0x87, 0x1E]


def test_output_dtypes_and_shapes() -> None:
    codes = torch.zeros(2, 3, 8, dtype=torch.int8)
    p = pack_int4(codes, signed=True)
    assert p.dtype == torch.uint8 and p.shape == (2, 3, 4)
    assert unpack_int4(p, signed=True).dtype == torch.int8
    assert unpack_int4(p, signed=False).dtype == torch.uint8
    assert unpack_int4(p, signed=True).shape == (2, 3, 8)


def test_unpack_known_byte() -> None:
    b = torch.tensor([0x8F], dtype=torch.uint8)
    assert unpack_int4(b, signed=True).tolist() == [-1, -8]
    assert unpack_int4(b, signed=False).tolist() == [15, 8]


@settings(max_examples=50, deadline=None)
@given(
    signed=st.booleans(),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    half=st.integers(1, 16),
    dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(signed: bool, lead: list[int], half: int, dtype: torch.dtype, seed: int) -> None:
    lo, hi = (-8, 7) if signed else (0, 15)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(lo, hi + 1, (*lead, 2 * half), generator=g).to(dtype)
    packed = pack_int4(codes, signed)
    assert packed.shape == (*lead, half)
    back = unpack_int4(packed, signed)
    assert torch.equal(back.to(torch.int64), codes.to(torch.int64))


@pytest.mark.parametrize("signed", [False, True])
def test_all_values_both_positions(signed: bool) -> None:
    lo, hi = (-8, 7) if signed else (0, 15)
    vals = torch.arange(lo, hi + 1)
    a, b = torch.meshgrid(vals, vals, indexing="ij")
    codes = torch.stack((a.flatten(), b.flatten()), dim=-1)  # every (low, high) pair
    packed = pack_int4(codes, signed)
    assert packed.unique().numel() == 256  # the layout is a bijection onto bytes
    assert torch.equal(unpack_int4(packed, signed).to(torch.int64), codes)


@pytest.mark.parametrize("signed", [False, True])
def test_round_trip_from_4bit_quantizer(signed: bool) -> None:
    q = quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), QuantSpec(4, signed, "group", 16))
    back = unpack_int4(pack_int4(q.codes, signed), signed)
    assert back.dtype == q.codes.dtype and torch.equal(back, q.codes)


def test_odd_last_dim() -> None:
    with pytest.raises(ShapeError, match="even"):
        pack_int4(torch.zeros(4, 3, dtype=torch.int8), signed=True)


@pytest.mark.parametrize("signed,bad", [(True, 8), (True, -9), (False, 16), (False, -1)])
def test_out_of_range(signed: bool, bad: int) -> None:
    codes = torch.zeros(2, 4, dtype=torch.int16)
    codes[1, 2] = bad
    with pytest.raises(QuantSpecError):
        pack_int4(codes, signed)


def test_wrong_dtypes() -> None:
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(4), signed=False)
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(4, dtype=torch.int8), signed=False)


def test_zero_dim() -> None:
    with pytest.raises(ShapeError):
        pack_int4(torch.tensor(1), signed=False)
    with pytest.raises(ShapeError):
        unpack_int4(torch.tensor(1, dtype=torch.uint8), signed=False)
