"""Evaluation and calibration token streams, and a finiteness check.

The library never guesses where data lives: pass a path, or let the optional
``datasets`` library fetch WikiText-2. Text is always tokenized once as a whole,
with no special tokens added (no BOS), so the stream is the same for every model
family and matches the published WikiText-2 protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from quantcompose.errors import CalibrationError, DataError

__all__ = ["load_wikitext2_test", "calibration_tokens", "check_finite", "tokenize_text", "read_text_file"]

_WIKITEXT = ("wikitext", "wikitext-2-raw-v1")


_BOM = b"\xef\xbb\xbf"


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped), or a :class:`DataError` saying why not.

    Refuses a missing path, a directory, an empty or whitespace-only file,
    a binary file (one with NUL bytes) and bytes that are not UTF-8.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"{what} file not found: {p}"
            + (" (it is a directory)" if p.is_dir() else "")
            + "; pass the path of an existing UTF-8 text file"
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {what} file {p}: {exc.strerror or exc}; check its permissions") from exc
    if data.startswith(_BOM):
        # Windows editors write one; as text it would be a stray U+FEFF token at the start.
        data = data[len(_BOM):]
    if b"\x00" in data:
        raise DataError(f"{what} file {p} is binary (it holds NUL bytes at offset {data.index(0)}); "
                        "pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} file {p} is not UTF-8 text (invalid byte at offset {exc.start}); "
                        "convert it to UTF-8 or pass another file") from None
    if not text.strip():
        raise DataError(f"{what} file {p} is empty; pass a file with text in it")
    return text


def _wikitext_rows(split: str) -> list[str]:
    """Rows of WikiText-2 (raw) ``split`` from the ``datasets`` library (imported lazily)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DataError(
            "WikiText-2 was requested without a file path and the `datasets` library is not installed; "
            "pass the path of a local copy (e.g. wikitext-2-raw/wiki.test.raw) or `pip install datasets`"
        ) from exc
    try:
        ds = datasets.load_dataset(*_WIKITEXT, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing cache, hub errors: all the same advice
        raise DataError(
            f"could not load WikiText-2 ({split} split) through `datasets` ({type(exc).__name__}: {exc}); "
            "with no network, pass the path of a local copy of the file instead"
        ) from exc
    return list(ds["text"])


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` once, as a whole, with no special tokens: LongTensor ``(1, N)``."""
    if not text.strip():
        raise DataError("the text to tokenize is empty; pass a file with text in it")
    try:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:  # tokenizers without the `verbose` keyword
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids.reshape(1, -1)


def load_wikitext2_test(tokenizer: Any, path: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """WikiText-2 (raw) test split as one token stream, LongTensor ``(1, N)``.

    Literature protocol: the split's rows joined with blank lines
    (``"\\n\\n".join(rows)``), tokenized once, no special tokens added.
    ``path`` is a local ``wiki.test.raw`` (read with ``splitlines()``, so CRLF is fine);
    with ``path=None`` the ``datasets`` library is used (needs it installed and reachable).
    """
    if path is None:
        rows = _wikitext_rows("test")
    else:
        rows = read_text_file(path, "WikiText-2 test").splitlines()
    return tokenize_text(tokenizer, "\n\n".join(rows))


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        if size is None:
            raise CalibrationError(
                "cannot tell the vocabulary size of this tokenizer for random calibration; "
                "pass vocab_size=model.config.vocab_size"
            ) from None
        return int(size)


#: Calibration sources that need no data: uniform and Zipf-ranked random tokens.
RANDOM_SOURCES = ("random", "random-zipf")
#: Rank offset of the ``random-zipf`` draw: keeps the first few ids (special
#: and byte tokens in most vocabularies) from taking most of the mass.
ZIPF_OFFSET = 10.0


def calibration_tokens(
    source: str | os.PathLike[str],
    tokenizer: Any,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    *,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``nsamples`` calibration sequences of ``seqlen`` tokens, LongTensor ``(nsamples, seqlen)``.

    ``source``:

    * ``"random"``: uniform random token ids in ``[0, vocab)``, where vocab is
      ``vocab_size`` if given, else ``len(tokenizer)`` (DuQuant shows random
      calibration does as well as real text; ``tokenizer`` may be None when
      ``vocab_size`` is given);
    * ``"random-zipf"``: random token ids drawn independently with probability
      ``∝ 1 / (id + ZIPF_OFFSET)``. BPE vocabularies number tokens in merge
      order, which follows pair frequency, so a low id is a common token and
      Zipf's law over that rank gives token frequencies closer to real text
      than a uniform draw does, still without any data. On SmolLM2-135M it
      lets GPTQ's Hessian generalise (see docs/benchmarks.md);
    * ``"wikitext2"``: the WikiText-2 (raw) train split through ``datasets``;
    * anything else: the path of a UTF-8 text file (e.g. ``wikitext-2/valid.txt``),
      read and tokenized whole, then ``nsamples`` windows drawn at random starts
      (windows may overlap, as in GPTQ).

    Deterministic for a given ``seed`` (a private ``torch.Generator``; global RNG untouched).
    """
    if int(nsamples) < 1 or int(seqlen) < 1:
        raise CalibrationError(f"nsamples and seqlen must be >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    nsamples, seqlen = int(nsamples), int(seqlen)
    gen = torch.Generator().manual_seed(int(seed))
    key = os.fspath(source)
    if key in RANDOM_SOURCES:
        vocab = int(vocab_size) if vocab_size is not None else _vocab_size(tokenizer)
        if vocab < 1:
            raise CalibrationError(f"vocabulary size must be >= 1 for random calibration, got {vocab}")
        if key == "random":
            return torch.randint(0, vocab, (nsamples, seqlen), generator=gen, dtype=torch.long)
        weights = 1.0 / (torch.arange(vocab, dtype=torch.float64) + ZIPF_OFFSET)
        ids = torch.multinomial(weights, nsamples * seqlen, replacement=True, generator=gen)
        return ids.reshape(nsamples, seqlen)
    if key == "wikitext2":
        stream = tokenize_text(tokenizer, "\n\n".join(_wikitext_rows("train")))
        label = "WikiText-2 train split"
    else:
        stream = tokenize_text(tokenizer, read_text_file(key, "calibration text"))
        label = repr(key)
    n = stream.shape[1]
    if n < seqlen:
        raise DataError(
            f"calibration text {label} has {n} tokens but one sample needs seqlen={seqlen}; "
            "use a longer text or a smaller seqlen"
        )
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    offsets = torch.arange(seqlen)
    return stream[0, starts[:, None] + offsets[None, :]]


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """Raise ``CalibrationError`` if ``tensor`` holds any NaN or inf (``where`` names it in the message)."""
    if not tensor.is_floating_point() and not tensor.is_complex():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise CalibrationError(
        f"NaN/inf found in {where} ({n_nan} NaN, {n_inf} inf of {tensor.numel()} values, dtype {tensor.dtype}); "
        "check the calibration data / model dtype (float16 overflows on large outliers: try float32 or bfloat16)"
    )
