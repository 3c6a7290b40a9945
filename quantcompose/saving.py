"""Save and load a quantized model: safetensors for tensors, a JSON manifest for the rest.

A saved model is a directory::

    quantcompose.json        the manifest: format version, model config, every file's sha256 and
                             size, every tensor's shape and dtype and the file holding it, per-layer
                             specs, the transforms
    model-00001-of-0000N.safetensors ... one shard per decoder layer: its parameters and buffers
                             (packed int4 weight codes included) and each distinct online transform
                             it runs, once, in the dtype it runs in
    model-0000N-of-0000N.safetensors  everything outside the layers (embedding, a quantized table's
                             codes described by the manifest's ``quantized_embedding``, final norm,
                             LM head) and the attention quantizers
    tokenizer files          when a tokenizer was given
    recipe.toml              the resolved recipe the model was quantized with, when known

Each shard is written and hashed alone (:mod:`quantcompose.saved_files`), so a
save never holds every file's bytes, and :func:`save_quantized` takes a
``layer_source`` that materializes one layer at a time (offloaded
quantization reads each back from its work folder). Format 2 (one
``model.safetensors`` and one ``transforms.safetensors``) still loads.

Loading trusts nothing it has not checked: the manifest's own sections carry
checksums, every file is compared with its recorded size and sha256, and
every tensor's shape and dtype with what the manifest and the layer specs
imply, all before a model is built. Nothing is unpickled and no code is run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from quantcompose.atomic_dir import recover, target_lock, was_interrupted, write_directory
from quantcompose.errors import (
    ModelLoadError,
    QuantComposeError,
    QuantSpecError,
    SaveError,
    SaveTargetExistsError,
    TransformError,
)
from quantcompose.models import get_adapter, set_submodule
from quantcompose.qlinear import QuantLinear, is_packed, weight_layout
from quantcompose.quant import QuantSpec
from quantcompose.quant.spec import spec_to_dict
from quantcompose.quant_embedding import QuantEmbedding
from quantcompose.recipe import SAVED_RECIPE_NAME
from quantcompose.saved_files import (
    TRANSFORM_KEY,
    V2_TRANSFORMS_NAME,
    V2_WEIGHTS_NAME,
    WEIGHT_FILES_SECTION,
    file_of,
    file_record,
    is_shard_name,
    shard_name,
    tensor_files,
    transform_file,
    weight_files_of,
)
from quantcompose.storage import hold_in_storage, narrowest_exact
from quantcompose.transforms import Transform, flatten_state, from_state_dict, unflatten_state

FORMAT_VERSION = 3
#: Formats this version loads: 2 (two tensor files) and 3 (one shard per decoder layer).
READABLE_FORMATS = (2, 3)
CONFIG_NAME = "quantcompose.json"
#: Format 2's tensor files (format 3 names its shards with :func:`quantcompose.saved_files.shard_name`).
WEIGHTS_NAME = V2_WEIGHTS_NAME
TRANSFORMS_NAME = V2_TRANSFORMS_NAME
#: The resolved recipe beside the model (listed in the manifest and checked like every file).
RECIPE_NAME = SAVED_RECIPE_NAME

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)}
#: Manifest sections covered by a checksum (quantized layers and transforms one entry each).
_SECTIONS = ("model_class", "model_config", "metadata", "files", "tensors", "aliases", "transform_tensors", "attention")
#: The manifest section describing a quantized embedding table (``None``: the table is float).
EMBEDDING_SECTION = "quantized_embedding"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}


def _digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _section_digests(manifest: dict[str, Any]) -> dict[str, str]:
    digests = {key: _digest(manifest.get(key)) for key in _SECTIONS}
    # Absent from models saved before tables could be quantized, and before shards (format 2).
    for optional in (EMBEDDING_SECTION, WEIGHT_FILES_SECTION):
        if optional in manifest:
            digests[optional] = _digest(manifest[optional])
    for group in ("quantized_layers", "transforms"):
        for name, entry in manifest.get(group, {}).items():
            digests[f"{group}[{name!r}]"] = _digest(entry)
    return digests


def _file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------- saving
#: ``layer_source(index, layer)``: a context in which decoder layer ``index`` (the skeleton's module)
#: holds its tensors, on any device; the layer may be freed again when it exits.
LayerSource = Callable[[int, nn.Module], AbstractContextManager[Any]]


def _layers_in_memory(index: int, layer: nn.Module) -> AbstractContextManager[Any]:
    return nullcontext()


def _modules(module: nn.Module, prefix: str, skip: str | None) -> Iterator[tuple[str, nn.Module]]:
    """``module``'s submodules named under ``prefix``, without those under ``skip`` (the decoder layers)."""
    for name, sub in module.named_modules(prefix=prefix.removesuffix(".")):
        if skip is None or not f"{name}.".startswith(skip):
            yield name, sub


def _unique_state(
    module: nn.Module, prefix: str = "", skip: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s state dict (names under ``prefix``, none under ``skip``) with tied tensors once,
    and ``{alias: stored name}`` for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    # A quantized layer's tensors keep the dtypes its manifest entry states.
    quantized = {name for name, m in _modules(module, prefix, skip) if isinstance(m, (QuantLinear, QuantEmbedding))}
    for name, tensor in module.state_dict(prefix=prefix).items():
        if skip is not None and name.startswith(skip):
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().cpu().contiguous()
        # Float16-exact values (quantcompose/storage.py) take half the bytes and reload bit for bit.
        tensors[name] = tensor if name.rsplit(".", 1)[0] in quantized else narrowest_exact(tensor)
    return tensors, aliases


def _distinct_transforms(
    modules: Iterator[tuple[str, nn.Module]], first_key: int = 0
) -> tuple[dict[str, Transform], dict[str, str]]:
    """``({id: transform}, {layer name: id})``: a transform object shared by layers is stored once.

    Siblings (q/k/v, gate/up) hold one object: the pipeline hands them one and
    :class:`QuantLinear` casts it through a shared cache; a loaded model shares them the same way.
    Ids count from ``first_key`` (a save numbers the transforms of all its shards as one sequence).
    """
    distinct: dict[str, Transform] = {}
    by_object: dict[int, str] = {}
    used_by: dict[str, str] = {}
    for name, module in modules:
        if not isinstance(module, QuantLinear) or module.transform is None:
            continue
        key = by_object.get(id(module.transform))
        if key is None:
            key = by_object[id(module.transform)] = str(first_key + len(distinct))
            distinct[key] = module.transform
        used_by[name] = key
    return distinct, used_by


def describe_quantized(
    module: nn.Module, prefix: str = "", skip: str | None = None, first_key: int = 0
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(quantized_layers, transforms, transform_tensors)``: the manifest's view of ``module``'s QuantLinears.

    Names are relative to ``module`` (under ``prefix``, leaving out those under ``skip``), transform
    ids count from ``first_key``; :func:`rebuild_quantized` turns them back into empty layers.
    """
    distinct, used_by = _distinct_transforms(_modules(module, prefix, skip), first_key)
    transform_configs: dict[str, Any] = {}
    transform_tensors: dict[str, torch.Tensor] = {}
    for key, transform in distinct.items():
        config, flat = flatten_state(transform.state_dict(), prefix=f"{key}.")
        transform_configs[key] = config
        transform_tensors.update({k: v.detach().cpu().contiguous() for k, v in flat.items()})
    layers: dict[str, Any] = {}
    for name, layer in _modules(module, prefix, skip):
        if isinstance(layer, QuantLinear):
            layers[name] = {
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "bias": layer.bias is not None,
                "float_dtype": _dtype_name(layer._float_dtype),
                "packed": layer.packed,
                "act_spec": spec_to_dict(layer.act_spec),
                "weight_spec": spec_to_dict(layer.weight_spec),
                "output_spec": spec_to_dict(layer.output_spec),
                "transform": used_by.get(name),
            }
    return layers, transform_configs, transform_tensors


def describe_embedding(model: nn.Module) -> dict[str, Any] | None:
    """The manifest entry of ``model``'s quantized embedding table, or ``None`` when it is float."""
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            return {
                "name": name,
                "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim,
                "compute_dtype": _dtype_name(module.compute_dtype),
                "packed": is_packed(module.spec, module.embedding_dim),
                "spec": spec_to_dict(module.spec),
            }
    return None


def _layers_prefix(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers and the name prefix of their state (``model.layers.``)."""
    layers = get_adapter(model).layers()
    return layers, next(name for name, m in model.named_modules() if m is layers) + "."


def _write_shard(
    file: Path, module: nn.Module, prefix: str, skip: str | None, manifest: dict[str, Any],
    extra_transform_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``module``'s tensors (see :func:`_unique_state`) and its transforms to ``file``, and record them."""
    tensors, aliases = _unique_state(module, prefix, skip)
    layers, configs, transform_tensors = describe_quantized(module, prefix, skip, len(manifest["transforms"]))
    transform_tensors.update(extra_transform_tensors or {})
    save_file({**tensors, **{TRANSFORM_KEY + k: v for k, v in transform_tensors.items()}}, str(file))
    manifest["files"][file.name] = file_record(file)
    manifest["tensors"].update({name: _describe(t) for name, t in tensors.items()})
    manifest["aliases"].update(aliases)
    manifest["transform_tensors"].update({name: _describe(t) for name, t in transform_tensors.items()})
    manifest["transforms"].update(configs)
    manifest["quantized_layers"].update(layers)
    for section, names in (("tensors", tensors), ("transform_tensors", transform_tensors)):
        manifest[WEIGHT_FILES_SECTION][section].update(dict.fromkeys(names, file.name))


def _write_files(
    model: nn.Module, directory: Path, tokenizer: Any, metadata: dict[str, Any] | None, recipe: Any = None,
    layer_source: LayerSource = _layers_in_memory,
) -> None:
    """Write a complete saved model into the empty directory ``directory``: shard by shard, manifest last."""
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_config": json.loads(json.dumps(model.config.to_dict(), default=str)),
        "metadata": json.loads(json.dumps(metadata or {}, default=str)),
        "files": {}, "tensors": {}, "aliases": {}, "transform_tensors": {}, "transforms": {}, "quantized_layers": {},
        WEIGHT_FILES_SECTION: {"tensors": {}, "transform_tensors": {}},
    }
    layers, prefix = _layers_prefix(model)
    count = len(layers) + 1
    for index, layer in enumerate(layers):
        with layer_source(index, layer):
            _write_shard(directory / shard_name(index, count), layer, f"{prefix}{index}.", None, manifest)
    manifest["attention"], attention_tensors = _attention_state(model)
    _write_shard(directory / shard_name(count - 1, count), model, "", prefix, manifest, attention_tensors)
    manifest[EMBEDDING_SECTION] = describe_embedding(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if recipe is not None:
        (directory / RECIPE_NAME).write_text(recipe.to_toml(), encoding="utf-8")
    for file in (p for p in directory.rglob("*") if p.is_file()):
        name = file.relative_to(directory).as_posix()
        if name not in manifest["files"]:
            manifest["files"][name] = file_record(file)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    # Checked on load so that no layer is built from a problem found later.
    _check_layers(directory, manifest)
    manifest["checksums"] = _section_digests(manifest)
    (directory / CONFIG_NAME).write_text(json.dumps(manifest, indent=1))


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a quantcompose manifest (not checked further)."""
    return (Path(path) / CONFIG_NAME).is_file()


def looks_like_saved_model(path: str | os.PathLike) -> bool:
    """A saved model, or what is left of one (its tensor files, or a save interrupted while replacing it)."""
    target = Path(path)
    shards = target.is_dir() and any(is_shard_name(p.name) for p in target.iterdir())
    return is_saved_model(target) or shards or (target / TRANSFORMS_NAME).is_file() or was_interrupted(target)


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_save_target(
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    replaceable: Callable[[Path], bool] = is_saved_model,
    kind: str = f"saved quantcompose model (no {CONFIG_NAME})",
) -> Path:
    """Raise :class:`SaveError` unless a model can be saved at ``path``; returns it as a ``Path``.

    ``path`` must not exist, or with ``overwrite`` be a directory ``replaceable``
    accepts (by default a saved quantcompose model) or an empty one (nothing
    else is ever replaced), and its nearest existing parent must be a
    directory this process can create entries in. ``kind`` names what
    ``replaceable`` accepts in the messages (an exporter passes its own).
    """
    if not os.fspath(path).strip():
        raise SaveError("the save path is empty; pass the directory to save the model to (--save DIR)")
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise SaveTargetExistsError(
                f"{target} already exists; choose another path, or pass overwrite=True (--overwrite) "
                f"to replace a {kind.split(' (')[0]}"
            )
        if not target.is_dir() or target.is_symlink():
            raise SaveError(f"{target} exists and is not a directory; refusing to replace it: choose another path")
        if not replaceable(target) and any(target.iterdir()):
            raise SaveError(
                f"{target} exists and is not a {kind}; refusing to replace "
                "what it holds: choose another path or empty it first"
            )
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise SaveError(f"cannot save to {target}: {parent} is not a directory; choose another path")
    # os.access says yes to root on a read-only file system's directories too: try it.
    probe = parent / f".qc-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise SaveError(f"cannot save to {target}: {parent} is not writable ({exc.strerror}); "
                        "choose a directory you can write to") from None
    return target


def _estimated_bytes(model: nn.Module) -> int:
    """Bytes the saved tensors will take at most, read off shapes and dtypes (nothing is copied).

    Float tensors are counted at their own width (the save may narrow them) and tied ones once;
    a layer waiting on the ``meta`` device (offloaded) counts its tensors but not its transforms.
    """
    total, seen = 0, set()
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.is_meta or key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    distinct, _ = _distinct_transforms(model.named_modules())
    for transform in distinct.values():
        _, flat = flatten_state(transform.state_dict())
        total += sum(t.numel() * t.element_size() for t in flat.values())
    return total


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    recipe: Any = None,
    layer_source: LayerSource = _layers_in_memory,
) -> int:
    """Write ``model`` (with its :class:`QuantLinear` layers) to the directory ``path``.

    The decoder layers are written one shard each, in order, each inside
    ``layer_source(index, layer)``: by default they are in memory; offloaded
    quantization passes one that reads the finished layer back and frees it
    after, so that only one layer is ever materialized.

    ``recipe`` (a resolved :class:`~quantcompose.recipe.Recipe`; default: the
    one :func:`quantcompose.quantize` quantized ``model`` with) is written as
    ``recipe.toml``, from which ``quantcompose quantize --recipe`` reproduces
    the model.

    Returns the size on disk in bytes. With ``overwrite``, replaces only a
    directory that holds a saved quantcompose model (or an empty one), and
    only once the new one is completely written: a failure or a kill at any
    point leaves the old model or the new one at ``path`` (see
    :mod:`quantcompose.atomic_dir`). Raises :class:`SaveError` otherwise.
    """
    target = check_save_target(path, overwrite)
    if recipe is None:
        from quantcompose.api import recipe_of

        recipe = recipe_of(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"cannot create {target.parent}: {exc.strerror}; choose another path") from None
    needed, free = _estimated_bytes(model), shutil.disk_usage(target.parent).free
    if needed > free:
        raise SaveError(f"saving to {target} needs about {needed / 2**20:.0f} MiB but {target.parent} has "
                        f"{free / 2**20:.0f} MiB free; free some space or save elsewhere")
    try:
        write_directory(target, lambda staging: _write_files(model, staging, tokenizer, metadata, recipe, layer_source),
                        marker=CONFIG_NAME, replace=overwrite)
    except OSError as exc:
        if isinstance(exc, SaveError):
            raise
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise SaveError(f"saving to {target} failed: {reason}; nothing was changed at {target}") from exc
    return directory_size(target)


def directory_size(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# -------------------------------------------------------------------- checking
def _fail(source: Path, what: str, problem: str) -> ModelLoadError:
    return ModelLoadError(
        f"{source / CONFIG_NAME if what == CONFIG_NAME else source / what}: {problem}; "
        "the saved model is damaged or was edited: save it again with `quantcompose quantize ... --save DIR`"
    )


def _recover_interrupted(target: Path) -> None:
    """Put back a model that a killed save had renamed aside (see :mod:`quantcompose.atomic_dir`)."""
    if not was_interrupted(target):
        return
    try:
        with target_lock(target):
            recover(target, CONFIG_NAME)
    except (SaveError, OSError):
        pass  # a save is running or the folder is read-only: report what is there


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the saved model at ``path``, its format and section checksums verified."""
    source = Path(path)
    config_file = source / CONFIG_NAME
    if not source.exists():
        _recover_interrupted(source)
    if not config_file.is_file():
        hint = " (the directory does not exist)" if not source.exists() else ""
        raise ModelLoadError(
            f"{source} is not a saved quantcompose model (no {CONFIG_NAME}){hint}; "
            "save one with `quantcompose quantize ... --save DIR`."
        )
    try:
        manifest = json.loads(config_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(source, CONFIG_NAME, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _fail(source, CONFIG_NAME, "not a JSON object")
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        raise ModelLoadError(
            f"{config_file}: field format_version is {version!r}; this quantcompose reads formats "
            f"{' and '.join(map(str, READABLE_FORMATS))}: quantize and save the model again with this version"
        )
    recorded = manifest.get("checksums")
    if not isinstance(recorded, dict):
        raise _fail(source, CONFIG_NAME, "field checksums is missing")
    actual = _section_digests(manifest)
    for section in sorted(set(actual) | set(recorded)):
        if recorded.get(section) != actual.get(section):
            raise _fail(source, CONFIG_NAME, f"field {section} does not match its checksum")
    if (version >= 3) != (WEIGHT_FILES_SECTION in manifest):
        raise _fail(source, CONFIG_NAME, f"format {version} {'needs' if version >= 3 else 'has no'} field "
                    f"{WEIGHT_FILES_SECTION}")
    return manifest


def _checked_bytes(source: Path, name: str, expected: dict[str, Any]) -> bytes:
    """The bytes of listed file ``name``, checked against its recorded size and sha256."""
    file = source / name
    if not file.is_file():
        raise _fail(source, name, "the file is missing")
    size = file.stat().st_size
    if size != expected.get("size"):
        raise _fail(source, name, f"field size: {size} bytes on disk, {expected.get('size')} recorded")
    data = file.read_bytes()
    if _file_digest(data) != expected.get("sha256"):
        raise _fail(source, name, "field sha256 does not match the file's contents")
    return data


def _split_shard(manifest: dict[str, Any], name: str, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(model tensors, transform tensors)`` of one tensor file."""
    if WEIGHT_FILES_SECTION not in manifest:  # format 2: one file of each kind
        return (tensors, {}) if name == V2_WEIGHTS_NAME else ({}, tensors)
    weights = {k: v for k, v in tensors.items() if not k.startswith(TRANSFORM_KEY)}
    return weights, {k[len(TRANSFORM_KEY):]: v for k, v in tensors.items() if k.startswith(TRANSFORM_KEY)}


def _read_tensors(source: Path, manifest: dict[str, Any]) -> tuple[dict, dict, bytes | None]:
    """``(model tensors, transform tensors, recipe bytes)``: every listed file checked, one file's bytes at a time.

    Each tensor file must hold exactly the tensors the manifest places in it, of the recorded shapes and dtypes.
    """
    files, weight_files = manifest["files"], weight_files_of(manifest)
    holders = tensor_files(manifest)
    for section in ("tensors", "transform_tensors"):
        if set(weight_files[section]) != set(manifest[section]):
            raise _fail(source, CONFIG_NAME, f"field {WEIGHT_FILES_SECTION}.{section} does not place exactly "
                        f"the tensors field {section} lists")
    for name in holders:
        if name not in files:
            raise _fail(source, CONFIG_NAME, f"field files does not list {name}")
    weights: dict[str, torch.Tensor] = {}
    transform_tensors: dict[str, torch.Tensor] = {}
    recipe_bytes = None
    for name, expected in files.items():
        data = _checked_bytes(source, name, expected)
        if name == RECIPE_NAME:
            recipe_bytes = data
        if name not in holders:
            continue
        try:
            parts = _split_shard(manifest, name, load_safetensors(data))
        except Exception as exc:  # safetensors raises its own error types for a malformed file
            raise _fail(source, name, f"not a safetensors file ({exc})") from None
        del data
        for section, found, into in zip(("tensors", "transform_tensors"), parts, (weights, transform_tensors)):
            placed = {k: manifest[section][k] for k, file in weight_files[section].items() if file == name}
            _check_tensors(source, name, found, placed)
            into.update(found)
    return weights, transform_tensors, recipe_bytes


def _check_tensors(source: Path, file: str, tensors: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """Names, shapes and dtypes of a tensor file against the manifest."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise _fail(source, file, f"tensors {missing} are missing and {extra} unexpected")
    for name, tensor in tensors.items():
        if _describe(tensor) != expected[name]:
            raise _fail(source, file, f"tensor {name}: shape {list(tensor.shape)} dtype "
                        f"{_dtype_name(tensor.dtype)}, manifest says {expected[name]}")


def _layer_spec(source: Path, layer: dict[str, Any], field: str, where: str) -> QuantSpec | None:
    data = layer.get(field)
    try:
        return None if data is None else QuantSpec.from_dict(data)
    except (QuantSpecError, TypeError) as exc:
        raise _fail(source, CONFIG_NAME, f"field {where}.{field} is not a valid quantizer spec ({exc})") from None


def _check_layers(source: Path, manifest: dict[str, Any]) -> None:
    """Each quantized layer's tensors in the manifest against what its specs imply."""
    for name, layer in manifest["quantized_layers"].items():
        where = f"quantized_layers[{name!r}]"
        spec = _layer_spec(source, layer, "weight_spec", where)
        _layer_spec(source, layer, "act_spec", where)
        _layer_spec(source, layer, "output_spec", where)
        float_dtype = _DTYPES.get(layer.get("float_dtype"))
        if float_dtype is None or not float_dtype.is_floating_point:
            raise _fail(source, CONFIG_NAME, f"field {where}.float_dtype {layer.get('float_dtype')!r} is not a float dtype")
        out_features, in_features = layer["out_features"], layer["in_features"]
        if spec is not None and layer.get("packed") != is_packed(spec, in_features):
            raise _fail(source, CONFIG_NAME, f"field {where}.packed is {layer.get('packed')} but weight_spec "
                        f"bits={spec.bits} on {in_features} inputs implies {not layer.get('packed')}")
        layout = weight_layout(out_features, in_features, spec, float_dtype)
        if layer["bias"]:
            layout["bias"] = ((out_features,), float_dtype)
        _check_layout(source, manifest, name, layout, f"{where} (weight_spec {spec})")
    _check_embedding_entry(source, manifest)


def _check_layout(source: Path, manifest: dict[str, Any], name: str, layout: dict[str, Any], where: str) -> None:
    tensors = manifest["tensors"]
    for key, (shape, dtype) in layout.items():
        expected = {"shape": list(shape), "dtype": _dtype_name(dtype)}
        found = tensors.get(f"{name}.{key}")
        if found != expected:
            raise _fail(source, file_of(manifest, "tensors", f"{name}.{key}"),
                        f"tensor {name}.{key} is {found}, but {where} implies {expected}")


def _embedding_entry(source: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], QuantSpec] | None:
    """The quantized embedding's manifest entry and its spec (``None`` for a float table)."""
    entry = manifest.get(EMBEDDING_SECTION)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION} is not an object")
    spec = _layer_spec(source, entry, "spec", EMBEDDING_SECTION)
    if spec is None or spec.granularity not in ("channel", "group"):
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION}.spec {spec} is not a per-row or per-group "
                    "quantizer")
    return entry, spec


def _check_embedding_entry(source: Path, manifest: dict[str, Any]) -> None:
    """A quantized embedding's tensors in the manifest against what its spec implies."""
    found = _embedding_entry(source, manifest)
    if found is None:
        return
    entry, spec = found
    compute = _DTYPES.get(entry.get("compute_dtype"))
    if compute is None or not compute.is_floating_point:
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION}.compute_dtype {entry.get('compute_dtype')!r} "
                    "is not a float dtype")
    rows, cols = entry["num_embeddings"], entry["embedding_dim"]
    if entry.get("packed") != is_packed(spec, cols):
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION}.packed is {entry.get('packed')} but spec "
                    f"bits={spec.bits} on a width of {cols} implies {not entry.get('packed')}")
    if spec.granularity == "group" and cols % spec.group_size:
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION}.spec group_size {spec.group_size} does not "
                    f"divide the width {cols}")
    _check_layout(source, manifest, entry["name"], weight_layout(rows, cols, spec),
                  f"{EMBEDDING_SECTION} (spec {spec})")


def _check_codes(source: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Values the specs constrain: symmetric zero points are 0, codes lie in the spec's range."""
    for name, layer in manifest["quantized_layers"].items():
        spec = _layer_spec(source, layer, "weight_spec", name)
        if spec is not None:
            _check_code_values(source, manifest, tensors, name, spec, layer["packed"],
                               f"quantized_layers[{name!r}].weight_spec")
    embedding = _embedding_entry(source, manifest)
    if embedding is not None:
        entry, spec = embedding
        _check_code_values(source, manifest, tensors, entry["name"], spec, entry["packed"], f"{EMBEDDING_SECTION}.spec")


def _check_code_values(
    source: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec,
    packed: bool, where: str,
) -> None:
    file = file_of(manifest, "tensors", f"{name}.weight_codes")
    if spec.symmetric and bool(tensors[f"{name}.weight_zero"].any()):
        raise _fail(source, file, f"{name}.weight_zero has nonzero zero points but {where}.symmetric "
                    "is true")
    codes = tensors[f"{name}.weight_codes"]
    if packed:
        # Each nibble of a byte is a code; 4-bit codes fill a nibble, so only narrower ones can overflow.
        if spec.bits == 4:
            return
        low, high = (codes & 0xF).to(torch.int16), (codes >> 4).to(torch.int16)
        if spec.symmetric:
            low, high = (low ^ 8) - 8, (high ^ 8) - 8
        lo, hi = min(int(low.min()), int(high.min())), max(int(low.max()), int(high.max()))
    else:
        lo, hi = int(codes.min()), int(codes.max())
    if lo < spec.qmin or hi > spec.qmax:
        raise _fail(source, file, f"{name}.weight_codes span [{lo}, {hi}] but {where}.bits="
                    f"{spec.bits} allows [{spec.qmin}, {spec.qmax}]")


def build_transforms(source: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Transform]:
    built: dict[str, Transform] = {}
    for key, config in manifest["transforms"].items():
        try:
            built[key] = from_state_dict(unflatten_state(config, tensors))
        except (TransformError, KeyError, TypeError, ValueError) as exc:
            raise _fail(source, transform_file(manifest, key), f"transform {key} cannot be rebuilt ({exc})") from None
    for name, layer in manifest["quantized_layers"].items():
        key = layer.get("transform")
        if key is None:
            continue
        if key not in built:
            raise _fail(source, CONFIG_NAME, f"quantized_layers[{name!r}].transform names transform {key!r}, "
                        "which is not stored")
        if built[key].size != layer["in_features"]:
            raise _fail(source, transform_file(manifest, key), f"transform {key} has width {built[key].size} but "
                        f"{name} has {layer['in_features']} inputs")
    return built


def _attention_state(model: nn.Module) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Each layer's Q/K/V quantizer as JSON config and tensors (None when none is installed)."""
    from quantcompose.attention_quant import attention_quantizer_of, installed_attention_modules

    modules = installed_attention_modules(model)
    if modules is None:
        return None, {}
    config: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        quantizer = attention_quantizer_of(module)
        if quantizer is not None:
            state, flat = flatten_state(quantizer.to_dict(), prefix=f"attention.{index}.")
            config[str(index)] = state
            tensors.update({k: v.detach().cpu().contiguous() for k, v in flat.items()})
    return {"layers": config}, tensors


def _restore_attention(
    source: Path, model: nn.Module, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor]
) -> None:
    """Reinstall the saved Q/K/V quantizers (see :func:`_attention_state`)."""
    if config is None:
        return
    from quantcompose.attention_quant import AttentionQuantizer, install_attention_quantization

    try:
        quantizers = {
            int(index): AttentionQuantizer.from_dict(unflatten_state(state, tensors))
            for index, state in config["layers"].items()
        }
        install_attention_quantization(model, quantizers)
    except (QuantComposeError, KeyError, TypeError, ValueError) as exc:
        raise _fail(source, CONFIG_NAME, f"field attention cannot be rebuilt ({exc})") from None


def _tokenizer_files_present(manifest: dict[str, Any]) -> bool:
    return "tokenizer_config.json" in manifest["files"]


def _new_model(source: Path, manifest: dict[str, Any]) -> nn.Module:
    """The model's skeleton from its config, without the cost of random initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]

    model_config = dict(manifest["model_config"])
    try:
        hf_config = AutoConfig.for_model(model_config.pop("model_type"), **model_config)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        # The skeleton comes untied; a tied model must hold one table, not two copies of it.
        model.tie_weights()
        return model
    except (KeyError, ValueError, TypeError) as exc:
        raise _fail(source, CONFIG_NAME, f"field model_config does not describe a model transformers can build "
                    f"({type(exc).__name__}: {exc})") from None


def _attach_recipe(source: Path, model: nn.Module, data: bytes) -> None:
    """Hang the saved recipe on the loaded model, so that saving it again keeps the recipe."""
    from quantcompose.api import RECIPE_ATTRIBUTE
    from quantcompose.recipe import Recipe, parse_toml

    try:
        recipe = Recipe.from_dict(parse_toml(data.decode("utf-8"), RECIPE_NAME))
    except (QuantComposeError, UnicodeDecodeError) as exc:
        raise _fail(source, RECIPE_NAME, f"not a valid recipe ({exc})") from None
    setattr(model, RECIPE_ATTRIBUTE, recipe)


def rebuild_quantized(
    source: Path, module: nn.Module, layers: dict[str, Any], transforms: dict[str, Transform]
) -> None:
    """Put an empty :class:`QuantLinear` wherever ``layers`` (from :func:`describe_quantized`) names one.

    Their buffers are to be filled by ``load_state_dict``; ``transforms`` are the rebuilt
    transforms by key. Problems are reported against the manifest in ``source``.
    """
    for name, layer in layers.items():
        quantized = QuantLinear.empty(
            layer["in_features"], layer["out_features"], bias=layer["bias"],
            transform=None if layer["transform"] is None else transforms[layer["transform"]],
            act_spec=_layer_spec(source, layer, "act_spec", name),
            weight_spec=_layer_spec(source, layer, "weight_spec", name),
            output_spec=_layer_spec(source, layer, "output_spec", name),
            dtype=_DTYPES[layer["float_dtype"]],
        )
        try:
            set_submodule(module, name, quantized)
        except (AttributeError, KeyError) as exc:
            raise _fail(source, CONFIG_NAME, f"quantized_layers names {name}, which the model does not have") from exc


def _rebuild_embedding(source: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    """Put an empty :class:`QuantEmbedding` in place of the skeleton's table when the manifest has one."""
    found = _embedding_entry(source, manifest)
    if found is None:
        return
    entry, spec = found
    modules = dict(model.named_modules())
    table = model.get_input_embeddings()
    if modules.get(entry["name"]) is not table:
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION}.name {entry['name']!r} is not the model's "
                    "input embedding")
    if [entry["num_embeddings"], entry["embedding_dim"]] != list(table.weight.shape):
        raise _fail(source, CONFIG_NAME, f"field {EMBEDDING_SECTION} describes a {entry['num_embeddings']} x "
                    f"{entry['embedding_dim']} table but model_config a {tuple(table.weight.shape)} one")
    # A quantized table has no float weight for a head to share (quantcompose.quant_embedding).
    if getattr(model.config, "tie_word_embeddings", False):
        raise _fail(source, CONFIG_NAME, f"field model_config ties the LM head to the embedding, which "
                    f"{EMBEDDING_SECTION} says is quantized")
    model.set_input_embeddings(QuantEmbedding.empty(entry["num_embeddings"], entry["embedding_dim"], spec,
                                                    _DTYPES[entry["compute_dtype"]]))


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load a model saved by :func:`save_quantized`; returns ``(model, tokenizer or None)``.

    Raises :class:`ModelLoadError`, naming the file and the field, when anything
    on disk differs from what the manifest records or its specs imply.
    """
    source = Path(path)
    manifest = read_manifest(source)
    try:
        weights, transform_tensors, recipe_bytes = _read_tensors(source, manifest)
        _check_layers(source, manifest)
        _check_codes(source, manifest, weights)
        transforms = build_transforms(source, manifest, transform_tensors)
    except (KeyError, TypeError, AttributeError) as exc:
        # Only a manifest written by hand, checksums recomputed, gets here.
        raise _fail(source, CONFIG_NAME, f"an entry is malformed ({type(exc).__name__}: {exc})") from None
    for alias, stored in manifest["aliases"].items():
        if stored not in weights:
            raise _fail(source, CONFIG_NAME, f"field aliases maps {alias} to {stored}, which is not stored")
        weights[alias] = weights[stored]

    model = _new_model(source, manifest)
    rebuild_quantized(source, model, manifest["quantized_layers"], transforms)
    _rebuild_embedding(source, model, manifest)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise _fail(source, tensor_files(manifest)[0], f"its tensors do not fit the model ({exc})") from None
    _restore_attention(source, model, manifest.get("attention"), transform_tensors)
    hold_in_storage(model)
    model.eval().to(device)
    if recipe_bytes is not None:
        _attach_recipe(source, model, recipe_bytes)
    tokenizer = None
    if _tokenizer_files_present(manifest):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    return model, tokenizer


# -------------------------------------------------------------------- size
@dataclass(frozen=True)
class SavedSize:
    """Bytes of a saved model by kind, and the size of the same model in float16."""

    codes: int
    scales: int
    floats: int
    transforms: int
    other: int
    fp16: int
    #: A quantized embedding table's codes, scales and zero points (0 when the table is float, in ``floats``).
    embedding: int = 0

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.floats + self.transforms + self.other + self.embedding

    @property
    def ratio(self) -> float:
        """Size on disk over the float16 model's size."""
        return self.total / self.fp16 if self.fp16 else float("nan")

    def format(self) -> str:
        """One line: total, ratio to float16, and the breakdown in MiB."""
        mib = 2**20
        table = f"quantized embedding table {self.embedding / mib:.1f}, " if self.embedding else ""
        return (f"{self.total / mib:.1f} MiB on disk, {self.ratio:.2f}x the float16 model "
                f"({self.fp16 / mib:.1f} MiB): codes {self.codes / mib:.1f}, scales+zeros {self.scales / mib:.1f}, "
                f"{table}embeddings and other float tensors {self.floats / mib:.1f}, "
                f"transforms {self.transforms / mib:.1f}, other files {self.other / mib:.1f} MiB")


def _nbytes(description: dict[str, Any]) -> int:
    numel = 1
    for n in description["shape"]:
        numel *= n
    return numel * _DTYPES[description["dtype"]].itemsize


def saved_size_breakdown(path: str | os.PathLike) -> SavedSize:
    """Size of the saved model at ``path`` by kind (from its manifest) against its float16 size.

    The float16 size counts every weight the model had before quantization
    (a quantized layer's ``out × in`` and bias, a quantized table's rows × width, every other stored
    tensor; tied ones once) at 2 bytes.
    """
    manifest = read_manifest(path)
    codes = scales = floats = table = 0
    fp16_elements = 0
    weight_keys = ("weight_codes", "weight_scale", "weight_zero")
    quantized = {f"{name}.{key}": name for name in manifest["quantized_layers"] for key in weight_keys}
    embedding = manifest.get(EMBEDDING_SECTION)
    table_tensors = set()
    if embedding is not None:
        table_tensors = {f"{embedding['name']}.{key}" for key in weight_keys}
        fp16_elements += embedding["num_embeddings"] * embedding["embedding_dim"]
    for name, description in manifest["tensors"].items():
        size = _nbytes(description)
        if name in table_tensors:
            table += size
        elif name.endswith(".weight_codes") and name in quantized:
            codes += size
        elif name in quantized:
            scales += size
        else:
            floats += size
            fp16_elements += size // _DTYPES[description["dtype"]].itemsize
    for layer in manifest["quantized_layers"].values():
        if layer["weight_spec"] is not None:
            fp16_elements += layer["in_features"] * layer["out_features"]
    transforms = sum(_nbytes(d) for d in manifest["transform_tensors"].values())
    total = sum(f["size"] for f in manifest["files"].values()) + (Path(path) / CONFIG_NAME).stat().st_size
    other = total - codes - scales - floats - transforms - table
    return SavedSize(codes, scales, floats, transforms, other, 2 * fp16_elements, table)
