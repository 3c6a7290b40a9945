"""Zero-shot tasks through EleutherAI's lm-evaluation-harness (``lm-eval``), for any model quantcompose holds.

A quantized model is still the ``transformers`` model it was (its linears are
:class:`~quantcompose.qlinear.QuantLinear` modules, Q/K/V quantization sits in
the attention interface), so the harness's own ``HFLM`` wrapper runs it as
given: in memory after :func:`quantcompose.pipeline.quantize_model`, loaded
back by :func:`quantcompose.saving.load_quantized`, or a plain model from
:func:`quantcompose.models.loading.load_model`. Tasks are resolved by the
harness's ``TaskManager`` (its built-in tasks plus YAML files under an include
path), so any task whose data is reachable works; this module only turns the
harness's failures into :class:`~quantcompose.errors.QuantComposeError` s and
its results into rows.

``lm-eval`` is optional: ``pip install "quantcompose[eval]"``.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from quantcompose.errors import DataError, ModelLoadError, UnknownTaskError, UsageError

__all__ = [
    "TaskScore",
    "TaskResults",
    "ResolvedTasks",
    "require_lm_eval",
    "harness_model",
    "resolve_tasks",
    "evaluate_tasks",
]


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a :class:`ModelLoadError` saying how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ModelLoadError(
            "zero-shot tasks need the lm-evaluation-harness, which is not installed; "
            'install it with `pip install "quantcompose[eval]"` (or `pip install lm-eval`)'
        ) from exc
    # The harness logs every task it builds at INFO/WARNING; our CLI prints its own table.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task: the harness's value and its standard error (None where it gives none)."""

    task: str
    metric: str
    value: float
    stderr: float | None


@dataclass
class TaskResults:
    """What :func:`evaluate_tasks` measured: one :class:`TaskScore` per task and metric, and the protocol."""

    scores: list[TaskScore]
    limit: int | None
    num_fewshot: int | None
    samples: dict[str, int] = field(default_factory=dict)
    harness_version: str = ""

    def score(self, task: str, metric: str) -> TaskScore:
        """The score of ``task``'s ``metric`` (a :class:`UsageError` naming those present if absent)."""
        for s in self.scores:
            if s.task == task and s.metric == metric:
                return s
        have = ", ".join(f"{s.task}/{s.metric}" for s in self.scores)
        raise UsageError(f"no metric {metric!r} for task {task!r} in these results (have: {have})")

    def to_table(self) -> str:
        """A plain-text table: task, metric, value, stderr (four decimals), one row per score."""
        header = ("task", "metric", "value", "stderr")
        rows = [(s.task, s.metric, f"{s.value:.4f}", "" if s.stderr is None else f"{s.stderr:.4f}")
                for s in self.scores]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                 for r in [header, tuple("-" * w for w in widths), *rows]]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every score and the protocol."""
        from quantcompose import __version__

        return {
            "scores": [vars(s) for s in self.scores],
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "samples": self.samples,
            "lm_eval_version": self.harness_version,
            "quantcompose_version": __version__,
        }


@dataclass
class ResolvedTasks:
    """Tasks the harness has built (their data read), ready for :func:`evaluate_tasks`."""

    names: list[str]
    objects: list[Any]
    manager: Any


def _task_manager(include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
                  local_only: bool) -> Any:
    paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    for p in paths:
        if not Path(p).is_dir():
            raise UsageError(f"--include-path {os.fspath(p)} is not a folder; pass a folder of task YAML files")
    if local_only and not paths:
        raise UsageError("resolving tasks from local folders only needs at least one --include-path FOLDER")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[os.fspath(p) for p in paths] or None, include_defaults=not local_only)


def _data_error(name: str, exc: Exception) -> DataError:
    cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return DataError(
        f"the data of task {name!r} could not be loaded ({cause}); the harness fetches most tasks' data "
        "from the Hugging Face hub, so with no network use a task whose data is in the local `datasets` "
        "cache, or define a local task (a YAML with `dataset_path: json` and `data_files`) and pass its "
        "folder with --include-path"
    )


def resolve_tasks(
    names: Sequence[str],
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    local_only: bool = False,
) -> ResolvedTasks:
    """Look ``names`` up in the harness (tasks, groups or tags) and build them, reading their data.

    ``include_path`` adds folders of task YAMLs; ``local_only`` skips the
    harness's built-in tasks (indexing its ~14,000 YAML files takes seconds).
    An unknown name is an :class:`UnknownTaskError` with the closest known
    names; data that cannot be reached is a :class:`DataError`. Both happen
    here, before any model runs.
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError("no task given; pass --tasks NAME[,NAME...] (e.g. --tasks piqa,arc_easy)")
    require_lm_eval()
    manager = _task_manager(include_path, local_only)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            where = "the --include-path folders" if local_only else "the harness's tasks or the --include-path folders"
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownTaskError(f"no task, group or tag named {name!r} in {where}{hint} "
                                   "(`lm_eval ls tasks` lists the harness's own)")
    objects = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, OSError) as exc:  # datasets' hub errors are ConnectionError / OSError
            raise _data_error(name, exc) from exc
        except Exception as exc:  # noqa: BLE001 - a broken task config: say which task and why
            if "dataset" in type(exc).__module__:
                raise _data_error(name, exc) from exc
            raise UsageError(f"the harness could not build task {name!r}: {type(exc).__name__}: {exc}") from exc
        # The object the name stands for: a group, or the task(s) of a task name or tag.
        group = loaded.get("groups", {}).get(name)
        objects.extend([group] if group is not None else loaded["tasks"].values())
    return ResolvedTasks(names, objects, manager)


def _model_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"


def harness_model(model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int | None = None) -> Any:
    """The harness's ``HFLM`` around an in-memory ``transformers`` causal LM (quantized or not) and its tokenizer.

    The model is used as it is, on its own device, in its own dtype; nothing is
    copied or reloaded.
    """
    if tokenizer is None:
        raise UsageError("the harness needs the model's tokenizer; load or save the model with one")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                device=_model_device(model))


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # the harness writes "N/A" where it has no stderr
        return None
    return None if math.isnan(number) else number


def _scores(results: dict[str, dict[str, Any]]) -> list[TaskScore]:
    scores = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or "_stderr" in metric or _number(value) is None:
                continue
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            stderr = _number(metrics.get(f"{metric}_stderr,{filter_name}"))
            scores.append(TaskScore(task, label, float(value), stderr))
    return scores


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: ResolvedTasks | Sequence[str],
    *,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> TaskResults:
    """Run ``tasks`` (names, or :func:`resolve_tasks`' result) on ``model`` through the harness.

    ``limit`` evaluates the first N documents of each task; ``num_fewshot``
    overrides the tasks' own few-shot counts (zero-shot where they set none);
    ``seed`` seeds the harness's sampling and few-shot draws. Returns one
    :class:`TaskScore` per task (and group) and metric.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"num_fewshot must be at least 0, got {num_fewshot}")
    resolved = tasks if isinstance(tasks, ResolvedTasks) else resolve_tasks(tasks, include_path)
    lm_eval = require_lm_eval()
    lm = harness_model(model, tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=resolved.objects, task_manager=resolved.manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    samples = {task: int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(n)
               for task, n in (output.get("n-samples") or {}).items()}
    return TaskResults(_scores(output["results"]), limit, num_fewshot, samples,
                       getattr(lm_eval, "__version__", ""))
