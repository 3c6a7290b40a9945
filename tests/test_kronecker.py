"""Unit tests of the Kronecker atom, its use online in a QuantLinear, and kernel dispatch.

The hypothesis properties (inverse, matrix, composition, folding, norms,
serialization) run over Kronecker atoms in tests/test_transforms_properties.py;
these pin the exact identities, the error cases and the integration points.
Tolerances: float64 1e-12 relative for single atoms, float32 1e-5 relative
for the well-conditioned factors used here (condition number at most 4).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from quantcompose.errors import ShapeError, TransformError
from quantcompose.kernel_dispatch import build_kernel_state, transform_to_kernel_args
from quantcompose.qlinear import QuantLinear
from quantcompose.quant import QuantSpec, fake_quantize
from quantcompose.transforms import (
    Compose,
    Identity,
    Kronecker,
    Permutation,
    Scale,
    flatten_state,
    from_state_dict,
    max_condition,
    random_orthogonal,
    unflatten_state,
)

from numerics import gen, rel_err, well_conditioned

F64 = torch.float64
F32_RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def invertible(n: int, seed: int) -> torch.Tensor:
    return well_conditioned(n, gen(seed))


@pytest.fixture
def kron() -> Kronecker:
    return Kronecker(invertible(3, 1), invertible(4, 2))


# --------------------------------------------------------------------------- the map


def test_forward_is_a_transposed_x_b_on_the_row_major_view(kron: Kronecker) -> None:
    x = torch.randn(5, 12, dtype=F64, generator=gen(3))
    expected = (kron.A.T @ x.reshape(5, 3, 4) @ kron.B).reshape(5, 12)
    assert rel_err(kron(x), expected) <= 1e-12
    assert kron.size == 12 and kron.factor_sizes == (3, 4)


def test_matrix_is_torch_kron_of_the_factors(kron: Kronecker) -> None:
    assert rel_err(kron.matrix(), torch.kron(kron.A, kron.B)) <= 1e-12


def test_inverse_and_transpose_are_kroneckers_of_the_inverted_and_transposed_factors(kron: Kronecker) -> None:
    inv = kron.inv
    assert isinstance(inv, Kronecker) and isinstance(kron.T, Kronecker)
    assert rel_err(inv.A, torch.linalg.inv(kron.A)) <= 1e-12
    assert rel_err(inv.B, torch.linalg.inv(kron.B)) <= 1e-12
    assert torch.equal(kron.T.A, kron.A.T) and torch.equal(kron.T.B, kron.B.T)
    eye = torch.eye(12, dtype=F64)
    assert float((kron.matrix() @ inv.matrix() - eye).abs().max()) <= 1e-12
    x = torch.randn(2, 3, 12, dtype=F64, generator=gen(4))
    assert rel_err(inv(kron(x)), x) <= 1e-12
    assert inv.inv is kron and not kron.is_orthogonal


def test_composition_with_other_atoms_is_the_matrix_product(kron: Kronecker) -> None:
    s = Scale(torch.linspace(0.5, 2.0, 12, dtype=F64))
    p = Permutation(torch.randperm(12, generator=gen(5)))
    t = s @ kron @ p
    assert rel_err(t.matrix(), s.matrix() @ torch.kron(kron.A, kron.B) @ p.matrix()) <= 1e-12
    assert isinstance(Compose([t, t.inv]).simplify(), Identity)


def test_orthogonal_factors_make_an_orthogonal_atom_that_keeps_norms() -> None:
    a, b = random_orthogonal(8, gen(6)), random_orthogonal(6, gen(7))
    t = Kronecker(a, b)
    assert t.is_orthogonal and t.inv is t.T
    assert torch.equal(t.inv.A, a.T)  # inverted by transposition
    x = torch.randn(4, 48, dtype=F64, generator=gen(8))
    assert rel_err(t(x).norm(dim=-1), x.norm(dim=-1)) <= 1e-12
    # One factor slightly off orthogonal: a general atom, inverted exactly rather than transposed.
    near = Kronecker(a + 1e-9 * torch.randn(8, 8, dtype=F64, generator=gen(9)), b)
    assert not near.is_orthogonal
    assert rel_err(near.inv(near(x)), x) <= 1e-12


def test_orthogonality_survives_a_float32_cast() -> None:
    t = Kronecker(random_orthogonal(16, gen(1)), random_orthogonal(24, gen(2))).to(dtype=torch.float32)
    assert t.is_orthogonal and t.A.dtype == torch.float32


def test_orthogonality_tolerance_is_never_looser_than_a_block_rotations() -> None:
    # 16·size·eps alone would be 0.5 for a 4×4 bfloat16 factor; |F·Fᵀ − I| = 0.21 here.
    t = Kronecker(1.1 * torch.eye(4, dtype=torch.bfloat16), torch.eye(2, dtype=torch.bfloat16))
    assert not t.is_orthogonal


def test_diagonal_and_identity_factors() -> None:
    d = Kronecker(torch.diag(torch.tensor([1.0, -2.0], dtype=F64)), torch.diag(torch.tensor([3.0, 0.5, 4.0], dtype=F64)))
    assert d.is_diagonal and torch.equal(d.matrix(), torch.diag(torch.diagonal(d.matrix())))
    kron_general = Kronecker(invertible(2, 3), torch.eye(3, dtype=F64))
    assert not kron_general.is_diagonal
    identity = Kronecker.identity(4, 5)
    assert identity.is_orthogonal and isinstance(identity.simplify(), Identity) and identity.simplify().size == 20
    assert kron_general.simplify() is kron_general


def test_width_one_factors_are_allowed() -> None:
    a = invertible(7, 4)
    t = Kronecker(a, torch.tensor([[2.0]], dtype=F64))
    assert rel_err(t.matrix(), 2.0 * a) <= 1e-12


def test_large_width_never_builds_the_dense_matrix() -> None:
    # 128·128 = 16384 channels: a dense float64 matrix would take 2 GiB and 4e12 flops per 1e3 rows.
    a, b = random_orthogonal(128, gen(1)), random_orthogonal(128, gen(2))
    t = Kronecker(a, b)
    x = torch.randn(2, 128 * 128, dtype=F64, generator=gen(3))
    y = t(x)
    assert rel_err(y.norm(dim=-1), x.norm(dim=-1)) <= 1e-12
    assert rel_err(t.inv(y), x) <= 1e-12


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.ones(2, 3), torch.eye(2), r"factor A must be a non-empty square matrix, got shape \(2, 3\)"),
        (torch.eye(2), torch.ones(4), r"factor B must be a non-empty square matrix, got shape \(4,\)"),
        (torch.eye(2), torch.zeros(0, 0), r"factor B must be a non-empty square"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.eye(2), r"A has 1 NaN or infinite"),
        (torch.eye(2), torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), r"B has 1 NaN or infinite"),
        (torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64), torch.eye(2), r"A .*singular or ill-conditioned"),
        (torch.zeros(3, 3), torch.eye(2), r"A .*singular or ill-conditioned"),
        (torch.eye(2), torch.diag(torch.tensor([1.0, 1e-9], dtype=F64)), r"B .*condition number 1e\+09 exceeds 1e\+08"),
    ],
)
def test_invalid_factors_are_rejected(a, b, message: str) -> None:
    with pytest.raises(TransformError, match=message):
        Kronecker(a, b)


def test_condition_limit_depends_on_the_dtype() -> None:
    assert max_condition(F64) == 1e8
    assert max_condition(torch.float32) == pytest.approx(1 / torch.finfo(torch.float32).eps)
    mild = torch.diag(torch.tensor([1.0, 1e-7], dtype=F64))  # condition number 1e7
    t = Kronecker(mild, torch.eye(2, dtype=F64))  # fine in float64
    with pytest.raises(TransformError, match=r"float32.*exceeds 8.39e\+06"):
        t.to(dtype=torch.float32)


def test_mixed_factor_dtypes_are_promoted_and_transforms_are_immutable() -> None:
    t = Kronecker(torch.eye(2, dtype=torch.float32), invertible(3, 5))
    assert t.A.dtype == t.B.dtype == F64
    with pytest.raises(AttributeError, match="immutable"):
        t.A = torch.eye(2)


def test_width_mismatch_is_a_shape_error(kron: Kronecker) -> None:
    with pytest.raises(ShapeError, match="width 12"):
        kron(torch.zeros(2, 10))


# --------------------------------------------------------------------------- folding, dtypes, state


def test_folding_into_a_linear_keeps_its_output(kron: Kronecker) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5, dtype=F64)
    x = torch.randn(7, 12, dtype=F64)
    w, b = kron.fold_into_weight(layer.weight.detach(), layer.bias.detach())
    assert rel_err(F.linear(kron(x), w, b), layer(x).detach()) <= 1e-12
    producer = torch.nn.Linear(3, 12, dtype=F64)
    z = torch.randn(7, 3, dtype=F64)
    w, b = kron.fold_into_output(producer.weight.detach(), producer.bias.detach())
    assert rel_err(F.linear(z, w, b), kron(producer(z).detach())) <= 1e-12


def test_float32_matches_float64(kron: Kronecker) -> None:
    t32 = kron.to(dtype=torch.float32)
    x = torch.randn(6, 12, dtype=F64, generator=gen(6))
    y32 = t32(x.float())
    assert y32.dtype == torch.float32
    assert rel_err(y32.double(), kron(x)) <= F32_RTOL
    assert rel_err(t32.inv(y32).double(), x) <= F32_RTOL
    moved = kron.to(device="cpu")
    assert moved == kron and moved is not kron


def test_serialization_round_trip_through_safetensors(kron: Kronecker, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    config, tensors = flatten_state((Scale([2.0] * 12) @ kron).state_dict(), prefix="layer0.mlp_in.")
    save_file(tensors, str(tmp_path / "t.safetensors"))
    config = json.loads(json.dumps(config))
    rebuilt = from_state_dict(unflatten_state(config, load_file(str(tmp_path / "t.safetensors"))))
    assert isinstance(rebuilt[1], Kronecker) and rebuilt[1] == kron
    x = torch.randn(3, 12, dtype=F64, generator=gen(7))
    assert torch.equal(rebuilt[1](x), kron(x)) and torch.equal(rebuilt[1].inv(x), kron.inv(x))
    assert Kronecker(kron.A * 2, kron.B) != kron  # equality is by value


# --------------------------------------------------------------------------- QuantLinear and kernels


def test_quantlinear_with_an_online_kronecker_matches_the_dense_reference(kron: Kronecker) -> None:
    torch.manual_seed(1)
    weight, bias = torch.randn(5, 12, dtype=F64), torch.randn(5, dtype=F64)
    folded, _ = kron.fold_into_weight(weight)
    spec = QuantSpec(8, False, "token")
    layer = QuantLinear(folded, bias, transform=kron, act_spec=spec)
    x = torch.randn(9, 12, dtype=F64)
    dense = F.linear(fake_quantize(x @ torch.kron(kron.A, kron.B), spec), folded, bias)
    assert torch.allclose(layer(x), dense, rtol=0, atol=1e-12)
    # Without an activation quantizer the online transform and the folded weight cancel exactly.
    exact = QuantLinear(folded, bias, transform=kron)
    assert rel_err(exact(x), F.linear(x, weight, bias)) <= 1e-12
    # .to() moves the transform with the layer and keeps it a Kronecker; a float32 input works too.
    moved = exact.to("cpu").float()
    assert isinstance(moved.transform, Kronecker)
    assert rel_err(moved(x.float()).double(), F.linear(x, weight, bias)) <= F32_RTOL


def test_kernel_dispatch_reports_a_kronecker_as_not_fusable(kron: Kronecker) -> None:
    assert transform_to_kernel_args(kron) is None
    assert transform_to_kernel_args(Scale([2.0] * 12) @ kron) is None
    assert transform_to_kernel_args(Scale([2.0] * 12)) is not None  # the dispatcher does fuse a plain Scale
    weight = torch.randn(5, 12)
    folded, _ = kron.fold_into_weight(weight.double())
    layer = QuantLinear(folded.float(), transform=kron, act_spec=QuantSpec(8, False, "token"),
                        weight_spec=QuantSpec(8, False, "channel"))
    assert build_kernel_state(layer, torch.device("cpu")) is None
    # Asked to use the kernels anyway, the layer falls back to the reference path.
    x = torch.randn(4, 12)
    layer.kernels = "never"
    reference = layer(x)
    layer.kernels = "always"
    assert torch.equal(layer(x), reference)
