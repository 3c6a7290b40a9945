"""The ``compare`` and ``inspect`` subcommands: their arguments and what they run.

``quantcompose.cli`` registers them with :func:`add_subcommands` and
dispatches through :data:`COMMANDS`; the work is done by
:mod:`quantcompose.compare` and :mod:`quantcompose.inspect_outliers`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

DEFAULT_BITS = "w4a4,w6a6,w8a8"


def _add_calibration_args(parser: argparse.ArgumentParser, nsamples: int) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, local path or hub id (default: %(default)s)")
    parser.add_argument("--calib", default="random-zipf",
                        help="calibration data: 'random-zipf' (default), 'random', a text file path, or 'wikitext2'")
    parser.add_argument("--nsamples", type=int, default=nsamples, help="calibration sequences (default: %(default)s)")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_subcommands(sub: Any) -> None:
    """Add ``compare`` and ``inspect`` to the ``quantcompose`` subparsers ``sub``."""
    from quantcompose.strategy import QuantSettings

    defaults = QuantSettings()
    c = sub.add_parser("compare", help="methods x bit settings (x seeds) on one model: table, CSV, JSON, bar chart")
    _add_calibration_args(c, nsamples=16)
    c.add_argument("--methods", default=None, help="comma-separated strategies (default: every installed one)")
    c.add_argument("--bits", default=DEFAULT_BITS, help="comma-separated wXaY settings (default: %(default)s)")
    c.add_argument("--opt", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option for one method, repeatable (e.g. duquant:alpha=0.6)")
    c.add_argument("--seeds", default="0", help="comma-separated seeds; each sets calibration and the "
                   "strategies' random choices (default: %(default)s)")
    c.add_argument("--eval-data", required=True, metavar="PATH",
                   help="WikiText-2 raw test file (wiki.test.raw), or 'wikitext2' for the datasets library")
    c.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default: %(default)s)")
    c.add_argument("--eval-windows", type=int, default=32, help="evaluate the first N windows (default: %(default)s)")
    c.add_argument("--weight-quantizer", choices=("rtn", "gptq"), default=defaults.weight_quantizer,
                   help="weight rounding for every method (default: %(default)s)")
    c.add_argument("--no-clip-search", action="store_true", help="no per-row weight clip search")
    c.add_argument("--act-clip-search", action=argparse.BooleanOptionalAction, default=defaults.act_clip_search,
                   help="per-place activation clip search (default: %(default)s)")
    c.add_argument("--out", default="compare-results", metavar="DIR",
                   help="where compare.md / .csv / .json / .png go (default: %(default)s)")
    c.add_argument("--no-plot", action="store_true", help="skip the bar chart (no matplotlib needed)")

    i = sub.add_parser("inspect", help="activation outlier landscapes of one layer and place before and after "
                       "each step of a strategy's transform")
    _add_calibration_args(i, nsamples=8)
    i.add_argument("--method", default="duquant", help="strategy whose transform is inspected (default: %(default)s)")
    i.add_argument("--layer", type=int, default=None, help="decoder layer index (required without --all-layers)")
    i.add_argument("--place", default="mlp_down", help="input place: attn_in, attn_out, mlp_in, mlp_down "
                   "(default: %(default)s)")
    i.add_argument("--all-layers", action="store_true",
                   help="one summary line per layer and place instead of pictures of one")
    i.add_argument("--bits", default="w4a4", help="wXaY the strategy plans for (default: %(default)s)")
    i.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="strategy option, repeatable")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--top", type=int, default=5, help="largest entries listed in the summary (default: %(default)s)")
    i.add_argument("--out", default="inspect-results", metavar="DIR", help="output folder (default: %(default)s)")


def _calibration(args: argparse.Namespace, tokenizer: Any, seed: int):
    from quantcompose.data import calibration_tokens

    return calibration_tokens(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=seed)


def _calibration_label(args: argparse.Namespace, per_seed: bool) -> str:
    drawn = ", drawn with the run's seed" if per_seed else ""
    return f"{args.nsamples} x {args.calib_seqlen} {args.calib} tokens{drawn}"


def cmd_compare(args: argparse.Namespace) -> int:
    from quantcompose.compare import (
        ComparisonError, Protocol, compare_methods, parse_bits_list, parse_method_options, run_grid,
        to_markdown, write_outputs,
    )
    from quantcompose.data import load_wikitext2_test
    from quantcompose.models.loading import load_model
    from quantcompose.plugin_manager import get_plugin_manager
    from quantcompose.strategy import QuantSettings

    manager = get_plugin_manager()
    installed = sorted(manager.strategies())
    methods = installed if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        manager.info(method)  # an unknown name is an error before the model loads
    bits = parse_bits_list(args.bits)
    options = parse_method_options(args.opt, methods)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ComparisonError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    if not args.no_plot:
        from quantcompose.plotting import pyplot

        pyplot()  # fail now, not after an hour of runs
    settings = QuantSettings(weight_quantizer=args.weight_quantizer, weight_clip_search=not args.no_clip_search,
                             act_clip_search=args.act_clip_search)
    model, tokenizer = load_model(args.model)
    eval_tokens = load_wikitext2_test(tokenizer, None if args.eval_data == "wikitext2" else args.eval_data)
    protocol = Protocol(
        model=args.model,
        eval_data="WikiText-2 raw test" + ("" if args.eval_data == "wikitext2" else f" ({Path(args.eval_data).name})"),
        seqlen=args.seqlen,
        max_windows=args.eval_windows,
        calibration=_calibration_label(args, per_seed=True),
    )
    result = compare_methods(
        model, run_grid(methods, bits, options), lambda seed: _calibration(args, tokenizer, seed), eval_tokens,
        protocol, seeds, settings=settings, manager=manager, progress=not args.quiet,
    )
    print(to_markdown(result))
    written = write_outputs(result, args.out, plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from quantcompose.cli import _parse_options
    from quantcompose.compare import parse_bits
    from quantcompose.inspect_outliers import (
        InspectionError, format_layer_table, format_summary, inspect_layers, inspect_place, write_inspection,
    )
    from quantcompose.models.loading import load_model
    from quantcompose.plugin_manager import get_plugin_manager
    from quantcompose.strategy import QuantSettings

    if args.layer is None and not args.all_layers:
        raise InspectionError("inspect needs --layer N (with --place) or --all-layers")
    bits = parse_bits(args.bits)
    settings = QuantSettings(wbits=bits.wbits, abits=bits.abits, seed=args.seed)
    manager = get_plugin_manager()
    options = manager.resolve(args.method, _parse_options(args.opt), settings)
    if not args.all_layers:
        from quantcompose.plotting import pyplot

        pyplot()
    model, tokenizer = load_model(args.model)
    tokens = _calibration(args, tokenizer, args.seed)
    out = Path(args.out)
    print(f"{args.model}: {_calibration_label(args, per_seed=False)} (seed {args.seed}), method {args.method}")
    if args.all_layers:
        layers = None if args.layer is None else [args.layer]
        found = inspect_layers(model, tokens, args.method, options, settings, manager=manager, layers=layers,
                               progress=not args.quiet)
        table = format_layer_table(found)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"all_layers_{args.method}.txt"
        path.write_text(table, encoding="utf-8")
        print(table + f"wrote {path}")
        return 0
    found = inspect_place(model, tokens, args.layer, args.place, args.method, options, settings, manager=manager,
                          top=args.top)
    written = write_inspection(found, out)
    print(format_summary(found) + "wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"compare": cmd_compare, "inspect": cmd_inspect}
