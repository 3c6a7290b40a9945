"""What a model adapter tells the rest of the library about one architecture.

An adapter is the one place that knows an architecture's module paths and
its shape: the pipeline, the strategies and the model-scope rewrites ask it
instead of matching module names or reading the config themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
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
    ``absorbable`` says how much of a transform ``prev`` can take. ``group``
    is the sub-block the place belongs to (``"attention"`` or ``"mlp"``),
    the unit of true-sequential calibration. When ``prev`` is a fused linear,
    ``prev_rows`` are the rows of its output that *are* this activation;
    ``None`` means its whole output.

    ``group`` defaults to ``""`` (no sub-block stated) only so that places
    written before it existed still construct; every built-in adapter states it.

    ``absorbable="shared_diagonal"`` (``o_proj``'s input under grouped-query
    attention) comes with ``shared_heads = (query heads per value head, head
    size)``: one value head serves a contiguous group of query heads, so its
    rows absorb a diagonal scale only when every head of the group has the
    same factors (:meth:`prev_factors`).
    """

    name: str
    linears: tuple[str, ...]
    prev: str | None
    prev_kind: PrevKind
    absorbable: Absorbable
    group: str = ""
    prev_rows: RowRange | None = None
    shared_heads: tuple[int, int] | None = None

    def prev_factors(self, factors: torch.Tensor) -> torch.Tensor | None:
        """The factors ``prev``'s output rows take to absorb ``Scale(factors)`` on this input, or None.

        ``factors`` themselves for a diagonal place; for a shared-diagonal one
        the value head's factors when all query heads of each group agree
        exactly, else None (the scale cannot fold).
        """
        if self.absorbable in ("any", "diagonal"):
            return factors
        if self.absorbable != "shared_diagonal" or self.shared_heads is None:
            return None
        group, head_dim = self.shared_heads
        grouped = factors.reshape(-1, group, head_dim)
        if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
            return None
        return grouped[:, 0].reshape(-1)


@dataclass(frozen=True)
class ResidualReader:
    """A norm on the residual stream and the linears that read its output."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class OutputSlice:
    """Some rows of a linear's output: ``rows=None`` is the whole output."""

    linear: str
    rows: RowRange | None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


class ModelAdapter(ABC):
    """How the library reaches into one architecture of causal language model.

    A subclass lists the ``config.model_type`` values it handles in
    ``model_types`` and implements the abstract methods; the parts common to
    every transformers causal LM (embeddings, LM head, the config's sizes)
    live here. Paths returned by the per-layer methods are relative to the
    decoder layer, as ``layer.get_submodule`` takes them.
    """

    #: ``config.model_type`` values this adapter handles
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- the model's sizes: read from the config here and nowhere else -----------------

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        # configs older than grouped-query attention have no such field: one kv head per head
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        """Width of the MLP's hidden activation (the input of its down projection)."""
        return int(self.config.intermediate_size)

    # --- whole-model parts ---------------------------------------------------------------

    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def tied_embeddings(self) -> bool:
        """True when the LM head's weight is the embedding's parameter itself."""
        # A quantized table (QuantEmbedding) or head (QuantLinear) holds codes, no weight to share.
        weight = getattr(self.embedding(), "weight", None)
        return weight is not None and getattr(self.lm_head(), "weight", None) is weight

    def untie_embeddings(self) -> None:
        """Give the LM head its own copy of the embedding weight (exact; a no-op when untied).

        Model-scope rewrites that fold a transform into the head but not into
        the embedding (or the other way round) need the two to be separate.
        """
        if self.tied_embeddings():
            head = self.lm_head()
            weight = self.embedding().weight
            head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        # transformers re-ties on tie_weights() / load unless the config says not to
        self.config.tie_word_embeddings = False

    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and the LM head."""

    # --- per decoder layer ---------------------------------------------------------------

    @abstractmethod
    def places(self, layer: nn.Module) -> list[InputPlace]:
        """The layer's input places, in execution order."""

    @abstractmethod
    def residual_readers(self, layer: nn.Module) -> tuple[ResidualReader, ...]:
        """Each norm on the residual stream with the linears that read its output."""

    @abstractmethod
    def residual_writers(self, layer: nn.Module) -> tuple[str, ...]:
        """The linears whose outputs are added to the residual stream."""

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module (what transformers' attention interface receives as ``module``)."""

    @abstractmethod
    def kv_outputs(self, layer: nn.Module) -> dict[str, OutputSlice]:
        """Where the keys (``"k"``) and values (``"v"``) come from, before RoPE and the cache."""

