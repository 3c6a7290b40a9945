"""``quantcompose quantize --offload``: quantize a safetensors checkpoint one layer at a time (:mod:`quantcompose.offload`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quantcompose.errors import UsageError


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of offloaded quantization, on the quantize parser."""
    group = parser.add_argument_group("models larger than memory")
    group.add_argument("--offload", action="store_true",
                       help="quantize layer by layer from a safetensors checkpoint folder (--model DIR with "
                            "config.json + model.safetensors), one decoder layer in memory at a time; needs "
                            "--save; a run interrupted is resumed by the same command")
    group.add_argument("--device", default="cpu",
                       help="with --offload: where each layer and the calibration activations live "
                            "(cpu, cuda, cuda:1; default: %(default)s)")
    group.add_argument("--restart", action="store_true",
                       help="with --offload: discard an interrupted run of other arguments instead of refusing")


def refuse_without_offload(args: argparse.Namespace) -> None:
    """``--device`` and ``--restart`` mean something only with ``--offload``: say so rather than ignore them."""
    for flag, given in (("--device", args.device != "cpu"), ("--restart", args.restart)):
        if given:
            raise UsageError(f"{flag} applies to offloaded quantization only; add --offload (with --model "
                             "CHECKPOINT_DIR --save DIR), or drop it")


def _tokenizer_of(folder: Path) -> Any:
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from quantcompose.models.loading import load_tokenizer

    return load_tokenizer(folder)


def run_offloaded(args: argparse.Namespace, recipe: Any, manager: Any) -> int:
    """Quantize ``args.model`` offloaded as ``recipe`` says, save it, evaluate the saved model if asked."""
    from quantcompose.offload import quantize_offloaded
    from quantcompose.saving import load_quantized, saved_size_breakdown

    if args.save is None:
        raise UsageError("--offload writes the model as it goes and needs --save DIR")
    source = Path(args.model)
    tokenizer = _tokenizer_of(source)
    result = quantize_offloaded(source, args.save, recipe, tokenizer=tokenizer, device=args.device,
                                overwrite=args.overwrite, restart=args.restart, progress=not args.quiet,
                                manager=manager)
    print(f"quantization time: {result.seconds:.1f} s, offloaded on {args.device} ({args.nsamples} x "
          f"{args.calib_seqlen} {args.calib} calibration tokens)")
    print(f"saved to {args.save}: {saved_size_breakdown(args.save).format()}")
    if args.eval_data is not None:
        # The float model is never whole in memory, so only the quantized one is evaluated.
        from quantcompose.cli import _eval_tokens
        from quantcompose.evaluate import perplexity

        model, tokenizer = load_quantized(args.save)
        if tokenizer is None:
            raise UsageError(f"{args.model} has no tokenizer files; --eval-data needs one")
        ppl = perplexity(model, _eval_tokens(args, tokenizer), seqlen=args.seqlen, max_windows=args.max_windows,
                         progress=not args.quiet)
        print(f"{args.save}: wikitext2 perplexity {ppl:.2f}")
    return 0


__all__ = ["add_offload_arguments", "refuse_without_offload", "run_offloaded"]
