"""quantcompose.quantize on toy models: targets and ignore, dtypes, errors before any change, reproduction."""

from __future__ import annotations

import copy
import pytest
import torch
from torch import nn

import quantcompose
import quantcompose.cli as cli
from quantcompose.errors import CalibrationError, RecipeError
from quantcompose.qlinear import QuantLinear
from quantcompose.recipe import Recipe, parse_toml
from quantcompose.storage import StoredLinear
from quantcompose.saving import RECIPE_NAME, load_quantized, read_manifest, save_quantized
from quantcompose.targets import resolve_targets
from quantcompose.models import get_adapter

from realmodel import WIKITEXT_TEST, load_smollm2, requires_real_model
from toymodel import CharTokenizer, tiny_llama

#: A quick recipe for the toy: few greedy steps, a few short calibration sequences.
FAST = {"options": {"block_size": 32, "steps": 4}, "calibration": {"nsamples": 2, "seqlen": 16}}
FIRST_LAYER_8BIT = {**FAST, "targets": [{"match": r"re:model\.layers\.0\..*", "wbits": 8, "abits": 8}]}


def _quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def first_layer_8bit():
    return quantcompose.quantize(tiny_llama(), recipe=FIRST_LAYER_8BIT, progress=False)


def test_a_target_keeps_the_first_layer_at_8_bits_and_lm_head_stays_float(first_layer_8bit):
    model, report = first_layer_8bit
    linears = _quantized_linears(model)
    assert len(linears) == 14  # 7 per layer, the head left out (the default ignore)
    for name, layer in linears.items():
        bits = 8 if name.startswith("model.layers.0.") else 4
        assert layer.weight_spec.bits == bits and layer.act_spec.bits == bits, name
    assert type(model.lm_head) in (nn.Linear, StoredLinear)  # a float head (held in 16 bits by the storage dtype)
    # Q/K/V of the first layer follow its bits, the second layer's the recipe's
    from quantcompose.attention_quant import attention_quantizer_of

    adapter = get_adapter(model)
    assert [attention_quantizer_of(adapter.attention(layer)).k_spec.bits for layer in adapter.layers()] == [8, 4]
    assert report.recipe.targets[0].wbits == 8 and report.recipe.quantcompose_version == quantcompose.__version__
    assert report.quantization.seconds > 0 and report.seconds == report.quantization.seconds


def test_ignored_linears_stay_nn_linear_and_untouched():
    model = tiny_llama()
    before = _state(model)
    quantcompose.quantize(model, recipe={**FAST, "ignore": ["lm_head", r"re:.*\.mlp\.(gate|up|down)_proj"]},
                          progress=False)
    for name, module in model.named_modules():
        if ".mlp." in name and name.endswith("_proj"):
            assert type(module) is nn.Linear, name
            assert torch.equal(module.weight, before[f"{name}.weight"]), name
    assert len(_quantized_linears(model)) == 8
    # the MLP norm fed only ignored linears: nothing was folded into it
    assert torch.equal(model.model.layers[1].post_attention_layernorm.weight,
                       before["model.layers.1.post_attention_layernorm.weight"])


def test_lm_head_is_quantized_when_asked_and_survives_saving(tmp_path):
    model = tiny_llama()  # tied embeddings: the head is untied first, the embedding keeps its weights
    embedding = model.model.embed_tokens.weight.detach().clone()
    tokens = torch.randint(0, 128, (1, 12))
    quantcompose.quantize(model, recipe={**FAST, "ignore": [], "targets": [{"match": "lm_head", "wbits": 8}]},
                          progress=False)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.weight_spec.bits == 8 and head.act_spec.bits == 4
    # The embedding keeps its weights, rounded to the default float16 storage.
    assert torch.equal(model.model.embed_tokens.weight, embedding.half())
    assert model.config.tie_word_embeddings is False
    logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    save_quantized(model, tmp_path / "m")
    loaded, _ = load_quantized(tmp_path / "m")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(loaded(tokens).logits, logits)


@pytest.mark.parametrize("method", ["smoothquant", "duquant", "quarot-online"])
def test_the_heads_transform_is_exact_at_16_bits(method):
    model = tiny_llama().double()
    tokens = torch.randint(0, 128, (2, 12))
    before = model(tokens).logits
    options = {"block_size": 32, "steps": 2} if method == "duquant" else {}
    # float32 storage: the default float16 would round the embeddings (quantcompose/storage.py).
    quantcompose.quantize(model, recipe={"method": method, "wbits": 16, "abits": 16, "ignore": [],
                                         "storage_dtype": "float32",
                                         "options": options, "calibration": {"nsamples": 2, "seqlen": 16}},
                          progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_quantized_in_their_dtype(dtype):
    model = tiny_llama().to(dtype)
    quantcompose.quantize(model, recipe=FAST, progress=False)
    assert len(_quantized_linears(model)) == 14
    assert all(p.dtype == dtype for p in model.parameters())
    logits = model(torch.randint(0, 128, (1, 10))).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({**FAST, "targets": [{"match": r"re:model\.layer\.0\..*", "wbits": 8}]},
         r"targets[0].match = 're:model\\.layer\\.0\\..*' matches no linear of this model"),
        ({**FAST, "ignore": ["lm_haed"]}, "ignore[0] = 'lm_haed' matches no linear"),
        ({**FAST, "targets": [{"match": "model.layers.0.self_attn.q_proj", "abits": 8}]},
         "gives model.layers.0.self_attn.q_proj and model.layers.0.self_attn.k_proj different settings "
         "(abits 8 and 4), but they read one input"),
        ({**FAST, "targets": [{"match": "model.layers.1.mlp.up_proj", "wbits": 8}]},
         "different settings (wbits 4 and 8)"),
        ({**FAST, "ignore": ["model.layers.0.self_attn.k_proj"]},
         "leaves ['model.layers.0.self_attn.k_proj'] in float but not"),
        ({**FAST, "method": "nosuch"}, "recipe key method: unknown method 'nosuch'"),
        ({**FAST, "wbits": 9}, "wbits=9"),
    ],
)
def test_a_bad_recipe_fails_before_the_model_is_touched(recipe, message):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(RecipeError) as info:
        quantcompose.quantize(model, recipe=recipe, progress=False)
    assert message in str(info.value)
    assert not _quantized_linears(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_overrides_win_over_the_recipe_and_unknown_ones_are_refused():
    model, report = quantcompose.quantize(tiny_llama(), recipe=FAST, wbits=8, options={"steps": 2}, progress=False)
    assert report.recipe.wbits == 8 and report.recipe.options["steps"] == 2
    assert report.recipe.options["block_size"] == 32
    assert all(m.weight_spec.bits == 8 for m in _quantized_linears(model).values())
    with pytest.raises(RecipeError, match="unknown override key 'wbit'; did you mean 'wbits'"):
        quantcompose.quantize(tiny_llama(), recipe=FAST, wbit=8)


def test_given_calibration_tokens_are_recorded_and_checked():
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    _, report = quantcompose.quantize(model, recipe=FAST, calibration=tokens, progress=False)
    source = report.recipe.calibration.source
    assert source.startswith("tokens:sha256:") and len(source) == len("tokens:sha256:") + 64
    with pytest.raises(CalibrationError, match="calibrated on tokens passed in from Python"):
        quantcompose.quantize(tiny_llama(), recipe=report.recipe)
    with pytest.raises(CalibrationError, match="not the ones the recipe records"):
        quantcompose.quantize(tiny_llama(), recipe=report.recipe, calibration=(tokens + 1) % 128)


def test_text_calibration_without_a_tokenizer_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="needs the tokenizer"):
        quantcompose.quantize(tiny_llama(), recipe=FAST, calibration=str(tmp_path / "text.txt"))


def test_targets_resolve_once_per_place():
    model = tiny_llama()
    recipe = Recipe.from_dict({**FIRST_LAYER_8BIT, "ignore": ["lm_head", r"re:.*down_proj"]})
    targets = resolve_targets(get_adapter(model), recipe)
    assert targets.settings_for(0, "attn_in").wbits == 8 and targets.settings_for(1, "mlp_in").abits == 4
    assert targets.settings_for(0, "mlp_down") is None and targets.settings_for(1, "mlp_down") is None
    assert targets.head is None and targets.attention[0].abits == 8


# -------------------------------------------------------------------- reproduction from the saved recipe
def test_the_saved_recipe_reproduces_the_model_through_the_cli(tmp_path, monkeypatch, first_layer_8bit):
    model, report = first_layer_8bit
    save_quantized(model, tmp_path / "first")
    saved = tmp_path / "first" / RECIPE_NAME
    assert RECIPE_NAME in read_manifest(tmp_path / "first")["files"]  # hashed and checked like every file
    assert Recipe.from_dict(parse_toml(saved.read_text(), "recipe")) == report.recipe
    loaded, _ = load_quantized(tmp_path / "first")
    assert quantcompose.api.recipe_of(loaded) == report.recipe

    monkeypatch.setattr(cli, "_load", lambda name: (tiny_llama(), CharTokenizer()))
    assert cli.main(["quantize", "--recipe", str(saved), "--quiet", "--save", str(tmp_path / "again")]) == 0
    again, _ = load_quantized(tmp_path / "again")
    first_state, again_state = loaded.state_dict(), again.state_dict()
    assert first_state.keys() == again_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], again_state[key]), key
    tokens = torch.randint(0, 128, (1, 12))
    assert torch.equal(loaded(tokens).logits, again(tokens).logits)
    assert quantcompose.load_recipe(tmp_path / "first") == report.recipe  # the folder stands for its recipe
    rerun = Recipe.from_dict(parse_toml((tmp_path / "again" / RECIPE_NAME).read_text(), "recipe"))
    assert rerun == Recipe.from_dict({**report.recipe.to_dict(), "model": "smollm2-135m"})


def test_an_edited_saved_recipe_is_refused_on_load(tmp_path, first_layer_8bit):
    from quantcompose.errors import ModelLoadError

    save_quantized(first_layer_8bit[0], tmp_path / "m")
    path = tmp_path / "m" / RECIPE_NAME
    path.write_text(path.read_text().replace("wbits = 4", "wbits = 3"))
    with pytest.raises(ModelLoadError, match="recipe.toml: field sha256 does not match"):
        load_quantized(tmp_path / "m")


@pytest.mark.slow
@requires_real_model
def test_smollm2_w8a8_with_the_first_layer_in_float_through_one_call():
    from quantcompose.data import load_wikitext2_test
    from quantcompose.evaluate import perplexity

    model, tokenizer = load_smollm2()
    model = copy.deepcopy(model)
    recipe = {"method": "rtn", "wbits": 8, "abits": 8, "weight_quantizer": "rtn", "weight_clip_search": False,
              "act_clip_search": False, "calibration": {"nsamples": 1, "seqlen": 64},
              "targets": [{"match": r"re:model\.layers\.0\..*", "wbits": 16, "abits": 16}]}
    model, report = quantcompose.quantize(model, tokenizer, recipe=recipe, progress=False)
    linears = _quantized_linears(model)
    assert len(linears) == 30 * 7
    assert linears["model.layers.0.self_attn.q_proj"].weight_spec is None
    assert linears["model.layers.1.self_attn.q_proj"].weight_spec.bits == 8
    assert report.recipe.model  # the model's name_or_path is recorded
    tokens = load_wikitext2_test(tokenizer, WIKITEXT_TEST)
    ppl = perplexity(model, tokens, seqlen=512, max_windows=1, progress=False)
    # W8A8 round-to-nearest stays near full precision (28.41 over 32 windows of 512 tokens)
    assert ppl < 40, ppl
