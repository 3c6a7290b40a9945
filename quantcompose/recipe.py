"""Recipes: a method, its options and the quantization settings as one checked value.

A :class:`Recipe` is built from a dict, a TOML file (``tomllib``) or a YAML
file (PyYAML, the ``recipes`` extra) and checked key by key before any model
is touched: unknown keys (with a did-you-mean), wrong types, bit widths, the
method and its options. :meth:`Recipe.resolve` fills in every default (the
strategy's options included) and the library version, which is what is
written beside a saved model (``recipe.toml``) so that the model can be
reproduced from its folder alone.

Per-linear exceptions are ``targets`` (rules that give the linears they match
other bits) and ``ignore`` (linears left in floating point; the LM head by
default), as llm-compressor's recipes have them. Matching them against a
model is :mod:`quantcompose.targets`' job.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from quantcompose.errors import QuantComposeError, RecipeError
from quantcompose.strategy import QuantSettings

_DEFAULT_SETTINGS = QuantSettings()

#: File suffixes a recipe may be read from.
RECIPE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")
#: The prefix of a target or ignore entry that is a regular expression (matched against the whole name).
REGEX_PREFIX = "re:"
#: The file a saved model's resolved recipe is written to (see quantcompose.saving).
SAVED_RECIPE_NAME = "recipe.toml"
#: How a recipe records calibration tokens passed in from Python: this prefix and their sha256.
TOKENS_PREFIX = "tokens:sha256:"


@dataclass(frozen=True)
class CalibrationRecipe:
    """Where the calibration tokens come from (see :func:`quantcompose.data.calibration_tokens`)."""

    source: str = "random-zipf"
    nsamples: int = 16
    seqlen: int = 512


@dataclass(frozen=True)
class TargetRule:
    """Linears matched by ``match`` (names, or ``re:`` regular expressions) and the settings they get.

    An unset field (``None``) keeps the recipe's value.
    """

    match: tuple[str, ...]
    wbits: int | None = None
    abits: int | None = None
    group_size: int | None = None

    def matches(self, name: str) -> bool:
        return any(name_matches(pattern, name) for pattern in self.match)


def name_matches(pattern: str, name: str) -> bool:
    """``re:PATTERN`` matches a module name as a whole (``re.fullmatch``); anything else is the exact name."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    return pattern == name


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a quantized model, defaults as the CLI's.

    The bit settings mirror :class:`quantcompose.strategy.QuantSettings`
    (``group_size`` is its ``weight_group_size``); ``options`` are the
    strategy's; ``model`` is what the CLI loads (the Python API quantizes the
    model it is given and only records it); ``quantcompose_version`` is filled
    in by :meth:`resolve`.
    """

    method: str = "duquant"
    options: Mapping[str, Any] = field(default_factory=dict)
    wbits: int = _DEFAULT_SETTINGS.wbits
    abits: int = _DEFAULT_SETTINGS.abits
    qkv_bits: int | None = _DEFAULT_SETTINGS.qkv_bits
    group_size: int | None = _DEFAULT_SETTINGS.weight_group_size
    weight_symmetric: bool = _DEFAULT_SETTINGS.weight_symmetric
    act_symmetric: bool = _DEFAULT_SETTINGS.act_symmetric
    weight_quantizer: str = _DEFAULT_SETTINGS.weight_quantizer
    weight_clip_search: bool = _DEFAULT_SETTINGS.weight_clip_search
    act_clip_search: bool = _DEFAULT_SETTINGS.act_clip_search
    true_sequential: bool = _DEFAULT_SETTINGS.true_sequential
    residual_rotation: bool = _DEFAULT_SETTINGS.residual_rotation
    storage_dtype: str = _DEFAULT_SETTINGS.storage_dtype
    embedding_bits: int | None = _DEFAULT_SETTINGS.embedding_bits
    refine: str | None = _DEFAULT_SETTINGS.refine
    refine_epochs: int = _DEFAULT_SETTINGS.refine_epochs
    refine_samples: int = _DEFAULT_SETTINGS.refine_samples
    refine_lr: float = _DEFAULT_SETTINGS.refine_lr
    seed: int = _DEFAULT_SETTINGS.seed
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    ignore: tuple[str, ...] = ("lm_head",)
    targets: tuple[TargetRule, ...] = ()
    model: str | None = None
    quantcompose_version: str | None = None

    # -- building -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """A recipe from plain data (as TOML, YAML or JSON give it); a :class:`RecipeError` names any bad key."""
        _require_mapping(data, "the recipe")
        _refuse_unknown(data, _TOP_KEYS, "recipe")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SCALARS:
                values[key] = _checked(key, value, _SCALARS[key])
        if "options" in data:
            options = _require_mapping(data["options"], "recipe key options")
            for name in options:
                if not isinstance(name, str):
                    raise RecipeError(f"recipe key options: option names must be strings, got {name!r}")
            values["options"] = dict(options)
        if "calibration" in data:
            values["calibration"] = _calibration(data["calibration"])
        if "ignore" in data:
            values["ignore"] = _patterns(data["ignore"], "ignore")
        if "targets" in data:
            entries = data["targets"]
            if not isinstance(entries, (list, tuple)):
                raise RecipeError(f"recipe key targets must be a list of tables "
                                  f"({{ match = ..., wbits = ... }}), got {type(entries).__name__}")
            values["targets"] = tuple(_target(entry, f"targets[{i}]") for i, entry in enumerate(entries))
        recipe = cls(**values)
        recipe.settings()  # bit widths and the weight quantizer are checked here, with the key named
        for rule in recipe.targets:
            recipe.target_settings(rule)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` reads back to an equal recipe."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "options":
                value = dict(value)
            elif f.name == "calibration":
                value = {c.name: getattr(value, c.name) for c in fields(value)}
            elif f.name == "ignore":
                value = list(value)
            elif f.name == "targets":
                value = [
                    {"match": list(t.match), **{k: getattr(t, k) for k in _TARGET_SETTINGS if getattr(t, k) is not None}}
                    for t in value
                ]
            data[f.name] = value
        return data

    def to_toml(self) -> str:
        """The recipe as TOML (keys whose value is ``None`` left out: TOML has no null, and they read back unset)."""
        from quantcompose.toml_writer import dumps

        return _HEADER + dumps(self.to_dict())

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Recipe":
        """This recipe with ``overrides`` (recipe keys) taking precedence.

        ``options`` and ``calibration`` are merged key by key; every other key,
        ``targets`` and ``ignore`` included, is replaced. Checked like
        :meth:`from_dict`.
        """
        _refuse_unknown(overrides, _TOP_KEYS, "override")
        data = self.to_dict()
        for key, value in overrides.items():
            if key in ("options", "calibration") and isinstance(value, Mapping):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return Recipe.from_dict(data)

    # -- what the pipeline reads -------------------------------------------------------
    def settings(self) -> QuantSettings:
        """The :class:`QuantSettings` of this recipe."""
        return self._settings({}, "recipe")

    def target_settings(self, rule: TargetRule) -> QuantSettings:
        """The settings of the linears ``rule`` matches (its unset fields are this recipe's)."""
        changes = {key: getattr(rule, key) for key in _TARGET_SETTINGS if getattr(rule, key) is not None}
        where = f"recipe targets[{self.targets.index(rule)}]" if rule in self.targets else "recipe target"
        return self._settings(changes, where)

    def _settings(self, changes: dict[str, Any], where: str) -> QuantSettings:
        values = {key: changes.get(key, getattr(self, key)) for key in _SETTINGS_KEYS}
        values["weight_group_size"] = values.pop("group_size")
        try:
            return QuantSettings(**values)
        except QuantComposeError as exc:
            raise RecipeError(f"{where}: {exc}") from None

    def resolve(self, manager: Any = None) -> "Recipe":
        """Every default filled in and checked: the method exists, its options parse and fit every setting.

        ``manager`` is a :class:`quantcompose.plugin_manager.StrategyManager`
        (default: the installed strategies). The result records this
        library's version.
        """
        from quantcompose import __version__
        from quantcompose.plugin_manager import get_plugin_manager

        manager = manager or get_plugin_manager()
        try:
            strategy = manager.get(self.method)
        except QuantComposeError as exc:
            raise RecipeError(f"recipe key method: {exc}") from None
        from quantcompose.learning.refine import check_refine

        try:  # the refinement against the strategy (a layer-scope one trains itself) and the base bits
            check_refine(strategy, self.settings())
        except QuantComposeError as exc:
            raise RecipeError(f"recipe key refine: {exc}") from None
        checks = [("options", self.settings())]
        checks += [(f"options (with the bits of targets[{i}])", self.target_settings(t)) for i, t in enumerate(self.targets)]
        resolved: list[dict[str, Any]] = []
        for where, settings in checks:
            try:
                resolved.append(strategy.resolve(self.options, settings))
            except QuantComposeError as exc:
                raise RecipeError(f"recipe key {where}: {exc}") from None
        # TOML has no null: an option whose value is None is left out, and reads back as its
        # default, which is the same model only when that default is None too.
        for key, value in resolved[0].items():
            if value is None and strategy.options[key].default is not None:
                raise RecipeError(f"recipe key options.{key}: None differs from the option's default "
                                  f"{strategy.options[key].default!r} but cannot be written to a recipe file; "
                                  "give it a value")
        options = {key: value for key, value in resolved[0].items() if value is not None}
        return replace(self, options=options, quantcompose_version=__version__)


# -------------------------------------------------------------------- keys and checks
_SETTINGS_KEYS = (
    "wbits", "abits", "qkv_bits", "group_size", "weight_symmetric", "act_symmetric", "weight_quantizer",
    "weight_clip_search", "act_clip_search", "true_sequential", "residual_rotation", "storage_dtype", "embedding_bits",
    "refine", "refine_epochs", "refine_samples", "refine_lr", "seed",
)
#: Scalar keys and what each must be: a type, or a tuple of types (``None`` allowed when listed).
_SCALARS: dict[str, tuple[Any, ...]] = {
    "method": (str,), "wbits": (int,), "abits": (int,), "qkv_bits": (int, None), "group_size": (int, None),
    "weight_symmetric": (bool,), "act_symmetric": (bool,), "weight_quantizer": (str,),
    "weight_clip_search": (bool,), "act_clip_search": (bool,), "true_sequential": (bool,),
    "residual_rotation": (bool,), "storage_dtype": (str,), "embedding_bits": (int, None), "refine": (str, None),
    "refine_epochs": (int,), "refine_samples": (int,), "refine_lr": (float, int), "seed": (int,), "model": (str, None),
    "quantcompose_version": (str, None),
}
_TOP_KEYS = (*_SCALARS, "options", "calibration", "ignore", "targets")
_CALIBRATION_KEYS = {"source": (str,), "nsamples": (int,), "seqlen": (int,)}
_TARGET_SETTINGS = ("wbits", "abits", "group_size")
_TARGET_KEYS = ("match", *_TARGET_SETTINGS)

_HEADER = "# quantcompose recipe: `quantcompose quantize --recipe THIS_FILE` (flags given there override it)\n"


def _type_name(kinds: tuple[Any, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", None: "unset"}
    return " or ".join(names[k] for k in kinds)


def _checked(key: str, value: Any, kinds: tuple[Any, ...]) -> Any:
    if value is None and None in kinds:
        return None
    for kind in kinds:
        # bool is an int subclass; YAML and TOML both tell them apart, so must we.
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
        if kind is float and isinstance(value, float):
            return value
    raise RecipeError(f"recipe key {key} must be {_type_name(kinds)}, got {value!r} ({type(value).__name__})")


def _require_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{what} must be a table (a mapping of keys to values), got {type(value).__name__}")
    return value


def _refuse_unknown(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"unknown {where} key {key!r}; {hint}known keys: {', '.join(known)}")


def _calibration(value: Any) -> CalibrationRecipe:
    data = _require_mapping(value, "recipe key calibration")
    _refuse_unknown(data, tuple(_CALIBRATION_KEYS), "calibration")
    values = {key: _checked(f"calibration.{key}", v, _CALIBRATION_KEYS[key]) for key, v in data.items()}
    for key in ("nsamples", "seqlen"):
        if key in values and values[key] < 1:
            raise RecipeError(f"recipe key calibration.{key} must be at least 1, got {values[key]}")
    return CalibrationRecipe(**values)


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
        raise RecipeError(f"recipe key {where} must be a module name or a list of them (non-empty strings; "
                          f"{REGEX_PREFIX}PATTERN for a regular expression), got {value!r}")
    for pattern in items:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as exc:
                raise RecipeError(f"recipe key {where}: {pattern!r} is not a valid regular expression ({exc})") from None
    return tuple(items)


def _target(entry: Any, where: str) -> TargetRule:
    data = _require_mapping(entry, f"recipe key {where}")
    _refuse_unknown(data, _TARGET_KEYS, where)
    if "match" not in data:
        raise RecipeError(f"recipe key {where} has no 'match': give the module names or {REGEX_PREFIX}PATTERN "
                          "it applies to")
    settings = {key: _checked(f"{where}.{key}", data[key], (int,)) for key in _TARGET_SETTINGS if key in data}
    if not settings:
        raise RecipeError(f"recipe key {where} sets none of {', '.join(_TARGET_SETTINGS)}; a target must change "
                          "something (to leave linears in float, list them under ignore)")
    return TargetRule(match=_patterns(data["match"], f"{where}.match"), **settings)


# -------------------------------------------------------------------- files
def parse_toml(text: str, what: str) -> Any:
    """``text`` read as TOML (``tomllib``; the ``tomli`` backport before Python 3.11)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{what} is not valid TOML: {exc}") from None


def _parse_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in RECIPE_SUFFIXES:
        raise RecipeError(f"recipe {path}: unknown file type {suffix or '(none)'!r}; "
                          f"use one of {', '.join(RECIPE_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}; pass the path of a .toml or .yaml recipe") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path} ({exc}); pass a UTF-8 text file") from None
    if suffix == ".toml":
        return parse_toml(text, f"recipe {path}")
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe {path} is not valid JSON: {exc}") from None
    try:
        import yaml
    except ImportError:
        raise RecipeError(f"reading the YAML recipe {path} needs PyYAML: `pip install quantcompose[recipes]` "
                          "(or write the recipe as TOML)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None


def load_recipe(source: "Recipe | Mapping[str, Any] | str | os.PathLike[str] | None") -> Recipe:
    """A :class:`Recipe` from a recipe, a dict, or the path of a TOML / YAML / JSON file (``None``: defaults).

    The folder of a saved model stands for the ``recipe.toml`` in it.
    """
    if source is None:
        return Recipe()
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return Recipe.from_dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir() and (path / SAVED_RECIPE_NAME).is_file():
            path = path / SAVED_RECIPE_NAME  # a saved model's folder: the recipe beside it
        data = _parse_file(path)
        try:
            return Recipe.from_dict({} if data is None else data)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    raise RecipeError(f"a recipe is a Recipe, a dict or a file path, got {type(source).__name__}")


__all__ = [
    "CalibrationRecipe",
    "RECIPE_SUFFIXES",
    "Recipe",
    "TargetRule",
    "load_recipe",
    "name_matches",
    "parse_toml",
]
