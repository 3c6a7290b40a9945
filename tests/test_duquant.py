"""DuQuant strategy plugin: smoothing, greedy block rotation, zigzag permutation.

Each test plants a structure the method must act on (a massive outlier
channel, a set of outlier channels, dead channels) so that a broken
implementation (identity rotation, unbalanced deal, missing fold) fails.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import quantcompose_plugins.duquant as dq
from quantcompose.strategy import PlaceStats, Plan, QuantSettings
from quantcompose.transforms import BlockRotation, Compose, Identity, Permutation, Scale


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orth_err(block: torch.Tensor) -> float:
    b = block.to(torch.float64)
    return float((b @ b.T - torch.eye(b.shape[0], dtype=torch.float64)).abs().max())


def _stats(width: int = 576, tokens: int = 512, seed: int = 0, outlier: float = 300.0) -> PlaceStats:
    g = _gen(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, 3] *= 20.0  # a systematic outlier channel
    x[:4, width // 2] = outlier  # a massive outlier on a few tokens
    w = {"up": torch.randn(96, width, generator=g) * 0.05, "gate": torch.randn(96, width, generator=g) * 0.05}
    return PlaceStats(0, "mlp_in", x.abs().amax(dim=0), x, w, "diagonal")


def _parts(t) -> list:
    return list(t.transforms) if isinstance(t, Compose) else [t]


# ---------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize(
    "width, block, sizes",
    [(576, 128, [128, 128, 128, 128, 64]), (1536, 128, [128] * 12), (100, 128, [100]), (301, 64, [64] * 4 + [45]), (1, 8, [1])],
)
def test_block_sizes(width, block, sizes):
    assert dq.block_sizes(width, block) == sizes


@pytest.mark.parametrize("n", [1, 2, 3, 64, 127, 128])
def test_step_matrix_is_orthogonal_with_uniform_first_row(n):
    for m in (dq.uniform_first_row_matrix(n), dq.step_base_matrix(n, _gen())):
        assert m.dtype == torch.float64
        assert _orth_err(m) < 1e-12
        assert torch.allclose(m[0], torch.full((n,), n**-0.5, dtype=torch.float64), atol=1e-12)


def test_one_step_spreads_a_single_outlier_evenly():
    n = 128
    x = torch.zeros(1, n, dtype=torch.float64)
    x[0, 0] = 64.0
    y = x @ dq.step_base_matrix(n, _gen())
    assert torch.allclose(y.abs(), torch.full_like(y, 64.0 / n**0.5), atol=1e-9)


# ---------------------------------------------------------------------------- greedy rotation
@pytest.mark.parametrize("width, block", [(576, 128), (1536, 128), (100, 128), (301, 64), (257, 128), (7, 4)])
def test_greedy_blocks_are_orthogonal_and_cover_width(width, block):
    x = torch.randn(300, width, generator=_gen(1))
    x[:2, width - 1] = 80.0  # the outlier sits in the (possibly short) last block
    blocks = dq.greedy_block_rotation(x, block, 32, _gen(2))
    assert [b.shape[0] for b in blocks] == dq.block_sizes(width, block)
    for b in blocks:
        assert b.dtype == torch.float64 and b.shape[0] == b.shape[1]
        assert _orth_err(b) < 1e-10
    BlockRotation(blocks)  # the atom accepts them


def test_greedy_rotation_flattens_a_massive_outlier():
    x = torch.randn(2048, 576, generator=_gen(3))
    x[:3, 300] = 400.0  # block 2
    x[:, 520] *= 40.0  # short last block (512..575)
    before = x.abs().max().item()
    blocks, info = dq.greedy_block_rotation(x, 128, 256, _gen(4), return_info=True)
    y = dq.apply_blocks(x.double(), blocks)
    assert y.abs().max().item() < 0.2 * before  # uniform spread: 400/sqrt(128) ≈ 35
    tail_before = x[:, 512:].abs().max().item()
    assert y[:, 512:].abs().max().item() < 0.4 * tail_before
    assert info["steps_taken"][2] >= 1 and info["steps_taken"][4] >= 1
    # The scored max is what the chosen rotation actually achieves on the sample.
    for b, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        assert y[:, lo:hi].abs().max().item() >= info["max_after"][b] - 1e-3
    assert info["max_after"][2] == pytest.approx(y[:, 256:384].abs().max().item(), rel=1e-4)


def test_greedy_never_worse_than_identity_and_zero_steps_is_identity():
    x = torch.randn(256, 200, generator=_gen(5))
    for b in dq.greedy_block_rotation(x, 64, 0, _gen()):
        assert torch.equal(b, torch.eye(b.shape[0], dtype=torch.float64))
    blocks, info = dq.greedy_block_rotation(x, 64, 16, _gen(), eval_tokens=None, return_info=True)
    assert all(a <= b for a, b in zip(info["max_after"], info["max_before"]))
    assert all(info["exact"])  # all rows scored
    zero = torch.zeros(16, 64)
    assert all(torch.equal(b, torch.eye(32, dtype=torch.float64)) for b in dq.greedy_block_rotation(zero, 32, 8, _gen()))


def test_greedy_accepts_a_channel_statistic():
    v = torch.rand(256, generator=_gen(6))
    v[10] = 100.0
    blocks = dq.greedy_block_rotation(v, 128, 64, _gen())
    assert (v.double() @ torch.block_diag(*blocks)).abs().max() < 30.0


@settings(max_examples=15)
@given(width=st.integers(1, 300), block=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_greedy_orthogonal_property(width, block, seed):
    x = torch.randn(24, width, generator=_gen(seed)) * torch.rand(width, generator=_gen(seed + 1)).pow(4).mul(30)
    blocks = dq.greedy_block_rotation(x, block, 6, _gen(seed))
    assert sum(b.shape[0] for b in blocks) == width
    assert max(_orth_err(b) for b in blocks) < 1e-10


# ---------------------------------------------------------------------------- zigzag
def test_zigzag_deals_back_and_forth():
    cm = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])
    # blocks of 2: deal order b0 b1 b2 b3 b3 b2 b1 b0
    assert dq.zigzag_permutation(cm, 2).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    # 5 channels, blocks [2, 2, 1]: the full short block is skipped on the way back
    assert dq.zigzag_permutation(torch.tensor([5.0, 4, 3, 2, 1]), 2).tolist() == [0, 4, 1, 3, 2]


@pytest.mark.parametrize("width, block, n_out", [(576, 128, 10), (1536, 128, 24), (300, 128, 6)])
def test_zigzag_is_a_permutation_that_balances_outliers(width, block, n_out):
    g = _gen(7)
    cm = torch.rand(width, generator=g)
    outliers = torch.randperm(width, generator=g)[:n_out]
    cm[outliers] = 100.0 + torch.arange(n_out, dtype=torch.float32)
    perm = dq.zigzag_permutation(cm, block)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(width))
    Permutation(perm)
    sizes = dq.block_sizes(width, block)
    counts, off = [], 0
    is_out = torch.zeros(width, dtype=torch.bool)
    is_out[outliers] = True
    for s in sizes:
        counts.append(int(is_out[perm[off : off + s]].sum()))
        off += s
    assert sum(counts) == n_out
    assert max(counts) - min(counts) <= 1, counts
    # Without the permutation the outliers would pile up wherever they happen to be.
    assert max(counts) <= -(-n_out // len(sizes))


@settings(max_examples=30)
@given(width=st.integers(1, 400), block=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_zigzag_valid_for_any_width(width, block, seed):
    cm = torch.rand(width, generator=_gen(seed))
    perm = dq.zigzag_permutation(cm, block)
    assert sorted(perm.tolist()) == list(range(width))


# ---------------------------------------------------------------------------- smoothing
def test_smooth_factors_formula():
    s = dq.smooth_factors(torch.tensor([4.0, 9.0]), torch.tensor([1.0, 4.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.5], dtype=torch.float64))


def test_smooth_factors_finite_positive_on_degenerate_channels():
    act = torch.tensor([0.0, 3.0, 0.0, float("nan"), float("inf"), 1e-30, 5.0])
    w = torch.tensor([0.0, 0.0, 2.0, 1.0, 1.0, 1.0, float("nan")])
    for alpha in (0.0, 0.5, 0.6, 1.0):
        s = dq.smooth_factors(act, w, alpha)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert s[0] == 1.0  # dead on both sides: left alone
        Scale(1.0 / s)
    with pytest.raises(ValueError):
        dq.smooth_factors(act, w, 1.5)


# ---------------------------------------------------------------------------- full transform
@pytest.mark.parametrize("preset", sorted(dq.ABLATIONS))
def test_transform_is_exact_after_folding(preset):
    stats = _stats(width=576, tokens=256)
    t = dq.build_duquant_transform(stats, {**dq.ABLATIONS[preset], "steps": 24}, QuantSettings())
    g = _gen(8)
    w = torch.randn(40, 576, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    x = stats.act_sample[:64].double()
    w2, b2 = t.fold_into_weight(w, b)
    assert torch.allclose(F.linear(t(x), w2, b2), F.linear(x, w, b), rtol=0, atol=1e-9)
    assert torch.allclose(t.inv(t(x)), x, rtol=0, atol=1e-9)


def test_full_transform_structure_and_effect():
    stats = _stats(width=576, tokens=1024)
    t, notes = dq.fit_duquant(stats, {}, QuantSettings())
    kinds = [type(p) for p in _parts(t)]
    assert kinds == [Scale, BlockRotation, Permutation, BlockRotation]
    assert [b.shape[0] for b in _parts(t)[1].blocks] == [128, 128, 128, 128, 64]
    y = t(stats.act_sample.double())
    assert y.abs().max().item() < 0.1 * stats.act_sample.abs().max().item()
    assert notes["sample_max_after"] == pytest.approx(y.abs().max().item(), rel=1e-4)


def test_ablation_presets_select_components():
    stats = _stats(width=300, tokens=128)
    expected = {
        "smooth": [Scale],
        "rotation": [BlockRotation],
        "smooth+rotation": [Scale, BlockRotation],
        "rotation+permutation+rotation": [BlockRotation, Permutation, BlockRotation],
        "full": [Scale, BlockRotation, Permutation, BlockRotation],
    }
    assert set(dq.ABLATIONS) == set(expected)
    for name, kinds in expected.items():
        t = dq.build_duquant_transform(stats, {**dq.ABLATIONS[name], "steps": 8})
        assert [type(p) for p in _parts(t)] == kinds, name
    off = {"smooth": False, "rotate": False, "permute": False}
    assert isinstance(dq.build_duquant_transform(stats, off), Identity)


def test_single_block_skips_the_useless_permutation():
    stats = _stats(width=96, tokens=64)
    t = dq.build_duquant_transform(stats, {"steps": 8})
    assert [type(p) for p in _parts(t)] == [Scale, BlockRotation, BlockRotation]


def test_without_sample_falls_back_to_absmax():
    stats = _stats(width=256, tokens=64)
    stats.act_sample = torch.zeros(0, 256)
    t = dq.build_duquant_transform(stats, {"steps": 16})
    assert t.size == 256


def test_deterministic_with_seed_and_varies_with_it():
    stats = _stats(width=300, tokens=128)
    m1 = dq.build_duquant_transform(stats, {"seed": 11, "steps": 16}).matrix()
    m2 = dq.build_duquant_transform(stats, {"seed": 11, "steps": 16}).matrix()
    m3 = dq.build_duquant_transform(stats, {"seed": 12, "steps": 16}).matrix()
    assert torch.equal(m1, m2)
    assert not torch.allclose(m1, m3)
    # The default seed comes from the settings.
    a = dq.build_duquant_transform(stats, {"steps": 16}, QuantSettings(seed=3)).matrix()
    b = dq.build_duquant_transform(stats, {"steps": 16, "seed": 3}).matrix()
    assert torch.equal(a, b)


def test_inputs_are_not_modified():
    stats = _stats(width=200, tokens=64)
    snapshot = (stats.act_absmax.clone(), stats.act_sample.clone(), {k: v.clone() for k, v in stats.weights.items()})
    dq.build_duquant_transform(stats, {"steps": 8})
    assert torch.equal(stats.act_absmax, snapshot[0]) and torch.equal(stats.act_sample, snapshot[1])
    assert all(torch.equal(stats.weights[k], snapshot[2][k]) for k in snapshot[2])


# ---------------------------------------------------------------------------- hooks and options
def test_info_and_plan():
    info = dq.STRATEGY.info
    assert info.name == "duquant" and info.scopes == ("place",)
    assert {"smooth", "alpha", "rotate", "block_size", "steps", "permute", "second_rotation", "act_clip", "weight_clip", "seed"} <= set(info.options)
    stats = _stats(width=256, tokens=64)
    # With the clip searches off, the reference's static ratios apply (--lac 0.9, --swc 0.8).
    static = QuantSettings(wbits=4, abits=4, act_clip_search=False, weight_clip_search=False)
    opts = dq.STRATEGY.resolve({"steps": 8}, static)
    plan = dq.STRATEGY.plan(stats, opts, static)
    assert isinstance(plan, Plan)
    assert plan.act_spec.clip_ratio == 0.9 and plan.act_spec.granularity == "token" and plan.act_spec.bits == 4
    assert plan.weight_spec.clip_ratio == 0.8 and plan.weight_spec.granularity == "channel"
    assert not plan.search_act_clip and not plan.search_weight_clip
    assert "r1_steps" in plan.notes
    # With the searches on (the default), the plan says so and carries no static ratio.
    searched = dq.STRATEGY.plan(stats, opts, QuantSettings(wbits=4, abits=4))
    assert searched.search_act_clip and searched.search_weight_clip
    assert searched.act_spec.clip_ratio == 1.0 and searched.weight_spec.clip_ratio == 1.0
    plan16 = dq.STRATEGY.plan(stats, opts, QuantSettings(wbits=16, abits=16))
    assert plan16.act_spec is None and plan16.weight_spec is None
    assert not plan16.search_act_clip and not plan16.search_weight_clip


def test_a_fixed_clip_ratio_with_its_search_on_is_an_error():
    from quantcompose.errors import OptionError

    with pytest.raises(OptionError, match="act_clip=0.9 fixes a clip ratio.*--no-act-clip-search"):
        dq.STRATEGY.resolve({"act_clip": "0.9"}, QuantSettings())
    with pytest.raises(OptionError, match="weight_clip=0.7.*--no-clip-search"):
        dq.STRATEGY.resolve({"weight_clip": 0.7}, QuantSettings())
    settings = QuantSettings(act_clip_search=False)
    plan = dq.STRATEGY.plan(_stats(width=64, tokens=16), dq.STRATEGY.resolve({"act_clip": "0.7", "steps": 2}, settings), settings)
    assert plan.act_spec.clip_ratio == 0.7 and not plan.search_act_clip and plan.search_weight_clip


def test_options_are_validated_and_parsed():
    from quantcompose.errors import OptionError

    info = dq.STRATEGY.info
    with pytest.raises(OptionError, match="rotation_steps"):
        info.resolve_options({"rotation_steps": 3})
    with pytest.raises(OptionError):
        dq.build_duquant_transform(_stats(width=64, tokens=16), {"blocksize": 32})
    parsed = info.resolve_options({"second_rotation": "false", "seed": "7", "alpha": "0.5", "permute": "off", "steps": "10"})
    assert parsed["second_rotation"] is False and parsed["seed"] == 7 and parsed["alpha"] == 0.5
    assert parsed["permute"] is False and parsed["steps"] == 10
    assert info.resolve_options({"second_rotation": "auto"})["second_rotation"] is None
    bad_values = (
        {"alpha": 2.0}, {"alpha": "5"}, {"block_size": 0}, {"block_size": "0"}, {"steps": -1},
        {"act_clip": 0.0}, {"act_clip": "abc"}, {"smooth": "maybe"}, {"block_size": 2.5}, {"smooth": 3},
        {"seed": -1},
    )
    for bad in bad_values:
        with pytest.raises(OptionError, match=next(iter(bad))):
            info.resolve_options(bad)


def test_registered_through_the_entry_point_when_installed():
    from quantcompose.plugin_manager import StrategyManager

    manager = StrategyManager()
    if "duquant" not in manager.strategies():
        pytest.skip("duquant is not registered in this installation's entry points yet")
    plan = manager.plan("duquant", _stats(width=128, tokens=32), manager.info("duquant").resolve_options({"steps": 4}), QuantSettings())
    assert isinstance(plan, Plan)
