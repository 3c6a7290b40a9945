"""The ``quantcompose`` command."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from quantcompose.errors import QuantComposeError, UsageError

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def _parse_options(pairs: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, local path or hub id (default: %(default)s)")
    parser.add_argument("--eval-data", default=None, metavar="PATH",
                        help="WikiText-2 raw test file (wiki.test.raw) for perplexity; 'wikitext2' uses the datasets library; omit to skip evaluation")
    parser.add_argument("--seqlen", type=int, default=2048, help="evaluation window length in tokens (default: %(default)s)")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantcompose",
        description="Weight-activation quantization of LLMs as compositions of exact transforms.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("methods", help="list the installed strategies and their options")

    q = sub.add_parser("quantize", help="quantize a model, report perplexity beside full precision, optionally save it")
    _add_model_args(q)
    q.add_argument("--method", default="duquant", help="strategy name (see `quantcompose methods`; default: %(default)s)")
    q.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8 or 16 for float (default: %(default)s)")
    q.add_argument("--abits", type=int, default=4, help="activation bits, 2..8 or 16 for float (default: %(default)s)")
    q.add_argument("--weight-sym", action="store_true", help="symmetric weight quantizer (default: asymmetric)")
    q.add_argument("--act-sym", action="store_true", help="symmetric activation quantizer (default: asymmetric)")
    q.add_argument("--group-size", type=int, default=None, help="per-group weight quantization with this group size")
    from quantcompose.strategy import REFINE_METHODS, QuantSettings

    defaults = QuantSettings()
    q.add_argument("--weight-quantizer", choices=("rtn", "gptq"), default=defaults.weight_quantizer,
                   help="round weights to nearest, or with GPTQ error compensation (default: %(default)s)")
    q.add_argument("--no-clip-search", action="store_true",
                   help="use the strategy's static weight clip ratio instead of the per-row clip search")
    q.add_argument("--act-clip-search", action=argparse.BooleanOptionalAction, default=defaults.act_clip_search,
                   help="pick each place's activation clip ratio by the output error it causes, instead of "
                   "the strategy's static ratio (default: %(default)s)")
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=defaults.true_sequential,
                   help="calibrate each layer's MLP on the output of its already quantized attention "
                        "(slower; default: %(default)s)")
    q.add_argument("--qkv-bits", "--kv-bits", dest="qkv_bits", type=int, default=None,
                   help="bits of attention's Q and K (after RoPE) and V, per token and head, the KV cache among "
                        "them (default: the activation bits, as the papers quantize all activations; "
                        "16 keeps them in float)")
    q.add_argument("--residual-rotation", action=argparse.BooleanOptionalAction, default=defaults.residual_rotation,
                   help="rotate the residual stream with a randomized Hadamard (fused norms) before the "
                        "method's own transforms, as QuaRot does (default: %(default)s)")
    q.add_argument("--storage-dtype", choices=("float16", "bfloat16", "float32"), default=defaults.storage_dtype,
                   help="precision of the embeddings and online transforms the quantized model keeps; the "
                        "weights are folded exactly for the rounded transforms (default: %(default)s)")
    q.add_argument("--embedding-bits", type=int, default=defaults.embedding_bits,
                   help="store the embedding table as 8-bit (or 4-bit packed) codes with one scale and zero "
                        "point per row (8 or 4), quantized after calibration; a head tied to the table "
                        "must be quantized too, by a recipe target (default: float)")
    q.add_argument("--refine", choices=REFINE_METHODS, default=defaults.refine,
                   help="after the method's closed-form plans, learn clipping per layer against its "
                        "full-precision output: 'lwc' (OmniQuant's learnable weight clipping and an activation "
                        "clip per place, replacing the clip searches' ratios; default: none)")
    q.add_argument("--refine-epochs", type=int, default=defaults.refine_epochs,
                   help="with --refine: training epochs per layer (default: %(default)s)")
    q.add_argument("--refine-samples", type=int, default=defaults.refine_samples,
                   help="with --refine: calibration sequences trained on, the first ones; 0: all "
                        "(default: %(default)s)")
    q.add_argument("--refine-lr", type=float, default=defaults.refine_lr,
                   help="with --refine: AdamW learning rate of the clip logits (default: %(default)s)")
    q.add_argument("--calib", default="random-zipf",
                   help="calibration data: 'random-zipf' (default: random tokens with a Zipf prior over token ids), "
                        "'random' (uniform random tokens), a text file path, or 'wikitext2' (datasets)")
    q.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default: %(default)s)")
    q.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length (default: %(default)s)")
    q.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="strategy option, repeatable")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-fp", action="store_true", help="skip the full-precision evaluation")
    q.add_argument("--save", default=None, metavar="DIR", help="save the quantized model to DIR")
    q.add_argument("--overwrite", action="store_true", help="replace DIR (and the --export folder) if it exists")
    from quantcompose.export.cli import add_export_option, add_export_subcommand

    add_export_option(q)
    from quantcompose.recipe_cli import add_recipe_argument

    add_recipe_argument(q)  # after every flag a recipe can set
    from quantcompose.offload_cli import add_offload_arguments

    add_offload_arguments(q)

    e = sub.add_parser("eval", help="perplexity and zero-shot tasks (lm-eval) of a model or of a saved quantized model")
    _add_model_args(e)
    from quantcompose.tasks_cli import add_task_args

    add_task_args(e)

    from quantcompose.analysis_cli import add_subcommands

    add_subcommands(sub)  # compare, inspect
    add_export_subcommand(sub)
    return parser


def _cmd_methods() -> int:
    from quantcompose.plugin_manager import get_plugin_manager

    for name, info in sorted(get_plugin_manager().strategies().items()):
        print(f"{name}: {info.description}")
        for key, option in info.options.items():
            print(f"    {key} = {option.default!r}  {option.help}")
    return 0


def _load(name: str):
    from quantcompose.saving import load_quantized, looks_like_saved_model

    if looks_like_saved_model(name):
        return load_quantized(name)
    from quantcompose.models.loading import load_model

    return load_model(name)


def _eval_tokens(args: argparse.Namespace, tokenizer: Any):
    if args.eval_data is None:
        return None
    from quantcompose.data import load_wikitext2_test

    return load_wikitext2_test(tokenizer, None if args.eval_data == "wikitext2" else args.eval_data)


#: torch seeds are 64-bit; a signed range keeps them valid for every generator.
MAX_SEED = 2**63


def _require_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be at least {minimum}, got {value}")


def _check_data_source(source: str | None, what: str, builtin: tuple[str, ...]) -> None:
    """A data path is readable UTF-8 text with something in it (built-in sources are not paths)."""
    if source is None or source in builtin:
        return
    from quantcompose.data import read_text_file

    read_text_file(source, what)


def _check_common_args(args: argparse.Namespace) -> None:
    """What `quantize` and `eval` can both check before a model is loaded."""
    # A window of one token has nothing to predict.
    _require_at_least(args, 2, "seqlen")
    _require_at_least(args, 1, "max_windows")
    _check_data_source(args.eval_data, "evaluation (--eval-data)", ("wikitext2",))


def _check_quantize_args(args: argparse.Namespace) -> None:
    """Everything `quantize` can check before the model is loaded, so that no work is wasted."""
    from quantcompose.data import RANDOM_SOURCES
    from quantcompose.quant_embedding import EMBEDDING_BITS
    from quantcompose.saving import check_save_target, is_saved_model

    _check_common_args(args)
    _require_at_least(args, 1, "nsamples", "calib_seqlen", "group_size")
    if not 0 <= args.seed < MAX_SEED:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    _check_data_source(args.calib, "calibration (--calib)", (*RANDOM_SOURCES, "wikitext2"))
    if args.embedding_bits is not None and args.embedding_bits not in EMBEDDING_BITS:
        raise UsageError(f"--embedding-bits must be 8 or 4, got {args.embedding_bits}; omit it to keep the "
                         "embedding table in float")
    if is_saved_model(args.model):
        raise UsageError(f"{args.model} is a saved quantcompose model, already quantized; "
                         f"use `quantcompose eval --model {args.model} --eval-data PATH` to evaluate it")
    if args.save is not None:
        check_save_target(args.save, args.overwrite)


def _check_against_model(args: argparse.Namespace, model: Any, eval_tokens: Any) -> None:
    """What needs the loaded model and tokenizer, checked before any evaluation or quantization."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    # --seqlen has a default that only matters for evaluation.
    seqlen = args.seqlen if eval_tokens is not None else None
    for flag, value in (("--seqlen", seqlen), ("--calib-seqlen", getattr(args, "calib_seqlen", None))):
        if context is not None and value is not None and value > context:
            raise UsageError(f"{flag} {value} is longer than the model's context of {context} tokens; "
                             f"use at most {context}")
    if eval_tokens is not None and eval_tokens.shape[1] < args.seqlen:
        raise UsageError(f"the evaluation text has {eval_tokens.shape[1]} tokens, fewer than one window of "
                         f"--seqlen {args.seqlen}; pass more text or a smaller --seqlen")
    group = getattr(args, "group_size", None)
    if group is not None:
        from torch import nn

        from quantcompose.models import get_adapter

        widths = sorted({m.in_features for layer in get_adapter(model).layers() for m in layer.modules()
                         if isinstance(m, nn.Linear)})
        bad = [w for w in widths if w % group]
        if bad:
            raise UsageError(f"--group-size {group} does not divide the input width {bad[0]} of some linear "
                             f"layers (widths {widths}); choose a group size that divides all of them")


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    header = ("setting", "bits", "wikitext2 ppl")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from quantcompose.api import prepare_quantization
    from quantcompose.evaluate import perplexity
    from quantcompose.plugin_manager import get_plugin_manager
    from quantcompose.recipe_cli import recipe_from_args

    # The recipe (--recipe, or the defaults) with the flags given winning; args then hold what will run.
    recipe = recipe_from_args(args, _parse_options, _check_quantize_args)
    from quantcompose.export.cli import check_export_args, export_after_quantize

    check_export_args(args, recipe.settings())
    manager = get_plugin_manager()
    # The method, its options and the bits are checked before anything is loaded.
    recipe = recipe.resolve(manager)
    from quantcompose.offload_cli import refuse_without_offload, run_offloaded

    if args.offload:
        return run_offloaded(args, recipe, manager)
    refuse_without_offload(args)
    torch.manual_seed(args.seed)
    model, tokenizer = _load(args.model)
    from quantcompose.models import get_adapter

    get_adapter(model)  # an architecture with no adapter fails before any evaluation or calibration
    eval_tokens = _eval_tokens(args, tokenizer)
    _check_against_model(args, model, eval_tokens)
    # Before the full-precision evaluation: targets that match nothing, or a calibration text too short, fail here.
    prepared = prepare_quantization(model, tokenizer, recipe, manager=manager)
    rows: list[tuple[str, str, str]] = []
    progress = not args.quiet
    if eval_tokens is not None and not args.no_fp:
        ppl = perplexity(model, eval_tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=progress)
        rows.append(("full precision", "W16A16", f"{ppl:.2f}"))
    model, result = prepared.run(progress=progress)
    report = result.quantization
    bits = f"W{args.wbits}A{args.abits}" + ("" if args.qkv_bits is None else f"QKV{args.qkv_bits}")
    if eval_tokens is not None:
        ppl = perplexity(model, eval_tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=progress)
        rows.append((args.method, bits, f"{ppl:.2f}"))
    if rows:
        windows = "all" if args.max_windows is None else f"first {args.max_windows}"
        print(f"\n{args.model}: WikiText-2 test, {windows} windows of {args.seqlen} tokens")
        _print_table(rows)
    print(f"quantization time: {report.seconds:.1f} s ({args.nsamples} x {args.calib_seqlen} {args.calib} calibration tokens)")
    if args.save is not None:
        from quantcompose.saving import save_quantized, saved_size_breakdown

        save_quantized(
            model, args.save, tokenizer=tokenizer, overwrite=args.overwrite,
            metadata={"method": args.method, "bits": bits, "options": report.options, "source": args.model},
            recipe=result.recipe,
        )
        print(f"saved to {args.save}: {saved_size_breakdown(args.save).format()}")
    export_after_quantize(args, model, tokenizer)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from quantcompose.evaluate import perplexity
    from quantcompose.tasks_cli import resolve_task_args, run_tasks

    if args.eval_data is None and args.tasks is None:
        raise UsageError("eval needs --eval-data PATH (wiki.test.raw) or --eval-data wikitext2, "
                         "and/or --tasks NAME[,NAME...] (lm-evaluation-harness tasks)")
    _check_common_args(args)
    # Tasks are built (their data read) before the model is loaded: a missing task costs no load.
    tasks = resolve_task_args(args)
    start = time.perf_counter()
    model, tokenizer = _load(args.model)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no saved tokenizer; re-save it with a tokenizer")
    tokens = _eval_tokens(args, tokenizer)
    _check_against_model(args, model, tokens)
    ppl = None
    if tokens is not None:
        ppl = perplexity(model, tokens, seqlen=args.seqlen, max_windows=args.max_windows, progress=not args.quiet)
        print(f"{args.model}: wikitext2 perplexity {ppl:.2f} ({time.perf_counter() - start:.1f} s)")
    if tasks is not None:
        run_tasks(args, model, tokenizer, tasks, perplexity=ppl)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "methods":
            return _cmd_methods()
        if args.command == "quantize":
            return _cmd_quantize(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "export":
            from quantcompose.export.cli import cmd_export

            return cmd_export(args)
        from quantcompose.analysis_cli import COMMANDS

        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
    except (QuantComposeError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"quantcompose: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A save in progress has already removed its staging folder; nothing else is written.
        print("quantcompose: interrupted", file=sys.stderr)
        return INTERRUPTED
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
