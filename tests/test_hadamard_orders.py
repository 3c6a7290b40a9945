"""Hadamard constructions for the widths of common models, the fallback for widths without one, and
the table in docs/hadamard-orders.md.

Base matrices are checked exactly (``H·Hᵀ = m·I`` in int64). Full-width
transforms too large for a dense matrix (29568² float64 is 7 GB) are checked
on a few vectors: each image of a basis vector must be a row of ±1/√n that
equals the Kronecker product of base-matrix rows, and the transform must keep
norms and invert to 1e-10 in float64.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from quantcompose.errors import HadamardSizeError, TransformError
from quantcompose.transforms import (
    BlockRotation,
    Hadamard,
    flatten_state,
    from_state_dict,
    hadamard_bases,
    hadamard_construction,
    hadamard_like,
    hadamard_like_description,
    hadamard_matrix,
    largest_hadamard_divisor,
    require_hadamard_size,
    supported_hadamard_size,
    unflatten_state,
)
from quantcompose.transforms.hadamard_matrices import base_matrix, sylvester

F64 = torch.float64
DOC = Path(__file__).resolve().parent.parent / "docs" / "hadamard-orders.md"

#: The widths issue 9 asks for: hidden / MLP of Llama 2 and 3, Mistral, Qwen2(.5), Phi-3, SmolLM2,
#: head dims and head counts. The doc's model table must cover them all.
REQUIRED_WIDTHS = {
    4096, 11008, 5120, 13824, 8192, 28672, 14336, 896, 4864, 1536, 8960, 2048, 3584, 18944,
    27648, 29568, 3072, 17920, 576, 64, 128, 9, 14, 28, 32, 40,
}
MODEL_COLUMNS = ("hidden", "MLP", "heads", "KV heads", "head dim")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_exact_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert bool(((h == 1) | (h == -1)).all())
    hi = h.to(torch.int64)
    assert torch.equal(hi @ hi.T, n * torch.eye(n, dtype=torch.int64)), n


# --------------------------------------------------------------------------- the doc tables


def table_rows(text: str, name: str) -> list[list[str]]:
    """The body rows of the markdown table between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    block = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert block, f"{DOC} has no {name} table markers"
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def model_widths() -> dict[int, set[str]]:
    """Width -> the roles it plays (``"hidden"``, ``"heads"``, ...) in the doc's model table."""
    roles: dict[int, set[str]] = {}
    for row in table_rows(DOC.read_text(encoding="utf-8"), "models"):
        for role, cell in zip(MODEL_COLUMNS, row[1:]):
            roles.setdefault(int(cell), set()).add(role)
    return roles


def render_orders(roles: dict[int, set[str]]) -> str:
    lines = ["| width | role | construction |", "| --- | --- | --- |"]
    for n in sorted(roles):
        role = ", ".join(r for r in MODEL_COLUMNS if r in roles[n])
        lines.append(f"| {n} | {role} | {hadamard_like_description(n)} |")
    return "\n".join(lines) + "\n"


def test_doc_covers_the_required_widths() -> None:
    missing = REQUIRED_WIDTHS - set(model_widths())
    assert not missing, f"docs/hadamard-orders.md lacks widths {sorted(missing)}"


def test_doc_table_matches_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    want = render_orders(model_widths())
    if os.environ.get("QUANTCOMPOSE_WRITE_DOCS") == "1":  # regenerate the table in place
        text = re.sub(r"(<!-- orders:begin -->\n).*?(<!-- orders:end -->)", lambda m: m[1] + want + m[2], text, flags=re.S)
        DOC.write_text(text, encoding="utf-8")
    have = re.search(r"<!-- orders:begin -->\n(.*?)<!-- orders:end -->", text, re.S).group(1)
    assert have == want, (
        "docs/hadamard-orders.md disagrees with the code; rerun with QUANTCOMPOSE_WRITE_DOCS=1 "
        f"or paste this table:\n{want}"
    )


def test_doc_lists_the_first_multiples_of_4_without_a_construction() -> None:
    gaps = [n for n in range(4, 240, 4) if not supported_hadamard_size(n)]
    assert gaps == [92, 116, 156, 172, 184, 188, 232, 236]
    assert "(" + ", ".join(map(str, gaps)) + ", ...:" in " ".join(DOC.read_text(encoding="utf-8").split())


# --------------------------------------------------------------------------- constructions


def test_every_required_width_with_an_order_divisible_by_4_has_a_construction() -> None:
    for n in REQUIRED_WIDTHS:
        assert supported_hadamard_size(n) == (n <= 2 or n % 4 == 0), n


@pytest.mark.parametrize(
    "n, bases, text",
    [
        (11008, (344,), "Paley I q=343 ⊗ Sylvester 32"),  # GF(7³): 172 = 11008/64 has no Paley order
        (29568, (12, 28, 44), "Paley I q=11 ⊗ Paley I q=27 ⊗ Paley I q=43 ⊗ Sylvester 2"),
        (4864, (76,), "Paley II q=37 ⊗ Sylvester 64"),
        (18944, (148,), "Paley II q=73 ⊗ Sylvester 128"),
        (4096, (), "Sylvester 4096"),
        (1, (), "Sylvester 1"),
        # Legacy rule kept (a saved transform must rebuild the same matrix): one base ≤ 256, the smallest.
        (576, (36,), "Paley II q=17 ⊗ Sylvester 16"),
        (13824, (108,), "Paley I q=107 ⊗ Sylvester 128"),
    ],
)
def test_constructions_of_model_widths(n: int, bases: tuple[int, ...], text: str) -> None:
    assert hadamard_bases(n) == bases
    assert hadamard_construction(n) == text == require_hadamard_size(n)
    assert Hadamard(n).bases == bases and Hadamard(n).base_order == math.prod(bases)


def test_base_matrices_of_model_widths_are_exact_hadamard_matrices() -> None:
    # Every base the model widths use, and Paley orders over the fields GF(3³), GF(5²), GF(7²), GF(7³).
    used = {m for n in model_widths() for m in (hadamard_bases(n) or ())}
    assert 344 in used
    for m in sorted(used | {28, 52, 100, 284}):
        assert_exact_hadamard(base_matrix(m))


@pytest.mark.parametrize("n", [624, 1232])
def test_kronecker_of_several_bases_is_exact_and_the_fast_path_matches_it(n: int) -> None:
    bases = hadamard_bases(n)
    assert len(bases) >= 2, bases  # 624 = 12·52, 1232 = 28·44
    h = hadamard_matrix(n)
    if n < 1000:
        assert_exact_hadamard(h)
    t = Hadamard.random(n, gen(n))
    dense = torch.diag(t.signs) @ h / math.sqrt(n)
    x = torch.randn(3, n, generator=gen(1), dtype=F64)
    assert float((t(x) - x @ dense).abs().max()) < 1e-12
    assert float((t.inv(x) - x @ dense.T).abs().max()) < 1e-12


def kron_row(n: int, bases: tuple[int, ...], i: int) -> torch.Tensor:
    """Row ``i`` of ``kron(H_{m₁}, …, H_{2^k})``, built from the base rows alone (mixed-radix digits of i)."""
    p = n // math.prod(bases)
    digits = []
    for m in reversed((*bases, p)):
        digits.append(i % m)
        i //= m
    row = torch.ones(1, dtype=F64)
    for m, d in zip((*bases, p), reversed(digits)):
        factor = sylvester(m)[d] if m == p else base_matrix(m)[d]
        row = torch.kron(row, factor)
    return row


@pytest.mark.parametrize("n", [11008, 29568, 18944, 4864])
def test_full_width_transform_on_a_few_vectors(n: int) -> None:
    t = Hadamard(n)
    rows = [0, 1, n // 3, n - 1]
    eye = torch.zeros(len(rows), n, dtype=F64)
    eye[range(len(rows)), rows] = 1.0
    images = t(eye) * math.sqrt(n)  # rows of the unnormalized matrix
    assert bool(((images - images.round()).abs() < 1e-9).all()) and bool((images.round().abs() == 1).all())
    for k, i in enumerate(rows):
        assert torch.equal(images[k].round(), kron_row(n, t.bases, i)), i
    signed = Hadamard.random(n, gen(n))
    x = torch.randn(4, n, generator=gen(2), dtype=F64)
    for u in (signed, signed.T):
        y = u(x)
        assert float((y.norm(dim=-1) - x.norm(dim=-1)).abs().max()) < 1e-10 * float(x.norm(dim=-1).max())
        assert float((u.inv(y) - x).abs().max()) < 1e-10
    # float32 stays close to float64 even with the 344-wide base.
    y32 = signed(x.float())
    assert float((y32.double() - signed(x)).abs().max()) < 1e-5 * float(signed(x).abs().max())


def test_empty_batches_keep_their_shape() -> None:
    for n in (11008, 29568, 12):
        for shape in ((0, n), (2, 0, n)):
            assert Hadamard(n)(torch.zeros(shape, dtype=F64)).shape == shape
            assert Hadamard(n).inv(torch.zeros(shape, dtype=F64)).shape == shape


def test_saved_bases_rebuild_the_same_matrix_and_old_states_use_the_default() -> None:
    t = Hadamard.random(576, gen(3))
    state = t.state_dict()
    assert state["bases"] == [36]
    old = {k: v for k, v in state.items() if k != "bases"}  # a state saved before bases were stored
    assert from_state_dict(old) == t
    other = Hadamard(576, t.signs, bases=(12, 12))  # kron(H12, H12, H4): another Hadamard matrix
    assert other != t and other.bases == (12, 12)
    back = from_state_dict(json.loads(json.dumps(other.state_dict(), default=lambda s: s.tolist())))
    assert back == other and torch.equal(back.matrix(), other.matrix())
    assert not torch.allclose(other.matrix(), t.matrix())
    assert_exact_hadamard(hadamard_matrix(576, bases=(12, 12)))


def test_invalid_bases_are_refused() -> None:
    with pytest.raises(HadamardSizeError, match=r"\[16\] are not Paley orders"):
        Hadamard(576, bases=(16,))
    with pytest.raises(HadamardSizeError, match="cannot make size 576"):
        Hadamard(576, bases=(20,))
    with pytest.raises(HadamardSizeError, match=r"\[92\] are not Paley orders"):
        hadamard_matrix(184, bases=(92,))


@pytest.mark.parametrize("n, below, above", [(9, 8, 12), (14, 12, 16), (172, 168, 176), (92, 88, 96)])
def test_unsupported_widths_fail_early_with_the_nearest_sizes(n: int, below: int, above: int) -> None:
    assert hadamard_construction(n) is None
    reason = "no Hadamard matrix of that order exists" if n % 4 else "it is not a product of Paley orders"
    with pytest.raises(HadamardSizeError, match=rf"size {n} \(layer 3 heads\): {reason}.*{below} below and {above} above.*hadamard_like"):
        require_hadamard_size(n, "layer 3 heads")


# --------------------------------------------------------------------------- hadamard_like


def test_hadamard_like_picks_hadamard_then_blocks_then_orthogonal() -> None:
    assert hadamard_like(576) == Hadamard(576)
    assert hadamard_like(576, generator=gen(4)) == Hadamard.random(576, gen(4))
    blocks = hadamard_like(14)
    assert isinstance(blocks, BlockRotation) and blocks.block_sizes == [2] * 7
    assert largest_hadamard_divisor(14) == 2 and largest_hadamard_divisor(9) == 1
    assert largest_hadamard_divisor(172) == 4 and hadamard_like(172).block_sizes == [4] * 43
    assert largest_hadamard_divisor(2 * 172) == 344  # Paley I over GF(7³): supported, no fallback
    assert torch.equal(blocks.blocks[0], Hadamard(2).matrix())
    signed = hadamard_like(14, generator=gen(5))
    assert signed.block_sizes == [2] * 7 and signed != blocks
    assert all(torch.equal(b.abs(), Hadamard(2).matrix().abs()) for b in signed.blocks)
    dense = hadamard_like(9)
    assert isinstance(dense, BlockRotation) and dense.block_sizes == [9]
    assert hadamard_like(9) == dense  # seeded: reproducible without a generator
    assert hadamard_like(9, generator=gen(6)) != dense
    assert hadamard_like(14, fallback="orthogonal").block_sizes == [14]
    assert hadamard_like_description(14) == "fallback: 7 Hadamard blocks of 2 (Sylvester 2)"
    assert hadamard_like_description(9) == "fallback: random orthogonal 9×9"
    assert hadamard_like_description(11008) == "Hadamard: Paley I q=343 ⊗ Sylvester 32"


def test_hadamard_like_errors() -> None:
    with pytest.raises(HadamardSizeError, match="8 below and 12 above"):
        hadamard_like(9, fallback="error")
    assert isinstance(hadamard_like(12, fallback="error"), Hadamard)
    with pytest.raises(TransformError, match="fallback must be one of"):
        hadamard_like(9, fallback="nearest")
    with pytest.raises(TransformError, match="positive int"):
        hadamard_like(0)


UNSUPPORTED = [n for n in range(1, 200) if not supported_hadamard_size(n)]


@given(
    n=st.sampled_from(UNSUPPORTED),
    fallback=st.sampled_from(["block", "orthogonal"]),
    seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    transpose=st.booleans(),
)
@example(n=9, fallback="block", seed=None, transpose=False)
@example(n=172, fallback="block", seed=7, transpose=True)
@example(n=14, fallback="block", seed=1, transpose=False)
def test_fallback_is_orthogonal_exact_and_serializable(n: int, fallback: str, seed: int | None, transpose: bool) -> None:
    t = hadamard_like(n, generator=None if seed is None else gen(seed), fallback=fallback)
    t = t.T if transpose else t
    assert t.size == n and t.is_orthogonal
    x = torch.randn(3, 2, n, generator=gen(8), dtype=F64)
    y = t(x)
    assert float((t.inv(y) - x).abs().max()) < 1e-10
    assert float((y.norm(dim=-1) - x.norm(dim=-1)).abs().max()) < 1e-10 * float(x.norm(dim=-1).max())
    assert float((t.matrix() @ t.inv.matrix() - torch.eye(n, dtype=F64)).abs().max()) < 1e-10
    config, tensors = flatten_state(t.state_dict())
    back = from_state_dict(unflatten_state(json.loads(json.dumps(config)), tensors))
    assert back == t and float((back(x) - y).abs().max()) < 1e-10
