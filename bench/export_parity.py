"""Export SmolLM2-135M W8A8 to compressed-tensors and compare perplexities across consumers.

For each method: quantize (W8A8: symmetric per-channel weights, symmetric
dynamic per-token activations, no Q/K/V quantization, no activation
clipping, the only W8A8 the format's runtimes execute), evaluate quantcompose's
model, export, load the folder with ``transformers`` (compressed-tensors
installed; it emulates the activation quantization on the CPU) and evaluate it
on the same windows. Online transforms that do not fold are written in the
format's ``transform_config`` (``--online-transforms transform-config``, the
default here) and the consumer applies it with compressed-tensors'
``apply_transform_config`` (``load_with_transform_config``); with
``--online-transforms refuse`` a method whose transforms cannot fold prints why.
A method may carry strategy options, ``METHOD:KEY=VALUE[:KEY=VALUE]``.

    python bench/export_parity.py                    # 32 windows of 512 tokens
    python bench/export_parity.py --max-windows 2 --methods rtn smoothquant
    python bench/export_parity.py --methods smoothquant:foldable=true quarot:online_hadamards=false
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
from quantcompose.export import export_compressed_tensors, load_with_transform_config
from quantcompose.export.transform_config import ONLINE_CHOICES
from quantcompose.models.loading import load_model
from quantcompose.pipeline import quantize_model
from quantcompose.plugin_manager import get_plugin_manager
from quantcompose.strategy import QuantSettings

DEFAULT_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
W8A8 = dict(wbits=8, abits=8, weight_symmetric=True, act_symmetric=True, qkv_bits=16, act_clip_search=False)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["duquant", "smoothquant", "quarot", "rtn"],
                   help="METHOD or METHOD:KEY=VALUE[:KEY=VALUE] (strategy options)")
    p.add_argument("--max-windows", type=int, default=32, help="first N evaluation windows (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default: %(default)s)")
    p.add_argument("--calib", default="random-zipf", help="calibration source (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--weight-quantizer", choices=("rtn", "gptq"), default="gptq")
    p.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL)
    p.add_argument("--out", type=Path, default=None, help="keep the exported folders here (default: a temp dir)")
    p.add_argument("--online-transforms", choices=ONLINE_CHOICES, default="transform-config",
                   help="what the export does with an online transform (default: %(default)s)")
    return p.parse_args()


def _method_and_options(manager, spec: str) -> tuple[str, dict]:
    """``("smoothquant", {"foldable": "true"})`` for ``smoothquant:foldable=true``."""
    method, *pairs = spec.split(":")
    given = dict(pair.split("=", 1) for pair in pairs)
    # DuQuant's static activation clip (0.9) has no place in a dynamic per-token scheme: switch it off
    # unless the row sets it (then the export names the setting).
    defaults = {"act_clip": "1.0"} if "act_clip" in manager.strategies()[method].options else {}
    return method, {**defaults, **given}


def main() -> None:
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

    def add(row: tuple[str, str, str, str]) -> None:
        rows.append(row)
        print("  done:", "  ".join(row), flush=True)  # a long run shows each row as it finishes

    for spec in args.methods:
        method, options = _method_and_options(manager, spec)
        folder = root / spec.replace(":", "_").replace("=", "-")
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize_model(model, calib, method, settings, manager.resolve(method, options, settings),
                       manager=manager, progress=False)
        ours = perplexity(model, tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
        try:
            report = export_compressed_tensors(model, tokenizer, folder, overwrite=True,
                                               online_transforms=args.online_transforms)
        except ExportError as error:
            message = str(error)  # "<layer> runs the online transform <T> on its input, which ...: <why>. ..."
            why = message.partition("cannot carry: ")[2].partition(". transformers")[0]
            add((spec, f"{ours:.3f}", "not exportable", message.split(", which")[0] + (f": {why}" if why else "")))
            continue
        del model
        loaded = load_with_transform_config(folder)
        with torch.no_grad():
            theirs = perplexity(loaded, tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
        add((spec, f"{ours:.3f}", f"{theirs:.3f}",
             f"{100 * (theirs / ours - 1):+.2f}% ({time.perf_counter() - start:.0f} s; "
             f"{report.online_transforms} online transforms, {report.size_bytes / 2**20:.0f} MiB)"))
    header = ("method", "quantcompose", "transformers+ct", "difference / reason")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])


if __name__ == "__main__":
    main()
