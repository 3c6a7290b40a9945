"""The ``quantcompose export`` subcommand and ``quantize --export DIR``."""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("compressed-tensors",)


def add_export_subcommand(sub: Any) -> None:
    """Register ``export SAVED_DIR OUT_DIR --format compressed-tensors [--overwrite]``."""
    x = sub.add_parser("export", help="write a saved quantized model in a format serving engines read (vLLM, transformers)")
    x.add_argument("saved", metavar="SAVED_DIR", help="a model saved by `quantcompose quantize --save`")
    x.add_argument("out", metavar="OUT_DIR", help="the folder to write")
    x.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="checkpoint format (default: %(default)s)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is a previous export")
    _add_online_option(x)


def _add_online_option(parser: argparse.ArgumentParser) -> None:
    from quantcompose.export.transform_config import ONLINE_CHOICES

    parser.add_argument("--online-transforms", choices=ONLINE_CHOICES, default=ONLINE_CHOICES[0],
                        help="an online transform that does not fold: refuse the export (default), or write it "
                             "as a dense matrix in the format's transform_config, which plain transformers "
                             "ignores (load with compressed-tensors' apply_transform_config)")


def add_export_option(quantize: argparse.ArgumentParser) -> None:
    """``quantize --export DIR``: export the freshly quantized model too."""
    quantize.add_argument("--export", default=None, metavar="DIR",
                          help="also export the quantized model to DIR as compressed-tensors (for vLLM / transformers)")
    _add_online_option(quantize)


def check_export_args(args: argparse.Namespace, settings: Any) -> None:
    """Before ``quantize`` loads anything: the settings can be exported and DIR can be written."""
    if getattr(args, "export", None) is None:
        return
    from quantcompose.export.compressed_tensors import check_export_target
    from quantcompose.export.schemes import check_settings

    check_settings(settings)
    check_export_target(args.export, args.overwrite)


def export_after_quantize(args: argparse.Namespace, model: Any, tokenizer: Any) -> None:
    """Run the export ``quantize --export DIR`` asked for, if it did."""
    if getattr(args, "export", None) is None:
        return
    from quantcompose.export.compressed_tensors import export_compressed_tensors

    print(export_compressed_tensors(model, tokenizer, args.export, overwrite=args.overwrite,
                                    online_transforms=args.online_transforms).format())


def cmd_export(args: argparse.Namespace) -> int:
    """``quantcompose export``: load a saved model and export it."""
    from quantcompose.export.compressed_tensors import check_export_target, export_compressed_tensors
    from quantcompose.saving import load_quantized

    check_export_target(args.out, args.overwrite)
    model, tokenizer = load_quantized(args.saved)
    print(export_compressed_tensors(model, tokenizer, args.out, overwrite=args.overwrite,
                                    online_transforms=args.online_transforms).format())
    return 0
