"""Export SmolLM2-135M W8A8 to compressed-tensors and compare perplexities across consumers.

For each method: quantize (W8A8: symmetric per-channel weights, symmetric
dynamic per-token activations, no Q/K/V quantization, no activation
clipping, the only W8A8 the format's runtimes execute), evaluate quantcompose's
model, export, load the folder with plain ``transformers`` (compressed-tensors
installed; it emulates the activation quantization on the CPU) and evaluate it
on the same windows. A method whose transforms cannot be exported prints why.

    python bench/export_parity.py                    # 32 windows of 512 tokens
    python bench/export_parity.py --max-windows 2 --methods rtn smoothquant
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from quantcompose.data import calibration_tokens, load_wikitext2_test
from quantcompose.errors import ExportError
from quantcompose.evaluate import perplexity
from quantcompose.export import export_compressed_tensors
from quantcompose.models.loading import load_model
from quantcompose.pipeline import quantize_model
from quantcompose.plugin_manager import get_plugin_manager
from quantcompose.strategy import QuantSettings

DEFAULT_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
W8A8 = dict(wbits=8, abits=8, weight_symmetric=True, act_symmetric=True, qkv_bits=16, act_clip_search=False)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["duquant", "smoothquant", "quarot", "rtn"])
    p.add_argument("--max-windows", type=int, default=32, help="first N evaluation windows (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default: %(default)s)")
    p.add_argument("--calib", default="random-zipf", help="calibration source (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--weight-quantizer", choices=("rtn", "gptq"), default="gptq")
    p.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL)
    p.add_argument("--out", type=Path, default=None, help="keep the exported folders here (default: a temp dir)")
    return p.parse_args()


def _options(manager, method: str) -> dict:
    # DuQuant's static activation clip (0.9) has no place in a dynamic per-token scheme: switch it off.
    strategy = manager.strategies()[method]
    return {"act_clip": "1.0"} if "act_clip" in strategy.options else {}


def main() -> None:
    from transformers import AutoModelForCausalLM

    args = parse_args()
    manager = get_plugin_manager()
    reference, tokenizer = load_model("smollm2-135m")
    tokens = load_wikitext2_test(tokenizer, args.eval_data)
    calib = calibration_tokens(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0,
                               vocab_size=reference.config.vocab_size)
    settings = QuantSettings(weight_quantizer=args.weight_quantizer, **W8A8)
    root = args.out or Path(tempfile.mkdtemp(prefix="export-parity-"))
    print(f"SmolLM2-135M W8A8, WikiText-2 test, first {args.max_windows} windows of {args.seqlen} tokens; "
          f"exports under {root}")
    rows = []
    for method in args.methods:
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize_model(model, calib, method, settings, manager.resolve(method, _options(manager, method), settings),
                       manager=manager, progress=False)
        ours = perplexity(model, tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
        try:
            export_compressed_tensors(model, tokenizer, root / method, overwrite=True)
        except ExportError as error:
            rows.append((method, f"{ours:.3f}", "not exportable", str(error).split(", which")[0]))
            continue
        del model
        loaded = AutoModelForCausalLM.from_pretrained(str(root / method)).eval()
        with torch.no_grad():
            theirs = perplexity(loaded, tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
        rows.append((method, f"{ours:.3f}", f"{theirs:.3f}",
                     f"{100 * (theirs / ours - 1):+.2f}% ({time.perf_counter() - start:.0f} s)"))
    header = ("method", "quantcompose", "transformers+ct", "difference / reason")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])


if __name__ == "__main__":
    main()
