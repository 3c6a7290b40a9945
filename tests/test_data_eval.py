"""Calibration / evaluation data and perplexity: fast tests on toy tokenizers and models, slow ones on SmolLM2."""

from __future__ import annotations

import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantcompose.data import calibration_tokens, check_finite, load_wikitext2_test
from quantcompose.errors import CalibrationError, DataError
from quantcompose.evaluate import perplexity

try:
    from realmodel import (
        WIKITEXT_TEST,
        WIKITEXT_TEST_TOKENS,
        WIKITEXT_VALID,
        FP_PPL_32x512,
        load_smollm2,
        load_smollm2_tokenizer,
        requires_data,
        requires_real_model,
        wikitext2_test_tokens,
    )
except ImportError:  # tests/ is a package
    from tests.realmodel import (
        WIKITEXT_TEST,
        WIKITEXT_TEST_TOKENS,
        WIKITEXT_VALID,
        FP_PPL_32x512,
        load_smollm2,
        load_smollm2_tokenizer,
        requires_data,
        requires_real_model,
        wikitext2_test_tokens,
    )


class WordTokenizer:
    """Whitespace tokenizer: ``w<k>`` -> id k, any other word -> a stable hash; BOS (id 0) if asked."""

    def __init__(self, vocab: int = 5000) -> None:
        self.vocab = vocab
        self.calls: list[tuple[str, bool]] = []

    def __len__(self) -> int:
        return self.vocab

    def _id(self, word: str) -> int:
        if word[:1] == "w" and word[1:].isdigit():
            return int(word[1:]) % self.vocab
        return 1 + zlib.crc32(word.encode()) % (self.vocab - 1)

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        self.calls.append((text, add_special_tokens))
        ids = [self._id(w) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def _counting_text(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# ---------------------------------------------------------------- calibration


def test_random_calibration_shape_range_determinism() -> None:
    tok = WordTokenizer(vocab=37)
    state = torch.random.get_rng_state()
    a = calibration_tokens("random", tok, nsamples=6, seqlen=50, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert a.shape == (6, 50) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 37
    assert len(a.unique()) > 30  # spread over the vocabulary, not a constant
    assert torch.equal(a, calibration_tokens("random", tok, nsamples=6, seqlen=50, seed=3))
    assert not torch.equal(a, calibration_tokens("random", tok, nsamples=6, seqlen=50, seed=4))


def test_random_calibration_vocab_override() -> None:
    a = calibration_tokens("random", None, nsamples=4, seqlen=100, vocab_size=5)
    assert int(a.max()) <= 4 and int(a.min()) >= 0


def test_zipf_calibration_favours_low_ids_and_is_deterministic() -> None:
    state = torch.random.get_rng_state()
    a = calibration_tokens("random-zipf", None, nsamples=8, seqlen=500, seed=1, vocab_size=1000)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.shape == (8, 500) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 1000
    # P(id) ∝ 1/(id + 10): the first 100 ids hold ln(11)/ln(101) ≈ 52% of the mass, not 10%.
    low = float((a < 100).double().mean())
    assert 0.45 < low < 0.60
    assert torch.equal(a, calibration_tokens("random-zipf", None, nsamples=8, seqlen=500, seed=1, vocab_size=1000))
    assert not torch.equal(a, calibration_tokens("random-zipf", None, nsamples=8, seqlen=500, seed=2, vocab_size=1000))


@pytest.mark.parametrize("nsamples,seqlen", [(0, 8), (4, 0), (-1, 8)])
def test_calibration_rejects_bad_sizes(nsamples: int, seqlen: int) -> None:
    with pytest.raises(CalibrationError):
        calibration_tokens("random", WordTokenizer(), nsamples=nsamples, seqlen=seqlen)


def test_file_calibration_draws_contiguous_windows(tmp_path: Path) -> None:
    f = tmp_path / "text.txt"
    f.write_text(_counting_text(1000), encoding="utf-8")
    tok = WordTokenizer()
    a = calibration_tokens(f, tok, nsamples=16, seqlen=32, seed=1)
    assert tok.calls[-1][1] is False  # no special tokens
    assert a.shape == (16, 32) and a.dtype == torch.long
    # every row is a contiguous window of the stream 0, 1, ..., 999
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, 32))
    assert int(a.min()) >= 0 and int(a.max()) <= 999
    assert torch.equal(a, calibration_tokens(str(f), tok, nsamples=16, seqlen=32, seed=1))
    assert not torch.equal(a, calibration_tokens(f, tok, nsamples=16, seqlen=32, seed=2))


def test_file_calibration_window_can_span_whole_text(tmp_path: Path) -> None:
    f = tmp_path / "text.txt"
    f.write_text(_counting_text(32), encoding="utf-8")
    a = calibration_tokens(f, WordTokenizer(), nsamples=3, seqlen=32)
    assert torch.equal(a, torch.arange(32).expand(3, 32))


@requires_data
def test_file_calibration_wikitext_valid() -> None:
    tok = WordTokenizer(vocab=50_000)
    a = calibration_tokens(WIKITEXT_VALID, tok, nsamples=8, seqlen=256, seed=0)
    assert a.shape == (8, 256)
    assert torch.equal(a, calibration_tokens(WIKITEXT_VALID, tok, nsamples=8, seqlen=256, seed=0))
    assert len({tuple(r.tolist()) for r in a}) == 8  # different windows


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="not found"):
        calibration_tokens(missing, WordTokenizer())
    with pytest.raises(DataError, match="not found"):
        load_wikitext2_test(WordTokenizer(), missing)
    with pytest.raises(DataError, match="directory"):
        load_wikitext2_test(WordTokenizer(), tmp_path)


def test_text_too_short_says_counts(tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text(_counting_text(20), encoding="utf-8")
    with pytest.raises(DataError) as info:
        calibration_tokens(f, WordTokenizer(), nsamples=4, seqlen=21)
    assert "20 tokens" in str(info.value) and "seqlen=21" in str(info.value)


def test_empty_text_raises(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        calibration_tokens(f, WordTokenizer())


def test_datasets_missing_says_pass_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="path"):
        load_wikitext2_test(WordTokenizer())
    with pytest.raises(DataError, match="path"):
        calibration_tokens("wikitext2", WordTokenizer())


# ---------------------------------------------------------------- WikiText-2 test stream


def test_wikitext_protocol_joins_lines_with_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "wiki.test.raw"
    f.write_bytes(b" = Title = \r\n w1 w2 \r\n w3\r\n")
    tok = WordTokenizer()
    ids = load_wikitext2_test(tok, f)
    text, special = tok.calls[-1]
    assert text == " = Title = \n\n w1 w2 \n\n w3"
    assert special is False
    assert ids.shape == (1, 6) and ids.dtype == torch.long
    assert ids[0, -3:].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- finiteness


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises(bad: float) -> None:
    x = torch.zeros(3, 4)
    x[1, 2] = bad
    with pytest.raises(CalibrationError) as info:
        check_finite(x, "layer 7 down_proj input")
    msg = str(info.value)
    assert "NaN/inf found in layer 7 down_proj input" in msg and "dtype" in msg
    assert ("1 NaN, 0 inf" if math.isnan(bad) else "0 NaN, 1 inf") in msg


def test_check_finite_passes() -> None:
    check_finite(torch.randn(5, 5), "x")
    check_finite(torch.arange(5), "ids")
    check_finite(torch.tensor([65504.0], dtype=torch.float16), "fp16 max")


# ---------------------------------------------------------------- perplexity


class UniformLM(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab) + self.dummy


class BigramLM(nn.Module):
    """Logits depend on the previous token only; plain module returning a tensor."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)
        self.dropout = nn.Dropout(0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.table[ids])


def _reference_ppl(model: BigramLM, tokens: torch.Tensor, seqlen: int, nwindows: int) -> float:
    """Token by token: exp(mean over windows of the mean NLL of the seqlen-1 predictions)."""
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    per_window = []
    for w in range(nwindows):
        win = tokens[0, w * seqlen : (w + 1) * seqlen].tolist()
        per_window.append(-sum(logp[a, b].item() for a, b in zip(win[:-1], win[1:])) / (seqlen - 1))
    return math.exp(sum(per_window) / nwindows)


def test_uniform_model_perplexity_is_vocab() -> None:
    tokens = torch.randint(0, 50, (1, 300))
    assert perplexity(UniformLM(50), tokens, seqlen=64, progress=False) == pytest.approx(50, rel=1e-6)


def test_perplexity_matches_reference_and_drops_partial_window() -> None:
    torch.manual_seed(0)
    model = BigramLM(20).train()
    tokens = torch.randint(0, 20, (1, 5 * 16 + 9))
    ref = _reference_ppl(model, tokens, seqlen=16, nwindows=5)
    got = perplexity(model, tokens, seqlen=16, progress=False)
    assert got == pytest.approx(ref, rel=1e-5)  # also proves dropout was off (eval mode)
    assert model.training  # mode restored
    # changing the trailing partial window or the first token of the *next* window must not matter
    changed = tokens.clone()
    changed[0, 5 * 16 :] = (changed[0, 5 * 16 :] + 1) % 20
    assert perplexity(model, changed, seqlen=16, progress=False) == pytest.approx(got, rel=1e-6)


def test_perplexity_max_windows_and_batches() -> None:
    model = BigramLM(30, seed=1)
    tokens = torch.randint(0, 30, (1, 7 * 10))
    full = perplexity(model, tokens, seqlen=10, progress=False)
    two = perplexity(model, tokens, seqlen=10, max_windows=2, progress=False)
    assert two == pytest.approx(_reference_ppl(model, tokens, 10, 2), rel=1e-5)
    assert two != pytest.approx(full, rel=1e-4)
    for bs in (2, 3, 7, 100):
        assert perplexity(model, tokens, seqlen=10, batch_size=bs, progress=False) == pytest.approx(full, rel=1e-5)
    assert perplexity(model, tokens[0], seqlen=10, progress=False) == pytest.approx(full, rel=1e-6)  # 1-D ok


def test_perplexity_of_hf_model_matches_hf_loss() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 64, (1, 3 * 24 + 5))
    with torch.no_grad():
        losses = [
            model(tokens[:, i * 24 : (i + 1) * 24], labels=tokens[:, i * 24 : (i + 1) * 24]).loss.item()
            for i in range(3)
        ]
    expected = math.exp(sum(losses) / 3)
    assert perplexity(model, tokens, seqlen=24, progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    tokens = torch.randint(0, 10, (1, 40))
    perplexity(UniformLM(10), tokens, seqlen=10, progress=True)
    assert "perplexity" in capsys.readouterr().err
    perplexity(UniformLM(10), tokens, seqlen=10, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "tokens,kwargs,match",
    [
        (torch.zeros(1, 9, dtype=torch.long), {"seqlen": 10}, "9 tokens"),
        (torch.zeros(2, 20, dtype=torch.long), {"seqlen": 10}, "shape"),
        (torch.zeros(1, 20), {"seqlen": 10}, "integer"),
        (torch.zeros(1, 20, dtype=torch.long), {"seqlen": 10, "max_windows": 0}, "max_windows"),
        (torch.zeros(1, 20, dtype=torch.long), {"seqlen": 1}, "seqlen"),
    ],
)
def test_perplexity_rejects_bad_input(tokens: torch.Tensor, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        perplexity(UniformLM(10), tokens, progress=False, **kwargs)


# ---------------------------------------------------------------- real model (slow)


@pytest.mark.slow
@requires_real_model
def test_wikitext_test_token_count() -> None:
    tok = load_smollm2_tokenizer()
    start = time.perf_counter()
    ids = load_wikitext2_test(tok, WIKITEXT_TEST)
    print(f"tokenize wiki.test.raw: {time.perf_counter() - start:.1f} s")
    assert ids.shape == (1, WIKITEXT_TEST_TOKENS)
    assert ids.dtype == torch.long
    assert tok.bos_token_id is None or int(ids[0, 0]) != tok.bos_token_id
    assert torch.equal(ids, wikitext2_test_tokens())


@pytest.mark.slow
@requires_real_model
def test_file_calibration_real_tokenizer() -> None:
    tok = load_smollm2_tokenizer()
    a = calibration_tokens(WIKITEXT_VALID, tok, nsamples=16, seqlen=512, seed=0)
    assert a.shape == (16, 512) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < len(tok)
    assert torch.equal(a, calibration_tokens(WIKITEXT_VALID, tok, nsamples=16, seqlen=512, seed=0))
    r = calibration_tokens("random", tok, nsamples=4, seqlen=512)
    assert int(r.max()) < 49152


@pytest.mark.slow
@requires_real_model
def test_full_precision_perplexity_first_windows() -> None:
    model, _ = load_smollm2()
    ppl = perplexity(model, wikitext2_test_tokens(), seqlen=512, max_windows=4, progress=False)
    assert 10 < ppl < 60
    assert ppl == pytest.approx(30.70, rel=0.01)  # measured: 30.704 (float32, CPU)


@pytest.mark.slow
@requires_real_model
@pytest.mark.skipif(
    os.environ.get("QUANTCOMPOSE_LONG_TESTS") != "1",
    reason="32 windows take 35-100 s on 2 cores; set QUANTCOMPOSE_LONG_TESTS=1 to run",
)
def test_full_precision_perplexity_published_protocol() -> None:
    model, _ = load_smollm2()
    ppl = perplexity(model, wikitext2_test_tokens(), seqlen=512, max_windows=32, progress=False, batch_size=4)
    assert ppl == pytest.approx(FP_PPL_32x512, abs=0.02)  # shared/MODELS.md; measured 28.405
