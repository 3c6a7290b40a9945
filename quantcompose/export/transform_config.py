"""Online transforms written as a compressed-tensors ``transform_config`` (one dense matrix each).

The format's transform config attaches a transform to a linear's input as an
online matrix multiplication ``x ↦ x·M`` (``location: input``), applied by
compressed-tensors' :func:`compressed_tensors.transform.apply_transform_config`
as a forward pre-hook, so before the linear's input quantizer runs. Its
``random-matrix`` type is the one that can hold an arbitrary matrix: the
package generates a random one when the config is applied, and the checkpoint
supplies the real values under the parameter name the package registers
(``<linear>.<group>_input.weight``). Any quantcompose transform, whatever its
atoms (DuQuant's block rotations and permutation, QuaRot's Hadamards, a scale
per channel), is written as its dense matrix ``M`` with ``forward(x) == x·M``.

One config group per distinct transform: the linears that read the same
activation (q/k/v, gate/up) share it, as the package shares one weight
between the targets of a group of one size; the checkpoint stores it once,
under the first linear's name.

A consumer must apply the config and then load those tensors: plain
``transformers`` ignores a ``transform_config``, which is why the exporter
writes one only when asked (``online_transforms="transform-config"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: the CLI's parser reads ONLINE_CHOICES
    import torch

    from quantcompose.transforms import Transform

#: The compressed-tensors transform type whose weight is an arbitrary stored matrix.
TRANSFORM_TYPE = "random-matrix"
#: The ``export_compressed_tensors`` / ``--online-transforms`` choices.
ONLINE_CHOICES = ("refuse", "transform-config")
GROUP_PREFIX = "quantcompose_online_"


@dataclass(frozen=True)
class OnlineGroup:
    """One distinct online transform and the linears whose input it transforms."""

    name: str
    transform: Transform
    linears: tuple[str, ...]

    @property
    def weight_key(self) -> str:
        """The checkpoint key of the group's matrix: the parameter the package registers on the first linear."""
        return f"{self.linears[0]}.{self.name}_input.weight"


def check_online_choice(online_transforms: str) -> None:
    """ValueError unless ``online_transforms`` is one of :data:`ONLINE_CHOICES`."""
    if online_transforms not in ONLINE_CHOICES:
        raise ValueError(f"online_transforms must be one of {', '.join(ONLINE_CHOICES)}, not {online_transforms!r}")


def group_online(online: dict[str, Transform]) -> list[OnlineGroup]:
    """``{linear path: transform}`` grouped by transform (the same object, or an equal one), in model order."""
    groups: list[tuple[Transform, list[str]]] = []
    for path, transform in online.items():
        for known, paths in groups:
            if known is transform or known == transform:
                paths.append(path)
                break
        else:
            groups.append((transform, [path]))
    return [OnlineGroup(f"{GROUP_PREFIX}{i}", t, tuple(paths)) for i, (t, paths) in enumerate(groups)]


def transform_config_of(groups: list[OnlineGroup]) -> Any:
    """The compressed-tensors ``TransformConfig`` that puts each group's matrix on its linears' inputs."""
    import torch
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    return TransformConfig(config_groups={
        g.name: TransformScheme(
            type=TRANSFORM_TYPE,
            # exact module names: a group is one layer's place, never a pattern over layers
            apply=[TransformArgs(targets=list(g.linears), location="input")],
            precision=torch.float32,
        )
        for g in groups
    })


def transform_tensors(groups: list[OnlineGroup], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{checkpoint key: dense matrix}`` for every group, computed in float64 and stored in ``dtype``."""
    import torch

    return {g.weight_key: g.transform.matrix(torch.float64).to(dtype).cpu().contiguous() for g in groups}


def load_with_transform_config(folder: str | Any, **from_pretrained: Any) -> Any:
    """Load an export the way a transform-aware consumer does, with transformers and compressed-tensors only.

    ``AutoModelForCausalLM.from_pretrained`` (which decompresses the weights
    and quantizes activations but ignores the ``transform_config``), then
    compressed-tensors' ``apply_transform_config`` and the stored matrices
    loaded into the parameters it registered. Raises ``ValueError`` if a
    transform the config declares has no stored matrix (it would run the
    package's random one). Nothing of quantcompose runs in the loaded model.
    """
    import json
    from pathlib import Path

    import torch
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained).eval()
    config = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("transform_config")
    if not config:
        return model
    apply_transform_config(model, TransformConfig.model_validate(config))
    params = {f"{name}.weight": module.weight for name, module in model.named_modules()
              if isinstance(module, TransformBase)}
    loaded: set[int] = set()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in set(f.keys()) & set(params):
            with torch.no_grad():
                params[key].copy_(f.get_tensor(key))
            loaded.add(id(params[key]))
    missing = sorted(k for k, p in params.items() if id(p) not in loaded)
    if missing:
        raise ValueError(f"{folder}: the transform_config declares transforms with no stored matrix: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return model
