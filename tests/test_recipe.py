"""Recipes: reading them from a dict, TOML, YAML or JSON, refusing every bad key, and the CLI's precedence."""

from __future__ import annotations

import pytest

import quantcompose
import quantcompose.cli as cli
from quantcompose.errors import QuantComposeError, RecipeError
from quantcompose.recipe import CalibrationRecipe, Recipe, TargetRule, load_recipe, parse_toml
from quantcompose.strategy import QuantSettings

TOML = """
method = "smoothquant"
wbits = 8
abits = 8
group_size = 32
seed = 3
ignore = ["lm_head"]

[options]
alpha = 0.4

[calibration]
source = "random"
nsamples = 4
seqlen = 64

[[targets]]
match = "re:model\\\\.layers\\\\.0\\\\..*"
wbits = 4
abits = 4
"""

YAML = """
method: smoothquant
wbits: 8
abits: 8
group_size: 32
seed: 3
ignore: [lm_head]
options: {alpha: 0.4}
calibration: {source: random, nsamples: 4, seqlen: 64}
targets:
  - {match: 're:model\\.layers\\.0\\..*', wbits: 4, abits: 4}
"""

EXPECTED = Recipe(
    method="smoothquant", wbits=8, abits=8, group_size=32, seed=3, ignore=("lm_head",),
    options={"alpha": 0.4}, calibration=CalibrationRecipe("random", 4, 64),
    targets=(TargetRule(match=(r"re:model\.layers\.0\..*",), wbits=4, abits=4),),
)


def test_toml_yaml_json_and_dict_give_the_same_recipe(tmp_path):
    (tmp_path / "r.toml").write_text(TOML)
    (tmp_path / "r.yaml").write_text(YAML)
    (tmp_path / "r.json").write_text(__import__("json").dumps(EXPECTED.to_dict()))
    for name in ("r.toml", "r.yaml", "r.json"):
        assert load_recipe(tmp_path / name) == EXPECTED, name
    assert load_recipe(EXPECTED.to_dict()) == EXPECTED
    assert load_recipe(str(tmp_path / "r.toml")) == EXPECTED


def test_defaults_are_the_settings_defaults_and_exported():
    assert quantcompose.Recipe is Recipe and quantcompose.load_recipe is load_recipe
    assert load_recipe(None) == Recipe() == Recipe.from_dict({})
    assert Recipe().settings() == QuantSettings()
    assert Recipe().ignore == ("lm_head",)
    assert Recipe(group_size=64, wbits=3).settings() == QuantSettings(wbits=3, weight_group_size=64)


def test_resolve_fills_every_option_default_and_the_version():
    resolved = Recipe(method="duquant", options={"alpha": 0.5}).resolve()
    assert resolved.options["alpha"] == 0.5
    assert resolved.options["block_size"] == 128 and resolved.options["permute"] is True
    assert "act_clip" not in resolved.options  # unset (None) options are left out, as TOML must
    assert resolved.quantcompose_version == quantcompose.__version__
    assert resolved.resolve() == resolved


def test_the_written_toml_reads_back_to_the_same_recipe(tmp_path):
    resolved = EXPECTED.resolve()
    text = resolved.to_toml()
    assert Recipe.from_dict(parse_toml(text, "recipe")) == resolved
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    assert load_recipe(path) == resolved
    assert "qkv_bits" not in text  # None has no TOML form: left out, and reads back unset


def test_overrides_replace_keys_and_merge_options_and_calibration():
    recipe = EXPECTED.with_overrides({"wbits": 4, "options": {"alpha": 0.7}, "calibration": {"nsamples": 8}})
    assert recipe.wbits == 4 and recipe.abits == 8
    assert recipe.options == {"alpha": 0.7}
    assert recipe.calibration == CalibrationRecipe("random", 8, 64)
    assert recipe.targets == EXPECTED.targets


@pytest.mark.parametrize(
    "data, message",
    [
        ({"wbit": 4}, "unknown recipe key 'wbit'; did you mean 'wbits'?"),
        ({"calibration": {"nsample": 4}}, "unknown calibration key 'nsample'; did you mean 'nsamples'?"),
        ({"targets": [{"match": "lm_head", "wbit": 8}]}, "unknown targets[0] key 'wbit'; did you mean 'wbits'?"),
        ({"wbits": "4"}, "recipe key wbits must be an integer, got '4'"),
        ({"wbits": True}, "recipe key wbits must be an integer, got True"),
        ({"act_symmetric": 1}, "recipe key act_symmetric must be true or false"),
        ({"method": 3}, "recipe key method must be a string"),
        ({"qkv_bits": 2.5}, "recipe key qkv_bits must be an integer or unset"),
        ({"wbits": 9}, "wbits=9 is not supported"),
        ({"abits": 1}, "abits=1 is out of range"),
        ({"qkv_bits": 12}, "qkv_bits=12 is out of range"),
        ({"group_size": 0}, "weight_group_size=0 must be a positive integer"),
        ({"weight_quantizer": "awq"}, "weight_quantizer='awq' is unknown"),
        ({"seed": -1}, "seed=-1 must be an integer"),
        ({"options": [1]}, "recipe key options must be a table"),
        ({"calibration": "random"}, "recipe key calibration must be a table"),
        ({"calibration": {"nsamples": 0}}, "calibration.nsamples must be at least 1"),
        ({"calibration": {"seqlen": "long"}}, "calibration.seqlen must be an integer"),
        ({"ignore": [3]}, "recipe key ignore must be a module name or a list of them"),
        ({"ignore": ["re:(("]}, "is not a valid regular expression"),
        ({"targets": {"match": "lm_head"}}, "recipe key targets must be a list of tables"),
        ({"targets": [{"wbits": 8}]}, "recipe key targets[0] has no 'match'"),
        ({"targets": [{"match": "lm_head"}]}, "targets[0] sets none of wbits, abits, group_size"),
        ({"targets": [{"match": "lm_head", "abits": "8"}]}, "recipe key targets[0].abits must be an integer"),
        ({"targets": [{"match": "lm_head", "wbits": 12}]}, "recipe targets[0]: wbits=12 is not supported"),
        ({"targets": [{"match": ["re:[", "x"], "wbits": 8}]}, "targets[0].match: 're:[' is not a valid"),
    ],
)
def test_every_bad_key_is_a_recipe_error_naming_it(data, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "recipe, message",
    [
        (Recipe(method="duqant"), "recipe key method: unknown method 'duqant'"),
        (Recipe(options={"alfa": 0.5}), "recipe key options: strategy 'duquant' has no option(s) ['alfa']"),
        (Recipe(options={"alpha": 2.0}), "duquant option alpha=2.0 must be a number in [0.0, 1.0]"),
        (Recipe(options={"steps": "many"}), "duquant option steps='many' cannot be read"),
        # a fixed clip ratio while its search is on: checked against the targets' settings too
        (Recipe(wbits=16, abits=16, weight_clip_search=True, options={"weight_clip": 0.9},
                targets=(TargetRule(("lm_head",), wbits=4),)),
         "recipe key options (with the bits of targets[0]): duquant option weight_clip=0.9 fixes a clip ratio"),
    ],
)
def test_the_method_and_its_options_are_checked_when_resolved(recipe, message):
    with pytest.raises(RecipeError) as info:
        recipe.resolve()
    assert message in str(info.value)
    assert isinstance(info.value, QuantComposeError)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("r.toml", "wbits = [", "is not valid TOML"),
        ("r.yaml", "wbits: [", "is not valid YAML"),
        ("r.json", "{", "is not valid JSON"),
        ("r.ini", "wbits=4", "unknown file type '.ini'"),
        ("r.toml", "wbits = 9", "r.toml: recipe: wbits=9"),
        ("r.yaml", "- 1", "the recipe must be a table"),
    ],
)
def test_bad_files_are_recipe_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / name)
    assert message in str(info.value)


def test_a_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "none.toml")


# -------------------------------------------------------------------- CLI precedence
@pytest.fixture
def captured(monkeypatch):
    """Run `quantcompose quantize` up to loading the model; return what it would load and the recipe."""
    import quantcompose.recipe_cli as recipe_cli

    seen = {}

    class Loaded(Exception):
        pass

    def load(name):
        seen["model"] = name
        raise Loaded

    real = recipe_cli.recipe_from_args

    def spy(args, options, check):
        seen["recipe"], seen["args"] = real(args, options, check), args
        return seen["recipe"]

    monkeypatch.setattr(recipe_cli, "recipe_from_args", spy)
    monkeypatch.setattr(cli, "_load", load)

    def run(argv):
        with pytest.raises(Loaded):
            cli.main(["quantize", *argv])
        return seen

    return run


def test_flags_given_on_the_command_line_win_over_the_recipe(tmp_path, captured):
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    seen = captured(["--recipe", str(path), "--wbits", "4", "--opt", "alpha=0.9", "--nsamples", "2"])
    recipe = seen["recipe"]
    assert recipe.wbits == 4  # the flag, although 4 is also the flag's default
    assert recipe.abits == 8 and recipe.group_size == 32 and recipe.seed == 3  # the recipe
    assert recipe.options == {"alpha": "0.9"}  # merged key by key (parsed when resolved)
    assert recipe.calibration == CalibrationRecipe("random", 2, 64)
    assert recipe.targets == EXPECTED.targets
    assert seen["args"].abits == 8 and seen["args"].calib == "random"  # the CLI's checks see what will run
    assert seen["model"] == "smollm2-135m"


def test_without_a_recipe_the_flags_and_their_defaults_decide(captured):
    recipe = captured(["--no-clip-search", "--qkv-bits", "16"])["recipe"]
    assert recipe == Recipe(model="smollm2-135m", weight_clip_search=False, qkv_bits=16)


def test_the_recipe_names_the_model_unless_the_flag_does(tmp_path, captured):
    path = tmp_path / "r.yaml"
    path.write_text("model: my/model\nwbits: 8\n")
    assert captured(["--recipe", str(path)])["model"] == "my/model"
    assert captured(["--recipe", str(path), "--model", "other"])["model"] == "other"


#: Flags whose help states their default as a value (the others describe it in words).
CHECKED_HELP = ("model", "method", "wbits", "abits", "weight_quantizer", "act_clip_search", "true_sequential",
                "residual_rotation", "nsamples", "calib_seqlen")


def test_the_defaults_the_cli_help_states_are_the_recipe_defaults():
    import re

    from quantcompose.recipe_cli import FLAG_KEYS

    parser = cli.build_parser()
    quantize = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["quantize"]
    defaults = Recipe()
    checked = 0
    for action in quantize._actions:
        stated = re.search(r"default: ([^);]+)", action.help or "")
        if action.dest not in CHECKED_HELP or stated is None:
            continue
        key = FLAG_KEYS[action.dest]
        section, _, sub = key.partition(".")
        value = getattr(defaults.calibration, sub) if sub else getattr(defaults, key)
        if action.dest == "model":
            value = "smollm2-135m"  # the recipe leaves it unset; the CLI loads the built-in model then
        assert stated.group(1).split(" ")[0] == str(value), (action.dest, stated.group(1), value)
        checked += 1
    assert checked == len(CHECKED_HELP)


def test_a_bad_recipe_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda name: (_ for _ in ()).throw(AssertionError("loaded")))
    path = tmp_path / "r.toml"
    path.write_text("wbit = 4\n")
    assert cli.main(["quantize", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe key 'wbit'; did you mean 'wbits'?" in err[0]
    path.write_text('method = "nosuch"\n')
    assert cli.main(["quantize", "--recipe", str(path)]) == 2
    assert "recipe key method: unknown method 'nosuch'" in capsys.readouterr().err


def test_the_shipped_example_recipe_resolves():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "duquant-w4a4.toml"
    recipe = load_recipe(path).resolve()
    assert recipe.method == "duquant" and (recipe.wbits, recipe.abits) == (4, 4)
    assert recipe.targets == (TargetRule(match=(r"re:model\.layers\.0\..*",), wbits=8, abits=8),)
