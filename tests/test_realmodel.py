"""Every strategy on the real SmolLM2-135M: exact folding, W8A8 accuracy, save/load.

Slow: each test quantizes the 30-layer model (with short calibration).
"""

from __future__ import annotations

import copy

import pytest
import torch

try:
    from realmodel import load_smollm2, requires_real_model, wikitext2_test_tokens
except ImportError:  # pragma: no cover - when tests/ is imported as a package
    from tests.realmodel import load_smollm2, requires_real_model, wikitext2_test_tokens

from quantcompose.data import calibration_tokens
from quantcompose.evaluate import perplexity
from quantcompose.pipeline import count_quantized, quantize_model
from quantcompose.plugin_manager import get_plugin_manager
from quantcompose.storage import round_float_weights
from quantcompose.strategy import QuantSettings

pytestmark = [pytest.mark.slow, requires_real_model]

# Fast fitting for tests: fewer greedy steps than the default (accuracy is the benchmark's job).
FAST = {"duquant": {"steps": 8}, "rtn": {}, "omniquant": {"epochs": 1, "samples": 1},
        "flatquant": {"epochs": 1, "samples": 1}}
STRATEGIES = sorted(get_plugin_manager().strategies())


def _quantized_copy(method: str, wbits: int, abits: int, nsamples: int = 2, seqlen: int = 128, **settings):
    model, tokenizer = load_smollm2()
    model = copy.deepcopy(model)
    calib = calibration_tokens("random", tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0,
                               vocab_size=model.config.vocab_size)
    report = quantize_model(model, calib, method, QuantSettings(wbits=wbits, abits=abits, **settings),
                            FAST.get(method, {}), progress=False)
    return model, report


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    "method, residual_rotation", [(m, False) for m in STRATEGIES] + [("duquant", True)]
)
def test_folding_the_plan_leaves_logits_unchanged(method, residual_rotation):
    """With quantization off (16 bits) a strategy's transforms must be exact (also after a residual rotation)."""
    reference, _ = load_smollm2()
    tokens = wikitext2_test_tokens()[:, :256]
    rotates_embeddings = residual_rotation or method == "quarot"
    if rotates_embeddings:
        # The float16 storage rounds the *rotated* embeddings, which the reference cannot mirror.
        storage = "float32"
    else:
        # Default float16 storage: the online transforms are rounded too, and the weights folded
        # with the rounded maps' inverses, so only the embeddings' rounding changes the model.
        storage = "float16"
        reference = copy.deepcopy(reference)
        round_float_weights(reference.get_input_embeddings(), reference.get_output_embeddings(), torch.float16)
    expected = _logits(reference, tokens)
    model, report = _quantized_copy(method, 16, 16, residual_rotation=residual_rotation, storage_dtype=storage)
    assert count_quantized(model) == 30 * 7
    got = _logits(model, tokens)
    # float32 through 30 layers with online rotations and massive activations
    # (|x| ~ 3000 at down_proj): stated tolerance 2e-3 absolute on logits of
    # magnitude ~20, and the predicted tokens agree.
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-3)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# OmniQuant's learned clipping starts clipped (sigmoid(4) ≈ 0.98) and, trained one step at lr 0.1
# (the test's shortened schedule), costs about 2% at W8A8: 1.0196x full precision on this test's
# 3 windows with round-to-nearest weights (1.037x with GPTQ). A known open problem of its
# defaults (see docs/benchmarks.md), kept visible rather than hidden; strict=False because it
# sits at the bound. (SmoothQuant, at the bound with GPTQ weights, is at 1.008x here.)
W8A8_XFAIL = {
    "omniquant": "omniquant's short-schedule clipping costs about 2% at W8A8 (1.0196x measured)",
}
W8A8_CASES = [
    pytest.param(m, marks=pytest.mark.xfail(reason=W8A8_XFAIL[m], strict=False)) if m in W8A8_XFAIL else m
    for m in STRATEGIES
]


@pytest.fixture(scope="module")
def fp_ppl_3_windows() -> float:
    reference, _ = load_smollm2()
    return perplexity(reference, wikitext2_test_tokens(), seqlen=512, max_windows=3, progress=False)


@pytest.mark.parametrize("method", W8A8_CASES)
def test_w8a8_within_two_percent_of_full_precision(method, fp_ppl_3_windows):
    """Each strategy's plan keeps W8A8 within 2% of full precision.

    Round-to-nearest weights: the check is on the strategy's transforms and
    quantizers, and GPTQ (two thirds of the time of each run here) has its own
    tests, and the W4A4 test below and every benchmark run it on this model.
    """
    tokens = wikitext2_test_tokens()
    fp = fp_ppl_3_windows
    model, _ = _quantized_copy(method, 8, 8, nsamples=4, seqlen=256, weight_quantizer="rtn")
    ppl = perplexity(model, tokens, seqlen=512, max_windows=3, progress=False)
    assert ppl <= fp * 1.02, f"{method} W8A8 perplexity {ppl:.2f} vs full precision {fp:.2f}"


@pytest.fixture(scope="module")
def duquant_w4a4():
    """One DuQuant W4A4 model (GPTQ weights) shared by the tests that only read it."""
    return _quantized_copy("duquant", 4, 4)[0]


def test_duquant_w4a4_beats_round_to_nearest_by_far(duquant_w4a4):
    tokens = wikitext2_test_tokens()
    rtn, _ = _quantized_copy("rtn", 4, 4)
    duquant = duquant_w4a4
    ppl_rtn = perplexity(rtn, tokens, seqlen=512, max_windows=2, progress=False)
    ppl_dq = perplexity(duquant, tokens, seqlen=512, max_windows=2, progress=False)
    assert ppl_dq * 5 < ppl_rtn, (ppl_dq, ppl_rtn)


def test_save_load_round_trip_gives_identical_logits(tmp_path, duquant_w4a4):
    from quantcompose.saving import load_quantized, save_quantized

    model = duquant_w4a4
    tokenizer = load_smollm2()[1]
    target = tmp_path / "w4a4"
    size = save_quantized(model, target, tokenizer=tokenizer)
    assert size > 0
    loaded, loaded_tokenizer = load_quantized(target)
    assert loaded_tokenizer is not None
    tokens = wikitext2_test_tokens()[:, :128]
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    # int4 codes are stored packed: half a byte per weight
    q = loaded.model.layers[3].mlp.down_proj
    assert q.weight_codes.shape == (q.out_features, q.in_features // 2)
