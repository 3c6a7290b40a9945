"""Quantize SmolLM2-135M with several methods / settings and print WikiText-2 perplexity.

Every row is measured in this run on the same model, calibration tokens and
evaluation windows, so the methods are compared side by side:

    python bench/quantize_smollm2.py                      # the issue's targets
    python bench/quantize_smollm2.py --ablation           # DuQuant's component ablation at W4A4
    python bench/quantize_smollm2.py --rows rtn:4:4 duquant:4:4 --opt duquant:alpha=0.5

A row is ``METHOD:WBITS:ABITS`` or ``duquant-ablation:NAME[:WBITS:ABITS]``,
optionally followed by ``:KEY=VALUE`` items that apply to that row only: a
``QuantSettings`` field (``weight_quantizer=gptq``, ``act_clip_search=true``,
``refine=lwc``, ``refine_epochs=2``)
or a strategy option (``alpha=0.5``). The model is
loaded once and its float state restored before each row; quantization time
counts calibration and transform fitting only, not loading or evaluation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

from quantcompose.data import calibration_tokens, load_wikitext2_test
from quantcompose.evaluate import perplexity
from quantcompose.models.loading import load_model
from quantcompose.pipeline import quantize_model
from quantcompose.plugin_manager import get_plugin_manager
from quantcompose.strategy import QuantSettings

DEFAULT_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_ROWS = ["rtn:8:8", "duquant:8:8", "duquant:6:6", "rtn:4:4", "duquant:4:4"]


def ablation_rows() -> list[str]:
    from quantcompose_plugins.duquant import ABLATIONS

    return [f"duquant-ablation:{name}" for name in ABLATIONS]


SETTING_FIELDS = {f.name for f in dataclasses.fields(QuantSettings)}


def _setting_value(key: str, text: str):
    from quantcompose.options import parse_bool

    default = getattr(QuantSettings(), key)
    if isinstance(default, bool):
        return parse_bool(text)
    if isinstance(default, int) or key in ("qkv_bits", "weight_group_size"):
        return None if text.lower() == "none" else int(text)
    if isinstance(default, float):
        return float(text)
    return None if key == "refine" and text.lower() == "none" else text


def parse_row(row: str, user_options: dict[str, dict[str, str]]):
    """``(label, method, wbits, abits, strategy options, settings overrides)`` for one row."""
    parts = row.split(":")
    extras = [p for p in parts if "=" in p]
    parts = [p for p in parts if "=" not in p]
    overrides: dict[str, str] = dict(pair.split("=", 1) for pair in extras)
    settings = {k: _setting_value(k, v) for k, v in overrides.items() if k in SETTING_FIELDS}
    row_options = {k: v for k, v in overrides.items() if k not in SETTING_FIELDS}
    suffix = f" {','.join(extras)}" if extras else ""
    if parts[0] == "duquant-ablation":
        from quantcompose_plugins.duquant import ABLATIONS

        options = {**ABLATIONS[parts[1]], **user_options.get("duquant", {}), **row_options}
        wbits, abits = (int(parts[2]), int(parts[3])) if len(parts) == 4 else (4, 4)
        return f"duquant[{parts[1]}]{suffix}", "duquant", wbits, abits, options, settings
    method, wbits, abits = parts[0], int(parts[1]), int(parts[2])
    return f"{method}{suffix}", method, wbits, abits, {**user_options.get(method, {}), **row_options}, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-data", default=str(DEFAULT_EVAL))
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--calib", default="random-zipf", help="calibration source (see quantcompose.data.calibration_tokens)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--rows", nargs="*", default=None, help="METHOD:WBITS:ABITS or duquant-ablation:NAME[:W:A]")
    parser.add_argument("--ablation", action="store_true", help="run DuQuant's component ablation at W4A4")
    parser.add_argument("--opt", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    defaults = QuantSettings()
    parser.add_argument("--weight-quantizer", choices=("rtn", "gptq"), default=defaults.weight_quantizer)
    parser.add_argument("--no-clip-search", action="store_true", help="static weight clip ratio instead of the search")
    parser.add_argument("--act-clip-search", action=argparse.BooleanOptionalAction, default=defaults.act_clip_search,
                        help="search each place's activation clip ratio (default: %(default)s)")
    args = parser.parse_args(argv)

    user_options: dict[str, dict[str, str]] = {}
    for item in args.opt:
        method, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        user_options.setdefault(method, {})[key] = value
    rows = args.rows or (ablation_rows() if args.ablation else DEFAULT_ROWS)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    eval_tokens = load_wikitext2_test(tokenizer, args.eval_data)
    calib = calibration_tokens(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=args.seed)
    manager = get_plugin_manager()

    print(f"model={args.model} eval=WikiText-2 test, first {args.max_windows} windows of {args.seqlen} tokens; "
          f"calibration={args.calib} {args.nsamples}x{args.calib_seqlen}; weights={args.weight_quantizer}"
          f"{'' if args.no_clip_search else ' + clip search'}; activation clip "
          f"{'search' if args.act_clip_search else 'static'}; torch threads={torch.get_num_threads()}")
    start = time.perf_counter()
    fp = perplexity(model, eval_tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
    print(f"{'setting':44s} {'bits':8s} {'ppl':>9s} {'x fp':>7s} {'quant s':>8s}  online/layer", flush=True)
    print(f"{'full precision':44s} {'W16A16':8s} {fp:9.2f} {1.0:7.3f} {'-':>8s}   (eval {time.perf_counter() - start:.0f} s)",
          flush=True)

    for row in rows:
        label, method, wbits, abits, options, overrides = parse_row(row, user_options)
        fresh = copy.deepcopy(model)  # quantization replaces linears in place
        settings = QuantSettings(**{
            "wbits": wbits, "abits": abits, "seed": args.seed, "weight_quantizer": args.weight_quantizer,
            "weight_clip_search": not args.no_clip_search, "act_clip_search": args.act_clip_search, **overrides,
        })
        resolved = manager.resolve(method, options, settings)
        report = quantize_model(fresh, calib, method, settings, resolved, manager=manager, progress=False)
        ppl = perplexity(fresh, eval_tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
        qkv = "" if settings.effective_qkv_bits >= 16 else f"QKV{settings.effective_qkv_bits}"
        print(f"{label:44s} {f'W{wbits}A{abits}{qkv}':8s} {ppl:9.2f} {ppl / fp:7.3f} {report.seconds:8.1f}  "
              f"{online_per_layer(report)}", flush=True)
    return 0


def online_per_layer(report) -> str:
    """Online transforms per layer: which places run one at inference, and Q/K's rotation if any."""
    layers = {p["layer"] for p in report.places}
    online = sorted({p["place"] for p in report.places if p["online"] != "-"})
    count = sum(1 for p in report.places if p["online"] != "-") / max(len(layers), 1)
    qk = report.attention is not None and "rotation none" not in report.attention
    return f"{count:g} ({', '.join(online) or 'none'}){' + Q/K' if qk else ''}"


if __name__ == "__main__":
    sys.exit(main())
