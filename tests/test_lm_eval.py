"""Zero-shot tasks through lm-evaluation-harness: a local task built from WikiText-2, run on SmolLM2.

No hub is reachable here, so the task is written in the harness's own format
(a YAML with ``dataset_path: json`` pointing at a JSONL in ``tmp_path``) by
:func:`quantcompose.lm_eval_tasks.write_continuation_task`: the first words of
a real WikiText-2 sentence, its true continuation, and three continuations cut
from other sentences, shuffled with a fixed seed. Chance is 1/4.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from quantcompose.cli import main
from quantcompose.errors import DataError, UsageError
from quantcompose.lm_eval_tasks import continuation_items, write_continuation_task

from realmodel import WIKITEXT_TEST, load_smollm2, requires_data, requires_real_model

pytest.importorskip("lm_eval")

#: The real-model task: 48 items x 4 choices of about 22 tokens each, so one model's run is about
#: 4,000 tokens (some 20 s on an idle 2-core machine).
ITEMS, PREFIX_WORDS, CONTINUATION_WORDS = 48, 10, 6
CHANCE = 0.25
#: Full precision must reach this accuracy, far above chance (it scores 0.78 on 60 such items).
FP_MIN_ACC = 0.6
#: W8A8 DuQuant may lose at most 3 of the 48 items (about 6 points) against full precision.
W8A8_MAX_DROP = 3 / ITEMS


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    import quantcompose.cli as cli

    def refuse(name):
        raise AssertionError(f"the model {name} was loaded before the bad input was found")

    monkeypatch.setattr(cli, "_load", refuse)


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@requires_data
def test_continuation_items_are_well_formed_and_reproducible():
    text = WIKITEXT_TEST.read_text(encoding="utf-8")
    docs = continuation_items(text, items=20, prefix_words=5, continuation_words=4, seed=3)
    assert len(docs) == 20
    assert docs == continuation_items(text, items=20, prefix_words=5, continuation_words=4, seed=3)
    assert docs != continuation_items(text, items=20, prefix_words=5, continuation_words=4, seed=4)
    endings = {d["choices"][d["label"]] for d in docs}
    assert len(endings) == 20
    for d in docs:
        assert len(d["context"].split()) == 5
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert all(len(c.split()) == 4 for c in d["choices"])
        # every wrong choice is the true ending of another item
        assert all(c in endings for c in d["choices"])
        assert " ".join([d["context"], d["choices"][d["label"]]]) in text.replace("\r\n", "\n")
    # the true choice is not always in the same slot
    assert len({d["label"] for d in docs}) > 1


def test_continuation_items_refuse_too_little_text():
    with pytest.raises(DataError, match="fewer than the 5 items"):
        continuation_items("one two three four five six seven eight nine ten eleven . " * 3, items=5)
    with pytest.raises(UsageError, match="distractors < items"):
        continuation_items("x", items=3, distractors=3)


def _local_task(tmp_path, name="wikitext_continuation", items=8):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Sentence number {i} says that word{i} follows the count of {i} things here ."
                              for i in range(items)), encoding="utf-8")
    return write_continuation_task(text, tmp_path / "tasks", name=name, items=items, prefix_words=5,
                                   continuation_words=4)


def test_an_unknown_task_is_one_line_before_the_model_loads(tmp_path, capsys, no_load):
    task = _local_task(tmp_path)
    line = _one_line_error(capsys, ["eval", "--tasks", "wikitext_continuaton", "--include-path", str(task.folder),
                                    "--local-tasks-only"])
    assert "no task, group or tag named 'wikitext_continuaton'" in line
    assert "did you mean wikitext_continuation" in line


def test_unreachable_task_data_is_one_line_before_the_model_loads(tmp_path, capsys, no_load):
    task = _local_task(tmp_path)
    task.data_path.unlink()
    line = _one_line_error(capsys, ["eval", "--tasks", task.name, "--include-path", str(task.folder),
                                    "--local-tasks-only"])
    assert f"the data of task {task.name!r} could not be loaded" in line and "--include-path" in line


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "x", "--limit", "0"], "--limit must be at least 1"),
    (["--tasks", "x", "--local-tasks-only"], "needs at least one --include-path"),
    (["--tasks", "x", "--include-path", "/no/such/folder"], "is not a folder"),
    (["--eval-data", "wikitext2", "--limit", "3"], "go with --tasks"),
    (["--tasks", "x", "--out", "/no/such/folder/t.json"], "does not exist"),
])
def test_bad_task_options_are_one_line_before_the_model_loads(argv, message, capsys, no_load):
    assert message in _one_line_error(capsys, ["eval", *argv])


def _word_tokenizer(words):
    """A word-level fast tokenizer over ``words`` (whitespace-split), so a toy model runs under the harness."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words)))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def _own_accuracy(model, tokenizer, docs):
    """Accuracy by summed log-likelihood of each choice's tokens after the context, in one batch."""
    import torch

    pairs = [(tokenizer.encode(d["context"]), tokenizer.encode(c)) for d in docs for c in d["choices"]]
    # Word-level tokens and fixed word counts: every context + choice has the same length.
    with torch.no_grad():
        logprobs = model(torch.tensor([ctx + cont for ctx, cont in pairs])).logits.log_softmax(-1)
    scores = torch.tensor([sum(float(logprobs[row, len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
                           for row, (ctx, cont) in enumerate(pairs)]).reshape(len(docs), -1)
    return float((scores.argmax(1) == torch.tensor([d["label"] for d in docs])).float().mean())


def test_a_quantized_toy_model_runs_under_the_harness_with_its_own_scores(tmp_path, monkeypatch, capsys):
    """`eval --tasks` on a W8A8 toy: the harness's accuracy equals the one computed from the model here."""
    import torch

    import quantcompose.cli as cli
    from quantcompose.pipeline import quantize_model
    from quantcompose.qlinear import QuantLinear
    from quantcompose.strategy import QuantSettings

    from toymodel import tiny_llama

    task = _local_task(tmp_path, items=12)
    docs = [json.loads(line) for line in task.data_path.read_text().splitlines()]
    tokenizer = _word_tokenizer(w for d in docs for text in [d["context"], *d["choices"]] for w in text.split())
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    quantize_model(model, torch.randint(0, len(tokenizer), (2, 16)), "duquant",
                   QuantSettings(wbits=8, abits=8, weight_quantizer="rtn"), {}, progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    monkeypatch.setattr(cli, "_load", lambda name: (model, tokenizer))

    out = tmp_path / "scores.json"
    assert main(["eval", "--model", "toy", "--tasks", task.name, "--include-path", str(task.folder),
                 "--local-tasks-only", "--batch-size", "5", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    scores = {s["metric"]: s for s in record["scores"]}
    assert scores["acc"]["value"] == pytest.approx(_own_accuracy(model, tokenizer, docs))
    assert set(scores) == {"acc", "acc_norm"} and record["samples"] == {task.name: len(docs)}
    assert record["tasks"] == [task.name] and record["lm_eval_version"]
    table = capsys.readouterr().out
    assert f"{task.name}  acc       {scores['acc']['value']:.4f}" in table


def _w8a8_duquant(model):
    import torch

    from quantcompose.pipeline import quantize_model
    from quantcompose.strategy import QuantSettings

    # Two random-token windows, round-to-nearest, no clipping or clip searches and a short greedy
    # rotation search: W8A8 needs little, and it keeps the test short.
    calib = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    settings = QuantSettings(wbits=8, abits=8, weight_quantizer="rtn", weight_clip_search=False,
                             act_clip_search=False)
    options = {"steps": 8, "act_clip": 1.0, "weight_clip": 1.0}
    quantize_model(model, calib, "duquant", settings, options, progress=False)
    return model


@pytest.mark.slow
@requires_real_model
def test_smollm2_scores_far_above_chance_and_w8a8_duquant_keeps_it(tmp_path, capsys):
    from quantcompose.lm_eval_adapter import evaluate_tasks, resolve_tasks

    task = write_continuation_task(WIKITEXT_TEST, tmp_path / "tasks", items=ITEMS, prefix_words=PREFIX_WORDS,
                                   continuation_words=CONTINUATION_WORDS)
    tasks = resolve_tasks([task.name], task.folder, local_only=True)
    model, tokenizer = load_smollm2()
    fp = evaluate_tasks(model, tokenizer, tasks, batch_size=32).score(task.name, "acc")
    assert fp.value >= FP_MIN_ACC, f"full precision acc {fp.value:.3f} is not far above chance {CHANCE}"
    assert fp.stderr is not None and 0 < fp.stderr < 0.1

    quantized = _w8a8_duquant(copy.deepcopy(model))
    q = evaluate_tasks(quantized, tokenizer, tasks, batch_size=32).score(task.name, "acc")
    assert q.value >= fp.value - W8A8_MAX_DROP, f"W8A8 DuQuant acc {q.value:.3f} against {fp.value:.3f}"


@pytest.mark.slow
def test_a_harness_task_whose_data_is_out_of_reach_is_a_clear_error(tmp_path):
    """piqa's data is on the hub; offline (as here) the CLI ends with one DataError line, before loading the model."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / ".shim"), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "quantcompose.cli", "eval", "--model", str(tmp_path / "none"),
                          "--tasks", "piqa"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("quantcompose: error: the data of task 'piqa' could not be loaded"), run.stderr
    assert "Traceback" not in run.stderr
