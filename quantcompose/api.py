"""One call from a ``transformers`` model to a quantized one: :func:`quantize`.

Everything a recipe says is checked, and its targets matched against the
model, before the model is touched; then the pipeline quantizes the model in
place, in the dtype and on the device it already has.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn

from quantcompose.errors import CalibrationError, RecipeError
from quantcompose.recipe import TOKENS_PREFIX, Recipe, load_recipe
from quantcompose.targets import PlaceTargets, resolve_targets

#: The attribute of a quantized model that holds the resolved recipe it was quantized with
#: (:func:`quantcompose.saving.save_quantized` writes it beside the model).
RECIPE_ATTRIBUTE = "quantcompose_recipe"


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: the resolved recipe (every default filled in) and the pipeline's report."""

    recipe: Recipe
    quantization: Any  # quantcompose.pipeline.QuantizationReport

    @property
    def seconds(self) -> float:
        return self.quantization.seconds


def tokens_digest(tokens: torch.Tensor) -> str:
    """sha256 of a token tensor's shape and int64 ids: how a recipe and a work folder name calibration tokens."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    shape = "x".join(str(n) for n in tokens.shape)
    return hashlib.sha256(shape.encode() + b":" + data).hexdigest()


def _with_given_tokens(recipe: Recipe, tokens: torch.Tensor) -> Recipe:
    """``recipe`` recording ``tokens`` as its calibration (by sha256), if they are the ones it may record."""
    source = recipe.calibration.source
    recorded = TOKENS_PREFIX + tokens_digest(tokens)
    if source.startswith(TOKENS_PREFIX) and source != recorded:
        raise CalibrationError(
            f"the calibration tokens passed in are not the ones the recipe records ({source}); "
            "pass the same tokens, or drop calibration.source from the recipe"
        )
    shape = tuple(tokens.shape) if tokens.ndim == 2 else (recipe.calibration.nsamples, recipe.calibration.seqlen)
    return replace(recipe, calibration=replace(recipe.calibration, source=recorded, nsamples=int(shape[0]),
                                               seqlen=int(shape[1])))


def _calibration_tokens(recipe: Recipe, model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """The calibration tokens the recipe's ``calibration`` table names."""
    source = recipe.calibration.source
    if source.startswith(TOKENS_PREFIX):
        raise CalibrationError(
            f"the recipe was calibrated on tokens passed in from Python ({source}); pass the same tokens "
            "as calibration=..., or set calibration.source to 'random-zipf', 'random', 'wikitext2' or a text file"
        )
    from quantcompose.data import RANDOM_SOURCES, calibration_tokens

    if tokenizer is None and source not in RANDOM_SOURCES:
        raise CalibrationError(
            f"calibration source {source!r} is text, which needs the tokenizer: pass tokenizer=..., "
            f"or use one of {', '.join(RANDOM_SOURCES)}"
        )
    vocab = None if tokenizer is not None else getattr(model.config, "vocab_size", None)
    return calibration_tokens(source, tokenizer, nsamples=recipe.calibration.nsamples,
                              seqlen=recipe.calibration.seqlen, seed=recipe.seed, vocab_size=vocab)


def _recipe_with(recipe: Any, calibration: Any, overrides: Mapping[str, Any]) -> Recipe:
    resolved = load_recipe(recipe)
    if isinstance(calibration, (str, os.PathLike)):
        overrides = {**overrides, "calibration": {"source": os.fspath(calibration)}}
    elif calibration is not None and not isinstance(calibration, torch.Tensor):
        raise RecipeError(
            f"calibration must be a source name or path (like calibration.source in a recipe), or an integer "
            f"tensor (nsamples, seqlen) of token ids; got {type(calibration).__name__}"
        )
    return resolved.with_overrides(overrides) if overrides else resolved


@dataclass
class PreparedQuantization:
    """A checked quantization of one model, not yet started: :meth:`run` does the work.

    Built by :func:`prepare_quantization`, which raises for anything wrong
    before the model is touched (the CLI evaluates the float model in between).
    """

    model: nn.Module
    recipe: Recipe
    targets: PlaceTargets
    calib_tokens: torch.Tensor
    manager: Any

    def run(self, *, progress: bool = True, **pipeline_kwargs: Any) -> tuple[nn.Module, QuantizeReport]:
        """Quantize the model in place; returns it with the report."""
        from quantcompose.pipeline import quantize_model

        torch.manual_seed(self.recipe.seed)
        report = quantize_model(
            self.model, self.calib_tokens, self.recipe.method, self.recipe.settings(), dict(self.recipe.options),
            manager=self.manager, progress=progress, targets=self.targets, **pipeline_kwargs,
        )
        setattr(self.model, RECIPE_ATTRIBUTE, self.recipe)
        return self.model, QuantizeReport(self.recipe, report)


def prepare_quantization(
    model: nn.Module,
    tokenizer: Any = None,
    recipe: Any = None,
    calibration: Any = None,
    *,
    manager: Any = None,
    **overrides: Any,
) -> PreparedQuantization:
    """Everything :func:`quantize` checks and computes before it touches ``model``."""
    from quantcompose.models import get_adapter
    from quantcompose.plugin_manager import get_plugin_manager

    manager = manager or get_plugin_manager()
    chosen = _recipe_with(recipe, calibration, overrides)
    if chosen.model is None and getattr(model, "name_or_path", ""):
        chosen = replace(chosen, model=str(model.name_or_path))
    given = calibration if isinstance(calibration, torch.Tensor) else None
    if given is not None:
        chosen = _with_given_tokens(chosen, given)
    resolved = chosen.resolve(manager)
    targets = resolve_targets(get_adapter(model), resolved)
    if resolved.embedding_bits is not None:
        _check_embedding_setting(model, resolved, targets, manager)
    # The pipeline checks given tokens (shape, dtype, range) before it changes anything.
    tokens = given if given is not None else _calibration_tokens(resolved, model, tokenizer)
    return PreparedQuantization(model, resolved, targets, tokens, manager)


def _check_embedding_setting(model: nn.Module, recipe: Recipe, targets: PlaceTargets, manager: Any) -> None:
    """``embedding_bits`` against the model's tied head, as the pipeline will see it (before any evaluation)."""
    from quantcompose.model_scope import model_facts
    from quantcompose.pipeline import check_embedding_setting, model_plan_for, prepare

    settings = recipe.settings()
    adapter, strategy, options = prepare(model, recipe.method, settings, dict(recipe.options), manager)
    plan = model_plan_for(strategy, model_facts(adapter), options, settings)
    check_embedding_setting(adapter, plan, settings, targets)


def quantize(
    model: nn.Module,
    tokenizer: Any = None,
    recipe: "Recipe | Mapping[str, Any] | str | os.PathLike[str] | None" = None,
    calibration: "str | os.PathLike[str] | torch.Tensor | None" = None,
    *,
    progress: bool = True,
    manager: Any = None,
    **overrides: Any,
) -> tuple[nn.Module, QuantizeReport]:
    """Quantize a ``transformers`` causal LM in place, as ``recipe`` says; returns ``(model, report)``.

    ``recipe`` is a :class:`~quantcompose.recipe.Recipe`, a dict, or the path
    of a TOML / YAML / JSON recipe (``None``: the defaults, DuQuant W4A4).
    ``overrides`` are recipe keys that win over the recipe's values
    (``wbits=8``, ``options={"alpha": 0.5}``, merged key by key for
    ``options`` and ``calibration``). ``calibration`` is a source (as
    ``calibration.source``) or an integer ``(nsamples, seqlen)`` tensor of
    token ids, recorded in the report's recipe by its sha256. The tokenizer is
    needed only for text calibration sources.

    The model stays in its dtype (float32, float16 or bfloat16) and on its
    device, and is calibrated there. ``report.recipe`` is the resolved recipe,
    which :func:`~quantcompose.saving.save_quantized` writes beside the model.
    Raises a :class:`~quantcompose.errors.QuantComposeError` for a bad recipe
    before anything is changed.
    """
    prepared = prepare_quantization(model, tokenizer, recipe, calibration, manager=manager, **overrides)
    return prepared.run(progress=progress)


def recipe_of(model: nn.Module) -> Recipe | None:
    """The resolved recipe ``model`` was quantized with by :func:`quantize` (``None`` if it was not)."""
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    return recipe if isinstance(recipe, Recipe) else None


__all__ = ["PreparedQuantization", "QuantizeReport", "prepare_quantization", "quantize", "recipe_of"]
