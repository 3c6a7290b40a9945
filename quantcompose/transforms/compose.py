"""Composition of transforms, applied left to right, and its exact simplification."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from quantcompose.errors import ShapeError, TransformError
from quantcompose.transforms.base import Transform
from quantcompose.transforms.identity import Identity
from quantcompose.transforms.permutation import Permutation
from quantcompose.transforms.scale import Scale


class Compose(Transform):
    """``Compose([A, B, C])`` applies ``A``, then ``B``, then ``C``: matrix ``A·B·C``.

    Nested Composes are flattened, so ``.transforms`` holds only atoms.
    """

    transforms: tuple[Transform, ...]

    def __init__(self, transforms: Iterable[Transform]) -> None:
        flat: list[Transform] = []
        for i, t in enumerate(transforms):
            if isinstance(t, Compose):
                flat.extend(t.transforms)
            elif isinstance(t, Transform):
                flat.append(t)
            else:
                raise TransformError(f"Compose item {i} is a {type(t).__name__}, not a Transform.")
        if not flat:
            raise TransformError("Compose needs at least one transform (use Identity(n) for none).")
        sizes = {t.size for t in flat}
        if len(sizes) != 1:
            listing = ", ".join(f"{type(t).__name__}({t.size})" for t in flat)
            raise ShapeError(f"Compose needs transforms of one width, got [{listing}].")
        self.transforms = tuple(flat)
        self.size = flat[0].size
        self._freeze()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t._forward(x)  # widths match by construction: skip the per-atom check
        return x

    def _make_inverse(self) -> "Compose":
        # (A·B)⁻¹ = B⁻¹·A⁻¹
        return Compose([t.inv for t in reversed(self.transforms)])

    def _make_transpose(self) -> "Compose":
        # (A·B)ᵀ = Bᵀ·Aᵀ
        return Compose([t.T for t in reversed(self.transforms)])

    def derived(self) -> list[Transform]:
        return [*super().derived(), *(d for t in self.transforms for d in t.derived())]

    def forget_derived(self) -> None:
        super().forget_derived()
        for t in self.transforms:
            t.forget_derived()

    @property
    def is_orthogonal(self) -> bool:
        return all(t.is_orthogonal for t in self.transforms)

    @property
    def is_diagonal(self) -> bool:
        # Sufficient, not necessary (P·P⁻¹ is diagonal too); simplify() first to catch those.
        return all(t.is_diagonal for t in self.transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]

    def simplify(self) -> Transform:
        """An equivalent transform with fewer parts, using only exact rewrites.

        Drops identities, cancels a transform followed by its inverse (the
        linked ``.inv`` object or an equal one), and merges adjacent
        permutations and adjacent scales. Returns an atom when one remains and
        ``Identity`` when nothing does.
        """
        parts = [t.simplify() for t in self.transforms]
        while True:
            # Cancel first: merging S·S' before seeing S'⁻¹ would turn an exact
            # cancellation into a product that is only 1 up to rounding.
            shorter = _merge_pass(_cancel_pass(parts))
            if len(shorter) == len(parts):
                break
            parts = shorter
        if not parts:
            return Identity(self.size)
        if len(parts) == 1:
            return parts[0]
        return Compose(parts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Compose":
        return Compose([t.to(device=device, dtype=dtype) for t in self.transforms])

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Compose", "transforms": [t.state_dict() for t in self.transforms]}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Compose":
        from quantcompose.transforms.serialize import from_state_dict

        return cls([from_state_dict(s) for s in state["transforms"]])

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def _cancel_pass(parts: list[Transform]) -> list[Transform]:
    """Drop identities and inverse pairs; a stack also removes nested pairs like A·B·B⁻¹·A⁻¹."""
    stack: list[Transform] = []
    for t in parts:
        if isinstance(t, Identity):
            continue
        if stack and _cancels(stack[-1], t):
            stack.pop()
        else:
            stack.append(t)
    return stack


def _merge_pass(parts: list[Transform]) -> list[Transform]:
    """Merge runs of adjacent permutations and of adjacent scales; drop merges that come out trivial."""
    out: list[Transform] = []
    for t in parts:
        merged = _merge(out[-1], t) if out else None
        if merged is None:
            out.append(t)
            continue
        out.pop()
        merged = merged.simplify()
        if not isinstance(merged, Identity):
            out.append(merged)
    return out


def _cancels(a: Transform, b: Transform) -> bool:
    """True when ``b`` is exactly ``a``'s inverse: the linked object, or equal parameters."""
    if a.__dict__.get("_inv_cache") is b or b.__dict__.get("_inverse_of") is a or a.__dict__.get("_inverse_of") is b:
        return True
    if type(a) is not type(b):
        return False
    return a.inv == b


def _merge(a: Transform, b: Transform) -> Transform | None:
    """One atom equal to ``a`` then ``b``, when that is exact; else None."""
    if isinstance(a, Permutation) and isinstance(b, Permutation):
        return a @ b
    if isinstance(a, Scale) and isinstance(b, Scale):
        # Multiply in the wider dtype so nothing is lost to the narrower one.
        dtype = torch.promote_types(a.factors.dtype, b.factors.dtype)
        try:
            return Scale(a.factors.to(dtype) * b.factors.to(device=a.factors.device, dtype=dtype))
        except TransformError:  # the product under/overflowed: keep the two scales apart
            return None
    return None
