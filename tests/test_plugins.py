"""The plugin contract: built-in and third-party strategies load the same way."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from quantcompose.errors import OptionError, UnknownStrategyError
from quantcompose.hookspecs import hookimpl
from quantcompose.plugin_manager import ENTRY_POINT_GROUP, StrategyManager
from quantcompose.strategy import PlaceStats, Plan, QuantSettings, Strategy
from quantcompose.transforms import Identity, Scale


def _stats(width: int = 8) -> PlaceStats:
    x = torch.randn(32, width)
    return PlaceStats(0, "attn_in", x.abs().amax(0), x, {"q_proj": torch.randn(4, width)}, "diagonal")


def test_builtin_rtn_is_found_through_the_entry_point():
    manager = StrategyManager()
    assert "rtn" in manager.strategies()
    plan = manager.plan("rtn", _stats(), manager.info("rtn").resolve_options({}), QuantSettings(wbits=4, abits=8))
    assert isinstance(plan.transform, Identity)
    assert plan.weight_spec.bits == 4 and plan.weight_spec.granularity == "channel"
    assert plan.act_spec.bits == 8 and plan.act_spec.granularity == "token"


def test_sixteen_bits_means_float():
    manager = StrategyManager()
    plan = manager.plan("rtn", _stats(), {"act_clip": None, "weight_clip": None}, QuantSettings(wbits=16, abits=16))
    assert plan.act_spec is None and plan.weight_spec is None


def test_third_party_package_is_discovered_from_its_entry_point(tmp_path, monkeypatch):
    """A throw-away strategy 'installed' as a distribution on sys.path."""
    (tmp_path / "throwaway_strategy.py").write_text(textwrap.dedent('''
        from quantcompose.hookspecs import hookimpl
        from quantcompose.options import Option
        from quantcompose.strategy import Plan, Strategy
        from quantcompose.transforms import Scale
        import torch

        class Throwaway(Strategy):
            name = "throwaway"
            description = "doubles every channel"
            options = {"factor": Option(2.0, "scale")}

            def plan(self, stats, options, settings):
                return Plan(Scale(torch.full((stats.width,), options["factor"])), None, None)

        @hookimpl
        def quantcompose_strategies():
            yield Throwaway()
    '''))
    dist = tmp_path / "throwaway_strategy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-strategy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nthrowaway = throwaway_strategy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "throwaway_strategy", raising=False)

    manager = StrategyManager()
    assert {"throwaway", "rtn"} <= set(manager.strategies())
    options = manager.info("throwaway").resolve_options({"factor": "3"})
    assert options == {"factor": 3.0}
    plan = manager.plan("throwaway", _stats(), options, QuantSettings())
    torch.testing.assert_close(plan.transform.factors, torch.full((8,), 3.0))


class _Inline:
    """A plugin object that yields two strategies: the manager serves both by name."""

    @hookimpl
    def quantcompose_strategies(self):
        class Ident(Strategy):
            name = "inline"
            description = "identity"

        class Halve(Strategy):
            name = "inline-halve"
            description = "halves every channel"

            def plan(self, stats, options, settings):
                return Plan(Scale(torch.full((stats.width,), 0.5)), None, None)

        return [Ident(), Halve()]


def test_a_plugin_yielding_two_strategies_serves_both():
    manager = StrategyManager(load_entry_points=False)
    manager.register(_Inline())
    assert list(manager.strategies()) == ["inline", "inline-halve"]
    settings = QuantSettings(wbits=16, abits=16)
    assert isinstance(manager.plan("inline", _stats(), {}, settings).transform, Identity)
    assert torch.equal(manager.plan("inline-halve", _stats(), {}, settings).transform.factors, torch.full((8,), 0.5))
    with pytest.raises(UnknownStrategyError, match="installed strategies are \\['inline', 'inline-halve'\\]"):
        manager.info("nosuch")


def test_two_plugins_claiming_one_name_are_refused():
    manager = StrategyManager(load_entry_points=False)
    manager.register(_Inline())
    with pytest.raises(ValueError, match="inline"):
        manager.register(_Inline(), name="again")
    assert list(manager.strategies()) == ["inline", "inline-halve"]  # the refused plugin left nothing behind


def test_shipped_plugins_yield_their_strategies():
    names = set(StrategyManager().strategies())
    assert {"rtn", "duquant", "smoothquant", "quarot", "quarot-online"} <= names
    assert StrategyManager().info("quarot").scopes == ("model", "place")


def test_unknown_option_is_rejected():
    manager = StrategyManager()
    with pytest.raises(OptionError, match="no option"):
        manager.info("rtn").resolve_options({"alpha": 0.5})


def test_bad_options_fail_before_calibration():
    """A bad option is an OptionError from quantize_model before the model is touched."""
    from toymodel import tiny_llama

    from quantcompose.pipeline import quantize_model

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, options in (("smoothquant", {"alpha": 5}), ("duquant", {"block_size": 0}), ("rtn", {"act_clip": "abc"})):
        with pytest.raises(OptionError):
            quantize_model(model, torch.randint(0, 128, (2, 8)), method, QuantSettings(), options, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bits_out_of_range_raise():
    from quantcompose.errors import QuantSpecError

    for bits in (0, 1, 9, 12):
        with pytest.raises(QuantSpecError):
            QuantSettings(wbits=bits)


def _attn_out_stats(absorbable: str) -> PlaceStats:
    """o_proj's input of 4 query heads of width 3 over 2 value heads, with one outlier channel."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=generator)
    x[:, 4] *= 50  # head 1 (value head 0), channel 1
    shared = (2, 3) if absorbable == "shared_diagonal" else None
    weight = torch.randn(6, 12, generator=generator)
    return PlaceStats(0, "attn_out", x.abs().amax(0), x, {"o_proj": weight}, absorbable,
                      shared_heads=shared)


def test_foldable_smoothquant_shares_o_proj_scales_across_the_query_heads_of_a_value_head():
    manager = StrategyManager()
    settings = QuantSettings(wbits=8, abits=8, act_clip_search=False, weight_clip_search=False)
    stats = _attn_out_stats("shared_diagonal")
    per_channel = manager.plan("smoothquant", stats, manager.resolve("smoothquant", {}, settings), settings)
    foldable = manager.plan("smoothquant", stats, manager.resolve("smoothquant", {"foldable": True}, settings), settings)
    grouped = foldable.transform.factors.reshape(2, 2, 3)
    assert torch.equal(grouped[:, 0], grouped[:, 1])  # equal across the two query heads of each value head
    # a channel's factor comes from its maxima over the group's heads (channel 1 of heads 0 and 1)
    from quantcompose_plugins._duquant_rotation import smooth_factors

    act = torch.maximum(stats.act_absmax[1], stats.act_absmax[4]).reshape(1)
    weight = stats.weight_absmax()[[1, 4]].amax().reshape(1)
    expected = 1.0 / smooth_factors(act, weight, 0.5)
    assert foldable.transform.factors[1] == foldable.transform.factors[4] == expected
    assert not torch.equal(per_channel.transform.factors.reshape(2, 2, 3)[:, 0],
                           per_channel.transform.factors.reshape(2, 2, 3)[:, 1])
    # a place that absorbs a per-channel scale gets one either way; one that absorbs nothing gets none
    diagonal = _attn_out_stats("diagonal")
    options = manager.resolve("smoothquant", {"foldable": True}, settings)
    assert torch.equal(manager.plan("smoothquant", diagonal, options, settings).transform.factors,
                       per_channel.transform.factors)
    assert isinstance(manager.plan("smoothquant", _attn_out_stats("none"), options, settings).transform, Identity)


def test_quarot_without_online_hadamards_keeps_only_the_folded_rotations():
    from quantcompose.strategy import ModelFacts

    manager = StrategyManager()
    settings = QuantSettings(wbits=8, abits=8)
    facts = ModelFacts("llama", 2, 96, 24, 4, 2, True)
    strategy = manager.get("quarot")
    full, folded = (manager.resolve("quarot", {"online_hadamards": flag}, settings) for flag in (True, False))
    assert strategy.model_plan(facts, full, settings).qk_rotation is not None
    plan = strategy.model_plan(facts, folded, settings)
    assert plan.fuse_norms and plan.residual is not None and plan.value_head is not None and plan.qk_rotation is None
    for place, width in (("attn_out", 96), ("mlp_down", 224)):
        stats = PlaceStats(0, place, torch.ones(width), torch.ones(4, width), {"w": torch.ones(2, width)}, "none",
                           model=facts)
        assert not isinstance(strategy.plan(stats, full, settings).transform, Identity)
        assert isinstance(strategy.plan(stats, folded, settings).transform, Identity)
