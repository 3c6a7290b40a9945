"""Block-diagonal orthogonal maps (DuQuant / QuaRot-style local rotations)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from quantcompose.errors import TransformError
from quantcompose.transforms._util import orthogonality_tolerance
from quantcompose.transforms.base import TRANSFORM_REGISTRY, Transform, cast_like


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive same-size blocks, applied with one batched matmul."""

    start: int  # first channel
    count: int  # number of blocks
    block: int  # block size
    matrix: torch.Tensor  # (b, b) when every block in the run is the same matrix, else (count, b, b)

    @property
    def shared(self) -> bool:
        return self.matrix.dim() == 2


def _segments(blocks: list[torch.Tensor]) -> tuple[_Segment, ...]:
    """Group ``blocks`` into runs of equal size; a run of identical blocks keeps one shared matrix."""
    segments: list[_Segment] = []
    start = 0
    i = 0
    while i < len(blocks):
        b = blocks[i].shape[0]
        j = i
        while j < len(blocks) and blocks[j].shape[0] == b:
            j += 1
        run = blocks[i:j]
        first = run[0]
        # Fast path: `uniform` passes the same object; equal values count too.
        if all(r is first or torch.equal(r, first) for r in run[1:]):
            matrix = first
        else:
            matrix = torch.stack(run)
        segments.append(_Segment(start, j - i, b, matrix))
        start += b * (j - i)
        i = j
    return tuple(segments)


def random_orthogonal(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    count: int | None = None,
) -> torch.Tensor:
    """A Haar-random ``n×n`` orthogonal matrix, or ``count`` of them stacked as ``(count, n, n)``.

    QR of a Gaussian with the signs fixed by ``diag(R)`` (without the fix the
    result is not uniformly distributed). One batched QR serves all ``count``
    blocks: per-call overhead dominates for small blocks.
    """
    g = torch.randn(count or 1, n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d[d == 0] = 1
    out = (q * d.unsqueeze(-2)).to(dtype).contiguous()  # QR returns column-major storage
    return out if count is not None else out[0]


def _check_orthogonal(blocks: list[tuple[int, torch.Tensor]]) -> None:
    """Raise a TransformError naming the first block (by position) with ``|B·Bᵀ − I|`` over tolerance.

    Blocks of one size, dtype and device are checked in one batched float64
    matmul (computing in float64 adds no rounding of its own).
    """
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, t in blocks:
        groups.setdefault((t.shape[0], t.dtype, t.device), []).append((i, t))
    failures = []
    for (n, dtype, device), members in groups.items():
        stack = torch.stack([t for _, t in members]).to(torch.float64)
        eye = torch.eye(n, dtype=torch.float64, device=device)
        err = (stack @ stack.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
        err = torch.where(torch.isfinite(stack).all(-1).all(-1), err, torch.full_like(err, float("inf")))
        tol = orthogonality_tolerance(dtype)
        for (i, _), e in zip(members, err.tolist()):
            if not e <= tol:
                failures.append((i, n, dtype, e, tol))
    if failures:
        i, n, dtype, e, tol = min(failures)
        others = f" ({len(failures) - 1} more blocks fail too)" if len(failures) > 1 else ""
        raise TransformError(
            f"Block {i} ({n}×{n}, {dtype}) is not orthogonal: max |B·Bᵀ − I| = {e:.3g} exceeds "
            f"{tol:.1g}{others}. Orthonormalize it (e.g. torch.linalg.qr) or use Compose with a "
            "Scale for non-orthogonal maps."
        )


class BlockDiagonal(Transform):
    """Square ``blocks`` along the diagonal: what :class:`BlockRotation` and :class:`BlockLinear` share.

    Block sizes may differ; typically all are ``b`` and the last is shorter
    (e.g. width 576 = 4×128 + 64). ``forward`` reshapes each run of equal-size
    blocks to ``(..., count, b)`` and applies one batched matmul. Subclasses
    say what the blocks must satisfy (``_check_blocks``) and how to invert them.
    """

    blocks: list[torch.Tensor]

    def __init__(self, blocks: Sequence[torch.Tensor]) -> None:
        checked = self._validated(blocks)
        self._init(checked)

    def _init(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = blocks
        self.size = sum(b.shape[0] for b in blocks)
        self._segments = _segments(blocks)
        self._freeze()

    @classmethod
    def _check_blocks(cls, blocks: list[tuple[int, torch.Tensor]]) -> None:
        """Raise a TransformError for a block that breaks the subclass's contract."""

    @classmethod
    def _validated(cls, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        name = cls.__name__
        if isinstance(blocks, torch.Tensor):
            raise TransformError(
                f"{name} takes a sequence of square blocks; for one matrix repeated along the "
                f"diagonal use {name}.uniform(matrix, size)."
            )
        blocks = list(blocks)
        if not blocks:
            raise TransformError(f"{name} needs at least one block.")
        out: list[torch.Tensor] = []
        seen: dict[int, torch.Tensor] = {}  # id(original) -> converted, so shared blocks stay shared
        unique: list[tuple[int, torch.Tensor]] = []
        for i, b in enumerate(blocks):
            if id(b) in seen:
                out.append(seen[id(b)])
                continue
            if not isinstance(b, torch.Tensor):
                raise TransformError(f"Block {i} is a {type(b).__name__}, expected a torch.Tensor.")
            if b.dim() != 2 or b.shape[0] != b.shape[1] or b.shape[0] == 0:
                raise TransformError(f"Block {i} must be a non-empty square matrix, got shape {tuple(b.shape)}.")
            t = b.detach()
            if not t.is_floating_point():
                t = t.to(torch.float64)
            # Contiguous copy: matmul rounding depends on memory layout, and a saved
            # (contiguous) copy must reproduce this transform bit for bit.
            t = t.clone(memory_format=torch.contiguous_format)
            seen[id(b)] = t
            unique.append((i, t))
            out.append(t)
        cls._check_blocks(unique)
        return out

    @classmethod
    def _trusted(cls, blocks: list[torch.Tensor]):
        obj = cls.__new__(cls)
        obj._init(blocks)
        return obj

    @classmethod
    def uniform(cls, matrix: torch.Tensor, size: int, tail: torch.Tensor | None = None):
        """``matrix`` repeated along the diagonal of a width-``size`` map.

        When ``size`` is not a multiple of the block size the remaining channels
        get ``tail`` (a square matrix of that size) or the identity.
        """
        name = cls.__name__
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise TransformError(f"{name}.uniform needs a square matrix, got {getattr(matrix, 'shape', matrix)}.")
        b = matrix.shape[0]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise TransformError(f"{name}.uniform: size must be a positive int, got {size!r}.")
        full, rem = divmod(size, b)
        if tail is not None and (not isinstance(tail, torch.Tensor) or tuple(tail.shape) != (rem, rem) or rem == 0):
            raise TransformError(
                f"{name}.uniform: width {size} with blocks of {b} leaves a tail of {rem} channels, "
                f"so tail must be a {rem}×{rem} matrix" + (" (or None)" if rem else "; pass tail=None")
                + f", got {tuple(tail.shape) if isinstance(tail, torch.Tensor) else tail!r}."
            )
        blocks: list[torch.Tensor] = [matrix] * full  # the same object: one shared validated copy
        if rem:
            dtype = matrix.dtype if matrix.is_floating_point() else torch.float64
            blocks.append(tail if tail is not None else torch.eye(rem, dtype=dtype, device=matrix.device))
        return cls(blocks)

    # ------------------------------------------------------------------ application
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for seg in self._segments:
            xs = x[..., seg.start : seg.start + seg.count * seg.block]
            xs = xs.reshape(*x.shape[:-1], seg.count, seg.block)
            m = cast_like(seg.matrix, x)
            if seg.shared:
                ys = xs @ m
            else:
                # (..., k, b) × (k, b, c) -> (..., k, c): block k multiplies channel group k.
                ys = torch.einsum("...kb,kbc->...kc", xs, m)
            outs.append(ys.reshape(*x.shape[:-1], seg.count * seg.block))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _map_blocks(self, fn) -> list[torch.Tensor]:
        """``fn`` of each block, computed once per distinct block so shared blocks stay shared."""
        done: dict[int, torch.Tensor] = {}
        out = []
        for b in self.blocks:
            if id(b) not in done:
                done[id(b)] = fn(b)
            out.append(done[id(b)])
        return out

    @property
    def is_diagonal(self) -> bool:
        return all(bool((b == torch.diag(torch.diagonal(b))).all()) for b in self.blocks)

    @property
    def block_sizes(self) -> list[int]:
        """The size of each diagonal block, in order."""
        return [b.shape[0] for b in self.blocks]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        out = self._map_blocks(lambda b: b.to(device=device, dtype=dtype))
        if dtype is None or all(b.dtype == dtype for b in self.blocks):
            return type(self)._trusted(out)  # same values, only moved: the contract still holds
        # Re-validate: casting to a low precision may break the contract (orthogonality) beyond tolerance.
        return type(self)(out)

    def state_dict(self) -> dict[str, Any]:
        # Shared blocks appear as the same tensor object; flatten_state stores them once.
        return {"type": type(self).__name__, "blocks": list(self.blocks)}

    @classmethod
    def _from_state(cls, state: dict[str, Any]):
        return cls(state["blocks"])

    def __repr__(self) -> str:
        sizes = self.block_sizes
        desc = f"{len(sizes)} blocks of {sizes[0]}" if len(set(sizes)) == 1 else f"blocks {sizes}"
        return f"{type(self).__name__}(size={self.size}, {desc}, dtype={self.blocks[0].dtype})"


class BlockRotation(BlockDiagonal):
    """A block-diagonal orthogonal map: square orthogonal ``blocks`` along the diagonal."""

    @classmethod
    def _check_blocks(cls, blocks: list[tuple[int, torch.Tensor]]) -> None:
        _check_orthogonal(blocks)

    @classmethod
    def random(
        cls,
        size: int,
        block_size: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> "BlockRotation":
        """Independent Haar-random orthogonal blocks of ``block_size`` (the last one shorter if needed)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise TransformError(f"BlockRotation.random: size must be a positive int, got {size!r}.")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise TransformError(f"BlockRotation.random: block_size must be a positive int, got {block_size!r}.")
        full, rem = divmod(size, block_size)
        # Clone each block out of the batch: separate storage, as safetensors requires.
        blocks = [b.clone() for b in random_orthogonal(block_size, generator, dtype, count=full)] if full else []
        if rem:
            blocks.append(random_orthogonal(rem, generator, dtype))
        return cls._trusted(blocks)

    def _make_inverse(self) -> "BlockRotation":
        # Orthogonal blocks: the inverse is the block-wise transpose.
        return BlockRotation._trusted(self._map_blocks(lambda b: b.T.contiguous()))

    @property
    def is_orthogonal(self) -> bool:
        return True


class BlockLinear(BlockDiagonal):
    """A block-diagonal invertible map whose blocks need not be orthogonal.

    What a :class:`BlockRotation` becomes once its blocks are rounded to a
    16-bit storage dtype (``quantcompose.storage``): the rounded blocks are
    no longer exactly orthogonal, so the inverse is computed, block by block
    in float64, instead of transposed, and a weight folded with it stays
    exact for the map that really runs.
    """

    @classmethod
    def _check_blocks(cls, blocks: list[tuple[int, torch.Tensor]]) -> None:
        for i, b in blocks:
            if not bool(torch.isfinite(b).all()):
                raise TransformError(f"BlockLinear block {i} ({b.shape[0]}×{b.shape[0]}) has NaN or inf entries.")

    def _make_inverse(self) -> "BlockLinear":
        def invert(b: torch.Tensor) -> torch.Tensor:
            inverse = torch.linalg.inv_ex(b.to(torch.float64))
            if int(inverse.info) != 0 or not bool(torch.isfinite(inverse.inverse).all()):
                raise TransformError(
                    f"BlockLinear has a singular {b.shape[0]}×{b.shape[0]} block: the map is not invertible."
                )
            return inverse.inverse.contiguous()

        return BlockLinear._trusted(self._map_blocks(invert))

    def _make_transpose(self) -> "BlockLinear":
        return BlockLinear._trusted(self._map_blocks(lambda b: b.T.contiguous()))

    @property
    def is_orthogonal(self) -> bool:
        return False


# The shared base is not a transform one can save or load by itself.
TRANSFORM_REGISTRY.pop("BlockDiagonal", None)
