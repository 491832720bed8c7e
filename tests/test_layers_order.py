"""The package's import graph: no circle, and no module imports from a higher layer.

The layers are the diagram in docs/contributing.md, read from there, so the doc and the test cannot drift.
A module's layer is its top-level name under peft_layersched/: a folder or a module file.
"""

from __future__ import annotations

import ast
import os
import re
import sys

import pytest

import peft_layersched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(peft_layersched.__file__))
DOC = os.path.join(ROOT, "docs", "contributing.md")
DIAGRAM_MARKER = "<!-- layers:"
# The version is a literal in __init__.py, the one place pyproject.toml reads it: reading it is no upward import.
ROOT_CONSTANTS = ("__version__",)
NO_TORCH = ("torch", "transformers", "peft", "accelerate", "numpy", "safetensors")


def layers_of_the_diagram(doc=DOC):
    """``[[top-level name, ...], ...]`` from docs/contributing.md's layer diagram, bottom layer first."""
    with open(doc) as handle:
        lines = handle.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(DIAGRAM_MARKER)), None)
    assert start is not None, "docs/contributing.md has no layer diagram (a line starting {!r})".format(DIAGRAM_MARKER)
    assert lines[start + 1].startswith("```"), "the layer diagram's fenced block must follow its marker line"
    layers = []
    for line in lines[start + 2 :]:
        if line.startswith("```"):
            break
        names = []
        for token in line.split():
            if not re.match(r"^\w+(/|\.py)$", token):
                break  # the rest of the line describes the layer
            names.append(token.rstrip("/")[:-3] if token.endswith(".py") else token.rstrip("/"))
        if names:
            layers.append(names)
    return layers[::-1]


def package_files():
    """``{module name: file}`` of every module of the installed package."""
    files = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), PACKAGE)[:-3].replace(os.sep, ".")
                module = "peft_layersched" + ("" if rel == "__init__" else "." + rel.replace(".__init__", ""))
                files[module] = os.path.join(folder, name)
    return files


def top_name(module):
    """The diagram's name of a module: ``__init__`` for the package itself, else its first name under it."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(path, package):
    """``(package modules, outside modules)`` that ``path`` imports, at any depth (function-level too).

    ``from M import x``: an edge to ``M.x`` where that is a module, else to ``M``; none for the
    package's ``__version__``.
    """
    tree = ast.parse(open(path).read())
    rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".").split(".")
    here = ["peft_layersched"] + rel[:-1]  # the package holding this file (or this __init__'s own)
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                full = "{}.{}".format(module, alias.name)
                if module == "peft_layersched" and alias.name in ROOT_CONSTANTS:
                    continue
                if full in package:
                    inside.add(full)
                elif module in package:
                    inside.add(module)
                else:
                    outside.add(module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name in package else outside).add(
                    alias.name if alias.name in package else alias.name.split(".")[0]
                )
    return inside, outside


FILES = package_files()
GRAPH = {module: imports(path, set(FILES)) for module, path in FILES.items()}


def test_the_diagram_names_every_top_level_module_once_and_nothing_else():
    named = [name for layer in layers_of_the_diagram() for name in layer]
    present = {top_name(module) for module in FILES}
    assert len(named) == len(set(named)), "a name stands twice in the diagram: {}".format(named)
    assert set(named) == present, "in the package, not in the diagram: {}; in the diagram only: {}".format(
        sorted(present - set(named)), sorted(set(named) - present)
    )


def test_no_module_imports_from_a_higher_layer():
    rank = {name: i for i, layer in enumerate(layers_of_the_diagram()) for name in layer}
    upward = sorted(
        "{} ({}) imports {} ({})".format(module, top_name(module), dep, top_name(dep))
        for module, (inside, _) in GRAPH.items()
        for dep in inside
        # a name missing from the diagram: the test above says so
        if top_name(module) in rank and top_name(dep) in rank and rank[top_name(dep)] > rank[top_name(module)]
    )
    assert not upward, "imports that point up the layers of docs/contributing.md:\n" + "\n".join(upward)


def test_schedules_are_pure_python():
    heavy = sorted(
        "{} imports {}".format(module, dep)
        for module, (_, outside) in GRAPH.items()
        if top_name(module) == "schedules"
        for dep in outside
        if dep in NO_TORCH
    )
    assert not heavy, heavy


def test_the_package_modules_import_one_another_without_a_circle():
    # The package __init__ and _compat's own __init__ re-export their submodules: importing them is fine.
    graph = {
        module: {d for d in inside - {module} if d not in ("peft_layersched", "peft_layersched._compat")}
        for module, (inside, _) in GRAPH.items()
    }
    assert "peft_layersched.training.scheduler" in graph and "peft_layersched.integrations.hf_trainer.callback" in graph

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(graph)) if c]
    assert not cycles, cycles


@pytest.mark.parametrize("line,names", [
    ("cli/  integrations/   the drivers", ["cli", "integrations"]),
    ("layers.py config.py   pure: no torch.py", ["layers", "config"]),
])
def test_the_diagram_reader_takes_the_names_before_the_description(tmp_path, line, names):
    doc = tmp_path / "contributing.md"
    doc.write_text("text\n{} x -->\n```text\n{}\n_compat/\n```\n".format(DIAGRAM_MARKER, line))
    assert layers_of_the_diagram(str(doc)) == [["_compat"], names]


MAX_MODULE_LINES, MAX_CLASS_LINES = 500, 300


@pytest.mark.skipif(sys.version_info < (3, 8), reason="ast nodes have end_lineno from Python 3.8")
def test_no_module_is_over_500_lines_and_no_class_over_300():
    """Small enough to read at once: a longer module or class is split by concern."""
    too_long = []
    for module, path in sorted(package_files().items()):
        with open(path) as handle:
            text = handle.read()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append("{}: {} lines".format(module, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append("{}.{}: {} lines".format(module, node.name, length))
    assert not too_long, "over {} lines a module or {} a class: {}".format(MAX_MODULE_LINES, MAX_CLASS_LINES, too_long)


ALLOWED_PRIVATE = ("_compat", "__version__")


def test_modules_import_no_private_names_from_one_another():
    """Modules use one another's public names; ``_compat`` (a module) and ``__version__`` are the exceptions."""
    private = []
    for module, path in sorted(package_files().items()):
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if not (node.level or (node.module or "").startswith("peft_layersched")):
                continue
            names = [a.name for a in node.names if a.name.startswith("_") and a.name not in ALLOWED_PRIVATE]
            private.extend("{} imports {} from {}".format(module, name, node.module or ".") for name in names)
    assert not private, private
