"""QuantSpec: validation, code ranges, serialization."""

from __future__ import annotations

import json
import math

import pytest
import torch

from quantcompose.errors import QuantSpecError
from quantcompose.quant import QuantSpec


def test_defaults() -> None:
    s = QuantSpec()
    assert (s.bits, s.symmetric, s.granularity, s.group_size, s.clip_ratio) == (8, False, "token", None, 1.0)


def test_positional_field_order() -> None:
    # strategy.py builds specs positionally; this order is part of the API.
    s = QuantSpec(4, True, "group", 128, 0.9)
    assert (s.bits, s.symmetric, s.granularity, s.group_size, s.clip_ratio) == (4, True, "group", 128, 0.9)


def test_frozen() -> None:
    with pytest.raises(Exception):
        QuantSpec().bits = 4  # type: ignore[misc]


@pytest.mark.parametrize("bits", range(2, 9))
def test_code_range(bits: int) -> None:
    a = QuantSpec(bits, False)
    assert (a.qmin, a.qmax, a.code_dtype) == (0, 2**bits - 1, torch.uint8)
    s = QuantSpec(bits, True)
    assert (s.qmin, s.qmax, s.code_dtype) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8)
    # The code range must fit the code dtype.
    for spec in (a, s):
        info = torch.iinfo(spec.code_dtype)
        assert info.min <= spec.qmin and spec.qmax <= info.max


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 4.5, 4.0, True, False, "4", None])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(QuantSpecError, match="bits"):
        QuantSpec(bits)  # type: ignore[arg-type]


def test_numpy_int_bits_normalized() -> None:
    np = pytest.importorskip("numpy")
    s = QuantSpec(np.int64(4))  # type: ignore[arg-type]
    assert type(s.bits) is int and s.bits == 4


@pytest.mark.parametrize("gran", ["row", "Token", "", None, 3])
def test_bad_granularity_lists_valid_ones(gran: object) -> None:
    with pytest.raises(QuantSpecError) as info:
        QuantSpec(4, False, gran)  # type: ignore[arg-type]
    msg = str(info.value)
    for valid in ("tensor", "channel", "token", "group"):
        assert valid in msg


def test_group_needs_size() -> None:
    with pytest.raises(QuantSpecError, match="group_size"):
        QuantSpec(4, False, "group")


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_group_size(size: object) -> None:
    with pytest.raises(QuantSpecError, match="group_size"):
        QuantSpec(4, False, "group", size)  # type: ignore[arg-type]


@pytest.mark.parametrize("gran", ["tensor", "channel", "token"])
def test_group_size_only_for_group(gran: str) -> None:
    with pytest.raises(QuantSpecError, match="group_size"):
        QuantSpec(4, False, gran, 64)  # type: ignore[arg-type]


@pytest.mark.parametrize("clip", [0, 0.0, -0.5, 1.5, 1.0000001, math.nan, math.inf, True, "0.9"])
def test_bad_clip(clip: object) -> None:
    with pytest.raises(QuantSpecError, match="clip_ratio"):
        QuantSpec(4, False, "token", None, clip)  # type: ignore[arg-type]


@pytest.mark.parametrize("clip", [1, 1.0, 0.5, 1e-3])
def test_good_clip(clip: float) -> None:
    s = QuantSpec(4, False, "token", None, clip)
    assert isinstance(s.clip_ratio, float) and s.clip_ratio == clip


def test_symmetric_must_be_bool() -> None:
    with pytest.raises(QuantSpecError, match="symmetric"):
        QuantSpec(4, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(4, True, "channel"),
        QuantSpec(3, False, "group", 64, 0.85),
        QuantSpec(2, True, "tensor", None, 0.5),
    ],
)
def test_dict_round_trip_through_json(spec: QuantSpec) -> None:
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == spec.to_dict()
    assert QuantSpec.from_dict(d) == spec


def test_from_dict_rejects_unknown_keys_and_validates() -> None:
    with pytest.raises(QuantSpecError, match="nbits"):
        QuantSpec.from_dict({"nbits": 4})
    with pytest.raises(QuantSpecError, match="bits"):
        QuantSpec.from_dict({"bits": 12})
    with pytest.raises(QuantSpecError):
        QuantSpec.from_dict([("bits", 4)])  # type: ignore[arg-type]
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(4)


def test_str() -> None:
    assert str(QuantSpec(4, False, "channel")) == "w4 asym per-channel"
    assert str(QuantSpec(4, True, "token")) == "a4 sym per-token"
    assert str(QuantSpec(3, False, "group", 128)) == "w3 asym per-group(128)"
    assert str(QuantSpec(8, True, "tensor", None, 0.9)) == "int8 sym per-tensor clip=0.9"
