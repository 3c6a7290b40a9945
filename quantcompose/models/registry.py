"""Which adapter handles which ``config.model_type``: built-in and third-party ones through one entry point.

An installed package adds an architecture by naming its ``ModelAdapter``
subclass in the ``quantcompose.adapters`` entry-point group; quantcompose's
own adapters are registered the same way in its pyproject.toml. The group is
read on first use. ``register_adapter`` adds one by hand (tests, notebooks).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from torch import nn

from quantcompose.errors import QuantComposeError, UnsupportedArchitectureError
from quantcompose.models.adapter import ModelAdapter
from quantcompose.models.llama import LlamaAdapter
from quantcompose.models.phi3 import Phi3Adapter

ENTRY_POINT_GROUP = "quantcompose.adapters"

#: What quantcompose's pyproject.toml registers in ``ENTRY_POINT_GROUP`` (a test keeps the two equal).
BUILTIN_ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, Phi3Adapter)


class AdapterRegistrationError(QuantComposeError, ValueError):
    """An adapter could not be registered: not an adapter, no model types, or a model type already taken."""


def _own_metadata_declares_group() -> bool:
    """Whether the installed quantcompose distribution lists its adapters in the entry-point group.

    A source checkout run without installing, or an install made before the
    group existed, does not; the built-ins are then registered directly so
    that they are never missing.
    """
    try:
        entry_points = metadata.distribution("quantcompose").entry_points
    except metadata.PackageNotFoundError:
        return False
    return any(ep.group == ENTRY_POINT_GROUP for ep in entry_points)


class AdapterRegistry:
    """Adapter classes by the ``config.model_type`` values they claim."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self._by_type: dict[str, type[ModelAdapter]] = {}
        self._sources: dict[type[ModelAdapter], str] = {}
        self._unloaded = load_entry_points

    def register(self, adapter: type[ModelAdapter], source: str = "register_adapter") -> type[ModelAdapter]:
        """Add ``adapter`` for each of its ``model_types``; returns it, so it works as a class decorator.

        Registering the same class again changes nothing; a model type that
        another class already claims is an ``AdapterRegistrationError``.
        """
        self._load_entry_points()
        self._add(adapter, source)
        return adapter

    def unregister(self, adapter: type[ModelAdapter]) -> None:
        """Remove ``adapter`` and the model types it claimed (nothing happens if it is not registered)."""
        self._by_type = {t: a for t, a in self._by_type.items() if a is not adapter}
        self._sources.pop(adapter, None)

    def supported_model_types(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._by_type)

    def adapter_class(self, config_or_model: Any) -> type[ModelAdapter]:
        """The adapter class for a model or its config, or ``UnsupportedArchitectureError``.

        Needs only the config, so a caller can fail before loading weights.
        """
        config = getattr(config_or_model, "config", config_or_model)
        model_type = getattr(config, "model_type", None)
        self._load_entry_points()
        if model_type in self._by_type:
            return self._by_type[model_type]
        what = f"architecture {model_type!r}" if model_type else f"{type(config_or_model).__name__} without a config.model_type"
        raise UnsupportedArchitectureError(
            f"no model adapter for {what}; supported model types: {self.supported_model_types()}. "
            "To add an architecture, subclass quantcompose.models.ModelAdapter and register it in the "
            f"{ENTRY_POINT_GROUP!r} entry-point group (see docs/adapter-guide.md)."
        )

    def _load_entry_points(self) -> None:
        if not self._unloaded:
            return
        if not _own_metadata_declares_group():
            for adapter in BUILTIN_ADAPTERS:
                self._add(adapter, "built-in")
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                adapter = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure becomes one actionable error
                raise AdapterRegistrationError(
                    f"the {ENTRY_POINT_GROUP!r} entry point {ep.name!r} = {ep.value!r} could not be loaded "
                    f"({type(exc).__name__}: {exc}); fix or uninstall the package that declares it"
                ) from exc
            self._add(adapter, f"entry point {ep.name!r} = {ep.value!r}")
        self._unloaded = False

    def _add(self, adapter: Any, source: str) -> None:
        if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
            raise AdapterRegistrationError(
                f"{source} gave {adapter!r}, which is not a subclass of quantcompose.models.ModelAdapter; "
                "register the adapter class itself"
            )
        if not adapter.model_types:
            raise AdapterRegistrationError(
                f"{adapter.__qualname__} (from {source}) lists no model_types; set it to the "
                "config.model_type values the adapter handles"
            )
        taken = {t: self._by_type[t] for t in adapter.model_types if self._by_type.get(t, adapter) is not adapter}
        if taken:
            owners = ", ".join(
                f"{t!r} by {a.__module__}.{a.__qualname__} ({self._sources[a]})" for t, a in sorted(taken.items())
            )
            raise AdapterRegistrationError(
                f"{adapter.__module__}.{adapter.__qualname__} (from {source}) claims model types that are "
                f"already taken: {owners}; each model_type may have one adapter, so drop it from one of them"
            )
        for model_type in adapter.model_types:
            self._by_type[model_type] = adapter
        self._sources.setdefault(adapter, source)


_REGISTRY = AdapterRegistry()


def adapter_registry() -> AdapterRegistry:
    """The process-wide registry that ``get_adapter`` consults."""
    return _REGISTRY


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class by hand (tests, notebooks); usable as a class decorator."""
    return _REGISTRY.register(adapter)


def unregister_adapter(adapter: type[ModelAdapter]) -> None:
    """Undo ``register_adapter``."""
    _REGISTRY.unregister(adapter)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` some registered adapter handles."""
    return _REGISTRY.supported_model_types()


def check_supported(config_or_model: Any) -> type[ModelAdapter]:
    """The adapter class for a config (or model), or ``UnsupportedArchitectureError`` naming the supported types.

    Works on a config alone, so the CLI can fail before loading weights or calibrating.
    """
    return _REGISTRY.adapter_class(config_or_model)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s architecture, or ``UnsupportedArchitectureError`` naming the supported ones."""
    return check_supported(model)(model)
