"""The learnable atoms: differentiable forward, gradients, constraints that hold while training, freezing.

Tolerances: a frozen float64 atom equals the float32 module's forward to
1e-6 relative to the output's magnitude (float32 rounding of the module's
own computation); float64 identities hold to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantcompose.errors import ShapeError, TransformError
from quantcompose.transforms import BlockRotation, Kronecker, Scale, random_orthogonal
from quantcompose.transforms.learnable import (
    FrozenShift,
    LearnableKronecker,
    LearnableOrthogonal,
    LearnableScale,
    LearnableShift,
)

from numerics import gen, rel_err

F64 = torch.float64
FREEZE_RTOL = 1e-6

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def perturbed(module: torch.nn.Module, seed: int, size: float = 0.3) -> torch.nn.Module:
    """``module`` with every trainable parameter moved away from its (often trivial) start."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# (name, a fresh module, the atom it freezes into): factories, since the tests train and perturb them.
ATOMS = [
    ("scale", lambda: LearnableScale(12, init=torch.linspace(0.5, 2.0, 12)), Scale),
    ("orthogonal_size", lambda: LearnableOrthogonal(13, 4), BlockRotation),  # 4, 4, 4, 1: a 1×1 tail
    ("orthogonal_blocks", lambda: LearnableOrthogonal(blocks=BlockRotation.random(12, 5, gen(1))), BlockRotation),
    ("kronecker", lambda: LearnableKronecker(3, 4), Kronecker),
]
IDS = [name for name, _, _ in ATOMS]


@pytest.mark.parametrize("name, make, atom_type", ATOMS, ids=IDS)
def test_freeze_returns_the_float64_atom_with_the_same_forward(name, make, atom_type) -> None:
    module = perturbed(make(), seed=2)
    frozen = module.freeze()
    assert type(frozen) is atom_type and frozen.size == module.width
    x = torch.randn(6, module.width, generator=gen(3))
    y = module(x)
    assert y.dtype == torch.float32
    assert rel_err(frozen(x.double()), y.double()) <= FREEZE_RTOL
    # The frozen atom is a plain value: detached, float64, serializable like any other.
    assert all(not t.requires_grad for t in frozen.state_dict().values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("name, make, atom_type", ATOMS, ids=IDS)
def test_gradients_reach_every_parameter(name, make, atom_type) -> None:
    module = perturbed(make(), seed=4, size=0.1)
    x = torch.randn(5, module.width, generator=gen(5))
    target = torch.randn(5, module.width, generator=gen(6))
    params = [p for p in module.parameters() if p.requires_grad]
    assert params
    ((module(x) - target) ** 2).sum().backward()
    for p in params:
        assert p.grad is not None and float(p.grad.abs().max()) > 0


@pytest.mark.parametrize("name, make, atom_type", ATOMS, ids=IDS)
def test_fold_into_weight_is_the_differentiable_inverse_transpose(name, make, atom_type) -> None:
    module = perturbed(make(), seed=7, size=0.1).double()
    weight = torch.randn(4, module.width, dtype=F64, generator=gen(8))
    x = torch.randn(5, module.width, dtype=F64, generator=gen(9))
    folded = module.fold_into_weight(weight)
    assert rel_err(F.linear(module(x), folded), F.linear(x, weight)) <= 1e-12
    frozen_w, _ = module.freeze().fold_into_weight(weight)
    assert rel_err(folded, frozen_w) <= 1e-12
    folded.sum().backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("blocks", [None, "rotation"])
def test_orthogonality_holds_after_optimizer_steps(blocks) -> None:
    module = LearnableOrthogonal(12, 5) if blocks is None else LearnableOrthogonal(blocks=BlockRotation.random(12, 5, gen(1)))
    start = module.freeze().matrix()
    opt = torch.optim.Adam(module.parameters(), lr=0.2)
    x = torch.randn(32, 12, generator=gen(2))
    target = torch.randn(32, 12, generator=gen(3))
    for _ in range(5):
        opt.zero_grad()
        ((module(x) - target) ** 2).mean().backward()
        opt.step()
    m64 = module(torch.eye(12, dtype=F64)).detach()
    assert float((m64 @ m64.T - torch.eye(12, dtype=F64)).abs().max()) <= 1e-12
    m32 = module(torch.eye(12)).detach()
    assert float((m32 @ m32.T - torch.eye(12)).abs().max()) <= 1e-5
    frozen = module.freeze()  # validates orthogonality again
    assert float((frozen.matrix() - start).abs().max()) > 0.05  # it did learn something
    assert rel_err(frozen.matrix(), m64) <= 1e-12


def test_orthogonal_starts_at_its_blocks_and_skips_one_by_one_blocks() -> None:
    rotation = BlockRotation([random_orthogonal(3, gen(1)), torch.tensor([[-1.0]], dtype=F64), random_orthogonal(2, gen(2))])
    module = LearnableOrthogonal(blocks=rotation)
    assert torch.equal(module.freeze().matrix(), rotation.matrix())
    assert [tuple(p.shape) for p in module.parameters()] == [(1, 3, 3), (1, 2, 2)]
    assert torch.equal(LearnableOrthogonal(6).freeze().matrix(), torch.eye(6, dtype=F64))
    with pytest.raises(TransformError, match="not orthogonal"):
        LearnableOrthogonal(blocks=[2 * torch.eye(3)])
    with pytest.raises(TransformError, match="either size"):
        LearnableOrthogonal(6, blocks=rotation)


def test_scale_stays_positive_and_starts_at_init() -> None:
    init = torch.tensor([0.5, 1.0, 4.0])
    module = LearnableScale(3, init=init)
    assert rel_err(module.freeze().factors, init.double()) <= 1e-7
    with torch.no_grad():
        module.log_factors.fill_(-50.0)  # any value of the parameter is a valid scale
    assert bool((module.freeze().factors > 0).all())
    with pytest.raises(TransformError, match="must be positive"):
        LearnableScale(3, init=[1.0, -1.0, 2.0])
    with pytest.raises(TransformError, match=r"shape \(3,\)"):
        LearnableScale(3, init=[1.0, 2.0])


def test_kronecker_starts_at_identity_or_given_factors() -> None:
    assert torch.equal(LearnableKronecker(2, 3).freeze().matrix(), torch.eye(6, dtype=F64))
    a, b = random_orthogonal(2, gen(1)), 2 * torch.eye(3, dtype=F64)
    assert rel_err(LearnableKronecker(2, 3, A=a, B=b).freeze().matrix(), torch.kron(a, b)) <= 1e-7
    with pytest.raises(TransformError, match=r"needs a 2×2 A and an 3×3 B"):
        LearnableKronecker(2, 3, A=torch.eye(3), B=torch.eye(2))
    module = LearnableKronecker(2, 2)
    with torch.no_grad():
        module.A.zero_()  # a fit that collapsed a factor cannot freeze
    with pytest.raises(TransformError, match="singular"):
        module.freeze()


def test_inputs_of_the_wrong_width_are_shape_errors() -> None:
    for module in (LearnableScale(4), LearnableOrthogonal(4), LearnableKronecker(2, 2), LearnableShift(4)):
        with pytest.raises(ShapeError, match="width 4"):
            module(torch.zeros(2, 5))


# --------------------------------------------------------------------------- the shift


def shift_setup():
    g = gen(11)
    shift = LearnableShift(6, init=torch.randn(6, generator=g, dtype=F64), dtype=F64)
    consumer = torch.nn.Linear(6, 4, dtype=F64)
    producer = torch.nn.Linear(3, 6, dtype=F64)
    return shift, consumer, producer


def test_shift_folds_into_the_consumer_bias_with_the_right_sign() -> None:
    torch.manual_seed(0)
    shift, consumer, _ = shift_setup()
    frozen = shift.freeze()
    x = torch.randn(5, 6, dtype=F64)
    w, b = consumer.weight.detach(), consumer.bias.detach()
    assert rel_err(shift(x), x - frozen.shift) <= 0 and rel_err(frozen(x), shift(x).detach()) <= 0
    new_b = frozen.consumer_bias(w, b)
    assert rel_err(F.linear(shift(x), w, new_b), F.linear(x, w, b)) <= 1e-12
    wrong = b - frozen.bias_correction(w)  # the other sign must not pass
    assert rel_err(F.linear(shift(x), w, wrong), F.linear(x, w, b)) > 1e-3
    assert rel_err(F.linear(shift(x), w, frozen.consumer_bias(w, None)), F.linear(x, w)) <= 1e-12


def test_shift_then_transform_is_exact_end_to_end() -> None:
    """producer (bias − shift, then T folded on its output) → consumer (T folded, bias + shift·Wᵀ)."""
    torch.manual_seed(1)
    shift, consumer, producer = shift_setup()
    frozen = shift.freeze()
    t = Scale(torch.linspace(0.5, 2.0, 6, dtype=F64)) @ BlockRotation.random(6, 4, gen(2))
    pw, pb = t.fold_into_output(producer.weight.detach(), frozen.producer_bias(producer.bias.detach()))
    cw, _ = t.fold_into_weight(consumer.weight.detach())
    # Either form of the consumer correction: the original weight, or the folded one with the shift through T.
    cb = frozen.consumer_bias(consumer.weight.detach(), consumer.bias.detach())
    cb_folded = FrozenShift(t(frozen.shift)).consumer_bias(cw, consumer.bias.detach())
    assert rel_err(cb_folded, cb) <= 1e-12
    z = torch.randn(5, 3, dtype=F64)
    expected = consumer(producer(z)).detach()
    assert rel_err(F.linear(F.linear(z, pw, pb), cw, cb), expected) <= 1e-12


def test_shift_gradient_and_errors() -> None:
    shift = LearnableShift(3)
    (shift(torch.randn(4, 3)) ** 2).sum().backward()
    assert shift.shift.grad is not None and float(shift.shift.grad.abs().max()) > 0
    with pytest.raises(ShapeError, match=r"\(out, 3\)"):
        shift.freeze().bias_correction(torch.zeros(2, 4))
    with pytest.raises(TransformError, match="finite"):
        LearnableShift(2, init=[0.0, float("nan")])
