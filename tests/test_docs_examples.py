"""Every fenced code block in README.md and docs/*.md runs, so the docs cannot drift from the code.

Each file's blocks run in order, in one fresh working folder and one Python
namespace: ```python blocks through ``exec``, ```bash / ```console blocks
command by command through ``quantcompose.cli.main`` in-process (a ``console``
block's commands are its ``$ `` lines), ```toml blocks are parsed. A block
that cannot run here carries ``<!-- not-run: reason -->`` on the line before
its fence; any other block that this test cannot run fails it, so new docs
cannot skip silently.

Examples are written for real runs (full SmolLM2-135M, 32 evaluation
windows). :data:`SHRINK` is the one table of rewriting rules that makes them
small enough for a test: fewer windows and calibration tokens, SmolLM2 cut to
its first :data:`SMALL_LAYERS` decoder layers (real weights and tokenizer,
saved as a local model folder), the shared data by absolute path. A file
whose rewritten blocks use the real model or data is a slow test.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from realmodel import SHARED, load_smollm2, requires_real_model

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no TOML parser; its toml blocks go unchecked
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Decoder layers kept of SmolLM2 for the examples (layer 1 is where `inspect --layer` then looks).
SMALL_LAYERS = 2

#: The rewriting rules, applied in order to the text of every block that runs:
#: (regular expression, replacement). ``{small_model}``, ``{shared}`` and ``{root}`` are
#: filled in with the cut-down SmolLM2 folder, the shared data folder and the repository root.
SHRINK: list[tuple[str, str]] = [
    (r"--max-windows \d+", "--max-windows 1"),
    (r"--eval-windows \d+", "--eval-windows 1"),
    (r"max_windows=\d+", "max_windows=1"),
    (r"--seqlen \d+", "--seqlen 64"),
    (r"\bseqlen=\d+", "seqlen=64"),
    (r"--calib-seqlen \d+", "--calib-seqlen 32"),
    (r"\bnsamples=\d+", "nsamples=1"),
    (r"--nsamples \d+", "--nsamples 1"),
    (r"--bits w\da\d(,w\da\d)+", "--bits w4a4"),
    (r"--methods [\w,-]+", "--methods rtn,duquant"),
    (r"--seeds [\d,]+", "--seeds 0"),
    (r"--layer 11\b", f"--layer {SMALL_LAYERS - 1}"),
    (r"--limit \d+", "--limit 4"),
    (r"\bitems=\d+", "items=8"),
    # The commands' own calibration defaults (16 x 512 tokens) where a command leaves them unset.
    (r"^(quantcompose (quantize|compare|inspect)\b(?!.*--nsamples).*)$", r"\1 --nsamples 1 --calib-seqlen 32"),
    (r"\bsmollm2-135m\b", "{small_model}"),
    # A placeholder model path in the Python API example, and files shipped at the repository root.
    (r"path/to/model", "{small_model}"),
    (r"(?<![\w/.])recipes/", "{root}/recipes/"),
    (r"\.\./shared/", "{shared}/"),
]
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language tag, its text and its not-run reason (if marked)."""

    path: Path
    line: int
    lang: str
    text: str
    not_run: str | None

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, indent = i, len(opening.group(1))
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        text = "\n".join(line[indent:] for line in lines[start + 1:i])
        blocks.append(Block(path, start + 1, opening.group(2).lower(), text, marker.group(1) if marker else None))
        i += 1
    return blocks


def shrink(text: str, small_model: str) -> str:
    """``text`` with every :data:`SHRINK` rule applied (multi-line, so ``^``/``$`` match per line)."""
    for pattern, replacement in SHRINK:
        text = re.sub(pattern, replacement.format(small_model=small_model, shared=SHARED, root=ROOT), text, flags=re.M)
    return text


def _commands(block: Block) -> list[str]:
    if block.lang == "console":
        return [line[2:] for line in block.text.splitlines() if line.startswith("$ ")]
    joined = re.sub(r"\\\n\s*", " ", block.text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


RUNNABLE = {"python", "bash", "console", "sh", "shell", "toml"}
NEEDS_MODEL = re.compile(r"\bsmollm2-135m\b|\.\./shared/")


def _needs_model(path: Path) -> bool:
    return any(b.not_run is None and NEEDS_MODEL.search(b.text) for b in code_blocks(path))


def _params():
    for path in DOC_FILES:
        if all(b.not_run for b in code_blocks(path)):
            continue  # nothing to run (test_every_block_runs_or_says_why_not covers its markers)
        marks = [pytest.mark.slow, requires_real_model] if _needs_model(path) else []
        yield pytest.param(path, id=str(path.relative_to(ROOT)), marks=marks)


@pytest.fixture(scope="session")
def small_smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M cut to its first SMALL_LAYERS decoder layers, saved as a local model folder."""
    model, tokenizer = load_smollm2()
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = SMALL_LAYERS
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:SMALL_LAYERS]
    # A fresh model, not a copy: transformers refuses to save one that was loaded from GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    small = type(model)(config)
    kept = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < SMALL_LAYERS}
    small.load_state_dict(kept)
    folder = tmp_path_factory.mktemp("smollm2-small")
    small.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def problems(blocks: list[Block]) -> list[str]:
    """Unmarked blocks this test cannot run: an unknown language, or a shell command other than `quantcompose`."""
    found = []
    for b in blocks:
        if b.not_run is not None:
            continue
        if b.lang not in RUNNABLE:
            found.append(f"{b.where}: a {b.lang or 'plain'} block")
        elif b.lang in {"bash", "console", "sh", "shell"}:
            found += [f"{b.where}: `{c.split()[0]}`" for c in _commands(b) if c.split()[0] != "quantcompose"]
    return found


def test_every_block_runs_or_says_why_not():
    found = problems([b for f in DOC_FILES for b in code_blocks(f)])
    assert not found, f"blocks this test cannot run, with no <!-- not-run: reason --> before them: {found}"


def test_an_unmarked_block_that_cannot_run_is_found(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Text.\n\n<!-- not-run: needs the hub -->\n```bash\npip install x\n```\n\n"
                   "```bash\nquantcompose methods\nvllm serve m\n```\n\n```\ndiagram\n```\n", encoding="utf-8")
    blocks = code_blocks(doc)
    assert [(b.lang, b.not_run) for b in blocks] == [("bash", "needs the hub"), ("bash", None), ("", None)]
    assert [p.split(": ", 1)[1] for p in problems(blocks)] == ["`vllm`", "a plain block"]


def test_the_rules_shrink_the_readme_command():
    command = _commands(next(b for b in code_blocks(ROOT / "README.md") if "quantize" in b.text))[0]
    small = shrink(command, "SMALL")
    assert "--max-windows 1" in small and "--seqlen 64" in small and "--nsamples 1" in small
    assert "--model SMALL" in small and f"{SHARED}/data/wikitext-2-raw/wiki.test.raw" in small


#: Shrunk commands that already ran and succeeded: the README and the user guide share one.
_RAN: set[str] = set()


def _run_block(block: Block, namespace: dict, small_model: str) -> None:
    if block.lang == "python":
        code = compile(shrink(block.text, small_model), block.where, "exec")
        exec(code, namespace)  # noqa: S102 - the docs' own examples
    elif block.lang == "toml":
        if tomllib is not None:
            tomllib.loads(block.text)
    else:
        from quantcompose.cli import main

        # Shrunk per command, after joining its continuation lines.
        for command in (shrink(c, small_model) for c in _commands(block)):
            if command in _RAN and "--out" not in command and "--save" not in command:
                continue  # same command, same result; one that writes files runs again for the blocks after it
            assert main(shlex.split(command)[1:]) == 0, f"{block.where}: `{command}` failed"
            _RAN.add(command)


@pytest.mark.parametrize("path", _params())
def test_the_examples_of(path, tmp_path, monkeypatch, request):
    blocks = [b for b in code_blocks(path) if b.not_run is None]
    small_model = request.getfixturevalue("small_smollm2") if _needs_model(path) else "smollm2-135m"
    monkeypatch.chdir(tmp_path)  # examples write their outputs (saved models, tables) where they run
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for block in blocks:
        _run_block(block, namespace, small_model)
