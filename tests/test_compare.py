"""`compare_methods` and its writers on a toy model: contents, failures, determinism, restoration."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from quantcompose.compare import (
    CSV_COLUMNS,
    BitSetting,
    ComparisonError,
    Protocol,
    RunSpec,
    compare_methods,
    parse_bits,
    parse_bits_list,
    parse_method_options,
    run_grid,
    to_csv,
    to_json,
    to_markdown,
    write_outputs,
)
from quantcompose.errors import QuantSpecError
from quantcompose.hookspecs import hookimpl
from quantcompose.plugin_manager import StrategyManager
from quantcompose.strategy import QuantSettings, Strategy

from tests.toymodel import tiny_llama

PROTOCOL = Protocol("tiny-llama", "random token stream", seqlen=32, max_windows=3, calibration="4 x 32 random tokens")
# RTN weights keep the toy runs fast; the pipeline's defaults are tested elsewhere.
FAST = QuantSettings(weight_quantizer="rtn", act_clip_search=False, weight_clip_search=False)


def _toy():
    # One layer is enough to exercise every place; hidden 64 keeps each run well under a second.
    return tiny_llama(hidden=64, layers=1)


def _calib(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))


def _eval_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (1, 3 * 32), generator=torch.Generator().manual_seed(99))


def _compare(model, runs, seeds=(0,), manager=None):
    return compare_methods(model, runs, _calib, _eval_tokens(), PROTOCOL, seeds, settings=FAST,
                           manager=manager, progress=False)


class _ExploderStrategy(Strategy):
    name = "exploder"
    description = "raises on every place"

    def plan(self, stats, options, settings):
        raise RuntimeError("exploder always fails")


class _Exploder:
    """A plugin whose strategy's planning raises, to prove one failed run does not stop the others."""

    @hookimpl
    def quantcompose_strategies(self):
        yield _ExploderStrategy()


@pytest.fixture(scope="module")
def result():
    model = _toy()
    runs = run_grid(["rtn", "duquant"], [BitSetting(8, 8), BitSetting(4, 4)], {"duquant": {"steps": "4"}})
    return _compare(model, runs, seeds=(0, 1))


def test_bits_parser_accepts_wxay_only():
    assert parse_bits("w4a4") == BitSetting(4, 4)
    assert parse_bits(" W6A16 ").label == "W6A16"
    assert parse_bits_list("w4a4,w8a8,w4a4") == [BitSetting(4, 4), BitSetting(8, 8)]
    for bad in ("4a4", "w4", "w8a8kv8", "w4a4g128", "", "wxa4"):
        with pytest.raises(ComparisonError, match="wXaY"):
            parse_bits(bad)
    with pytest.raises(QuantSpecError, match="'w9a4'.*wbits=9"):
        parse_bits("w9a4")
    with pytest.raises(ComparisonError, match="no bit setting"):
        parse_bits_list(" , ")


def test_method_options_parser():
    assert parse_method_options(["duquant:alpha=0.6", "duquant:block-size=64", "rtn:act_clip=0.9"],
                                ["rtn", "duquant"]) == {
        "duquant": {"alpha": "0.6", "block_size": "64"}, "rtn": {"act_clip": "0.9"}}
    with pytest.raises(ComparisonError, match="METHOD:KEY=VALUE"):
        parse_method_options(["alpha=0.6"], ["duquant"])
    with pytest.raises(ComparisonError, match="not among the compared methods"):
        parse_method_options(["smoothquant:alpha=0.6"], ["duquant"])


def test_table_rows_and_columns(result):
    rows = result.rows()
    assert [(r.method, r.bits) for r in rows] == [
        ("rtn", "W8A8"), ("duquant", "W8A8"), ("rtn", "W4A4"), ("duquant", "W4A4")]
    assert all(r.succeeded == r.runs == 2 for r in rows)
    fp = result.full_precision.perplexity
    for row in rows:
        assert row.ppl_min <= row.ppl_mean <= row.ppl_max
        assert row.x_fp_mean == pytest.approx(row.ppl_mean / fp)
        assert row.ppl_std is not None and row.ppl_std >= 0
    by = {(r.method, r.bits): r for r in rows}
    # A seed sets the calibration draw and DuQuant's random rotations, so DuQuant's rows
    # spread over seeds; round-to-nearest without searches reads no calibration data at all.
    assert by[("duquant", "W8A8")].ppl_std > 0 and by[("duquant", "W4A4")].ppl_std > 0
    assert by[("rtn", "W8A8")].ppl_std == 0 and by[("rtn", "W4A4")].ppl_std == 0
    assert by[("duquant", "W8A8")].options_given == {"steps": "4"}

    table = to_markdown(result)
    header = table.splitlines()[table.splitlines().index("") + 1]
    for column in ("method", "bits", "options", "perplexity", "std", "min–max", "× full precision",
                   "quantization s", "peak RSS MiB", "error"):
        assert f" {column} " in header
    assert f"| full precision | W16A16 |  | {fp:.2f} |" in table
    assert "Seeds: 0,1" in table and "sample standard deviation" in table
    assert "first 3 windows of 32 tokens" in table and "quantcompose " in table


def test_csv_and_json_hold_every_figure(result):
    records = list(csv.DictReader(io.StringIO(to_csv(result))))
    assert tuple(records[0]) == CSV_COLUMNS
    assert records[0]["method"] == "full precision" and records[0]["seed"] == ""
    assert len(records) == 1 + 4 * 2
    duquant = [r for r in records if r["method"] == "duquant"]
    assert {r["seed"] for r in duquant} == {"0", "1"}
    assert json.loads(duquant[0]["options_used"])["steps"] == 4  # parsed and resolved by the strategy
    for record in records[1:]:
        assert float(record["quant_seconds"]) > 0 and float(record["peak_rss_mib"]) > 0

    document = json.loads(to_json(result))
    for key in ("quantcompose_version", "protocol", "settings", "seeds", "memory", "full_precision", "rows", "runs"):
        assert key in document
    assert document["protocol"]["seqlen"] == 32 and document["seeds"] == [0, 1]
    assert document["settings"]["weight_quantizer"] == "rtn"
    assert len(document["runs"]) == 8 and len(document["rows"]) == 4
    assert document["runs"][0]["perplexity"] == pytest.approx(result.runs[0].perplexity)


def test_write_outputs_writes_four_files(result, tmp_path):
    written = write_outputs(result, tmp_path / "out")
    assert sorted(written) == ["csv", "json", "markdown", "png"]
    for path in written.values():
        assert path.stat().st_size > 0
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_run_is_a_row_and_the_others_go_on():
    manager = StrategyManager()
    manager.register(_Exploder(), name="exploder")
    runs = [RunSpec("rtn", BitSetting(8, 8), {"alpha": "0.5"}),  # rtn has no alpha: rejected
            RunSpec("exploder", BitSetting(8, 8)),
            RunSpec("rtn", BitSetting(8, 8))]
    out = _compare(_toy(), runs, manager=manager)
    rejected, exploded, fine = out.runs
    assert "no option" in rejected.error and "alpha" in rejected.error
    assert exploded.error == "RuntimeError: exploder always fails"
    assert fine.ok and math.isfinite(fine.perplexity)
    table = to_markdown(out)
    assert "seed 0: RuntimeError: exploder always fails" in table
    assert [r.succeeded for r in out.rows()] == [0, 0, 1]


def test_diverged_perplexity_is_a_failed_row(monkeypatch):
    import quantcompose.compare as compare

    calls = iter([5.0, math.nan])  # full precision, then the quantized run
    monkeypatch.setattr(compare, "perplexity", lambda *a, **k: next(calls))
    out = _compare(_toy(), [RunSpec("rtn", BitSetting(8, 8))])
    assert "diverged" in out.runs[0].error and out.rows()[0].x_fp_mean is None
    assert json.loads(to_json(out))["runs"][0]["perplexity"] == "nan"


def test_same_seed_same_table_and_the_model_is_restored():
    model = _toy()
    probe = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(probe).logits
    # The same run twice in one comparison: the second must start from the pristine model too.
    runs = [RunSpec("duquant", BitSetting(4, 4), {"steps": 4}), RunSpec("duquant", BitSetting(4, 4), {"steps": 4})]
    first = _compare(model, runs)
    second = _compare(model, runs)
    assert first.runs[0].perplexity == first.runs[1].perplexity
    assert to_markdown(first, timings=False) == to_markdown(second, timings=False)
    with torch.no_grad():
        after = model(probe).logits
    assert torch.equal(before, after)
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())


def test_empty_inputs_are_clear_errors():
    with pytest.raises(ComparisonError, match="nothing to compare"):
        _compare(_toy(), [])
    with pytest.raises(ComparisonError, match="no seed"):
        _compare(_toy(), [RunSpec("rtn", BitSetting(8, 8))], seeds=())
