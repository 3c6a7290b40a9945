"""Perplexity over non-overlapping windows, the GPTQ / DuQuant convention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantcompose.errors import DataError

__all__ = ["perplexity"]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> float:
    """Perplexity of ``model`` on a token stream ``tokens`` of shape ``(1, N)``.

    Protocol (GPTQ / DuQuant): cut the stream into ``N // seqlen`` non-overlapping
    windows of ``seqlen`` tokens (the trailing partial window is dropped; at most
    ``max_windows`` from the start). Each window is scored on its own, with no
    context carried over: its loss is the mean cross-entropy of the ``seqlen - 1``
    next-token predictions, accumulated as ``nlls.append(loss.float() * seqlen)``,
    and ``ppl = exp(sum(nlls) / (nwindows * seqlen))`` — the exponential of the
    mean per-window loss. Runs on the device of the model's parameters, in eval mode
    (the previous train/eval mode is restored afterwards).
    """
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise DataError(f"tokens must have shape (1, N), got {tuple(tokens.shape)}; concatenate the stream first")
    if tokens.is_floating_point() or tokens.is_complex():
        raise DataError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    seqlen, batch_size = int(seqlen), int(batch_size)
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2 (one prediction needs two tokens), got {seqlen}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n_tokens = tokens.shape[1]
    nwindows = n_tokens // seqlen
    if nwindows == 0:
        raise DataError(
            f"the token stream has {n_tokens} tokens, fewer than one window of seqlen={seqlen}; "
            "pass more text or a smaller seqlen"
        )
    if max_windows is not None:
        if int(max_windows) < 1:
            raise DataError(f"max_windows must be >= 1 or None, got {max_windows}")
        nwindows = min(nwindows, int(max_windows))

    device = _model_device(model)
    windows = tokens[0, : nwindows * seqlen].reshape(nwindows, seqlen).long()
    is_hf = hasattr(model, "config")
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    try:
        with tqdm(total=nwindows, disable=not progress, desc="perplexity", unit="window") as bar:
            for start in range(0, nwindows, batch_size):
                batch = windows[start : start + batch_size].to(device)
                out = model(batch, use_cache=False) if is_hf else model(batch)
                logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
                shift_logits = logits[:, :-1, :].float()
                shift_labels = batch[:, 1:]
                # per-window mean NLL over its seqlen-1 predictions
                loss = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    reduction="none",
                ).view(batch.shape[0], -1).mean(dim=1)
                nll_sum += (loss.double() * seqlen).sum().cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    mean_nll = float(nll_sum) / (nwindows * seqlen)
    try:
        return math.exp(mean_nll)
    except OverflowError:  # a broken (e.g. badly quantized) model: report inf, not a crash
        return math.inf
