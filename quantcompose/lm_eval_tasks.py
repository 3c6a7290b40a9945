"""A multiple-choice task built from local text, in lm-evaluation-harness's own task format.

The harness's tasks (piqa, arc_easy, ...) fetch their data from the Hugging Face
hub. Where no hub is reachable, :func:`write_continuation_task` builds an
offline stand-in from any text file (WikiText-2 here): each item is the start of
a sentence, its true continuation, and continuations cut from other sentences.
A language model that reads the prefix should prefer the true one, so a model's
accuracy on it is a cheap check that quantization kept what the model knows.
The task is a YAML file plus a JSONL file that
``quantcompose eval --tasks NAME --include-path FOLDER`` (or the harness itself,
``lm_eval --include_path FOLDER``) resolves like any other task.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from quantcompose.data import read_text_file
from quantcompose.errors import DataError, UsageError

__all__ = ["ContinuationTask", "continuation_items", "write_continuation_task"]

#: WikiText marks headings as ``= Title =`` rows; they are not sentences.
_HEADING = re.compile(r"^\s*=.*=\s*$")
#: WikiText's raw text puts spaces around sentence-ending periods (`` . ``).
_SENTENCE_END = re.compile(r"(?<=\s[.!?])\s+")


@dataclass(frozen=True)
class ContinuationTask:
    """Where :func:`write_continuation_task` put the task, and how many items it has."""

    name: str
    yaml_path: Path
    data_path: Path
    items: int
    choices: int

    @property
    def folder(self) -> Path:
        """The folder to pass as ``--include-path``."""
        return self.yaml_path.parent


def _sentences(text: str, min_words: int) -> list[list[str]]:
    sentences = []
    for row in text.splitlines():
        if not row.strip() or _HEADING.match(row):
            continue
        for sentence in _SENTENCE_END.split(row.strip()):
            words = sentence.split()
            if len(words) >= min_words:
                sentences.append(words)
    return sentences


def continuation_items(
    text: str,
    *,
    items: int = 80,
    prefix_words: int = 10,
    continuation_words: int = 6,
    distractors: int = 3,
    seed: int = 0,
) -> list[dict[str, object]]:
    """``items`` multiple-choice documents ``{"context", "choices", "label"}`` cut from ``text``.

    Each document takes one sentence of at least ``prefix_words +
    continuation_words`` words: its first ``prefix_words`` words are the
    context, the next ``continuation_words`` the true choice, and
    ``distractors`` other chosen sentences give the same-length slice as wrong
    choices. Sentences, distractors and the order of the choices are drawn
    from ``random.Random(seed)``, so the same text and seed give the same task.
    """
    if items < 2 or distractors < 1 or distractors >= items or prefix_words < 1 or continuation_words < 1:
        raise UsageError(
            f"a continuation task needs items >= 2, 1 <= distractors < items and positive word counts; "
            f"got items={items}, distractors={distractors}, prefix_words={prefix_words}, "
            f"continuation_words={continuation_words}"
        )
    sentences = _sentences(text, prefix_words + continuation_words)
    if len(sentences) < items:
        raise DataError(
            f"the text has {len(sentences)} sentences of at least {prefix_words + continuation_words} words, "
            f"fewer than the {items} items asked for; pass a longer text or ask for fewer items"
        )
    rng = random.Random(seed)
    chosen = rng.sample(sentences, items)
    endings = [" ".join(words[prefix_words:prefix_words + continuation_words]) for words in chosen]
    documents = []
    for i, words in enumerate(chosen):
        wrong = rng.sample([e for j, e in enumerate(endings) if j != i and e != endings[i]], distractors)
        choices = [endings[i], *wrong]
        rng.shuffle(choices)
        documents.append({"context": " ".join(words[:prefix_words]), "choices": choices,
                          "label": choices.index(endings[i])})
    return documents


def _task_yaml(name: str, data_path: Path) -> str:
    # The harness's multiple-choice format: the context, then each choice after a
    # space, scored by log-likelihood (acc) and by log-likelihood per byte (acc_norm).
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_path))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def write_continuation_task(
    source: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    name: str = "wikitext_continuation",
    items: int = 80,
    prefix_words: int = 10,
    continuation_words: int = 6,
    distractors: int = 3,
    seed: int = 0,
) -> ContinuationTask:
    """Write the task ``name`` built from the text file ``source`` into ``folder`` (created if missing).

    ``folder`` gets ``NAME.yaml`` (the harness's task config, pointing at the
    data by absolute path) and ``NAME.jsonl`` (one document per line; see
    :func:`continuation_items` for how they are cut). Returns where they are.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise UsageError(f"task name {name!r} must be letters, digits, '_' or '-' (it names files and the task)")
    documents = continuation_items(
        read_text_file(source, "task source text"), items=items, prefix_words=prefix_words,
        continuation_words=continuation_words, distractors=distractors, seed=seed,
    )
    target = Path(folder).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    data_path = target / f"{name}.jsonl"
    data_path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    yaml_path = target / f"{name}.yaml"
    yaml_path.write_text(_task_yaml(name, data_path), encoding="utf-8")
    return ContinuationTask(name, yaml_path, data_path, len(documents), distractors + 1)
