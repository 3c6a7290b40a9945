"""Save / load on a toy model: round trip, refusals, no partial files after a failure."""

from __future__ import annotations

import pytest
import torch

from quantcompose.errors import ModelLoadError
from quantcompose.pipeline import quantize_model
from quantcompose.saving import load_quantized, save_quantized
from quantcompose.strategy import QuantSettings

from toymodel import tiny_llama


def _quantized(wbits=4, abits=8):
    model = tiny_llama()
    quantize_model(model, torch.randint(0, 128, (2, 16)), "duquant", QuantSettings(wbits=wbits, abits=abits),
                   {"block_size": 32, "steps": 4}, progress=False)
    return model


def test_round_trip_identical_logits(tmp_path):
    model = _quantized()
    save_quantized(model, tmp_path / "m")
    loaded, tokenizer = load_quantized(tmp_path / "m")
    assert tokenizer is None
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_refuses_to_overwrite_without_permission(tmp_path):
    model = _quantized()
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(model, tmp_path / "m")
    save_quantized(model, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "quantcompose.json").is_file()


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import quantcompose.saving as saving

    model = _quantized()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a saved quantcompose model"):
        load_quantized(tmp_path)
