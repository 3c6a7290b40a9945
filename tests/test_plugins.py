"""The plugin contract: built-in and third-party strategies load the same way."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from quantcompose.errors import UnknownStrategyError
from quantcompose.plugin_manager import ENTRY_POINT_GROUP, StrategyManager
from quantcompose.strategy import PlaceStats, QuantSettings
from quantcompose.transforms import Identity


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
    plan = manager.plan("rtn", _stats(), {"act_clip": 1.0, "weight_clip": 1.0}, QuantSettings(wbits=16, abits=16))
    assert plan.act_spec is None and plan.weight_spec is None


def test_third_party_package_is_discovered_from_its_entry_point(tmp_path, monkeypatch):
    """A throw-away strategy 'installed' as a distribution on sys.path."""
    (tmp_path / "throwaway_strategy.py").write_text(textwrap.dedent('''
        from quantcompose.hookspecs import hookimpl
        from quantcompose.strategy import Plan, StrategyInfo, Option
        from quantcompose.transforms import Scale
        import torch

        @hookimpl
        def quantcompose_strategy_info():
            return StrategyInfo("throwaway", "doubles every channel", {"factor": Option(2.0, "scale")})

        @hookimpl
        def quantcompose_plan(method, stats, options, settings):
            if method != "throwaway":
                return None
            return Plan(Scale(torch.full((stats.width,), options["factor"])), None, None)
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


def test_register_by_hand_and_unknown_method():
    class Inline:
        from quantcompose.hookspecs import hookimpl

        @hookimpl
        def quantcompose_strategy_info(self):
            from quantcompose.strategy import StrategyInfo

            return StrategyInfo("inline", "identity")

        @hookimpl
        def quantcompose_plan(self, method, stats, options, settings):
            from quantcompose.strategy import Plan

            return Plan(Identity(stats.width), None, None) if method == "inline" else None

    manager = StrategyManager(load_entry_points=False)
    manager.register(Inline())
    assert list(manager.strategies()) == ["inline"]
    with pytest.raises(UnknownStrategyError, match="installed strategies are \\['inline'\\]"):
        manager.info("nosuch")


def test_unknown_option_is_rejected():
    manager = StrategyManager()
    with pytest.raises(KeyError, match="no option"):
        manager.info("rtn").resolve_options({"alpha": 0.5})


def test_bits_out_of_range_raise():
    from quantcompose.errors import QuantSpecError

    for bits in (0, 1, 9, 12):
        with pytest.raises(QuantSpecError):
            QuantSettings(wbits=bits)
