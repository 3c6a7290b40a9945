"""Host-side preparation of the online transform for the fused activation kernel.

Pure PyTorch (no Triton): :func:`prepare_transform` turns the plain tensors of
``T = diag(scale) · blockdiag(rot1) · P(perm) · blockdiag(rot2)`` into the small
tables the kernel reads.  Build it once per layer (``QuantLinear``) and pass it
as ``plan=`` to :func:`quantcompose_kernels.fused_transform_quantize`.

The kernel always produces the output in *output blocks*: contiguous ranges
``[o_start, o_start + width)`` of output channels (``width ≤ 128``), each of
which is ``u_blk = z_blk · C_blk`` where ``z_blk`` is a ``width``-wide slice of
a *source* (``C_blk`` may be absent: then ``u_blk = z_blk · diag(mul)``).
Three modes, picked automatically from the structure of ``T``:

``local`` (mode 0)
    Every output block depends on one contiguous range of input channels
    (``x[:, src_start : src_start + width]``).  This is the case for scale
    only, rotations without a permutation when the block boundaries line up
    (QuaRot Hadamard, DuQuant without permutation, ``rot1`` and ``rot2`` of
    equal or nested block sizes), and for permutations that stay inside blocks
    or move whole blocks.  ``scale``, ``rot1``, ``perm`` and ``rot2`` are
    folded into one dense ``width×width`` matrix per block on the host (in
    float64), so the kernel does a single ``tl.dot`` per block straight from
    the input rows: no intermediate leaves registers.  Found by a union-find
    over the block / permutation dependency graph.
``gather`` (mode 1)
    No ``rot1`` but a permutation: the output block gathers its input
    channels ``x[:, perm[o_start:o_start+width]]`` directly from the input rows
    (scale folded into the rows of ``rot2``'s block, or applied as ``mul``).
``general`` (mode 2)
    ``rot1`` followed by a permutation that mixes ``rot1``'s blocks (DuQuant's
    zigzag permutation).  Then *every* output block of ``rot2`` depends on the
    whole row of ``y = x · diag(scale) · rot1``, so ``y`` must exist for the
    full width before the first output block can be formed.  The kernel
    computes ``y`` block by block with tensor-core dots into a small
    per-program staging buffer (channel-major, ``BLOCK_M`` rows, reused across
    the row tiles of a persistent grid so it stays L2-resident), synchronizes
    the CTA, and then gathers the permuted channels from it for ``rot2``.  The
    alternative of recomputing ``rot1`` per output block costs
    ``O(width)`` instead of ``O(block)`` multiply-adds per element, and a
    register-resident full row does not fit for widths like 11008.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .reference import BlocksLike, normalize_blocks

__all__ = ["MAX_BLOCK", "FusedTransformPlan", "prepare_transform"]

#: largest block of rot1 / rot2 (and largest output block) the kernel handles.
MAX_BLOCK = 128
#: width of output chunks when no matrix defines the blocks.
_CHUNK = 128
#: small blocks are merged (block-diagonally) up to this width: a 16-wide dot wastes the tensor cores,
#: while merging wider blocks would only add multiply-adds with zeros.
_MERGE_CAP = 64

MODE_LOCAL, MODE_GATHER, MODE_GENERAL = 0, 1, 2
_MODE_NAMES = {MODE_LOCAL: "local", MODE_GATHER: "gather", MODE_GENERAL: "general"}


def _pow2_at_least(v: int, lo: int = 16) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


@dataclass
class FusedTransformPlan:
    """Tables for the fused kernel (float64 / int64 masters on the CPU).

    Use :meth:`tensors` to get device copies in the kernel's operand dtype
    (cached per ``(device, dtype)``).
    """

    n: int
    mode: int
    # output blocks (stage 2)
    o_start: torch.Tensor                 # (NB2,) int64
    o_width: torch.Tensor                 # (NB2,) int64
    ow: int                               # padded block width (power of two ≥ 16)
    src_start: Optional[torch.Tensor]     # (NB2,) mode local: first input channel of the block
    gidx: Optional[torch.Tensor]          # (NB2, ow) modes gather/general: source channel per output
    c2: Optional[torch.Tensor]            # (NB2, ow, ow) per-block matrix, zero padded
    mul: Optional[torch.Tensor]           # (n,) per-output-channel factor when there is no matrix
    # stage 1 (mode general): y = x · diag(scale) · rot1, block by block
    b1_start: Optional[torch.Tensor] = None   # (NB1,)
    b1_width: Optional[torch.Tensor] = None   # (NB1,)
    sb1: int = 16
    c1: Optional[torch.Tensor] = None          # (NB1, sb1, sb1)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def mode_name(self) -> str:
        return _MODE_NAMES[self.mode]

    @property
    def num_out_blocks(self) -> int:
        return int(self.o_start.numel())

    @property
    def int4_ok(self) -> bool:
        """All output blocks start and end on even channels (needed to pack two per byte)."""
        return bool(((self.o_start % 2) == 0).all() and ((self.o_width % 2) == 0).all())

    @property
    def aligned16(self) -> bool:
        """All block starts are multiples of 16 (lets the kernel vectorize its loads / stores)."""
        starts = [self.o_start]
        if self.src_start is not None:
            starts.append(self.src_start)
        if self.b1_start is not None:
            starts.append(self.b1_start)
        return all(bool(((t % 16) == 0).all()) for t in starts)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict:
        """Device tensors for the kernel; matrices in ``dtype`` (the dot operand dtype)."""
        key = (torch.device(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit

        def i32(t):
            return None if t is None else t.to(device=device, dtype=torch.int32).contiguous()

        def mat(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()

        out = {
            "o_start": i32(self.o_start),
            "o_width": i32(self.o_width),
            "src_start": i32(self.src_start),
            "gidx": i32(self.gidx),
            "c2": mat(self.c2),
            "mul": None if self.mul is None else self.mul.to(device=device, dtype=torch.float32).contiguous(),
            "b1_start": i32(self.b1_start),
            "b1_width": i32(self.b1_width),
            "c1": mat(self.c1),
        }
        self._cache[key] = out
        return out


# --------------------------------------------------------------------------- helpers


def _starts(sizes: list[int]) -> list[int]:
    s, out = 0, []
    for w in sizes:
        out.append(s)
        s += w
    return out


def _merge_ranges(sizes: list[int], cap: int) -> list[tuple[int, int, list[int]]]:
    """Greedily merge consecutive ranges (given by sizes) while the total stays ≤ cap.

    Returns ``(start, width, member_indices)``.
    """
    out: list[tuple[int, int, list[int]]] = []
    start = 0
    for i, w in enumerate(sizes):
        if out and out[-1][1] + w <= cap:
            s0, w0, mem = out[-1]
            out[-1] = (s0, w0 + w, mem + [i])
        else:
            out.append((start, w, [i]))
        start += w
    return out


def _chunks(n: int, cap: int = _CHUNK) -> list[tuple[int, int]]:
    return [(s, min(cap, n - s)) for s in range(0, n, cap)]


def _check_perm(perm: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(perm, torch.Tensor) or perm.shape != (n,):
        raise ValueError(f"perm must be an index tensor of shape ({n},).")
    p = perm.detach().to("cpu", torch.int64)
    if not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise ValueError("perm is not a permutation of 0..n-1.")
    return p


def _blockdiag64(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*[b.detach().to("cpu", torch.float64) for b in blocks])


class _DSU:
    def __init__(self, n: int):
        self.p = list(range(n))

    def find(self, a: int) -> int:
        p = self.p
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[rb] = ra


def _local_components(n, a_sizes, perm, b_sizes):
    """Connected components of the dependency graph, or None if some is not local.

    Local: each component's input channels and output channels are contiguous
    ranges of at most MAX_BLOCK.  Returns a list of ``(x_start, o_start, width)``
    sorted by ``o_start``.
    """
    na, nb = len(a_sizes), len(b_sizes)
    a_of = torch.repeat_interleave(torch.arange(na), torch.tensor(a_sizes)).tolist()
    b_of = torch.repeat_interleave(torch.arange(nb), torch.tensor(b_sizes)).tolist()
    src = perm.tolist() if perm is not None else list(range(n))
    dsu = _DSU(na + nb)
    for c in range(n):
        dsu.union(a_of[src[c]], na + b_of[c])
    a_st, b_st = _starts(a_sizes), _starts(b_sizes)
    comps: dict[int, list[list[int]]] = {}
    for i in range(na):
        comps.setdefault(dsu.find(i), [[], []])[0].append(i)
    for j in range(nb):
        comps.setdefault(dsu.find(na + j), [[], []])[1].append(j)
    out = []
    for a_ids, b_ids in comps.values():
        xs = min(a_st[i] for i in a_ids)
        xw = sum(a_sizes[i] for i in a_ids)
        xe = max(a_st[i] + a_sizes[i] for i in a_ids)
        os_ = min(b_st[j] for j in b_ids)
        ow = sum(b_sizes[j] for j in b_ids)
        oe = max(b_st[j] + b_sizes[j] for j in b_ids)
        if xe - xs != xw or oe - os_ != ow or xw != ow or xw > MAX_BLOCK:
            return None
        out.append((xs, os_, xw))
    out.sort(key=lambda t: t[1])
    return out


# --------------------------------------------------------------------------- main entry


def prepare_transform(
    n: int,
    *,
    scale: Optional[torch.Tensor] = None,
    rot1: Optional[BlocksLike] = None,
    perm: Optional[torch.Tensor] = None,
    rot2: Optional[BlocksLike] = None,
) -> FusedTransformPlan:
    """Compile ``T = diag(scale) · blockdiag(rot1) · P(perm) · blockdiag(rot2)`` of width ``n``.

    * ``scale``: ``(n,)`` factors (``Scale.factors``), or ``None``.
    * ``rot1`` / ``rot2``: ``BlockRotation.blocks`` (list of square matrices
      along the diagonal, sizes summing to ``n``, each ≤ 128; the last may be
      shorter), a ``(nblocks, b, b)`` tensor, or one square matrix.  A Hadamard
      of block size ``b`` is the block rotation with blocks ``H_b/√b`` (times
      its signs), so dense block rotations cover it.
    * ``perm``: ``(n,)`` indices with ``(x·P)[..., c] = x[..., perm[c]]``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"width n={n!r} must be a positive integer.")
    s = None
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.shape != (n,):
            raise ValueError(f"scale must be a tensor of shape ({n},).")
        s = scale.detach().to("cpu", torch.float64)
    A = normalize_blocks(rot1, n, "rot1")
    B = normalize_blocks(rot2, n, "rot2")
    for name, blocks in (("rot1", A), ("rot2", B)):
        if blocks is not None:
            big = max(b.shape[0] for b in blocks)
            if big > MAX_BLOCK:
                raise ValueError(f"{name} has a block of size {big}; the fused kernel supports blocks up to "
                                 f"{MAX_BLOCK}.")
    P = _check_perm(perm, n) if perm is not None else None
    if P is not None and torch.equal(P, torch.arange(n)):
        P = None

    a_sizes = [b.shape[0] for b in A] if A is not None else None
    b_sizes = [b.shape[0] for b in B] if B is not None else None

    # ---------------------------------------------------------------- local
    if A is None and P is None:
        if B is None:
            ranges = _chunks(n)
            return _finish_local(n, [(st, st, w) for st, w in ranges], s, None, None, None, mats=False)
        comps = [(st, st, w) for st, w, _ in _merge_ranges(b_sizes, _MERGE_CAP)]
        return _finish_local(n, comps, s, None, None, B, mats=True)
    if A is not None:
        comps = _local_components(n, a_sizes, P, b_sizes if B is not None else [1] * n)
        if comps is not None:
            merged = []
            for xs, os_, w in comps:
                if merged and merged[-1][0] + merged[-1][2] == xs and merged[-1][2] + w <= _MERGE_CAP:
                    mx, mo, mw = merged[-1]
                    merged[-1] = (mx, mo, mw + w)
                else:
                    merged.append((xs, os_, w))
            return _finish_local(n, merged, s, A, P, B, mats=True)

    # ---------------------------------------------------------------- gather / general
    if B is not None:
        out_blocks = [(st, w, mem) for st, w, mem in _merge_ranges(b_sizes, _MERGE_CAP)]
        b_st = _starts(b_sizes)
    else:
        out_blocks = [(st, w, None) for st, w in _chunks(n)]
    src = P if P is not None else torch.arange(n)
    ow = _pow2_at_least(max(w for _, w, _ in out_blocks))
    nb2 = len(out_blocks)
    gidx = torch.zeros(nb2, ow, dtype=torch.int64)
    c2 = torch.zeros(nb2, ow, ow, dtype=torch.float64) if B is not None else None
    for j, (st, w, mem) in enumerate(out_blocks):
        gidx[j, :w] = src[st:st + w]
        if B is not None:
            blk = _blockdiag64([B[i] for i in mem])
            assert b_st[mem[0]] == st and blk.shape[0] == w
            if A is None and s is not None:
                blk = s[src[st:st + w]][:, None] * blk     # diag(s[perm]) · rot2
            c2[j, :w, :w] = blk
    o_start = torch.tensor([st for st, _, _ in out_blocks], dtype=torch.int64)
    o_width = torch.tensor([w for _, w, _ in out_blocks], dtype=torch.int64)

    if A is None:  # gather straight from x
        mul = s[src] if (s is not None and B is None) else None
        return FusedTransformPlan(n=n, mode=MODE_GATHER, o_start=o_start, o_width=o_width, ow=ow,
                                  src_start=None, gidx=gidx, c2=c2, mul=mul)

    sb1 = _pow2_at_least(max(a_sizes))
    c1 = torch.zeros(len(A), sb1, sb1, dtype=torch.float64)
    a_st = _starts(a_sizes)
    for k, blk in enumerate(A):
        w = blk.shape[0]
        m = blk.detach().to("cpu", torch.float64)
        if s is not None:
            m = s[a_st[k]:a_st[k] + w][:, None] * m        # diag(s) · rot1
        c1[k, :w, :w] = m
    return FusedTransformPlan(n=n, mode=MODE_GENERAL, o_start=o_start, o_width=o_width, ow=ow,
                              src_start=None, gidx=gidx, c2=c2, mul=None,
                              b1_start=torch.tensor(a_st, dtype=torch.int64),
                              b1_width=torch.tensor(a_sizes, dtype=torch.int64), sb1=sb1, c1=c1)


def _finish_local(n, comps, s, A, P, B, *, mats: bool) -> FusedTransformPlan:
    """Mode local: one dense matrix per output block (or just ``mul``)."""
    ow = _pow2_at_least(max(w for _, _, w in comps))
    nb2 = len(comps)
    o_start = torch.tensor([o for _, o, _ in comps], dtype=torch.int64)
    o_width = torch.tensor([w for _, _, w in comps], dtype=torch.int64)
    src_start = torch.tensor([x for x, _, _ in comps], dtype=torch.int64)
    if not mats:
        return FusedTransformPlan(n=n, mode=MODE_LOCAL, o_start=o_start, o_width=o_width, ow=ow,
                                  src_start=src_start, gidx=None, c2=None, mul=s)
    a_sizes = [b.shape[0] for b in A] if A is not None else None
    b_sizes = [b.shape[0] for b in B] if B is not None else None
    a_st = _starts(a_sizes) if A is not None else None
    b_st = _starts(b_sizes) if B is not None else None
    c2 = torch.zeros(nb2, ow, ow, dtype=torch.float64)
    for j, (xs, os_, w) in enumerate(comps):
        e = torch.eye(w, dtype=torch.float64)
        if s is not None:
            e = s[xs:xs + w][:, None] * e
        if A is not None:
            for k, blk in enumerate(A):
                if xs <= a_st[k] < xs + w:
                    lo, hi = a_st[k] - xs, a_st[k] - xs + blk.shape[0]
                    e[:, lo:hi] = e[:, lo:hi] @ blk.detach().to("cpu", torch.float64)
        if P is not None:
            idx = P[os_:os_ + w] - xs
            assert bool((idx >= 0).all() and (idx < w).all())
            e = e[:, idx]
        else:
            assert xs == os_
        if B is not None:
            for k, blk in enumerate(B):
                if os_ <= b_st[k] < os_ + w:
                    lo, hi = b_st[k] - os_, b_st[k] - os_ + blk.shape[0]
                    e[:, lo:hi] = e[:, lo:hi] @ blk.detach().to("cpu", torch.float64)
        c2[j, :w, :w] = e
    return FusedTransformPlan(n=n, mode=MODE_LOCAL, o_start=o_start, o_width=o_width, ow=ow,
                              src_start=src_start, gidx=None, c2=c2, mul=None)
