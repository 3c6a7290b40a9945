"""Property tests of the transform algebra (hypothesis).

Every property runs over single atoms and random compositions of up to five
atoms on random widths: 1..600 including odd ones, always with the real model
widths 576 and 1536 as explicit examples. Hadamard atoms only appear at
supported widths, Kronecker atoms at widths ``m·n`` with both factors at most
64 (orthogonal factors, or general ones with condition number at most 4).
Parameters come from a seeded torch generator so that the examples stay cheap
to draw.

Tolerances (max error relative to the max magnitude of the reference). Let κ̂
be the product of the Scale atoms' max/min factor ratios and the Kronecker
atoms' cond(A)·cond(B), an upper bound on the condition number (orthogonal
atoms have κ = 1); Scale factor magnitudes are drawn from [0.1, 10], so
κ̂ ≤ 1e4 for a Scale and any composition with at most two Scales, times at
most 16 per general Kronecker. Then:

* float64: 1e-10, times κ̂/1e4 when κ̂ > 1e4 (three or more Scales);
* float32 forward vs float64: 1e-4, times κ̂/1e4 when κ̂ > 1e4;
* float32 round trip: 1e-4, times κ̂/1e2 when κ̂ > 1e2 (rounding in x·T is
  amplified by up to κ when T⁻¹ undoes it).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from quantcompose.transforms import (
    BlockRotation,
    Compose,
    Hadamard,
    Identity,
    Kronecker,
    Permutation,
    Scale,
    Transform,
    flatten_state,
    from_state_dict,
    hadamard_matrix,
    random_orthogonal,
    supported_hadamard_size,
    unflatten_state,
)

from numerics import well_conditioned

F64_RTOL = 1e-10
F32_RTOL = 1e-4

SPECIAL_WIDTHS = [576, 1536, 1, 2, 7, 45, 99, 12, 64, 100]
HADAMARD_WIDTHS = [n for n in range(1, 601) if supported_hadamard_size(n)] + [1536]
ORTHOGONAL_KINDS = [
    "identity", "permutation", "rotation", "rotation_uniform", "rotation_uneven",
    "hadamard", "hadamard_signed", "hadamard_T", "kronecker_orthogonal",
]
# Scales twice: they are what breaks orthogonality. General Kroneckers too.
KINDS = ORTHOGONAL_KINDS + ["scale", "scale", "kronecker"]
# Kronecker factors stay small (each at most this), so widths with no such split get none.
MAX_KRONECKER_FACTOR = 64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------- building atoms


def build_atom(kind: str, n: int, seed: int) -> Transform:
    """One atom of width ``n`` with float64 parameters drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "identity":
        return Identity(n)
    if kind == "scale":
        logs = torch.empty(n, dtype=torch.float64).uniform_(math.log(0.1), math.log(10.0), generator=g)
        signs = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.25, -1.0, 1.0)
        return Scale(torch.exp(logs) * signs)
    if kind == "permutation":
        return Permutation(torch.randperm(n, generator=g))
    if kind == "rotation":
        block = int(torch.randint(1, min(n, 130) + 1, (1,), generator=g))
        return BlockRotation.random(n, block, generator=g)
    if kind == "rotation_uniform":
        block = int(torch.randint(1, min(n, 130) + 1, (1,), generator=g))
        tail = n % block
        with_tail = tail and bool(torch.randint(0, 2, (1,), generator=g))
        return BlockRotation.uniform(
            random_orthogonal(block, g), n, tail=random_orthogonal(tail, g) if with_tail else None
        )
    if kind == "rotation_uneven":
        # Uneven block sizes from a small palette: one batched QR per distinct size.
        palette = torch.randint(1, min(n, 40) + 1, (3,), generator=g).tolist()
        sizes, left = [], n
        while left:
            s = min(palette[int(torch.randint(0, 3, (1,), generator=g))], left)
            sizes.append(s)
            left -= s
        pools = {s: iter(random_orthogonal(s, g, count=sizes.count(s))) for s in dict.fromkeys(sizes)}
        return BlockRotation([next(pools[s]) for s in sizes])
    if kind == "hadamard":
        return Hadamard(n)
    if kind == "hadamard_signed":
        return Hadamard.random(n, generator=g)
    if kind == "hadamard_T":
        return Hadamard.random(n, generator=g).T
    if kind.startswith("kronecker"):
        splits = kronecker_splits(n)
        m = splits[int(torch.randint(0, len(splits), (1,), generator=g))]
        factor = random_orthogonal if kind == "kronecker_orthogonal" else well_conditioned
        return Kronecker(factor(m, g), factor(n // m, g))
    raise AssertionError(kind)


def kronecker_splits(n: int) -> list[int]:
    """The ``m`` with ``m·(n/m) = n`` and both factors at most MAX_KRONECKER_FACTOR."""
    return [m for m in range(1, min(n, MAX_KRONECKER_FACTOR) + 1) if n % m == 0 and n // m <= MAX_KRONECKER_FACTOR]


def kinds_for(n: int, kinds: list[str]) -> list[str]:
    if not supported_hadamard_size(n):
        kinds = [k for k in kinds if not k.startswith("hadamard")]
    if not kronecker_splits(n):
        kinds = [k for k in kinds if not k.startswith("kronecker")]
    return kinds


def widths() -> st.SearchStrategy[int]:
    # Half the draws come from Hadamard-supported widths so Hadamard atoms show up often.
    return st.one_of(st.sampled_from(SPECIAL_WIDTHS), st.integers(1, 600), st.sampled_from(HADAMARD_WIDTHS))


@st.composite
def atoms(draw, n: int | None = None, kinds: list[str] = KINDS) -> Transform:
    n = draw(widths()) if n is None else n
    kind = draw(st.sampled_from(kinds_for(n, kinds)))
    return build_atom(kind, n, draw(st.integers(0, 2**32 - 1)))


@st.composite
def compositions(draw, n: int | None = None, kinds: list[str] = KINDS) -> Transform:
    n = draw(widths()) if n is None else n
    count = draw(st.integers(1, 5))
    return Compose([draw(atoms(n, kinds)) for _ in range(count)])


def transforms(n: int | None = None, kinds: list[str] = KINDS) -> st.SearchStrategy[Transform]:
    return st.one_of(atoms(n, kinds), compositions(n, kinds))


def _examples() -> list[Transform]:
    """Explicit examples run by every property: each atom at 576, the large ones at 1536, DuQuant-like chains."""
    out = [build_atom(kind, 576, 1) for kind in dict.fromkeys(KINDS)]
    out += [build_atom(kind, 1536, 2) for kind in ("rotation_uniform", "hadamard_signed", "kronecker")]
    out.append(Compose([build_atom(k, 576, i) for i, k in enumerate(["scale", "kronecker", "hadamard_signed"])]))
    out.append(Compose([build_atom(k, 576, i) for i, k in enumerate(["scale", "permutation", "rotation", "permutation", "rotation"])]))
    out.append(Compose([build_atom(k, 1536, i) for i, k in enumerate(["scale", "hadamard_signed", "permutation"])]))
    out.append(Compose([build_atom(k, 45, i) for i, k in enumerate(["scale", "rotation_uneven", "scale", "permutation"])]))
    out.append(Compose([build_atom(k, 7, i) for i, k in enumerate(["rotation", "scale"])]))
    return out


EXAMPLES = _examples()


def atoms_of(t: Transform) -> tuple[Transform, ...]:
    return t.transforms if isinstance(t, Compose) else (t,)


def with_examples(fn=None, *, orthogonal_only: bool = False, **fixed):
    """Apply ``@example(t=..., **fixed)`` for each explicit example (only the orthogonal ones if asked)."""

    def apply(fn):
        for t in EXAMPLES:
            if orthogonal_only and not t.is_orthogonal:
                continue
            fn = example(t=t, **fixed)(fn)
        return fn

    return apply(fn) if fn is not None else apply


# --------------------------------------------------------------------------- helpers


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max())
    return float((actual - expected).abs().max()) / max(scale, 1e-300)


def kappa_bound(t: Transform) -> float:
    """Upper bound on the condition number: the product of the Scale and Kronecker atoms' condition numbers.

    A Scale's is max|f|/min|f|; a Kronecker's is cond(A)·cond(B) (≤ 16 for the drawn ones).
    """
    k = 1.0
    for a in atoms_of(t):
        if isinstance(a, Scale):
            f = a.factors.abs()
            k *= float(f.max() / f.min())
        elif isinstance(a, Kronecker):
            k *= float(torch.linalg.cond(a.A.double()) * torch.linalg.cond(a.B.double()))
    return k


def tol64(kappa: float) -> float:
    return F64_RTOL * max(1.0, kappa / 1e4)


def tol32_forward(kappa: float) -> float:
    return F32_RTOL * max(1.0, kappa / 1e4)


def tol32_round_trip(kappa: float) -> float:
    return F32_RTOL * max(1.0, kappa / 1e2)


def random_input(t: Transform, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, t.size, generator=g, dtype=torch.float64).to(dtype)


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


# --------------------------------------------------------------------------- properties


@with_examples
@given(t=transforms())
def test_forward_matches_dense_matrix(t: Transform) -> None:
    x = random_input(t)
    assert rel_err(t(x), x @ t.matrix()) <= tol64(kappa_bound(t))


def dense_from_attributes(t: Transform) -> torch.Tensor:
    """The matrix a kernel would build from the public attributes, independent of ``forward``."""
    n = t.size
    if isinstance(t, Compose):
        out = torch.eye(n, dtype=torch.float64)
        for a in t.transforms:
            out = out @ dense_from_attributes(a)
        return out
    if isinstance(t, Identity):
        return torch.eye(n, dtype=torch.float64)
    if isinstance(t, Scale):
        return torch.diag(t.factors.double())
    if isinstance(t, Permutation):
        return torch.eye(n, dtype=torch.float64)[:, t.indices]
    if isinstance(t, BlockRotation):
        return torch.block_diag(*[b.double() for b in t.blocks])
    if isinstance(t, Kronecker):
        return torch.kron(t.A.double(), t.B.double())
    if isinstance(t, Hadamard):
        h = hadamard_matrix(n) / math.sqrt(n)
        s = torch.ones(n, dtype=torch.float64) if t.signs is None else t.signs.double()
        return h.T * s if t.transposed else s[:, None] * h
    raise AssertionError(type(t))


@with_examples
@given(t=transforms())
def test_forward_matches_the_attributes_kernels_read(t: Transform) -> None:
    x = random_input(t)
    assert rel_err(t(x), x @ dense_from_attributes(t)) <= tol64(kappa_bound(t))


@with_examples
@given(t=transforms())
def test_inverse_round_trip_float64(t: Transform) -> None:
    x = random_input(t)
    y = t(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert rel_err(t.inv(y), x) <= tol64(kappa_bound(t))
    assert rel_err(t.inverse(y), x) <= tol64(kappa_bound(t))


@with_examples
@given(t=transforms())
def test_float32_matches_float64_and_round_trips(t: Transform) -> None:
    k = kappa_bound(t)
    t32 = t.to(dtype=torch.float32)
    x = random_input(t)
    x32 = x.to(torch.float32)
    y32 = t32(x32)
    assert y32.dtype == torch.float32
    assert rel_err(y32.double(), t(x)) <= tol32_forward(k)
    assert rel_err(t32.inv(y32).double(), x) <= tol32_round_trip(k)


@with_examples
@given(t=transforms())
def test_matrix_times_inverse_matrix_is_identity(t: Transform) -> None:
    n = t.size
    m, mi = t.matrix(), t.inv.matrix()
    assert float((m @ mi - eye(n)).abs().max()) <= tol64(kappa_bound(t))
    assert float((mi @ m - eye(n)).abs().max()) <= tol64(kappa_bound(t))


@with_examples
@given(t=transforms())
def test_transpose_is_matrix_transpose(t: Transform) -> None:
    m = t.matrix()
    assert rel_err(t.T.matrix(), m.T) <= tol64(kappa_bound(t))
    # Double transposition and inversion come back to the same map.
    assert rel_err(t.T.T.matrix(), m) <= tol64(kappa_bound(t))
    assert rel_err(t.inv.inv.matrix(), m) <= tol64(kappa_bound(t))
    # T and inv commute: (T⁻¹)ᵀ == (Tᵀ)⁻¹.
    assert rel_err(t.inv.T.matrix(), t.T.inv.matrix()) <= tol64(kappa_bound(t))


@with_examples(orthogonal_only=True)
@given(t=transforms(kinds=ORTHOGONAL_KINDS))
def test_orthogonal_transforms_keep_norms(t: Transform) -> None:
    assert t.is_orthogonal
    x = random_input(t)
    torch.testing.assert_close(t(x).norm(dim=-1), x.norm(dim=-1), rtol=tol64(1.0), atol=0)
    m = t.matrix()
    assert float((m @ m.T - eye(t.size)).abs().max()) <= tol64(kappa_bound(t))


@with_examples
@given(t=transforms())
def test_flags_match_the_matrix(t: Transform) -> None:
    m = t.matrix()
    if t.is_diagonal:
        assert torch.equal(m, torch.diag(torch.diagonal(m)))
    if t.is_orthogonal:
        assert float((m @ m.T - eye(t.size)).abs().max()) <= tol64(kappa_bound(t))


@with_examples(out_features=3, seed=0)
@given(t=transforms(), out_features=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_fold_into_weight_keeps_layer_output(t: Transform, out_features: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(t.size, out_features, bias=True, dtype=torch.float64)
    x = random_input(t, seed)
    w, b = t.fold_into_weight(layer.weight.detach(), layer.bias.detach())
    assert w.shape == layer.weight.shape
    assert torch.equal(b, layer.bias.detach())  # the input transform never touches the bias
    assert rel_err(F.linear(t(x), w, b), layer(x).detach()) <= tol64(kappa_bound(t))


@with_examples(in_features=3, seed=0)
@given(t=transforms(), in_features=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_fold_into_output_produces_transformed_output(t: Transform, in_features: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, t.size, bias=True, dtype=torch.float64)
    x = torch.randn(5, in_features, dtype=torch.float64)
    w, b = t.fold_into_output(layer.weight.detach(), layer.bias.detach())
    assert w.shape == layer.weight.shape and b.shape == layer.bias.shape
    assert rel_err(F.linear(x, w, b), t(layer(x).detach())) <= tol64(kappa_bound(t))


@st.composite
def pairs(draw) -> tuple[Transform, Transform]:
    n = draw(widths())
    return draw(transforms(n)), draw(transforms(n))


@example(ab=(EXAMPLES[0], EXAMPLES[-4]))
@example(ab=(build_atom("hadamard_signed", 1536, 5), build_atom("rotation", 1536, 6)))
@given(ab=pairs())
def test_composition_matrix_is_matrix_product(ab: tuple[Transform, Transform]) -> None:
    a, b = ab
    ab_t = a @ b
    assert isinstance(ab_t, Transform)
    expected = a.matrix() @ b.matrix()
    tol = tol64(kappa_bound(ab_t))
    assert rel_err(ab_t.matrix(), expected) <= tol
    assert rel_err(Compose([a, b]).matrix(), expected) <= tol


@st.composite
def cancelling_chains(draw) -> Transform:
    """Compositions seeded with things simplify() can remove: identities, inverses, equal copies."""
    n = draw(widths())
    parts: list[Transform] = []
    for _ in range(draw(st.integers(1, 5))):
        a = draw(transforms(n))
        parts.append(a)
        trick = draw(st.sampled_from(["none", "inv", "inv_copy", "identity", "same_kind"]))
        if trick == "inv":
            parts.append(a.inv)  # the linked inverse object
        elif trick == "inv_copy":
            parts.append(from_state_dict(a.state_dict()).inv)  # equal parameters, no link
        elif trick == "identity":
            parts.append(Identity(n))
        elif trick == "same_kind":  # a run of scales or of permutations to merge
            kind = draw(st.sampled_from(["scale", "permutation"]))
            parts += [draw(atoms(n, kinds=[kind])) for _ in range(draw(st.integers(2, 3)))]
    return Compose(parts)


@with_examples
@given(t=cancelling_chains())
def test_simplify_preserves_the_matrix(t: Transform) -> None:
    s = t.simplify()
    assert s.size == t.size
    assert rel_err(s.matrix(), t.matrix()) <= tol64(kappa_bound(t))
    n_before = len(t.transforms) if isinstance(t, Compose) else 1
    n_after = len(s.transforms) if isinstance(s, Compose) else 1
    assert n_after <= n_before
    if isinstance(s, Compose):
        parts = s.transforms
        assert not any(isinstance(p, Identity) for p in parts)
        for a, b in zip(parts, parts[1:]):
            assert not (isinstance(a, Permutation) and isinstance(b, Permutation))
            assert not (isinstance(a, Scale) and isinstance(b, Scale))


@given(t=transforms())
def test_composition_with_own_inverse_simplifies_to_identity(t: Transform) -> None:
    s = Compose([t, t.inv]).simplify()
    assert isinstance(s, Identity) and s.size == t.size
    s2 = Compose([t.inv, from_state_dict(t.state_dict())]).simplify()
    assert isinstance(s2, Identity)


@with_examples
@given(t=transforms())
def test_serialization_round_trip_is_exact(t: Transform) -> None:
    config, tensors = flatten_state(t.state_dict(), prefix="layer0.attn_in.")
    assert all(k.startswith("layer0.attn_in.") for k in tensors)
    config = json.loads(json.dumps(config))  # the config really is plain JSON
    rebuilt = from_state_dict(unflatten_state(config, tensors))
    assert type(rebuilt) is type(t) and rebuilt == t
    x = random_input(t)
    assert torch.equal(rebuilt(x), t(x))
    assert torch.equal(rebuilt.inv(x), t.inv(x))
    # state_dict -> from_state_dict directly, too.
    assert from_state_dict(t.state_dict()) == t


@pytest.mark.parametrize("n", [576, 1536])
def test_model_widths_have_every_atom(n: int) -> None:
    """Deterministic: every atom kind is constructible and exact at the real model widths."""
    x = torch.randn(4, n, dtype=torch.float64)
    for kind in dict.fromkeys(KINDS):
        t = build_atom(kind, n, 3)
        assert rel_err(t.inv(t(x)), x) <= tol64(kappa_bound(t)), kind
