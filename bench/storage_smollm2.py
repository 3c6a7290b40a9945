"""Saved size, load time and resident memory of quantized SmolLM2-135M models.

For each row (``METHOD:WBITS:ABITS`` with optional ``:KEY=VALUE`` recipe keys, such as
``:storage_dtype=float32`` or ``:embedding_bits=8``, and ``:head_wbits=N`` / ``:head_abits=N``,
which quantize the LM head as a recipe target ``{ match = "lm_head", wbits = N, abits = N }``;
``head_abits`` defaults to 16, a weight-only head) the script quantizes the model, saves it, and prints:

- the saved size against the float16 model (269 MB, the unquantized model's
  parameters at 2 bytes, the tied table once) with its breakdown
  (codes, scales + zeros, embeddings and other float tensors, transforms);
- the load time with the integrity checks (median of ``--loads`` loads);
- the bytes the loaded model holds between forward passes (parameters,
  buffers, online transforms; ``quantcompose.storage.resident_bytes``) after
  one forward pass, against the same 269 MB;
- perplexity of the quantized model before saving and after loading (first
  ``--max-windows`` windows of 512 tokens of WikiText-2 test), which must agree.

    python bench/storage_smollm2.py
    python bench/storage_smollm2.py --rows duquant:4:4 duquant:4:4:storage_dtype=float32
    python bench/storage_smollm2.py --rows quarot:4:4:embedding_bits=8:head_wbits=8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quantcompose.data import calibration_tokens, load_wikitext2_test
from quantcompose.evaluate import perplexity
from quantcompose.models.loading import load_model
from quantcompose.pipeline import quantize_model
from quantcompose.saving import load_quantized, save_quantized, saved_size_breakdown
from quantcompose.storage import resident_bytes
from quantcompose.models import get_adapter
from quantcompose.recipe import Recipe
from quantcompose.targets import resolve_targets

DEFAULT_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_ROWS = ["duquant:4:4", "quarot:4:4", "duquant:8:8"]
MIB = 2**20


def _value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def parse_row(row: str) -> tuple[str, Recipe]:
    """``METHOD:WBITS:ABITS[:KEY=VALUE...]`` as a recipe (``head_wbits`` / ``head_abits``: an LM head target)."""
    method, wbits, abits, *extra = row.split(":")
    keys = {key: _value(value) for key, value in (item.split("=", 1) for item in extra)}
    head = {"wbits": keys.pop("head_wbits", None), "abits": keys.pop("head_abits", 16)}
    data = {"method": method, "wbits": int(wbits), "abits": int(abits), **keys}
    if head["wbits"] is not None:
        data.update(ignore=[], targets=[{"match": "lm_head", **head}])
    return method, Recipe.from_dict(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--eval-data", default=str(DEFAULT_EVAL))
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--loads", type=int, default=3)
    args = parser.parse_args()

    base, tokenizer = load_model("smollm2-135m")
    tokens = load_wikitext2_test(tokenizer, args.eval_data)
    calib = calibration_tokens("random-zipf", tokenizer, nsamples=args.nsamples, seqlen=512, seed=0,
                               vocab_size=base.config.vocab_size)
    fp16_bytes = sum(p.numel() for p in base.parameters()) * 2
    print(f"float16 model: {fp16_bytes / 1e6:.0f} MB ({fp16_bytes / MIB:.1f} MiB)")
    print("| row | saved | × fp16 | codes | scales+zeros | quantized table | float tensors | transforms | load s "
          "| held after a forward | × fp16 | ppl before save | ppl after load | quantize s |")
    print("| --- " * 14 + "|")
    for row in args.rows:
        method, recipe = parse_row(row)
        model = copy.deepcopy(base)
        targets = resolve_targets(get_adapter(model), recipe) if recipe.targets else None
        report = quantize_model(model, calib, method, recipe.settings(), dict(recipe.options), progress=False,
                                targets=targets)
        ppl_before = perplexity(model, tokens, seqlen=512, max_windows=args.max_windows, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model"
            save_quantized(model, target)
            del model
            size = saved_size_breakdown(target)
            times = []
            for _ in range(args.loads):
                start = time.perf_counter()
                loaded, _ = load_quantized(target)
                times.append(time.perf_counter() - start)
        ppl_after = perplexity(loaded, tokens, seqlen=512, max_windows=args.max_windows, progress=False)
        held = sum(resident_bytes(loaded).values())
        print(f"| {row} | {size.total / MIB:.1f} MiB | {size.total / fp16_bytes:.2f} | {size.codes / MIB:.1f} | "
              f"{size.scales / MIB:.1f} | {size.embedding / MIB:.1f} | {size.floats / MIB:.1f} | {size.transforms / MIB:.1f} | "
              f"{statistics.median(times):.2f} | {held / MIB:.1f} MiB | {held / fp16_bytes:.2f} | "
              f"{ppl_before:.3f} | {ppl_after:.3f} | {report.seconds:.0f} |", flush=True)
        del loaded


if __name__ == "__main__":
    with torch.no_grad():
        main()
