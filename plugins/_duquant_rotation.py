"""DuQuant's math as plain-tensor functions: smoothing factors, greedy block
rotations and the zigzag permutation.

Everything here follows Lin et al., "DuQuant: Distributing Outliers via Dual
Transformation Makes Stronger Quantized LLMs" (NeurIPS 2024, arXiv 2406.01721),
Sec. 3.2, in the row-vector convention of ``docs/architecture.md``: an
activation row ``x`` becomes ``x·M``. Nothing in this module knows about the
transform atoms; ``plugins/duquant.py`` wires the results into them.
"""

from __future__ import annotations

import math

import torch

from quantcompose.threads import limited_threads

#: Intra-op threads for the greedy search loop. Its ops are small (a few
#: 128×128 matmuls per step) and sequential, so extra threads buy little, and
#: on a shared, oversubscribed CPU OpenMP spin-waiting made a 0.3 s fit take
#: 1-30 s with 2 threads. Set to None to leave torch's setting alone.
SEARCH_THREADS: int | None = 1


#: Lower clamp for activation / weight maxima before the power law (the
#: reference implementation's CLIPMIN), and the range the factors are kept in.
SMOOTH_EPS = 1e-5
SMOOTH_MIN = 1e-5
SMOOTH_MAX = 1e5


# ---------------------------------------------------------------------------- smoothing
def smooth_factors(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """SmoothQuant-style per-channel factors ``s_j = max|X_j|^α / max|W_j|^(1−α)``.

    DuQuant (Sec. 3.2, "smooth" step, following SmoothQuant) divides the
    activation by ``s`` (``Scale(1/s)``) and multiplies the weight's input
    channels by ``s`` before the rotations. Maxima are made finite and clamped
    to at least ``SMOOTH_EPS``; the result is computed in float64 in log space
    and clamped to ``[SMOOTH_MIN, SMOOTH_MAX]``. A channel that is dead on both
    sides (both maxima ``<= SMOOTH_EPS``) gets ``s = 1``. Returns float64,
    always finite and positive.
    """
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"smoothing strength alpha={alpha!r} must lie in [0, 1] (the paper uses 0.5-0.6).")
    a = torch.as_tensor(act_absmax).detach().to(torch.float64).abs().flatten()
    w = torch.as_tensor(weight_absmax).detach().to(torch.float64).abs().flatten()
    if a.shape != w.shape:
        raise ValueError(
            f"act_absmax has {a.numel()} channels but weight_absmax has {w.numel()}; "
            "both must be per input channel of the same place."
        )
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0)
    dead = (a <= SMOOTH_EPS) & (w <= SMOOTH_EPS)
    a = a.clamp(min=SMOOTH_EPS)
    w = w.clamp(min=SMOOTH_EPS)
    s = torch.exp(alpha * a.log() - (1.0 - alpha) * w.log()).clamp(SMOOTH_MIN, SMOOTH_MAX)
    return torch.where(dead, torch.ones_like(s), s)


# ---------------------------------------------------------------------------- blocks
def block_sizes(width: int, block_size: int) -> list[int]:
    """Diagonal block widths covering ``width``: full blocks, then a shorter tail.

    ``block_sizes(576, 128) == [128, 128, 128, 128, 64]``; a width smaller than
    ``block_size`` is one block of that width.
    """
    if width < 1 or block_size < 1:
        raise ValueError(f"width={width} and block_size={block_size} must both be positive.")
    full, tail = divmod(width, block_size)
    return [block_size] * full + ([tail] if tail else [])


# ---------------------------------------------------------------------------- rotation pieces
def uniform_first_row_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthogonal ``n×n`` matrix whose first row is uniform, ``1/√n`` everywhere.

    This is the paper's ``R̃``: applied to a row whose outlier sits at position
    0, it spreads that outlier evenly over all ``n`` coordinates. We use the
    Householder reflection ``I − 2vvᵀ/vᵀv`` with ``v = e₁ − 1/√n`` (symmetric,
    maps ``e₁`` to the uniform vector); the reference code uses a chain of
    Givens rotations with the same first-row property.
    """
    eye = torch.eye(n, dtype=dtype)
    if n == 1:
        return eye
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=dtype)
    v = eye[0] - u
    return eye - 2.0 * torch.outer(v, v) / torch.dot(v, v)


def random_orthogonal(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random ``n×n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    if n <= 0:
        return torch.eye(0, dtype=dtype)
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(dtype)


def step_base_matrix(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One greedy step's rotation before the channel exchange: ``diag(1, Q')·R̃``.

    ``R̃`` has a uniform first row (:func:`uniform_first_row_matrix`) and
    ``Q'`` is a Haar-random rotation of the other ``n−1`` coordinates, which
    the paper adds "to increase the randomness" (a Householder ``R̃`` alone is
    an involution, so repeated steps would undo each other). We put ``Q'``
    *before* ``R̃`` so that the product keeps the paper's defining property,
    a uniform first row: the outlier moved to position 0 is spread over the
    block exactly evenly. The reference code multiplies ``Q`` after ``R̃``,
    which re-randomises that spread: on synthetic planted outliers the order
    used here reached about half the block maximum of the reference order (on
    SmolLM2-135M activations the W4A4 layer error was the same for both).
    float64, orthogonal.
    """
    q = torch.eye(n, dtype=torch.float64)
    if n > 2:
        q[1:, 1:] = random_orthogonal(n - 1, generator)
    return q @ uniform_first_row_matrix(n)


def nearest_orthogonal(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest ``m`` (polar factor ``U·Vᵀ`` of its SVD), float64."""
    u, _, vh = torch.linalg.svd(m.to(torch.float64))
    return u @ vh


def _orthonormalize(m: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Polar factors of a batch ``(count, n, n)`` of *nearly* orthogonal matrices, float64.

    Newton–Schulz iterations ``X ← X(3I − XᵀX)/2`` converge quadratically
    when ``‖I − XᵀX‖ < 1``: a float32 product of a few hundred rotations
    (error ~1e-6) is orthogonal to ~1e-15 after three, at a fraction of an
    SVD's cost. Anything further off falls back to :func:`nearest_orthogonal`.
    """
    x = m.to(torch.float64)
    eye = torch.eye(x.shape[-1], dtype=torch.float64)
    if float((x.transpose(-1, -2) @ x - eye).abs().amax()) > 1e-2:
        return torch.stack([nearest_orthogonal(b) for b in x])
    for _ in range(iterations):
        x = 0.5 * x @ (3.0 * eye - x.transpose(-1, -2) @ x)
    return x


# ---------------------------------------------------------------------------- greedy rotation
def _as_sample(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() == 1:
        x = x[None, :]
    if x.dim() != 2:
        raise ValueError(
            f"expected a per-channel statistic (in,) or a sample (tokens, in), got shape {tuple(x.shape)}."
        )
    return torch.nan_to_num(x.to(device="cpu", dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)


def greedy_block_rotation(
    x: torch.Tensor,
    block_size: int = 128,
    steps: int = 256,
    generator: torch.Generator | None = None,
    eval_tokens: int | None = 128,
    return_info: bool = False,
):
    """DuQuant's greedy rotation (Sec. 3.2), one orthogonal matrix per diagonal block.

    ``x`` is an activation sample ``(tokens, in)`` (or a per-channel statistic
    ``(in,)``, treated as a single row). Channels are cut into blocks of
    ``block_size`` (the last block may be shorter, see :func:`block_sizes`).
    Within each block, independently, for ``k = 1..steps``:

    1. find the outlier channel ``d(k) = argmax_j max_i |Y_ij|`` of the current
       rotated block ``Y``;
    2. right-multiply by ``E_d · diag(1, Q')R̃ · E_d``: the transposition
       ``E_d`` brings channel ``d`` to position 0, ``Q'`` randomly rotates the
       other channels, ``R̃`` (uniform first row) spreads channel 0 evenly
       over the whole block, and ``E_d`` swaps the labels back (as the
       reference implementation does); see :func:`step_base_matrix`;
    3. record ``M_k = max |Y|``.

    The block keeps the prefix ``R = Π_{k<=n} E_d(k) · diag(1, Q')R̃ · E_d(k)`` with
    ``n = argmin_k M_k`` (``n = 0``, the identity, if no step helps) — the
    paper's "select the rotation with the smallest max". One ``Q'`` is drawn per
    block and reused for all its steps, like the reference's single ``get_rot``
    per call; unlike the reference, which shares one matrix across all blocks,
    each block gets its own (the paper's block-diagonal ``R̂``).

    Scoring: ``max |Y|`` is evaluated on the ``eval_tokens`` sample rows with
    the largest norm inside the block (``None``: all rows). This is exact
    whenever the evaluated max is at least the largest norm among the rows left
    out, since an orthogonal map cannot make an entry exceed its row's norm
    (``info["exact"]``; on real activations this bound is rarely met, but the
    high-norm tokens carry the outliers: on SmolLM2-135M, 128 rows and all
    2048 rows gave the same held-out W4A4 error, at a ~6x lower cost, and the
    plugin's default of 64 rows the same perplexity as 128). The search
    runs in float32 (batched over blocks) and accumulates each block's product
    alongside; the chosen product is re-orthonormalised in float64 (its polar
    factor, the nearest orthogonal matrix), so every returned block is orthogonal to ~1e-15 however
    many steps were taken.

    Returns the list of float64 blocks (sizes per :func:`block_sizes`); with
    ``return_info=True`` also a dict with per-block ``steps_taken``,
    ``max_before``, ``max_after`` (as scored) and ``exact`` (whether the
    token-subset bound above certifies the scored max).
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0.")
    with limited_threads(SEARCH_THREADS):
        blocks, info = _greedy(_as_sample(x), block_size, steps, generator, eval_tokens)
    return (blocks, info) if return_info else blocks


def _greedy(
    sample: torch.Tensor,
    block_size: int,
    steps: int,
    generator: torch.Generator | None,
    eval_tokens: int | None,
) -> tuple[list[torch.Tensor], dict]:
    """The search behind :func:`greedy_block_rotation` (``sample``: float32 CPU)."""
    tokens, width = sample.shape
    sizes = block_sizes(width, block_size)
    nb, bmax = len(sizes), max(sizes)
    k_rows = tokens if eval_tokens is None else max(1, min(int(eval_tokens), tokens))

    # Evaluation rows per block, zero-padded to a common width bmax.
    y = torch.zeros(nb, k_rows, bmax, dtype=torch.float32)
    left_out_norm = torch.zeros(nb, dtype=torch.float64)
    off = 0
    for b, w in enumerate(sizes):
        xb = sample[:, off : off + w]
        off += w
        if k_rows < tokens:
            norms = xb.norm(dim=1)
            top = torch.topk(norms, k_rows + 1, sorted=True)
            rows = top.indices[:k_rows]
            left_out_norm[b] = float(top.values[k_rows])
            xb = xb[rows]
        y[b, :, :w] = xb

    # One diag(1, Q')R̃ per block, padded with identity to bmax (padding columns stay zero).
    base64 = torch.eye(bmax, dtype=torch.float64).repeat(nb, 1, 1)
    for b, w in enumerate(sizes):
        if w > 1:
            base64[b, :w, :w] = step_base_matrix(w, generator)
    base = base64.to(torch.float32)

    acc = torch.eye(bmax, dtype=torch.float32).repeat(nb, 1, 1)  # running product per block
    best = acc.clone()
    bidx = torch.arange(nb)

    def swap0(t: torch.Tensor, d: torch.Tensor) -> None:
        # In place: exchange column 0 and column d[b] of every block b (E_d).
        first = t[bidx, :, 0].clone()
        t[bidx, :, 0] = t[bidx, :, d]
        t[bidx, :, d] = first

    colmax = y.abs().amax(dim=1)  # (nb, bmax)
    cur = colmax.amax(dim=1)
    max_before = cur.clone()
    best_max = cur.clone()
    best_k = torch.zeros(nb, dtype=torch.long)
    trivial = torch.tensor([w <= 1 for w in sizes])
    last_col = torch.tensor(sizes) - 1

    for k in range(1, steps + 1):
        d = torch.minimum(colmax.argmax(dim=1), last_col)  # outlier channel per block
        # Right-multiply by E_d · diag(1, Q')R̃ · E_d.
        swap0(y, d)
        swap0(acc, d)
        y = torch.bmm(y, base)
        acc = torch.bmm(acc, base)
        swap0(y, d)
        swap0(acc, d)
        colmax = y.abs().amax(dim=1)
        cur = colmax.amax(dim=1)
        improved = (cur < best_max) & ~trivial
        if bool(improved.any()):
            best_max = torch.where(improved, cur, best_max)
            best_k = torch.where(improved, torch.full_like(best_k, k), best_k)
            best = torch.where(improved[:, None, None], acc, best)

    # The identity padding keeps each padded product orthogonal, so the whole batch is cleaned at once.
    cleaned = _orthonormalize(best)
    blocks: list[torch.Tensor] = []
    for b, w in enumerate(sizes):
        if int(best_k[b]) == 0:
            blocks.append(torch.eye(w, dtype=torch.float64))
        else:
            blocks.append(cleaned[b, :w, :w].contiguous())
    info = {
        "steps_taken": best_k.tolist(),
        "max_before": max_before.tolist(),
        "max_after": best_max.tolist(),
        "exact": (best_max.double() >= left_out_norm).tolist(),
    }
    return blocks, info


def apply_blocks(x: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """``x·diag(blocks)`` on the last dimension (a plain-tensor BlockRotation)."""
    outs, off = [], 0
    for blk in blocks:
        w = blk.shape[0]
        outs.append(x[..., off : off + w] @ blk.to(dtype=x.dtype, device=x.device))
        off += w
    if off != x.shape[-1]:
        raise ValueError(f"blocks cover {off} channels but x has {x.shape[-1]}.")
    return torch.cat(outs, dim=-1)


# ---------------------------------------------------------------------------- zigzag
def zigzag_permutation(channel_max: torch.Tensor, block_size: int) -> torch.Tensor:
    """DuQuant's zigzag permutation (Sec. 3.2): balance outliers across blocks.

    Channels are sorted by descending ``channel_max`` and dealt to the blocks
    back and forth — blocks ``0, 1, …, K−1, K−1, …, 1, 0, 0, 1, …`` — so each
    block receives a similar share of large channels (the paper's goal: equal
    block means after the first rotation). A full block is skipped, which is
    how the shorter last block gets only its capacity. Within a block,
    channels keep the order they were dealt in (descending magnitude, as in
    the reference). Returns ``indices`` (long, ``(in,)``) for
    ``forward(x) = x[..., indices]``: output position ``p`` reads input
    channel ``indices[p]``.
    """
    cm = torch.as_tensor(channel_max).detach().to(torch.float64).flatten()
    cm = torch.nan_to_num(cm.abs(), nan=0.0, posinf=float("inf"))
    n = cm.numel()
    sizes = block_sizes(n, block_size)
    nblk = len(sizes)
    order = torch.argsort(cm, descending=True, stable=True).tolist()
    dealt: list[list[int]] = [[] for _ in range(nblk)]
    pattern = list(range(nblk)) + list(range(nblk - 1, -1, -1))
    pos = 0
    for ch in order:
        while len(dealt[pattern[pos]]) >= sizes[pattern[pos]]:
            pos = (pos + 1) % len(pattern)
        dealt[pattern[pos]].append(ch)
        pos = (pos + 1) % len(pattern)
    return torch.tensor([c for blk in dealt for c in blk], dtype=torch.long)
