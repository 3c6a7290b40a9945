"""What a model adapter tells the pipeline: the input places of a decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from quantcompose.strategy import Absorbable

PrevKind = Literal["norm", "linear", "none"]


@dataclass(frozen=True)
class InputPlace:
    """One activation that feeds one or more linears inside a decoder layer.

    ``prev`` is the module (path inside the layer) that produces the
    activation and can absorb a transform exactly: a norm absorbs a diagonal
    scale in its weight; a linear absorbs a transform on its output side.
    ``absorbable`` says how much of a transform ``prev`` can take.
    """

    name: str
    linears: tuple[str, ...]
    prev: str | None
    prev_kind: PrevKind
    absorbable: Absorbable


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


class ModelAdapter:
    """Base class: how the pipeline reaches into one architecture."""

    #: ``config.model_type`` values this adapter handles
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def places(self, layer: nn.Module) -> list[InputPlace]:
        raise NotImplementedError
