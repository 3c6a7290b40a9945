"""Offloaded quantization (quantcompose/offload.py): one layer in memory, same result, resumable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from quantcompose import pipeline, quantize
from quantcompose.checkpoint import Checkpoint, write_checkpoint
from quantcompose.errors import ModelLoadError, OffloadError
from quantcompose.offload import quantize_offloaded
from quantcompose.qlinear import QuantLinear
from quantcompose.saving import load_quantized, read_manifest, save_quantized
from quantcompose.work_folder import work_folder_for
from realmodel import requires_model
from toymodel import tiny_llama

LAYERS = 4
W4A4 = {"method": "duquant", "wbits": 4, "abits": 4, "weight_quantizer": "rtn"}  # rtn: GPTQ is slow, not under test


class Interrupted(Exception):
    pass


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "toy"
    tiny_llama(layers=LAYERS, hidden=64).save_pretrained(folder)
    return folder


def _in_memory(recipe: dict) -> nn.Module:
    model = tiny_llama(layers=LAYERS, hidden=64)
    quantize(model, recipe=recipe, calibration=_tokens(), progress=False)
    return model


def _shards(folder: Path) -> dict[str, str]:
    """``{shard: sha256}`` of a saved model's tensor files, each hashed here from its bytes."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in read_manifest(folder)["files"] if name.endswith(".safetensors")}


@pytest.mark.parametrize("recipe", [
    W4A4,
    # the LM head quantized (needs the final norm and head after the last layer), one layer left in float
    {**W4A4, "targets": [{"match": ["lm_head"], "wbits": 8, "abits": 8}],
     "ignore": ["re:model\\.layers\\.2\\.mlp\\..*"]},
    # the embedding table quantized at the end, from the table loaded outside the layers
    {**W4A4, "targets": [{"match": ["lm_head"], "wbits": 8}], "ignore": [], "embedding_bits": 8},
], ids=["duquant-w4a4", "targets-and-head", "embedding-bits"])
def test_offloaded_equals_in_memory_bit_for_bit(checkpoint, tmp_path, recipe):
    quantize_offloaded(checkpoint, tmp_path / "out", recipe=recipe, calibration=_tokens(), progress=False)
    loaded, _ = load_quantized(tmp_path / "out")
    assert torch.equal(_logits(loaded), _logits(_in_memory(recipe)))
    assert not work_folder_for(tmp_path / "out").exists()  # removed once the model is saved


def test_offloaded_and_in_memory_saves_write_the_same_shards(checkpoint, tmp_path):
    quantize_offloaded(checkpoint, tmp_path / "offloaded", recipe=W4A4, calibration=_tokens(), progress=False)
    save_quantized(_in_memory(W4A4), tmp_path / "in-memory")
    shards = _shards(tmp_path / "offloaded")
    assert len(shards) == LAYERS + 1 and shards == _shards(tmp_path / "in-memory")


def test_the_save_materializes_one_layer_at_a_time(checkpoint, tmp_path, monkeypatch):
    import quantcompose.saving as saving

    skeletons, written = [], []
    skeleton, write = Checkpoint.skeleton, saving.save_file

    def kept(self, dtype):
        skeletons.append(skeleton(self, dtype))
        return skeletons[-1]

    def recorded(tensors, file, *args, **kwargs):
        """Which decoder layers hold real tensors while each shard is written."""
        held = [i for i, layer in enumerate(skeletons[-1].model.layers)
                if not all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])]
        written.append((Path(file).name, held))
        return write(tensors, file, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "skeleton", kept)
    monkeypatch.setattr(saving, "save_file", recorded)
    quantize_offloaded(checkpoint, tmp_path / "out", recipe=W4A4, calibration=_tokens(), progress=False)
    assert written == [(f"model-{i + 1:05d}-of-{LAYERS + 1:05d}.safetensors", [i] if i < LAYERS else [])
                       for i in range(LAYERS + 1)]


def test_only_the_layer_being_quantized_is_materialized(checkpoint, tmp_path, monkeypatch):
    step = pipeline.quantize_layer_step
    seen = []

    def checked(run, index, layer, inputs):
        layers = run.adapter.layers()
        later = [p for j in range(index + 1, LAYERS) for p in layers[j].parameters()]
        assert all(p.is_meta for p in later) and (later or index == LAYERS - 1)
        for j in range(index):  # finished: quantized, written to the work folder, freed
            assert not any(type(m) is nn.Linear for m in layers[j].modules())
            assert all(t.is_meta for t in [*layers[j].parameters(), *layers[j].buffers()])
        assert not any(p.is_meta for p in layer.parameters())
        seen.append(index)
        return step(run, index, layer, inputs)

    monkeypatch.setattr(pipeline, "quantize_layer_step", checked)
    quantize_offloaded(checkpoint, tmp_path / "out", recipe={"method": "rtn", "wbits": 4, "abits": 8},
                       calibration=_tokens(), progress=False)
    assert seen == list(range(LAYERS))


def test_interrupted_run_resumes_after_the_last_finished_layer(checkpoint, tmp_path, monkeypatch):
    quantize_offloaded(checkpoint, tmp_path / "whole", recipe=W4A4, calibration=_tokens(), progress=False)

    def stop_after_layer_1(index: int) -> None:
        if index == 1:
            raise Interrupted

    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        quantize_offloaded(checkpoint, out, recipe=W4A4, calibration=_tokens(), progress=False,
                           after_layer=stop_after_layer_1)
    assert not out.exists() and work_folder_for(out).is_dir()

    step = pipeline.quantize_layer_step
    quantized: list[int] = []

    def counting(run, index, layer, inputs):
        quantized.append(index)
        return step(run, index, layer, inputs)

    monkeypatch.setattr(pipeline, "quantize_layer_step", counting)
    report = quantize_offloaded(checkpoint, out, recipe=W4A4, calibration=_tokens(), progress=False)
    assert quantized == [2, 3]  # layers 0 and 1 were read back, not quantized again
    assert _shards(out) == _shards(tmp_path / "whole")
    assert {line["layer"] for line in report.quantization.places} == set(range(LAYERS))
    resumed, _ = load_quantized(out)
    whole, _ = load_quantized(tmp_path / "whole")
    assert torch.equal(_logits(resumed), _logits(whole))


def test_work_folder_of_other_arguments_is_refused_unless_restarted(checkpoint, tmp_path):
    out = tmp_path / "out"

    def stop(index: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        quantize_offloaded(checkpoint, out, recipe=W4A4, calibration=_tokens(), progress=False, after_layer=stop)
    other = {**W4A4, "wbits": 8}
    with pytest.raises(OffloadError, match="other arguments.*--restart"):
        quantize_offloaded(checkpoint, out, recipe=other, calibration=_tokens(), progress=False)
    quantize_offloaded(checkpoint, out, recipe=other, calibration=_tokens(), progress=False, restart=True)
    assert torch.equal(_logits(load_quantized(out)[0]), _logits(_in_memory(other)))


@pytest.mark.parametrize("recipe", [
    {"method": "quarot", "wbits": 4, "abits": 4},
    {**W4A4, "residual_rotation": True},
], ids=["quarot", "residual-rotation"])
def test_model_scope_plans_are_refused_before_any_work(checkpoint, tmp_path, recipe):
    with pytest.raises(OffloadError, match="does not support"):
        quantize_offloaded(checkpoint, tmp_path / "out", recipe=recipe, calibration=_tokens(), progress=False)
    assert not work_folder_for(tmp_path / "out").exists()


def test_sharded_checkpoint(tmp_path):
    folder = tmp_path / "sharded"
    tiny_llama(layers=2, hidden=64).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    recipe = {"method": "rtn", "wbits": 8, "abits": 8}
    quantize_offloaded(folder, tmp_path / "out", recipe=recipe, calibration=_tokens(), progress=False)
    model = tiny_llama(layers=2, hidden=64)
    quantize(model, recipe=recipe, calibration=_tokens(), progress=False)
    assert torch.equal(_logits(load_quantized(tmp_path / "out")[0]), _logits(model))


def test_source_that_is_not_a_safetensors_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        quantize_offloaded(tmp_path, tmp_path / "out", calibration=_tokens(), progress=False)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        quantize_offloaded(tmp_path, tmp_path / "out", calibration=_tokens(), progress=False)


def test_cli_offload(checkpoint, tmp_path, capsys):
    from quantcompose.cli import main

    out = tmp_path / "out"
    argv = ["quantize", "--offload", "--model", str(checkpoint), "--method", "rtn", "--wbits", "8", "--abits", "8",
            "--nsamples", "2", "--calib-seqlen", "16", "--quiet"]
    assert main(argv) == 2
    assert "--offload writes the model as it goes and needs --save DIR" in capsys.readouterr().err
    assert main(["quantize", "--device", "cuda", "--model", str(checkpoint)]) == 2
    assert "--device applies to offloaded quantization only" in capsys.readouterr().err
    assert main([*argv, "--save", str(out)]) == 0
    assert "offloaded on cpu" in capsys.readouterr().out
    model, _ = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * LAYERS


@pytest.mark.slow
@requires_model
def test_smollm2_offloaded_equals_in_memory(tmp_path):
    import copy

    from realmodel import load_smollm2

    base, tokenizer = load_smollm2()
    write_checkpoint(base, tmp_path / "smollm2")  # save_pretrained refuses a model loaded from GGUF
    # The cheapest settings: the test is about where the weights come from, not how they are rounded.
    recipe = {"method": "rtn", "wbits": 8, "abits": 8, "weight_quantizer": "rtn", "qkv_bits": 16,
              "weight_clip_search": False, "act_clip_search": False}
    tokens = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    quantize_offloaded(tmp_path / "smollm2", tmp_path / "out", recipe=recipe, calibration=tokens, progress=False)
    model = copy.deepcopy(base)
    quantize(model, recipe=recipe, calibration=tokens, progress=False)
    ids = tokenizer("Offloaded quantization keeps one layer in memory.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "out")[0](ids).logits, model(ids).logits)


def test_write_checkpoint_drops_the_gguf_quantization_and_writes_tied_tensors_once(tmp_path):
    import json

    model = tiny_llama(layers=1, hidden=64)
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    folder = write_checkpoint(model, tmp_path / "ckpt")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert hasattr(model.config, "quantization_config")  # the model's own config is untouched
    checkpoint = Checkpoint(folder)
    assert "lm_head.weight" not in checkpoint.files  # tied: the embedding is written once
    state = model.state_dict()
    for name, tensor in checkpoint.read(checkpoint.files).items():
        assert torch.equal(tensor, state[name])
