"""A recipe's ``targets`` and ``ignore`` resolved once against one model: the settings of every input place.

The pipeline quantizes input places, not single linears: the linears of a
place (q/k/v, gate/up) read one activation through one transform and one
activation quantizer, and their weights are quantized together. So the
linears of a place must resolve to the same settings (an error says which
rule splits them), and a place is either quantized or left alone as a whole.
The LM head is a place of its own (the final norm feeds it). Each place's
settings are decided here and nowhere else; the pipeline only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from quantcompose.errors import RecipeError
from quantcompose.models import ModelAdapter
from quantcompose.recipe import Recipe, TargetRule, name_matches
from quantcompose.strategy import QuantSettings

#: The name :class:`PlaceTargets` uses for the LM head's place.
HEAD = "lm_head"


@dataclass(frozen=True)
class PlaceTargets:
    """The settings of each input place; ``None`` leaves a place's linears as they are (``nn.Linear``).

    ``places[(layer index, place name)]`` for decoder layers; ``head`` for the
    LM head; ``attention[layer index]`` are the settings Q/K/V of that layer
    follow (those of the place that holds the key projection).
    """

    places: dict[tuple[int, str], QuantSettings | None] = field(default_factory=dict)
    head: QuantSettings | None = None
    attention: dict[int, QuantSettings | None] = field(default_factory=dict)

    def settings_for(self, layer: int, place: str) -> QuantSettings | None:
        return self.places[(layer, place)]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _settings_of(name: str, recipe: Recipe, base: QuantSettings) -> tuple[bool, QuantSettings]:
    """(ignored, settings) of one linear: the last matching target wins."""
    settings = base
    for rule in recipe.targets:
        if rule.matches(name):
            settings = recipe.target_settings(rule)
    return any(name_matches(p, name) for p in recipe.ignore), settings


def _differences(a: QuantSettings, b: QuantSettings) -> str:
    keys = (("wbits", "wbits"), ("abits", "abits"), ("weight_group_size", "group_size"))
    return ", ".join(f"{key} {getattr(a, f)} and {getattr(b, f)}" for f, key in keys if getattr(a, f) != getattr(b, f))


def _place_settings(names: Sequence[str], what: str, recipe: Recipe, base: QuantSettings) -> QuantSettings | None:
    """One place's settings; its linears must agree."""
    resolved = [_settings_of(name, recipe, base) for name in names]
    ignored = {name for name, (skip, _) in zip(names, resolved) if skip}
    if ignored and len(ignored) != len(names):
        raise RecipeError(
            f"recipe key ignore leaves {sorted(ignored)} in float but not "
            f"{sorted(set(names) - ignored)}: they read one input ({what}) through one transform, so ignore "
            "all of them or none"
        )
    first = resolved[0][1]
    for name, (_, settings) in zip(names[1:], resolved[1:]):
        if settings != first:
            raise RecipeError(
                f"recipe key targets gives {names[0]} and {name} different settings ({_differences(first, settings)}), "
                f"but they read one input ({what}): they share one activation quantizer and their weights are "
                "quantized together, so give them the same bits (match all of them, or none)"
            )
    return None if ignored else first


def resolve_targets(adapter: ModelAdapter, recipe: Recipe) -> PlaceTargets:
    """The settings of every place of ``adapter``'s model under ``recipe``'s targets and ignore.

    Every target ``match`` and every ``ignore`` entry must match at least one
    linear the pipeline can quantize (a typo must not silently do nothing);
    reads module names only and changes nothing.
    """
    names = _module_names(adapter.model)
    base = recipe.settings()
    places: dict[tuple[int, str], QuantSettings | None] = {}
    attention: dict[int, QuantSettings | None] = {}
    candidates: list[str] = []
    for index, layer in enumerate(adapter.layers()):
        by_linear: dict[str, QuantSettings | None] = {}
        for place in adapter.places(layer):
            linears = [names[id(layer.get_submodule(path))] for path in place.linears]
            candidates += linears
            settings = _place_settings(linears, f"place {place.name!r} of layer {index}", recipe, base)
            places[(index, place.name)] = settings
            by_linear.update(dict.fromkeys(place.linears, settings))
        attention[index] = by_linear.get(adapter.kv_outputs(layer)["k"].linear)
    head_name = names.get(id(adapter.lm_head()))
    head = None
    if head_name is not None:
        candidates.append(head_name)
        head = _place_settings([head_name], "the final norm", recipe, base)
    _check_every_pattern_matches(recipe, candidates)
    return PlaceTargets(places, head, attention)


def _check_every_pattern_matches(recipe: Recipe, candidates: list[str]) -> None:
    entries = [(f"ignore[{i}]", p) for i, p in enumerate(recipe.ignore)]
    entries += [(f"targets[{i}].match", p) for i, rule in enumerate(recipe.targets) for p in rule.match]
    for where, pattern in entries:
        if not any(name_matches(pattern, name) for name in candidates):
            example = ", ".join(candidates[:3] + candidates[-1:])
            raise RecipeError(
                f"recipe key {where} = {pattern!r} matches no linear of this model; linear names look like "
                f"{example} (plain names match exactly, re:PATTERN a regular expression over the whole name)"
            )


__all__ = ["HEAD", "PlaceTargets", "TargetRule", "resolve_targets"]
