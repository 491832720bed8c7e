"""The ``peft-layersched`` program: the parser, the subcommand registry, ``main`` and shared helpers.

Each subcommand module (``plan``, ``inspect``, ``demo``) registers itself with :func:`register_subcommand`.
Library errors (``ValueError``/``TypeError``/``OSError``) exit with code 1 and the message on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

_SUBCOMMANDS: List[Tuple[str, str, AddArguments, Run]] = []


def register_subcommand(name: str, add_arguments: AddArguments, run: Run, help: str = "") -> None:
    """Add (or replace) the subcommand ``name``: ``add_arguments(parser)`` declares its options,
    ``run(args)`` does the work and returns the exit code."""
    _SUBCOMMANDS[:] = [entry for entry in _SUBCOMMANDS if entry[0] != name]
    _SUBCOMMANDS.append((name, help, add_arguments, run))


def _version() -> str:
    from .. import __version__

    return __version__


def _register_demo() -> None:
    # demo.py imports torch, transformers and PEFT at the top: imported when a parser is built, not with cli.
    if any(entry[0] == "demo" for entry in _SUBCOMMANDS):
        return
    from .demo import HELP, add_arguments, run

    register_subcommand("demo", add_arguments, run, help=HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-layersched", description="Layer-scheduling LoRA for Hugging Face PEFT."
    )
    parser.add_argument("--version", action="version", version=f"peft-layersched {_version()}")
    _register_demo()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, add_arguments, run in _SUBCOMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 0
    try:
        return int(run(args) or 0)
    except (ValueError, TypeError, OSError) as error:
        print(f"peft-layersched {args.command}: error: {error}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------------ shared


def quiet_transformers() -> None:
    import transformers

    # Deprecation chatter of the installed transformers is not for the person reading the plan.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _is_inline_json(text: str) -> bool:
    """``--config '{...}'``: a JSON object given on the command line, not a file name."""
    return text.lstrip().startswith("{") and not os.path.exists(text)


def config_label(text: str) -> str:
    """How messages name a ``--config`` value: the file's path, or ``--config`` for inline JSON."""
    return "--config" if _is_inline_json(text) else text


def _read_config_data(path: str) -> Tuple[Any, str]:
    """The JSON data of ``path`` (a file, a folder holding ``adapter_config.json``, or inline JSON) and the
    name messages give it."""
    example = '{"target_modules": ["query", "value"], "layer_schedule": {"0": [-1]}}'
    if _is_inline_json(path):
        try:
            return json.loads(path), "--config"
        except ValueError as error:
            raise ValueError(
                f"--config: inline JSON that does not parse ({error}); quote the whole object for the shell, "
                f"e.g. --config '{example}', or give a file."
            ) from None
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path}: no such file; give a ScheduledLoraConfig JSON file (as written by save_pretrained, or a "
            f"dict such as {example}), an adapter folder, or the dict itself as inline JSON (--config '{example}')."
        )
    with open(path) as handle:
        try:
            return json.load(handle), path
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error}).") from None


def load_config(path: str, ignored: Optional[List[str]] = None) -> Any:
    """A ``ScheduledLoraConfig`` from an ``adapter_config.json`` (or a folder holding one), or from a
    small JSON dict of its fields (``target_modules``, ``r``, ``layer_schedule``, ...), in a file or inline
    (``path`` is then the JSON text itself, starting with ``{``).

    Keys of a saved config that the installed PEFT does not know (written by a newer PEFT) are dropped
    and listed in ``ignored``; in a hand-written dict they are an error (a typo must not pass).
    """
    from ..config import ScheduledLoraConfig

    data, path = _read_config_data(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of ScheduledLoraConfig fields, got {type(data).__name__}.")
    data = ScheduledLoraConfig.upgrade_saved_keys(data)  # an earlier version's "layers_pattern" loads silently
    peft_type = data.pop("peft_type", None)
    if peft_type not in (None, "SCHEDULED_LORA", "LORA"):
        raise ValueError(f"{path}: peft_type {peft_type!r} is not a LoRA adapter (SCHEDULED_LORA or LORA).")
    known = {f.name for f in dataclasses.fields(ScheduledLoraConfig) if f.init and f.name != "peft_type"}
    unknown = sorted(key for key in data if key not in known)
    if unknown and peft_type is None:
        raise ValueError(
            f"{path}: unknown ScheduledLoraConfig field(s) {unknown}; fields include target_modules, r, "
            f"lora_alpha, layer_schedule, schedule_unit, preallocate_layers, layer_stacks, task_type."
        )
    if ignored is not None:
        ignored.extend(unknown)
    return ScheduledLoraConfig(**{key: value for key, value in data.items() if key in known})


def format_count(n: int) -> str:
    return f"{n:,}"


def format_table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def emit(args: argparse.Namespace, payload: Dict[str, Any], lines: List[str]) -> int:
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(lines))
    return 0
