"""Model adapters: every fact they state is checked against what the model computes.

Architectures × tied / untied embeddings × grouped-query (2 kv heads of 4) /
plain (4 of 4) attention, on toy models with non-trivial norms and biases.
"""

from __future__ import annotations

import copy
from importlib import metadata
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, GPT2Config, LlamaConfig, Phi3Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from quantcompose.errors import UnsupportedArchitectureError
from quantcompose.models import (
    BUILTIN_ADAPTERS,
    ENTRY_POINT_GROUP,
    AdapterRegistrationError,
    AdapterRegistry,
    LlamaAdapter,
    ModelAdapter,
    Phi3Adapter,
    check_supported,
    get_adapter,
    register_adapter,
    supported_model_types,
    unregister_adapter,
)
from quantcompose.models import registry as registry_module

from realmodel import load_smollm2, requires_model
from toymodel import TOY_ARCHS, tiny_model

CASES = [(arch, tied, kv) for arch in TOY_ARCHS for tied in (True, False) for kv in (2, 4)]
IDS = [f"{arch}-{'tied' if tied else 'untied'}-kv{kv}" for arch, tied, kv in CASES]
EXPECTED_ADAPTER = {"llama": LlamaAdapter, "mistral": LlamaAdapter, "qwen2": LlamaAdapter, "phi3": Phi3Adapter}
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
# float32 logits of O(1) through 2 layers; a wrong fold moves them by O(0.1) or more
ATOL = RTOL = 2e-4


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _place_width(adapter: ModelAdapter, name: str) -> int:
    return {
        "attn_in": adapter.hidden_size,
        "attn_out": adapter.num_heads * adapter.head_dim,
        "mlp_in": adapter.hidden_size,
        "mlp_down": adapter.intermediate_size,
    }[name]


def _rows(linear: nn.Linear, rows: tuple[int, int] | None) -> tuple[int, int]:
    return rows if rows is not None else (0, linear.out_features)


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


# --- paths, types, widths ----------------------------------------------------------------


@pytest.mark.parametrize(("arch", "tied", "kv"), CASES, ids=IDS)
def test_every_named_path_exists_with_the_right_type_and_width(arch, tied, kv):
    model = tiny_model(arch, tied=tied, kv_heads=kv)
    adapter = get_adapter(model)
    assert type(adapter) is EXPECTED_ADAPTER[arch]
    assert (adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (96, 4, kv, 24)
    assert isinstance(adapter.layers(), nn.ModuleList) and len(adapter.layers()) == 2
    assert isinstance(adapter.embedding(), nn.Embedding) and adapter.embedding().weight.shape == (128, 96)
    assert isinstance(adapter.lm_head(), nn.Linear) and adapter.lm_head().weight.shape == (128, 96)
    assert adapter.final_norm().weight.shape == (96,)
    for layer in adapter.layers():
        places = adapter.places(layer)
        assert [p.name for p in places] == ["attn_in", "attn_out", "mlp_in", "mlp_down"]
        assert [p.group for p in places] == ["attention", "attention", "mlp", "mlp"]
        attention = adapter.attention(layer)
        consumed = [name for p in places for name in p.linears]
        # every linear of the layer is consumed by exactly one place
        assert sorted(consumed) == sorted(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
        for place in places:
            width = _place_width(adapter, place.name)
            for name in place.linears:
                linear = layer.get_submodule(name)
                assert isinstance(linear, nn.Linear) and linear.in_features == width
                assert _contains(attention, linear) == (place.group == "attention")
            assert (place.prev is None) == (place.prev_kind == "none") == (place.absorbable == "none")
            if place.prev_kind == "norm":
                assert place.prev_rows is None and layer.get_submodule(place.prev).weight.shape == (width,)
            elif place.prev_kind == "linear":
                prev = layer.get_submodule(place.prev)
                start, stop = _rows(prev, place.prev_rows)
                # a shared-diagonal place's producer has one row per value-head channel
                group = place.shared_heads[0] if place.absorbable == "shared_diagonal" else 1
                assert (place.shared_heads is not None) == (place.absorbable == "shared_diagonal")
                assert isinstance(prev, nn.Linear) and (stop - start) * group == width
                assert 0 <= start < stop <= prev.out_features
        for name, out in adapter.kv_outputs(layer).items():
            linear = layer.get_submodule(out.linear)
            start, stop = _rows(linear, out.rows)
            assert isinstance(linear, nn.Linear) and stop - start == adapter.head_dim * kv and stop <= linear.out_features
        assert set(adapter.kv_outputs(layer)) == {"k", "v"}


@pytest.mark.parametrize(("arch", "kv"), [(a, kv) for a in TOY_ARCHS for kv in (2, 4)])
def test_attn_out_absorbs_into_v_a_scale_shared_by_the_query_heads_of_each_value_head(arch, kv):
    model = tiny_model(arch, kv_heads=kv)
    adapter = get_adapter(model)
    attn_out = {p.name: p for p in adapter.places(adapter.layers()[0])}["attn_out"]
    value = adapter.kv_outputs(adapter.layers()[0])["v"]
    assert (attn_out.prev, attn_out.prev_kind, attn_out.prev_rows) == (value.linear, "linear", value.rows)
    if kv == adapter.num_heads:
        assert attn_out.absorbable == "diagonal" and attn_out.shared_heads is None
    else:
        assert attn_out.absorbable == "shared_diagonal" and attn_out.shared_heads == (adapter.num_heads // kv, 24)
        shared = _shared_factors(attn_out, adapter.num_heads * 24, seed=0)
        assert torch.equal(attn_out.prev_factors(shared), shared.reshape(kv, -1, 24)[:, 0].reshape(-1))
        assert attn_out.prev_factors(_random_factors(adapter.num_heads * 24, seed=0)) is None


# --- what the model computes agrees with the adapter --------------------------------------


class _Probe:
    """An attention function that records what transformers hands it, then runs SDPA."""

    name = "quantcompose_adapter_probe"

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        AttentionInterface.register(self.name, self)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append((module, key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _record_outputs(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda module, args, out: outputs.__setitem__(name, out)

    return outputs, [m.register_forward_hook(hook(n)) for n, m in modules.items()]


@pytest.mark.parametrize(("arch", "tied", "kv"), CASES, ids=IDS)
def test_attention_module_and_kv_outputs_are_what_attention_receives(arch, tied, kv):
    model = tiny_model(arch, tied=tied, kv_heads=kv)
    adapter = get_adapter(model)
    probe = _Probe()
    model.config._attn_implementation = probe.name
    layer = adapter.layers()[0]
    kv_out = adapter.kv_outputs(layer)
    outputs, handles = _record_outputs({s.linear: layer.get_submodule(s.linear) for s in kv_out.values()})
    _logits(model)
    for h in handles:
        h.remove()
    module, key, value = probe.calls[0]
    assert module is adapter.attention(layer)
    batch, tokens = TOKENS.shape

    def heads(name):  # (batch, kv_heads, tokens, head_dim), as attention sees them
        start, stop = _rows(layer.get_submodule(kv_out[name].linear), kv_out[name].rows)
        rows = outputs[kv_out[name].linear][..., start:stop]
        return rows.reshape(batch, tokens, kv, adapter.head_dim).transpose(1, 2)

    torch.testing.assert_close(value, heads("v"), rtol=0, atol=0)
    # keys arrive rotated by RoPE, which is the identity at position 0
    torch.testing.assert_close(key[:, :, 0], heads("k")[:, :, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("arch", "tied", "kv"), CASES, ids=IDS)
def test_residual_readers_and_writers_are_exactly_the_streams_linears(arch, tied, kv):
    model = tiny_model(arch, tied=tied, kv_heads=kv)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    modules = dict(layer.named_modules())
    del modules[""]
    outputs, handles = _record_outputs(modules)
    inputs: dict[str, torch.Tensor] = {}
    handles += [
        m.register_forward_pre_hook(lambda module, args, n=n: inputs.__setitem__(n, args[0]))
        for n, m in modules.items()
        if isinstance(m, nn.Linear)
    ]
    layer_io: list[torch.Tensor] = []
    handles.append(layer.register_forward_hook(lambda m, args, out: layer_io.extend([args[0], out])))
    _logits(model)
    for h in handles:
        h.remove()
    # the truth, found from the forward pass: which norm's output each linear reads
    norms = {n for n, m in modules.items() if not isinstance(m, nn.Linear) and hasattr(m, "weight")}
    read_by = {
        norm: {lin for lin, x in inputs.items() if x is outputs[norm] or torch.equal(x, outputs[norm])}
        for norm in norms
    }
    claimed = {r.norm: set(r.linears) for r in adapter.residual_readers(layer)}
    assert claimed == {norm: lins for norm, lins in read_by.items() if lins}
    # the layer's output is its input plus what the writers produce, and nothing else
    layer_in, layer_out = layer_io[0], layer_io[1]
    layer_out = layer_out[0] if isinstance(layer_out, tuple) else layer_out
    written = sum(outputs[name] for name in adapter.residual_writers(layer))
    torch.testing.assert_close(layer_out, layer_in + written, rtol=1e-5, atol=1e-5)
    assert not set(adapter.residual_writers(layer)) & {n for r in adapter.residual_readers(layer) for n in r.linears}


@pytest.mark.parametrize(("arch", "tied", "kv"), CASES, ids=IDS)
def test_final_norm_feeds_the_lm_head(arch, tied, kv):
    model = tiny_model(arch, tied=tied, kv_heads=kv)
    adapter = get_adapter(model)
    seen: list[torch.Tensor] = []
    h1 = adapter.final_norm().register_forward_hook(lambda m, args, out: seen.append(out))
    h2 = adapter.lm_head().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    _logits(model)
    h1.remove(), h2.remove()
    torch.testing.assert_close(seen[0][:, -1:], seen[1][:, -1:], rtol=0, atol=0)


# --- the absorbable claims are exact -------------------------------------------------------


def _scale_place(layer: nn.Module, place, factors: torch.Tensor, rows_override=None, prev_factors=None) -> None:
    """Scale the activation at ``place`` by ``factors`` on the prev side and undo it in the consumers.

    The prev side takes ``prev_factors`` (default: what the place says it absorbs for ``factors``).
    """
    prev = layer.get_submodule(place.prev)
    on_prev = place.prev_factors(factors) if prev_factors is None else prev_factors
    with torch.no_grad():
        if place.prev_kind == "norm":
            prev.weight.mul_(on_prev)
        else:
            start, stop = _rows(prev, rows_override or place.prev_rows)
            prev.weight[start:stop].mul_(on_prev[:, None])
            if prev.bias is not None:
                prev.bias[start:stop].mul_(on_prev)
        for name in place.linears:
            layer.get_submodule(name).weight.div_(factors)


def _random_factors(width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(width).uniform_(-1.0, 1.0, generator=generator))


def _shared_factors(place, width: int, seed: int) -> torch.Tensor:
    """Random factors, equal across the query heads of each value head (``place.shared_heads``)."""
    group, head_dim = place.shared_heads
    per_value_head = _random_factors(width // group, seed).reshape(-1, 1, head_dim)
    return per_value_head.expand(-1, group, -1).reshape(-1)


def _scale_in_every_layer(model: nn.Module, name: str) -> bool:
    """Scale place ``name`` of every layer by random factors it claims to absorb; False for ``"none"``."""
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers()):
        place = {p.name: p for p in adapter.places(layer)}[name]
        if place.absorbable == "none":
            return False
        assert place.absorbable in ("diagonal", "shared_diagonal"), "no built-in place claims more than a diagonal"
        width = _place_width(adapter, name)
        shared = place.absorbable == "shared_diagonal"
        _scale_place(layer, place, _shared_factors(place, width, i) if shared else _random_factors(width, seed=i))
    return True


@pytest.mark.parametrize(("arch", "tied", "kv"), CASES, ids=IDS)
def test_every_absorbable_claim_is_exact(arch, tied, kv):
    base = tiny_model(arch, tied=tied, kv_heads=kv)
    before = _logits(base)
    checked = []
    for place in get_adapter(base).places(get_adapter(base).layers()[0]):
        model = copy.deepcopy(base)
        if _scale_in_every_layer(model, place.name):
            torch.testing.assert_close(_logits(model), before, rtol=RTOL, atol=ATOL, msg=lambda m: f"{place.name}: {m}")
            checked.append(place.name)
    assert checked == ["attn_in", "attn_out", "mlp_in", "mlp_down"]


@pytest.mark.parametrize("arch", TOY_ARCHS)
def test_the_exactness_check_catches_a_wrong_claim(arch):
    """Scaling the gate's rows instead of up's changes the logits: the check above can fail."""
    model = tiny_model(arch)
    before = _logits(model)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    mlp_down = adapter.places(layer)[3]
    gate = adapter.projections()["gate"]
    wrong = type(mlp_down)(mlp_down.name, mlp_down.linears, gate.linear, "linear", "diagonal", "mlp", gate.rows)
    _scale_place(layer, wrong, _random_factors(adapter.intermediate_size, seed=3))
    assert not torch.allclose(_logits(model), before, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch", TOY_ARCHS)
def test_a_scale_the_query_heads_of_a_value_head_do_not_share_does_not_fold(arch):
    """Under grouped-query attention, folding one head's factors into v for a per-head scale is wrong."""
    model = tiny_model(arch, kv_heads=2)
    before = _logits(model)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    attn_out = adapter.places(layer)[1]
    factors = _random_factors(_place_width(adapter, "attn_out"), seed=5)
    assert attn_out.prev_factors(factors) is None
    _scale_place(layer, attn_out, factors, prev_factors=factors.reshape(2, 2, 24)[:, 0].reshape(-1))
    assert not torch.allclose(_logits(model), before, rtol=RTOL, atol=ATOL)


# --- embeddings ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "tied", "kv"), CASES, ids=IDS)
def test_untie_embeddings_is_exact_and_separates_the_head(arch, tied, kv, tmp_path):
    model = tiny_model(arch, tied=tied, kv_heads=kv)
    adapter = get_adapter(model)
    assert adapter.tied_embeddings() == tied
    head_weight = adapter.lm_head().weight
    before = _logits(model)
    adapter.untie_embeddings()
    assert not adapter.tied_embeddings() and model.config.tie_word_embeddings is False
    assert adapter.lm_head().weight.data_ptr() != adapter.embedding().weight.data_ptr()
    assert torch.equal(adapter.lm_head().weight, adapter.embedding().weight) == tied
    assert torch.equal(_logits(model), before)
    if not tied:
        assert adapter.lm_head().weight is head_weight  # nothing to do for an untied model
    model.tie_weights()  # transformers must not tie them again
    assert not adapter.tied_embeddings()
    with torch.no_grad():
        adapter.lm_head().weight.mul_(2.0)
    assert not torch.equal(adapter.lm_head().weight, adapter.embedding().weight)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert not get_adapter(reloaded).tied_embeddings()
    assert torch.equal(get_adapter(reloaded).lm_head().weight, adapter.lm_head().weight)


# --- registry ----------------------------------------------------------------------------------


class _ToyAdapter(LlamaAdapter):
    model_types = ("toy-arch",)


class _OtherToyAdapter(LlamaAdapter):
    model_types = ("other-toy", "toy-arch")


def _config(model_type: str):
    return type("Config", (), {"model_type": model_type})()


def test_unsupported_architecture_names_it_and_the_supported_types():
    with pytest.raises(UnsupportedArchitectureError) as info:
        check_supported(GPT2Config())
    message = str(info.value)
    assert "'gpt2'" in message and all(repr(t) in message for t in ("llama", "mistral", "qwen2", "phi3"))
    assert ENTRY_POINT_GROUP in message

    class NoConfig(nn.Module):
        pass

    with pytest.raises(UnsupportedArchitectureError, match="without a config.model_type"):
        get_adapter(NoConfig())


def test_check_supported_works_on_a_config_alone():
    assert check_supported(LlamaConfig()) is LlamaAdapter
    assert check_supported(Phi3Config()) is Phi3Adapter
    assert check_supported(tiny_model("qwen2")) is LlamaAdapter
    assert {"llama", "mistral", "qwen2", "phi3"} <= set(supported_model_types())


def test_registry_rejects_duplicates_and_non_adapters():
    registry = AdapterRegistry(load_entry_points=False)
    assert registry.register(_ToyAdapter) is _ToyAdapter
    registry.register(_ToyAdapter)  # the same class again is no conflict
    with pytest.raises(AdapterRegistrationError, match=r"'toy-arch' by .*_ToyAdapter"):
        registry.register(_OtherToyAdapter)
    assert registry.supported_model_types() == ["toy-arch"]  # nothing half-registered
    with pytest.raises(AdapterRegistrationError, match="not a subclass"):
        registry.register(object)  # type: ignore[arg-type]

    class Nameless(LlamaAdapter):
        model_types = ()

    with pytest.raises(AdapterRegistrationError, match="no model_types"):
        registry.register(Nameless)
    registry.unregister(_ToyAdapter)
    with pytest.raises(UnsupportedArchitectureError, match="toy-arch"):
        registry.adapter_class(_config("toy-arch"))


def test_register_adapter_by_hand():
    with pytest.raises(AdapterRegistrationError, match="'llama'"):
        register_adapter(type("Clash", (LlamaAdapter,), {"model_types": ("llama",)}))
    register_adapter(_ToyAdapter)
    try:
        assert check_supported(_config("toy-arch")) is _ToyAdapter and "toy-arch" in supported_model_types()
    finally:
        unregister_adapter(_ToyAdapter)
    assert "toy-arch" not in supported_model_types()


# --- entry points (importlib.metadata monkeypatched) -------------------------------------------


def _entry_point(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """An importable third-party module with adapters, and a way to install entry points to it."""
    (tmp_path / "qc_third_party.py").write_text(
        "from quantcompose.models import LlamaAdapter\n"
        "class ToyAdapter(LlamaAdapter):\n    model_types = ('toy-arch',)\n"
        "class LlamaClash(LlamaAdapter):\n    model_types = ('llama',)\n"
        "NOT_AN_ADAPTER = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(*entry_points: metadata.EntryPoint, own_group_declared: bool = False) -> None:
        monkeypatch.setattr(
            metadata, "entry_points",
            lambda group: [ep for ep in entry_points if ep.group == group],
        )
        monkeypatch.setattr(registry_module, "_own_metadata_declares_group", lambda: own_group_declared)

    return install


def _pyproject_entry_points() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    return pyproject["project"]["entry-points"][ENTRY_POINT_GROUP]


def test_pyproject_registers_exactly_the_builtin_adapters():
    loaded = [_entry_point(n, v).load() for n, v in _pyproject_entry_points().items()]
    assert loaded == list(BUILTIN_ADAPTERS)


def test_third_party_adapter_loads_from_its_entry_point(third_party):
    builtins = [_entry_point(n, v) for n, v in _pyproject_entry_points().items()]
    third_party(*builtins, _entry_point("toy", "qc_third_party:ToyAdapter"), own_group_declared=True)
    registry = AdapterRegistry()
    assert registry.supported_model_types() == ["llama", "mistral", "phi3", "qwen2", "toy-arch"]
    assert registry.adapter_class(_config("toy-arch")).__qualname__ == "ToyAdapter"
    assert registry.adapter_class(LlamaConfig()) is LlamaAdapter


def test_builtins_are_there_when_the_installed_metadata_predates_the_group(third_party):
    third_party(_entry_point("toy", "qc_third_party:ToyAdapter"), own_group_declared=False)
    assert AdapterRegistry().supported_model_types() == ["llama", "mistral", "phi3", "qwen2", "toy-arch"]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("qc_third_party:LlamaClash", r"already taken: 'llama' by quantcompose\.models\.llama\.LlamaAdapter"),
        ("qc_third_party:NOT_AN_ADAPTER", "not a subclass"),
        ("qc_no_such_module:Adapter", r"entry point 'bad' = 'qc_no_such_module:Adapter' could not be loaded"),
    ],
)
def test_a_broken_entry_point_is_a_clear_error(third_party, value, match):
    third_party(_entry_point("bad", value))
    with pytest.raises(AdapterRegistrationError, match=match):
        AdapterRegistry().supported_model_types()


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
@requires_model
def test_smollm2_facts_and_absorbable_claims():
    real, _ = load_smollm2()
    assert check_supported(real.config) is LlamaAdapter
    model = copy.deepcopy(real)  # the loaded model is shared by the session
    adapter = get_adapter(model)
    assert (adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (576, 9, 3, 64)
    assert adapter.tied_embeddings() and len(adapter.layers()) == 30
    tokens = torch.randint(0, real.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
        scaled = [name for name in ("attn_in", "attn_out", "mlp_in", "mlp_down") if _scale_in_every_layer(model, name)]
        after = model(tokens).logits
    assert scaled == ["attn_in", "attn_out", "mlp_in", "mlp_down"]  # attn_out: a scale shared per value head
    torch.testing.assert_close(after, before, rtol=1e-4, atol=2e-3)
