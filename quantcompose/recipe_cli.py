"""``quantcompose quantize --recipe FILE``: the recipe's values, with the flags actually given winning.

To tell a flag given on the command line from one left at its default, the
quantize parser's recipe-backed flags default to ``argparse.SUPPRESS`` (absent
from the namespace unless given); :func:`recipe_from_args` then fills every
absent one from the recipe, whose defaults are the CLI's.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from quantcompose.recipe import Recipe, load_recipe

#: Flag destination → recipe key ("calibration.KEY" inside the calibration table).
FLAG_KEYS: dict[str, str] = {
    "method": "method", "wbits": "wbits", "abits": "abits", "qkv_bits": "qkv_bits", "group_size": "group_size",
    "weight_sym": "weight_symmetric", "act_sym": "act_symmetric", "weight_quantizer": "weight_quantizer",
    "no_clip_search": "weight_clip_search", "act_clip_search": "act_clip_search",
    "true_sequential": "true_sequential", "residual_rotation": "residual_rotation", "storage_dtype": "storage_dtype",
    "embedding_bits": "embedding_bits", "refine": "refine", "refine_epochs": "refine_epochs",
    "refine_samples": "refine_samples", "refine_lr": "refine_lr", "seed": "seed",
    "model": "model", "calib": "calibration.source", "nsamples": "calibration.nsamples",
    "calib_seqlen": "calibration.seqlen",
}
#: Flags that switch their recipe key off.
INVERTED = frozenset({"no_clip_search"})
#: What ``--model`` loads when neither the flag nor the recipe names a model.
DEFAULT_MODEL = "smollm2-135m"


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--recipe`` to the quantize parser and make its recipe-backed flags report whether they were given."""
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="TOML or YAML recipe (method, options, bits, calibration, targets, ignore); flags "
                             "given on the command line override its values")
    # argparse keeps its actions in a private list; walking it is the only way to change defaults after the fact.
    for action in parser._actions:
        if action.dest in FLAG_KEYS or action.dest == "opt":
            if action.help and "%(default)s" in action.help:
                action.help = action.help.replace("%(default)s", str(action.default))
            action.default = argparse.SUPPRESS


def _recipe_value(recipe: Recipe, key: str) -> Any:
    if key.startswith("calibration."):
        return getattr(recipe.calibration, key.partition(".")[2])
    return getattr(recipe, key)


def recipe_from_args(
    args: argparse.Namespace,
    options: Callable[[list[str]], dict[str, str]],
    check: Callable[[argparse.Namespace], None],
) -> Recipe:
    """The recipe of ``--recipe`` (or the defaults) with the flags given on the command line winning.

    First every flag not given is filled in from the recipe, so that ``args``
    holds what will run and ``check`` (the CLI's own checks, which name the
    flags) sees it; then the recipe is rebuilt with those values.
    ``options`` parses ``--opt KEY=VALUE`` pairs, merged key by key over the
    recipe's options.
    """
    recipe = load_recipe(args.recipe) if args.recipe is not None else Recipe()
    for dest, key in FLAG_KEYS.items():
        if not hasattr(args, dest):
            value = _recipe_value(recipe, key)
            setattr(args, dest, (not value) if dest in INVERTED else value)
    if args.model is None:
        args.model = DEFAULT_MODEL
    if not hasattr(args, "opt"):
        args.opt = []
    check(args)
    overrides: dict[str, Any] = {"options": options(args.opt)}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        value = (not value) if dest in INVERTED else value
        section, _, sub = key.partition(".")
        if sub:
            overrides.setdefault(section, {})[sub] = value
        else:
            overrides[key] = value
    return recipe.with_overrides(overrides)


__all__ = ["DEFAULT_MODEL", "FLAG_KEYS", "INVERTED", "add_recipe_argument", "recipe_from_args"]
