"""``quantcompose eval --tasks ...``: the zero-shot task options of the ``eval`` command and what they run.

``quantcompose.cli`` adds these options to ``eval`` with :func:`add_task_args`,
resolves the tasks (and reads their data) with :func:`resolve_task_args`
before it loads the model, and runs them with :func:`run_tasks`; the work is
done by :mod:`quantcompose.lm_eval_adapter`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quantcompose.errors import UsageError


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--tasks``, ``--include-path``, ``--local-tasks-only``, ``--limit``, ``--num-fewshot``,
    ``--batch-size`` and ``--out`` to ``parser``."""
    parser.add_argument("--tasks", default=None, metavar="NAME[,NAME...]",
                        help="lm-evaluation-harness tasks, groups or tags (e.g. piqa,arc_easy), resolved by the "
                             "harness; needs `pip install \"quantcompose[eval]\"`")
    parser.add_argument("--include-path", action="append", default=[], metavar="FOLDER",
                        help="a folder of task YAML files for --tasks, repeatable")
    parser.add_argument("--local-tasks-only", action="store_true",
                        help="resolve --tasks only from the --include-path folders (skips indexing the "
                             "harness's own tasks, which takes seconds)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per document (default: each task's own, 0 where it sets none)")
    parser.add_argument("--batch-size", type=int, default=16, help="harness batch size (default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the task scores as JSON to FILE")


def _check_out(path: str | None) -> None:
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"--out {path} is a folder; pass a file name (e.g. {target / 'tasks.json'})")
    if not target.parent.is_dir():
        raise UsageError(f"--out {path}: the folder {target.parent} does not exist; create it first")


def resolve_task_args(args: argparse.Namespace) -> Any:
    """Check the task options and build the tasks (their data read), before any model is loaded.

    Returns the :class:`~quantcompose.lm_eval_adapter.ResolvedTasks`, or None without ``--tasks``.
    """
    for flag, value, minimum in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                                 ("--batch-size", args.batch_size, 1)):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be at least {minimum}, got {value}")
    if args.tasks is None:
        if args.include_path or args.local_tasks_only or args.limit is not None or args.num_fewshot is not None:
            raise UsageError("--include-path, --local-tasks-only, --limit and --num-fewshot go with --tasks NAME")
        return None
    _check_out(args.out)
    from quantcompose.lm_eval_adapter import resolve_tasks

    return resolve_tasks(args.tasks.split(","), args.include_path or None, local_only=args.local_tasks_only)


def run_tasks(args: argparse.Namespace, model: Any, tokenizer: Any, resolved: Any,
              perplexity: float | None = None) -> Any:
    """Run the resolved tasks on ``model``, print the table and write ``--out``; returns the results."""
    from quantcompose.lm_eval_adapter import evaluate_tasks

    results = evaluate_tasks(model, tokenizer, resolved, limit=args.limit, num_fewshot=args.num_fewshot,
                             batch_size=args.batch_size)
    limit = "" if args.limit is None else f", first {args.limit} documents per task"
    print(f"\n{args.model}: lm-evaluation-harness {results.harness_version}{limit}")
    print(results.to_table())
    if args.out is not None:
        record = {"model": args.model, "tasks": resolved.names, **results.to_dict()}
        if perplexity is not None:
            record["wikitext2_perplexity"] = {"value": perplexity, "seqlen": args.seqlen,
                                              "max_windows": args.max_windows}
        Path(args.out).expanduser().write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return results
