"""`quantcompose inspect`: activations collected, the plan applied atom by atom, pictures and summaries."""

from __future__ import annotations

import sys

import pytest
import torch

from quantcompose.cli import main
from quantcompose.inspect_outliers import (
    InspectionError,
    format_layer_table,
    format_summary,
    inspect_layers,
    inspect_place,
    layer_place_inputs,
    write_inspection,
)
from quantcompose.plotting import PlotDependencyError
from quantcompose.strategy import QuantSettings

from tests.realmodel import requires_model
from tests.toymodel import tiny_llama

SEQLEN = 32
OUTLIER_CHANNEL = 37
OPTIONS = {"block_size": 32, "steps": 8}  # 160 down_proj channels: five blocks, so the permutation has work


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (3, SEQLEN), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def toy():
    """A toy whose down_proj input has a massive channel, as SmolLM2's layer 11 has."""
    model = tiny_llama(hidden=64, layers=2)
    with torch.no_grad():  # down's input is act(gate)·up: a huge up row makes that channel huge on every token
        model.model.layers[1].mlp.up_proj.weight[OUTLIER_CHANNEL] *= 5000.0
    return model


@pytest.fixture(scope="module")
def inspection(toy):
    return inspect_place(toy, _tokens(), 1, "mlp_down", "duquant", OPTIONS, QuantSettings())


def test_inputs_are_what_the_linear_receives_in_a_full_forward(toy):
    tokens = _tokens()
    seen = []
    handle = toy.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        toy(tokens)
    handle.remove()
    walked = list(layer_place_inputs(toy, tokens, [1], batch_size=2))
    assert [index for index, _, _ in walked] == [1]
    expected = seen[0].reshape(-1, seen[0].shape[-1])
    torch.testing.assert_close(walked[0][2]["mlp_down"], expected, rtol=1e-5, atol=1e-4)
    assert set(walked[0][2]) == {"attn_in", "attn_out", "mlp_in", "mlp_down"}


def test_each_step_applies_the_next_atom(toy, inspection):
    assert [s.name for s in inspection.steps] == ["input", "Scale", "BlockRotation", "Permutation", "BlockRotation"]
    x = next(iter(layer_place_inputs(toy, _tokens(), [1])))[2]["mlp_down"]
    torch.testing.assert_close(inspection.steps[0].channel_absmax, x.abs().amax(dim=0))
    # After the last atom: what the plan's whole transform makes of the input, as one dense matrix.
    dense = x.double() @ inspection.transform.matrix().double()
    torch.testing.assert_close(inspection.steps[-1].channel_absmax.double(), dense.abs().amax(dim=0),
                               rtol=1e-4, atol=1e-4)
    seq = inspection.landscape_sequence
    assert inspection.steps[0].landscape.shape == (SEQLEN, 160)
    torch.testing.assert_close(inspection.steps[0].landscape, x[seq * SEQLEN:(seq + 1) * SEQLEN].abs())
    assert inspection.before.row // SEQLEN == seq  # the landscape shows the sequence holding the max
    # Orthogonal steps keep each token's norm; the Scale does not.
    for before, after in zip(inspection.steps[2:], inspection.steps[3:]):
        torch.testing.assert_close(after.landscape.norm(dim=1), before.landscape.norm(dim=1), rtol=1e-4, atol=1e-3)


def test_the_planted_outlier_is_found_and_spread(inspection):
    top = inspection.outliers[0]
    assert top.channel == OUTLIER_CHANNEL and top.layer == 1 and top.place == "mlp_down"
    assert abs(top.value) == pytest.approx(inspection.before.max_abs)
    assert inspection.massive_count > 0
    assert inspection.after.max_over_median < inspection.before.max_over_median / 10
    blocks = inspection.blocks
    assert blocks.block_size == 32 and blocks.before.numel() == blocks.after.numel() == 5
    assert blocks.variance_after < blocks.variance_before
    text = format_summary(inspection)
    assert "layer 1 mlp_down (input of mlp.down_proj; 160 channels)" in text
    assert f"  1      mlp_down   {top.sequence:<8}  {top.position:<5}  {OUTLIER_CHANNEL:<7}" in text
    assert "Scale · BlockRotation · Permutation · BlockRotation" in text
    assert "per-block max |x| around the permutation (blocks of 32)" in text


def test_pictures_and_summary_are_written(inspection, tmp_path):
    written = write_inspection(inspection, tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted(
        [f"layer1_mlp_down_duquant_step{k}_{n}.png"
         for k, n in enumerate(["input", "scale", "blockrotation", "permutation", "blockrotation"])]
        + ["layer1_mlp_down_duquant_steps.png", "layer1_mlp_down_duquant_block_max.png",
           "layer1_mlp_down_duquant_summary.txt"]
    )
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if path.suffix == ".png" else b"massive" in data


def test_a_strategy_without_permutation_has_no_block_chart(toy, tmp_path):
    found = inspect_place(toy, _tokens(), 0, "attn_in", "smoothquant")
    assert [s.name for s in found.steps] == ["input", "Scale"] and found.blocks is None
    assert "per-block" not in format_summary(found)
    assert not any("block_max" in p.name for p in write_inspection(found, tmp_path))


def test_all_layers_one_line_per_layer_and_place(toy):
    found = inspect_layers(toy, _tokens(), "duquant", OPTIONS, progress=False)
    assert [(i.layer, i.place) for i in found] == [
        (layer, place) for layer in (0, 1) for place in ("attn_in", "attn_out", "mlp_in", "mlp_down")]
    assert all(s.landscape is None for i in found for s in i.steps)
    lines = format_layer_table(found).splitlines()
    assert len(lines) == 1 + 8 and lines[0].split()[:4] == ["layer", "place", "max_before", "max/med_before"]
    down = next(i for i in found if (i.layer, i.place) == (1, "mlp_down"))
    assert down.before.channel == OUTLIER_CHANNEL


def test_bad_layer_place_and_missing_matplotlib(toy, inspection, tmp_path, monkeypatch):
    with pytest.raises(InspectionError, match="layers 0..1"):
        inspect_place(toy, _tokens(), 2, "mlp_down")
    with pytest.raises(InspectionError, match="places are \\['attn_in'"):
        inspect_place(toy, _tokens(), 0, "mlp_out")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotDependencyError, match="quantcompose\\[plot\\]"):
        write_inspection(inspection, tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect"], "needs --layer"),
        (["inspect", "--layer", "1", "--bits", "w4"], "wXaY"),
        (["inspect", "--layer", "1", "--method", "nosuch"], "unknown method"),
        (["compare", "--eval-data", "x", "--bits", "w8a8kv8"], "wXaY"),
        (["compare", "--eval-data", "x", "--methods", "rtn,nosuch"], "unknown method 'nosuch'"),
        (["compare", "--eval-data", "x", "--methods", "rtn", "--opt", "duquant:alpha=1"], "not among"),
        (["compare", "--eval-data", "x", "--seeds", "0,a"], "--seeds"),
    ],
)
def test_cli_errors_before_loading_a_model(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantcompose: error:") and message in err


@pytest.mark.slow
@requires_model  # the model only: inspecting needs no evaluation data
def test_smollm2_layer11_down_proj_massive_outlier_is_spread_by_duquant():
    from tests.realmodel import load_smollm2

    from quantcompose.data import calibration_tokens

    model, tokenizer = load_smollm2()
    tokens = calibration_tokens("random-zipf", tokenizer, nsamples=4, seqlen=512, seed=0)
    found = inspect_place(model, tokens, 11, "mlp_down", "duquant")
    # Measured (8 x 512 random-zipf tokens, seed 0): max |x| 3203 at channel 1229, tokens 0-1;
    # max/median 6.0e4 at the input and 53 after DuQuant's four steps, a drop of about 1,100x.
    assert found.before.max_abs > 1000
    assert found.outliers[0].channel == 1229 and found.outliers[0].position <= 1
    assert found.massive_count > 0
    assert found.after.max_over_median < found.before.max_over_median / 100
    assert found.blocks.variance_after < found.blocks.variance_before / 10
