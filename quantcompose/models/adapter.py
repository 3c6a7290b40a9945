"""What a model adapter tells the pipeline: the input places of a decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from quantcompose.strategy import Absorbable

PrevKind = Literal["norm", "linear", "none"]
RowRange = tuple[int, int]  # rows [start, stop) of a linear's output (its weight's dim 0)


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
    group: str = ""  # the sub-block ("attention", "mlp"): true-sequential calibration follows it
    prev_rows: RowRange | None = None  # rows of a fused prev linear's output that are this activation


@dataclass(frozen=True)
class ResidualReader:
    """A norm on the residual stream and the linears that read its output."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class OutputSlice:
    """The rows of a linear's output that hold one quantity (K, V), or all of it."""

    linear: str
    rows: RowRange | None = None


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

    # -- model-wide facts (model scope) ------------------------------------------------
    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Linear:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.model.config, "head_dim", None) or self.hidden_size // self.num_heads)

    def residual_readers(self, layer: nn.Module) -> tuple[ResidualReader, ...]:
        raise NotImplementedError

    def residual_writers(self, layer: nn.Module) -> tuple[str, ...]:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def kv_outputs(self, layer: nn.Module) -> dict[str, OutputSlice]:
        raise NotImplementedError

    def tied_embeddings(self) -> bool:
        return self.lm_head().weight is self.embedding().weight

    def untie_embeddings(self) -> None:
        """Give the LM head its own copy of the embedding matrix (exact)."""
        head = self.lm_head()
        if self.tied_embeddings():
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.model.config.tie_word_embeddings = False
