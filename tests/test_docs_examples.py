"""Every ```python block of docs/*.md and README.md runs (offline, on the CPU, in seconds).

Markers, an HTML comment on the line right before a block's opening fence (visible in the Markdown source):

* ``<!-- docs-test: setup -->``: the page's setup; every setup block of a page runs (in page order)
  before each other block of that page, in the same namespace.  Each block is a test of its own; and each
  page also runs top to bottom in one namespace (``test_page_runs_in_order``), as a reader pasting it into
  one session would: a block must not depend on a later one, nor reuse what an earlier one used up (a base
  model that ``get_peft_model`` already wrapped).
* ``<!-- docs-test: skip (reason) -->``: not run; the reason is shown as the skip reason.
* ``<!-- docs-test: requires trl -->``: skipped where that module is not installed.
* ``<!-- docs-test: plan CONFIG_JSON FLAGS -->`` before a plain ```` ``` ```` block: that block is
  ``peft-layersched plan`` output on a BERT-base config (12 layers) with ``{"r": 8, "target_modules":
  ["query", "value"]}`` updated by ``CONFIG_JSON``; every line of it but ``...`` must be in the real
  output, in order.
* ``<!-- docs-test: transcript -->`` before a plain ```` ``` ```` block: a shell session.  ``$ cat FILE`` and the
  lines up to the next ``$`` write FILE; ``$ peft-layersched ...`` runs that command line (``cli.main``, in a
  temporary folder), and every line up to the next ``$`` but ``...`` must be in its output, in order.

Each Python block runs in a fresh temporary working directory (examples write ``out/``, ``adapter/``, ...).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import warnings

import pytest

# The examples are written for the newest stack: under tox they run where PEFT_LAYERSCHED_DOCS_TESTS=1 (the
# envs docs and peft0212-tf5); outside tox (a plain pytest run) always.
pytestmark = pytest.mark.skipif(
    "TOX_ENV_NAME" in os.environ and os.environ.get("PEFT_LAYERSCHED_DOCS_TESTS") != "1",
    reason="the docs' examples run in the tox envs docs and peft0212-tf5 (PEFT_LAYERSCHED_DOCS_TESTS=1)",
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(setup|skip|requires|plan|transcript)\b\s*(.*?)\s*-->\s*$")
_PLAN = re.compile(r"^<!--\s*docs-test:\s*plan\s+(.*?)\s*-->\n```[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


class Block(object):
    def __init__(self, page: pathlib.Path, line: int, code: str, marker: str, argument: str) -> None:
        self.page, self.line, self.code, self.marker, self.argument = page, line, code, marker, argument

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: pathlib.Path):
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        kind, argument = (marker.group(1), marker.group(2).strip("() ")) if marker else ("", "")
        found.append(Block(page, line, match.group(1), kind, argument))
    return found


ALL = [block for page in PAGES for block in blocks_of(page)]
SETUP = {}
for _block in ALL:
    if _block.marker == "setup":
        SETUP.setdefault(_block.page, []).append(_block)
EXAMPLES = [block for block in ALL if block.marker != "setup"]


def runnable(block: Block) -> bool:
    """Whether ``block`` runs here: not marked skip, and every module it requires is installed."""
    if block.marker == "skip":
        return False
    if block.marker == "requires":
        return all(importlib.util.find_spec(module) is not None for module in block.argument.split())
    return True


def run_block(block: Block, namespace: dict) -> None:
    # Line numbers in a traceback are the page's (the code starts on the line after the fence).
    tree = ast.parse(block.code, str(block.page))
    ast.increment_lineno(tree, block.line)
    exec(compile(tree, str(block.page), "exec"), namespace)


def test_pages_have_examples():
    assert EXAMPLES, "no ```python blocks found in README.md / docs/*.md"
    for block in ALL:
        marker_line = block.page.read_text(encoding="utf-8").splitlines()[block.line - 2] if block.line > 1 else ""
        if "docs-test" in marker_line:
            assert block.marker, f"{block.name}: unknown docs-test marker {marker_line!r}"


@pytest.mark.parametrize("block", EXAMPLES, ids=[block.name for block in EXAMPLES])
def test_example_runs(block, tmp_path, monkeypatch):
    if block.marker == "skip":
        pytest.skip(block.argument or "marked docs-test: skip")
    if block.marker == "requires":
        for module in block.argument.split():
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"needs {module}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    namespace = {"__name__": "__main__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for setup in SETUP.get(block.page, []):
            run_block(setup, namespace)
        run_block(block, namespace)
    assert os.getcwd() == str(tmp_path)


IN_ORDER = [page for page in PAGES if sum(1 for block in ALL if block.page == page and block.marker != "setup") > 1]


@pytest.mark.parametrize("page", IN_ORDER, ids=[str(page.relative_to(ROOT)) for page in IN_ORDER])
def test_page_runs_in_order(page, tmp_path, monkeypatch):
    # A reader runs a page top to bottom in one session (a notebook, a REPL): setup blocks where they
    # stand, then every block after the one before, in one namespace and one working folder.
    blocks = [block for block in ALL if block.page == page and runnable(block)]
    if sum(1 for block in blocks if block.marker != "setup") < 2:
        pytest.skip("fewer than two of this page's blocks run here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    namespace = {"__name__": "__main__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            try:
                run_block(block, namespace)
            except Exception as error:
                pytest.fail(f"{block.name}, run after the page's blocks above it: {type(error).__name__}: {error}")


_TRANSCRIPT = re.compile(r"^<!--\s*docs-test:\s*transcript\s*-->\n```[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
TRANSCRIPTS = [(page, text.count("\n", 0, m.start()) + 1, m.group(1))
               for page in PAGES for text in [page.read_text(encoding="utf-8")] for m in _TRANSCRIPT.finditer(text)]


@pytest.mark.parametrize("transcript", TRANSCRIPTS,
                         ids=["%s:%d" % (p.relative_to(ROOT), line) for p, line, _ in TRANSCRIPTS])
def test_cli_transcript(transcript, tmp_path, monkeypatch, capsys, transformers_logging_restored):
    import shlex

    from peft_layersched import cli

    page, line, text = transcript
    monkeypatch.chdir(tmp_path)
    commands = []  # [command line, [lines shown after it]]
    for shown in text.splitlines():
        if shown.startswith("$ "):
            commands.append([shown[2:], []])
        else:
            assert commands, f"{page.name}:{line}: a transcript starts with a '$ ' command line"
            commands[-1][1].append(shown)
    ran = 0
    for command, shown in commands:
        argv = shlex.split(command)
        if argv[0] == "cat":
            (tmp_path / argv[1]).write_text("\n".join(shown) + "\n")
            continue
        assert argv[0] == "peft-layersched", f"{page.name}:{line}: no way to run {command!r} here"
        code = cli.main(argv[1:])
        captured = capsys.readouterr()
        assert code == 0, f"{page.name}:{line}: {command} exited {code}: {captured.err}"
        output = iter(out.rstrip() for out in captured.out.splitlines())
        for expected in shown:
            if expected.strip() != "...":
                found = any(out == expected.rstrip() for out in output)
                assert found, f"{page.name}:{line}: not in the output of {command} (in this order): {expected!r}"
        ran += 1
    assert ran, f"{page.name}:{line}: the transcript runs no peft-layersched command"


PLANS = [(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
         for page in PAGES for text in [page.read_text(encoding="utf-8")] for m in _PLAN.finditer(text)]


@pytest.mark.parametrize("plan", PLANS, ids=["%s:%d" % (p.relative_to(ROOT), line) for p, line, _, _ in PLANS])
def test_plan_output(plan, tmp_path, capsys, transformers_logging_restored):
    import json

    from transformers import BertConfig

    from peft_layersched import cli

    page, line, arguments, shown = plan
    fields, end = json.JSONDecoder().raw_decode(arguments)
    config = BertConfig()  # BERT-base: 12 layers
    config.architectures = ["BertForSequenceClassification"]
    config.save_pretrained(str(tmp_path / "bert-base"))
    (tmp_path / "schedule.json").write_text(json.dumps(dict({"r": 8, "target_modules": ["query", "value"]}, **fields)))
    argv = ["plan", "--model", str(tmp_path / "bert-base"), "--config", str(tmp_path / "schedule.json")]
    assert cli.main(argv + arguments[end:].split()) == 0
    output = iter(out.rstrip() for out in capsys.readouterr().out.splitlines())
    for expected in shown.splitlines():
        if expected.strip() != "...":
            found = any(out == expected.rstrip() for out in output)
            assert found, f"{page.name}:{line}: not in plan's output (in this order): {expected!r}"
