"""Unit tests and error cases of the transform atoms, Compose and serialization."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from quantcompose.errors import HadamardSizeError, ShapeError, TransformError
from quantcompose.transforms import (
    BlockRotation,
    Compose,
    Hadamard,
    Identity,
    Permutation,
    Scale,
    Transform,
    base_orders,
    flatten_state,
    from_state_dict,
    fwht,
    hadamard_matrix,
    nearest_hadamard_sizes,
    random_orthogonal,
    supported_hadamard_size,
    unflatten_state,
)
from quantcompose.transforms.galois import prime_power, quadratic_character
from quantcompose.transforms.hadamard_matrices import sylvester

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# --------------------------------------------------------------------------- base behaviour


def test_width_mismatch_raises_shape_error_with_hint() -> None:
    t = Scale(torch.ones(8, dtype=F64) * 2)
    with pytest.raises(ShapeError, match=r"width 8.*last dimension 5.*\(3, 5\)"):
        t(torch.zeros(3, 5))
    with pytest.raises(ShapeError):
        t.inverse(torch.zeros(8, 3))
    with pytest.raises(ShapeError, match="scalar"):
        t(torch.tensor(1.0))


def test_transforms_are_immutable() -> None:
    t = Scale([1.0, 2.0])
    with pytest.raises(AttributeError, match="immutable"):
        t.factors = torch.ones(2)
    with pytest.raises(AttributeError):
        Hadamard(4).size = 8


def test_forward_keeps_input_dtype_and_leading_dims() -> None:
    t = BlockRotation.random(12, 5, generator=gen()).to(dtype=torch.float32)
    x = torch.randn(2, 3, 4, 12, dtype=F64)
    y = t(x)
    assert y.shape == x.shape and y.dtype == F64
    # float32 parameters, float64 input: computed in float64 against the same (float32) matrix.
    assert close(y, x @ t.matrix(F64), 1e-13)
    assert t(x.float()).dtype == torch.float32


def test_matrix_default_is_forward_of_identity_and_takes_dtype() -> None:
    t = Permutation([2, 0, 1])
    m = t.matrix(dtype=torch.float32)
    assert m.dtype == torch.float32
    assert torch.equal(m, torch.eye(3)[:, [2, 0, 1]])


def test_inv_and_T_are_cached_and_linked() -> None:
    t = Scale([2.0, 4.0])
    assert t.inv is t.inv and t.inv.inv is t
    assert t.inv._inverse_of is t
    h = Hadamard(12)
    assert h.T is h.inv  # orthogonal: transpose == inverse
    assert h.T.T is h


def test_equality_is_by_value() -> None:
    assert Scale([1.0, 2.0]) == Scale([1.0, 2.0])
    assert Scale([1.0, 2.0]) != Scale([1.0, 3.0])
    assert Scale([1.0, 2.0]) != Scale(torch.tensor([1.0, 2.0], dtype=torch.float32))  # dtype counts
    assert Identity(3) != Scale([1.0, 1.0, 1.0])
    assert len({Hadamard(8), Hadamard(8)}) == 1


def test_fold_into_weight_on_a_linear() -> None:
    torch.manual_seed(0)
    n = 36
    t = Compose([Scale(torch.rand(n, dtype=F64) + 0.5), Hadamard.random(n, gen(1)), Permutation.random(n, gen(2))])
    layer = torch.nn.Linear(n, 5, dtype=F64)
    x = torch.randn(7, n, dtype=F64)
    w, b = t.fold_into_weight(layer.weight.detach(), layer.bias.detach())
    assert close(F.linear(t(x), w, b), layer(x).detach(), 1e-12)
    # W·T⁻ᵀ, checked against the dense definition.
    assert close(w, layer.weight.detach() @ torch.linalg.inv(t.matrix()).T, 1e-12)
    w0, b0 = t.fold_into_weight(layer.weight.detach())
    assert b0 is None and torch.equal(w0, w)


def test_fold_into_output_on_a_linear() -> None:
    torch.manual_seed(0)
    n = 20
    t = Compose([BlockRotation.random(n, 8, gen(3)), Scale(torch.rand(n, dtype=F64) + 0.5)])
    layer = torch.nn.Linear(6, n, dtype=F64)
    x = torch.randn(4, 6, dtype=F64)
    w, b = t.fold_into_output(layer.weight.detach(), layer.bias.detach())
    assert close(F.linear(x, w, b), t(layer(x).detach()), 1e-12)
    assert close(w, t.matrix().T @ layer.weight.detach(), 1e-12)


def test_fold_never_aliases_the_callers_tensors() -> None:
    w, b = torch.randn(3, 4, dtype=F64), torch.randn(3, dtype=F64)
    w2, b2 = Identity(4).fold_into_weight(w, b)
    assert w2 is not w and b2 is not b and torch.equal(w2, w)
    w3, _ = Identity(3).fold_into_output(w)
    assert w3 is not w


def test_fold_errors() -> None:
    t = Scale(torch.ones(4, dtype=F64))
    with pytest.raises(ShapeError, match="in_features=5"):
        t.fold_into_weight(torch.zeros(3, 5))
    with pytest.raises(ShapeError, match="out_features=3"):
        t.fold_into_output(torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="2-D"):
        t.fold_into_weight(torch.zeros(4))
    with pytest.raises(ShapeError, match="bias"):
        t.fold_into_output(torch.zeros(4, 2), torch.zeros(3))


# --------------------------------------------------------------------------- Identity


def test_identity() -> None:
    t = Identity(5)
    x = torch.randn(2, 5)
    assert torch.equal(t(x), x)
    assert torch.equal(t.matrix(), torch.eye(5, dtype=F64))
    assert t.inv == t and t.T == t
    assert t.is_orthogonal and t.is_diagonal
    assert t.state_dict() == {"type": "Identity", "size": 5}
    with pytest.raises(TransformError, match="positive int"):
        Identity(0)


# --------------------------------------------------------------------------- Scale


def test_scale_forward_inverse_transpose() -> None:
    f = torch.tensor([2.0, -0.5, 4.0], dtype=F64)
    t = Scale(f)
    x = torch.randn(4, 3, dtype=F64)
    assert torch.equal(t(x), x * f)
    assert torch.equal(t.matrix(), torch.diag(f))
    assert torch.equal(t.inv.factors, 1 / f)
    assert t.T is t
    assert t.is_diagonal and not t.is_orthogonal
    assert Scale([1.0, -1.0]).is_orthogonal


def test_scale_from_list_is_float64_and_copies_input() -> None:
    assert Scale([1, 2, 3]).factors.dtype == F64
    f = torch.tensor([1.0, 2.0])
    t = Scale(f)
    f[0] = 100.0
    assert float(t.factors[0]) == 1.0  # the transform owns its parameters


@pytest.mark.parametrize(
    "bad, count",
    [([1.0, 0.0, 2.0], 1), ([float("nan"), 1.0, float("inf")], 2), ([0.0, 0.0, -float("inf"), 1.0], 3)],
)
def test_scale_rejects_zero_nan_inf(bad: list[float], count: int) -> None:
    with pytest.raises(TransformError, match=rf"{count} of {len(bad)}.*[Cc]lamp"):
        Scale(bad)


def test_scale_error_names_offending_indices() -> None:
    f = torch.ones(100, dtype=F64)
    f[[3, 70]] = 0
    with pytest.raises(TransformError, match=r"indices \[3, 70\]"):
        Scale(f)


def test_scale_rejects_bad_shapes() -> None:
    with pytest.raises(TransformError, match="1-D"):
        Scale(torch.ones(2, 2))
    with pytest.raises(TransformError, match="1-D"):
        Scale(torch.ones(0))


# --------------------------------------------------------------------------- Permutation


def test_permutation_forward_indexes_last_dim() -> None:
    p = Permutation([2, 0, 3, 1])
    x = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(p(x), x[..., [2, 0, 3, 1]])
    assert p.indices.dtype == torch.int64
    assert torch.equal(p.inv(p(x)), x)
    assert torch.equal(p.inv.indices, torch.tensor([1, 3, 0, 2]))
    assert p.T == p.inv
    assert p.is_orthogonal and not p.is_diagonal
    assert Permutation([0, 1, 2]).is_diagonal


def test_permutation_is_stored_as_indices_only() -> None:
    state = Permutation.random(1000, gen()).state_dict()
    assert set(state) == {"type", "indices"} and state["indices"].shape == (1000,)


def test_permutation_composition_is_a_permutation() -> None:
    p, q = Permutation.random(10, gen(1)), Permutation.random(10, gen(2))
    pq = p @ q
    assert isinstance(pq, Permutation)
    assert torch.equal(pq.matrix(), p.matrix() @ q.matrix())
    x = torch.randn(3, 10)
    assert torch.equal(pq(x), q(p(x)))


@pytest.mark.parametrize(
    "indices, message",
    [
        ([0, 1, 1], r"missing \[2\], repeated \[1\]"),
        ([0, 3, 1], r"0\.\.2"),
        ([-1, 0, 1], r"0\.\.2"),
        (torch.tensor([0.0, 1.0]), "integers"),
        ([], "non-empty"),
    ],
)
def test_permutation_validation(indices, message: str) -> None:
    with pytest.raises(TransformError, match=message):
        Permutation(indices)


def test_permutation_to_keeps_int64() -> None:
    p = Permutation([1, 0]).to(dtype=torch.float16)
    assert p.indices.dtype == torch.int64


# --------------------------------------------------------------------------- BlockRotation


def test_block_rotation_matches_block_diag() -> None:
    blocks = [random_orthogonal(s, gen(s)) for s in (3, 3, 5, 1, 2)]
    t = BlockRotation(blocks)
    assert t.size == 14 and t.block_sizes == [3, 3, 5, 1, 2]
    assert close(t.matrix(), torch.block_diag(*blocks), 1e-15)
    assert close(t.inv.matrix(), torch.block_diag(*blocks).T, 1e-15)
    assert t.T is t.inv
    assert t.is_orthogonal and not t.is_diagonal


def test_block_rotation_576_with_short_tail() -> None:
    t = BlockRotation.random(576, 128, generator=gen())
    assert t.block_sizes == [128] * 4 + [64]
    dense = torch.block_diag(*t.blocks)
    x = torch.randn(5, 576, dtype=F64)
    assert close(t(x), x @ dense, 1e-13)
    assert close(t.inv(t(x)), x, 1e-13)


def test_uniform_shares_one_matrix_and_fills_tail() -> None:
    r = random_orthogonal(128, gen())
    t = BlockRotation.uniform(r, 576)
    assert len(t.blocks) == 5
    assert all(b is t.blocks[0] for b in t.blocks[:4])  # one shared (validated) copy
    assert torch.equal(t.blocks[0], r)
    assert torch.equal(t.blocks[4], torch.eye(64, dtype=F64))
    assert close(t.matrix(), torch.block_diag(*([r] * 4 + [torch.eye(64, dtype=F64)])), 1e-15)
    tail = random_orthogonal(64, gen(1))
    t2 = BlockRotation.uniform(r, 576, tail=tail)
    assert torch.equal(t2.blocks[4], tail)
    # The inverse keeps the sharing; flatten_state stores the shared block once.
    assert t2.inv.blocks[0] is t2.inv.blocks[3]
    _, tensors = flatten_state(t2.state_dict())
    assert sorted(tensors) == ["blocks.0", "blocks.4"]


def test_uniform_exact_multiple_and_smaller_than_block() -> None:
    r = random_orthogonal(8, gen())
    assert BlockRotation.uniform(r, 32).block_sizes == [8] * 4
    assert BlockRotation.uniform(r, 5).block_sizes == [5]  # only the tail (identity)
    with pytest.raises(TransformError, match=r"tail of 4 channels.*4×4"):
        BlockRotation.uniform(r, 12, tail=torch.eye(3))
    with pytest.raises(TransformError, match="tail=None"):
        BlockRotation.uniform(r, 16, tail=torch.eye(2))
    with pytest.raises(TransformError, match="square"):
        BlockRotation.uniform(torch.eye(2, 3), 6)


def test_shared_and_stacked_paths_agree() -> None:
    r = random_orthogonal(16, gen())
    shared = BlockRotation.uniform(r, 64)
    stacked = BlockRotation([r.clone() for _ in range(3)] + [random_orthogonal(16, gen(1))])
    x = torch.randn(3, 64, dtype=F64)
    assert close(shared(x)[..., :48], stacked(x)[..., :48], 1e-14)


def test_block_rotation_validation() -> None:
    with pytest.raises(TransformError, match=r"Block 1 must be a non-empty square matrix.*\(2, 3\)"):
        BlockRotation([torch.eye(2), torch.zeros(2, 3)])
    with pytest.raises(TransformError, match=r"Block 0 \(2×2, torch.float64\) is not orthogonal"):
        BlockRotation([torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=F64)])
    with pytest.raises(TransformError, match="at least one block"):
        BlockRotation([])
    with pytest.raises(TransformError, match="uniform"):
        BlockRotation(torch.eye(4))
    with pytest.raises(TransformError, match="not orthogonal"):
        BlockRotation([torch.full((2, 2), float("nan"))])


def test_orthogonality_tolerance_depends_on_dtype() -> None:
    r = random_orthogonal(64, gen())
    # A float32 rounding of an orthogonal matrix is accepted as float32 ...
    BlockRotation([r.float()])
    BlockRotation([r.to(torch.bfloat16)])
    # ... but an error of 1e-5 is too much for float64.
    bumped = r.clone()
    bumped[0, 0] += 1e-5
    with pytest.raises(TransformError, match="not orthogonal"):
        BlockRotation([bumped])
    BlockRotation([bumped.float()])


def test_random_rotation_is_reproducible_and_orthogonal() -> None:
    a = BlockRotation.random(100, 30, generator=gen(5))
    b = BlockRotation.random(100, 30, generator=gen(5))
    assert a == b and a.block_sizes == [30, 30, 30, 10]
    m = a.matrix()
    assert close(m @ m.T, torch.eye(100, dtype=F64), 1e-13)
    assert BlockRotation.random(10, 4, dtype=torch.float32).blocks[0].dtype == torch.float32


# --------------------------------------------------------------------------- Hadamard matrices


ORDERS_UP_TO_64 = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64]


@pytest.mark.parametrize("n", ORDERS_UP_TO_64)
def test_every_order_up_to_64_is_a_hadamard_matrix(n: int) -> None:
    assert supported_hadamard_size(n)
    h = hadamard_matrix(n)
    assert h.dtype == F64 and h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=F64))


def test_paley_base_orders_include_prime_power_fields() -> None:
    orders = base_orders()
    for m in (12, 20, 24, 28, 36, 44, 48, 52, 60):
        assert m in orders
    # 28 = 27 + 1 (Paley I over GF(3³)) and 52 = 2·(25 + 1) (Paley II over GF(5²)) are built
    # from non-prime fields; every base order must give a Hadamard matrix.
    for m in orders:
        h = hadamard_matrix(m)
        assert torch.equal(h @ h.T, m * torch.eye(m, dtype=F64)), m


def test_quadratic_character_of_small_fields() -> None:
    assert prime_power(27) == (3, 3) and prime_power(25) == (5, 2) and prime_power(12) is None
    for q in (7, 9, 25, 27, 49):
        chi = quadratic_character(q)
        assert int(chi[0]) == 0
        assert int((chi == 1).sum()) == (q - 1) // 2 == int((chi == -1).sum())
    assert quadratic_character(7).tolist() == [0, 1, 1, -1, 1, -1, -1]  # squares mod 7: 1, 2, 4


@pytest.mark.parametrize("n", [576, 1536, 96, 768])
def test_model_widths_are_supported(n: int) -> None:
    assert supported_hadamard_size(n)
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=F64))


@pytest.mark.parametrize("n, below, above", [(92, 88, 96), (7, 4, 8), (3, 2, 4), (6, 4, 8), (116, 112, 120)])
def test_unsupported_size_names_neighbours(n: int, below: int, above: int) -> None:
    assert not supported_hadamard_size(n)
    assert nearest_hadamard_sizes(n) == (below, above)
    with pytest.raises(HadamardSizeError, match=rf"size {n}\b.*{below} below and {above} above"):
        hadamard_matrix(n)
    with pytest.raises(HadamardSizeError, match=rf"{below} below and {above} above"):
        Hadamard(n)


def test_invalid_sizes() -> None:
    for n in (0, -4, 2.0, True):
        assert not supported_hadamard_size(n)
    with pytest.raises(HadamardSizeError, match="positive int"):
        Hadamard(0)
    assert issubclass(HadamardSizeError, TransformError)


def test_hadamard_matrix_returns_a_copy() -> None:
    h = hadamard_matrix(12)
    h.zero_()
    assert float(hadamard_matrix(12).abs().sum()) == 144


# --------------------------------------------------------------------------- Hadamard transform


@pytest.mark.parametrize("p", [1, 2, 4, 64, 1024])
def test_fwht_equals_dense_sylvester(p: int) -> None:
    x = torch.randn(3, 2, p, dtype=F64)
    assert close(fwht(x), x @ sylvester(p), 1e-13)
    x_copy = x.clone()
    fwht(x)
    assert torch.equal(x, x_copy)  # the input is left alone
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 28, 36, 40, 52, 108, 576, 1536])
def test_hadamard_fast_path_equals_dense(n: int) -> None:
    h = hadamard_matrix(n)
    signs = Hadamard.random(n, gen(n)).signs
    for t, dense in [
        (Hadamard(n), h / n**0.5),
        (Hadamard(n, signs), torch.diag(signs) @ h / n**0.5),
    ]:
        x = torch.randn(4, n, dtype=F64)
        assert close(t(x), x @ dense, 1e-12)
        assert close(t.inv(x), x @ dense.T, 1e-12)  # orthonormal: inverse is the transpose
        assert close(t.T.matrix(), dense.T, 1e-12)


def test_paley_hadamard_is_not_symmetric_but_transpose_is_right() -> None:
    t = Hadamard(12)
    m = t.matrix()
    assert not torch.allclose(m, m.T)  # Paley I: T must really transpose
    assert t.inv.transposed and not t.transposed
    assert close(t.T.matrix(), m.T, 1e-14)
    assert close(m @ t.inv.matrix(), torch.eye(12, dtype=F64), 1e-14)


def test_hadamard_signs_validation_and_random() -> None:
    t = Hadamard.random(16, gen(0))
    assert t.signs is not None and bool((t.signs.abs() == 1).all())
    assert t.signs.min() == -1 and t.signs.max() == 1
    assert Hadamard.random(16, gen(0)) == t and Hadamard.random(16, gen(1)) != t
    with pytest.raises(TransformError, match=r"exactly ±1.*indices \[1\]"):
        Hadamard(4, torch.tensor([1.0, 0.5, -1.0, 1.0]))
    with pytest.raises(TransformError, match=r"shape \(4,\)"):
        Hadamard(4, torch.ones(8))
    assert Hadamard(4).signs is None
    assert not Hadamard(4).is_diagonal and Hadamard(1).is_diagonal


def test_hadamard_large_power_of_two_never_builds_dense() -> None:
    n = 1 << 16  # a dense float64 matrix would be 32 GiB
    x = torch.randn(2, n, dtype=F64)
    t = Hadamard(n)
    y = t(x)
    assert close(y.norm(dim=-1), x.norm(dim=-1), 1e-12)
    assert close(t.inv(y), x, 1e-12)


# --------------------------------------------------------------------------- Compose


def test_compose_applies_left_to_right_and_flattens() -> None:
    a, b, c = Scale([1.0, 2.0, 3.0]), Permutation([1, 2, 0]), BlockRotation.random(3, 2, gen())
    ab = a @ b
    assert isinstance(ab, Compose) and ab.transforms == (a, b)
    abc = ab @ c
    assert abc.transforms == (a, b, c) and len(abc) == 3 and abc[2] is c
    assert Compose([a, Compose([b, c])]).transforms == (a, b, c)
    x = torch.randn(2, 3, dtype=F64)
    assert torch.equal(abc(x), c(b(a(x))))
    assert close(abc.matrix(), a.matrix() @ b.matrix() @ c.matrix(), 1e-14)
    assert abc.inv.transforms == (c.inv, b.inv, a.inv)
    assert abc.T.transforms == (c.T, b.T, a.T)
    assert not abc.is_orthogonal and Compose([b, c]).is_orthogonal
    assert Compose([a, Scale([2.0, 2.0, 2.0])]).is_diagonal


def test_compose_errors() -> None:
    with pytest.raises(TransformError, match="at least one"):
        Compose([])
    with pytest.raises(ShapeError, match=r"Scale\(2\).*Identity\(3\)"):
        Compose([Scale([1.0, 2.0]), Identity(3)])
    with pytest.raises(TransformError, match="not a Transform"):
        Compose([Identity(2), torch.eye(2)])


def test_simplify_rules() -> None:
    n = 12
    s1, s2 = Scale(torch.rand(n, dtype=F64) + 0.5), Scale(torch.rand(n, dtype=F64) + 0.5)
    p1, p2 = Permutation.random(n, gen(1)), Permutation.random(n, gen(2))
    h = Hadamard.random(n, gen(3))
    r = BlockRotation.random(n, 5, gen(4))

    assert Compose([Identity(n), h, Identity(n)]).simplify() is h
    assert isinstance(Compose([Identity(n)]).simplify(), Identity)
    # Linked inverse, and an independently built inverse with equal parameters.
    assert isinstance(Compose([r, h, h.inv, r.inv]).simplify(), Identity)
    assert isinstance(Compose([h, from_state_dict(h.state_dict()).inv]).simplify(), Identity)
    # Adjacent permutations and scales merge into one atom.
    merged = Compose([p1, p2, s1, s2]).simplify()
    assert isinstance(merged, Compose) and len(merged) == 2
    assert isinstance(merged[0], Permutation) and isinstance(merged[1], Scale)
    assert torch.equal(merged[1].factors, s1.factors * s2.factors)
    # Cancellation wins over merging: S1·S2·S2⁻¹·S1⁻¹ is exactly the identity.
    assert isinstance(Compose([s1, s2, s2.inv, s1.inv]).simplify(), Identity)
    # Permutations that multiply to the identity vanish.
    assert isinstance(Compose([p1, Permutation(p1.inv.indices)]).simplify(), Identity)
    # Nothing to do: same structure back.
    t = Compose([s1, h, r])
    assert t.simplify() == t


def test_simplify_keeps_scales_whose_product_overflows_apart() -> None:
    big = Scale(torch.full((2,), 1e200, dtype=F64))
    s = Compose([big, big]).simplify()
    assert isinstance(s, Compose) and len(s) == 2


# --------------------------------------------------------------------------- to()


def test_to_returns_new_transform_with_cast_tensors() -> None:
    t = Compose([Scale([1.0, 2.0, 3.0, 4.0]), Hadamard.random(4, gen()), BlockRotation.random(4, 3, gen())])
    t32 = t.to(dtype=torch.float32)
    assert t32 is not t and t.transforms[0].factors.dtype == F64
    assert t32.transforms[0].factors.dtype == torch.float32
    assert t32.transforms[1].signs.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in t32.transforms[2].blocks)
    assert t.to(device="cpu") == t


# --------------------------------------------------------------------------- serialization


def _all_kinds() -> Transform:
    return Compose(
        [
            Identity(576),
            Scale(torch.rand(576, dtype=F64) + 0.1),
            Permutation.random(576, gen(1)),
            BlockRotation.uniform(random_orthogonal(128, gen(2)), 576, tail=random_orthogonal(64, gen(3))),
            BlockRotation.random(576, 100, gen(4), dtype=torch.float32),
            Hadamard(576),
            Hadamard.random(576, gen(5)).T,
        ]
    )


def test_state_dict_is_plain_and_round_trips() -> None:
    t = _all_kinds()
    state = t.state_dict()
    assert state["type"] == "Compose"
    assert [s["type"] for s in state["transforms"]] == [
        "Identity", "Scale", "Permutation", "BlockRotation", "BlockRotation", "Hadamard", "Hadamard",
    ]
    assert state["transforms"][6]["transposed"] is True
    rebuilt = from_state_dict(state)
    assert rebuilt == t
    x = torch.randn(3, 576, dtype=F64)
    assert torch.equal(rebuilt(x), t(x))


def test_flatten_state_through_safetensors_is_bitwise_exact(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    t = _all_kinds()
    config, tensors = flatten_state(t.state_dict(), prefix="model.layers.0.mlp_in.")
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"))
    (tmp_path / "t.json").write_text(json.dumps(config))
    loaded = safetensors_torch.load_file(str(tmp_path / "t.safetensors"))
    rebuilt = from_state_dict(unflatten_state(json.loads((tmp_path / "t.json").read_text()), loaded))
    assert rebuilt == t
    for a, b in zip(t.transforms, rebuilt.transforms):
        for key, value in a.state_dict().items():
            if isinstance(value, torch.Tensor):
                other = b.state_dict()[key]
                assert other.dtype == value.dtype and torch.equal(other, value)
    x = torch.randn(3, 576, dtype=F64)
    assert torch.equal(rebuilt(x), t(x))
    assert torch.equal(rebuilt.inv(x), t.inv(x))


def test_flatten_state_references_and_errors() -> None:
    config, tensors = flatten_state(Scale([1.0, 2.0]).state_dict(), prefix="p.")
    assert config == {"type": "Scale", "factors": {"__tensor__": "p.factors"}}
    assert list(tensors) == ["p.factors"]
    with pytest.raises(TransformError, match="missing"):
        unflatten_state(config, {})
    with pytest.raises(TransformError, match="cannot store"):
        flatten_state({"type": "Scale", "x": object()})


def test_from_state_dict_errors() -> None:
    with pytest.raises(TransformError, match=r"Unknown transform type 'Nope'.*Scale"):
        from_state_dict({"type": "Nope"})
    with pytest.raises(TransformError, match="'type'"):
        from_state_dict({"factors": [1.0]})
    # Loaded state is validated like user input.
    with pytest.raises(TransformError):
        from_state_dict({"type": "Permutation", "indices": torch.tensor([0, 0])})
