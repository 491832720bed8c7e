"""The ``peft-layersched`` command line.

* ``peft-layersched plan --model MODEL --config SCHEDULE_JSON [--epochs N | --steps N]``: what a schedule
  does on a model (built from its config on the meta device: no weights), as a timeline grid.  ``MODEL`` is
  a folder or ``config.json``, a model type (``bert``) or a Hub id; ``SCHEDULE_JSON`` a file or inline JSON.
* ``peft-layersched inspect ADAPTER_DIR``: a saved adapter's schedule, which adapters trained, counts,
  and whether ``export_lora`` can turn it into plain LoRA.
* ``peft-layersched demo``: :mod:`peft_layersched.demo`, registered when the parser is built.

Each subcommand is ``(name, add_arguments(parser), run(args) -> exit code)``; add one with
:func:`register_subcommand`.  ``--json`` prints machine-readable output instead of the tables.
Library errors (``ValueError``/``TypeError``/``OSError``) end the command with exit code 1 and their
message on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..schedules import describe_schedule, format_layers, preview_span

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

_SUBCOMMANDS: List[Tuple[str, str, AddArguments, Run]] = []

_GRID_COLUMNS = 64  # beyond this many epochs/steps, one grid column covers several


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
    from . import demo

    doc = (demo.__doc__ or "").strip().splitlines()  # no docstrings under python -OO
    summary = doc[0].split(":", 1)[-1].strip().rstrip(".") if doc else ""
    register_subcommand("demo", demo.add_arguments, demo.run, help=summary)


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


def _quiet_transformers() -> None:
    import transformers

    # Deprecation chatter of the installed transformers is not for the person reading the plan.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _is_inline_json(text: str) -> bool:
    """``--config '{...}'``: a JSON object given on the command line, not a file name."""
    return text.lstrip().startswith("{") and not os.path.exists(text)


def _config_label(text: str) -> str:
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


def _load_config(path: str, ignored: Optional[List[str]] = None) -> Any:
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


def _count(n: int) -> str:
    return f"{n:,}"


def _table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _emit(args: argparse.Namespace, payload: Dict[str, Any], lines: List[str]) -> int:
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------- plan


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a model folder with config.json, or the config.json itself; a transformers model type such as bert "
        "or llama (that type's default config, built offline: for bert, BERT-base's 12 layers); or a Hub model id, "
        "whose config.json is read from the local cache or downloaded (no weights are read)",
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="SCHEDULE_JSON",
        help="ScheduledLoraConfig JSON: adapter_config.json (or its folder), or a dict of fields such as "
        '{"target_modules": ["query", "value"], "layer_schedule": {"type": "gradual", "every": 2}}, in a file or '
        "inline (quoted for the shell)",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--epochs", type=int, metavar="N", help="epochs to show (schedule_unit 'epoch')")
    span.add_argument("--steps", type=int, metavar="N", help="optimizer steps to show (schedule_unit 'step')")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the timeline (layers x time) to FILE, e.g. timeline.png or .svg/.pdf (matplotlib; a name "
        "without a suffix gets .png)",
    )


def _model_class(config: Any, task_type: Any) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    auto = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }.get(str(getattr(task_type, "value", task_type)), "AutoModel")
    return getattr(transformers, auto)


def _model_config(name: str) -> Any:
    """The transformers config ``--model name`` stands for: a local folder or ``config.json``, a model
    type (its default config, built offline) or a Hub model id (cache or download; config.json only)."""
    import difflib

    from transformers import CONFIG_MAPPING, AutoConfig

    if os.path.exists(name):
        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(
                f"--model {name}: this folder holds no config.json; give the model's folder or its config.json "
                f"(only the architecture is read, no weights)."
            )
        return AutoConfig.from_pretrained(name)
    if name in CONFIG_MAPPING:
        return AutoConfig.for_model(name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        stem = name.split("/")[-1].lower()
        types = list(CONFIG_MAPPING.keys())
        # "bert-base-uncased" -> "bert": the longest model type the name starts with, else near spellings
        prefixes = sorted((t for t in types if len(t) > 2 and stem.startswith(t)), key=len, reverse=True)
        close = prefixes[:1] or difflib.get_close_matches(stem, types, n=3)
        hint = f" Did you mean the model type {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"--model {name}: not a config.json file nor a folder holding one, not a transformers model type, "
            f"and no Hub model this machine can read ({reason}).{hint} Give the model's folder or its config.json, "
            f"a model type such as bert or llama (its default config, built offline), or a Hub id such as "
            f"google-bert/bert-base-uncased (config.json from the local cache or downloaded; no weights are read)."
        ) from None


def _build_model(path: str, task_type: Any) -> Tuple[Any, str]:
    """The model ``--model path`` names (see :func:`_model_config`) with empty weights, and the device name."""
    from .. import _compat

    config = _model_config(path)
    cls = _model_class(config, task_type)
    context, device = _compat.empty_weights()
    with context:
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    return model, device


def _module_suffix(module_name: str, index: Any) -> str:
    for stack in index.stacks:
        prefix = f"{stack.path}."
        if module_name.startswith(prefix):
            return module_name[len(prefix) :].split(".", 1)[-1]
    return module_name


def _stack_text(stack: Any, multi: bool) -> str:
    ids = f"'{stack.name}.0'..'{stack.name}.{stack.length - 1}'" if multi else f"0..{stack.length - 1}"
    return f"{stack.path}: {stack.length} layers (ids {ids})"


def _phases(timeline: List[List[Any]]) -> List[Tuple[int, int, List[Any]]]:
    phases: List[Tuple[int, int, List[Any]]] = []
    for t, active in enumerate(timeline):
        if phases and phases[-1][2] == active:
            phases[-1] = (phases[-1][0], t, active)
        else:
            phases.append((t, t, active))
    return phases


def _grid(
    rows: List[Any], timeline: List[List[Any]], preallocated: List[Any], unit: str
) -> List[str]:
    horizon = len(timeline)
    width = max(1, int(math.ceil(horizon / float(_GRID_COLUMNS))))
    bins = [(start, min(start + width, horizon)) for start in range(0, horizon, width)]
    cells: Dict[Any, str] = {}
    for layer in rows:
        line = []
        for start, end in bins:
            hits = sum(1 for t in range(start, end) if layer in timeline[t])
            if hits == end - start:
                line.append("#")
            elif hits:
                line.append("+")
            else:
                line.append("." if layer in preallocated else " ")
        cells[layer] = "".join(line)
    digits = max(len(str(layer)) for layer in rows)
    labels = {layer: "layer " + str(layer).rjust(digits) for layer in rows}
    head = f"{unit}s" if width == 1 else f"{unit}s ({width} per column)"
    pad = max(len(head), 6 + digits)
    step = len(str(bins[-1][0])) + 1
    lines = []
    if width == 1 and step * len(bins) <= 80:  # one label per column
        lines.append("  " + head.ljust(pad) + "".join(str(start).rjust(step) for start, _ in bins))
        for layer in rows:
            lines.append(("  " + labels[layer].ljust(pad) + "".join(c.rjust(step) for c in cells[layer])).rstrip())
    else:
        ruler = "".join(str(start).ljust(10) for i, (start, _) in enumerate(bins) if i % 10 == 0)
        lines.append("  " + head.ljust(pad) + " " + ruler.rstrip())
        ticks = "".join("|" if i % 10 == 0 else " " for i in range(len(bins)))
        lines.append("  " + " " * pad + " " + ticks.rstrip())
        for layer in rows:
            lines.append(("  " + labels[layer].ljust(pad) + " " + cells[layer]).rstrip())
    legend = "# trains   . adapter idle (frozen or not yet active)   blank: no adapter"
    if width > 1:
        legend = "# trains for the whole column   + for part of it   . adapter idle   blank: no adapter"
    lines.append("  " + legend)
    return lines


def _plan_horizon(chosen: Optional[int], unit: str, schedule: Any) -> int:
    if chosen is None:
        return preview_span(schedule) if schedule is not None else 1
    if chosen < 1:
        raise ValueError(f"--{unit}s must be >= 1 (the number of {unit}s to show), got {chosen}.")
    return chosen


def _compute_plan(
    model_path: str, config_path: str, epochs: Optional[int] = None, steps: Optional[int] = None
) -> Dict[str, Any]:
    """What ``plan`` shows, as plain data (the ``--json`` output): the model's stacks, the schedule, the
    adapters per layer and the active layers at each epoch/step, with the phases they form."""
    from peft import get_peft_model

    _quiet_transformers()
    config = _load_config(config_path)
    label = _config_label(config_path)
    unit = config.schedule_unit
    if epochs is not None and unit != "epoch":
        raise ValueError(f"{label}: schedule_unit is {unit!r}: the schedule counts optimizer steps; use --steps.")
    if steps is not None and unit != "step":
        raise ValueError(f"{label}: schedule_unit is {unit!r}: the schedule counts epochs; use --epochs.")
    base, device = _build_model(model_path, config.task_type)
    tuner = get_peft_model(base, config).base_model
    plan = tuner.scheduled_adapter()
    schedule = plan.schedule
    horizon = _plan_horizon(epochs if epochs is not None else steps, unit, schedule)
    if schedule is not None and schedule.spec.needs_run_length:  # (progressive) a run as long as the plan
        tuner.set_layer_schedule(schedule.spec.with_run_length(horizon).to_json())
        schedule = tuner.scheduled_adapter().schedule
    preallocated = tuner.preallocated_layers
    if schedule is None:
        timeline = [list(preallocated)] * horizon
    else:
        timeline = [list(schedule.active_at(t)) for t in range(horizon)]
    params = {layer: sum(p.numel() for p in ps) for layer, ps in tuner.layer_parameters().items()}
    modules: Dict[Any, List[str]] = {}
    for module_name, layer in sorted(tuner.scheduled_modules().items()):
        if layer is not None:
            modules.setdefault(layer, []).append(_module_suffix(module_name, plan.index))
    return {
        "model": {"path": model_path, "class": type(base).__name__, "device": device},
        "stacks": [{"name": s.name, "path": s.path, "length": s.length} for s in plan.index.stacks],
        "schedule": {
            "kind": schedule.kind if schedule is not None else None,
            "layer_schedule": config.to_dict().get("layer_schedule"),
            "unit": unit,
            "description": describe_schedule(schedule, unit)
            if schedule is not None
            else "none (plain LoRA: every adapter trains)",
        },
        "preallocated_layers": preallocated,
        "layers": [
            {"id": layer, "modules": modules.get(layer, []), "lora_params": params.get(layer, 0)}
            for layer in preallocated
        ],
        "lora_params_total": sum(params.values()),
        "horizon": horizon,
        "timeline": timeline,
        "phases": [
            {"start": start, "end": end, "active": active, "trainable_lora_params": sum(params[x] for x in active)}
            for start, end, active in _phases(timeline)
        ],
    }


def _stack_index(plan: Dict[str, Any]) -> Any:
    from ..layers import LayerIndex, LayerStack

    return LayerIndex([LayerStack(s["name"], s["path"], s["length"]) for s in plan["stacks"]])


def _plan_rows(plan: Dict[str, Any]) -> List[Any]:
    """Every layer of the model's stacks, top first (the rows of the grid and the plot)."""
    return list(reversed(_stack_index(plan).all_layers()))


def _render_plan(plan: Dict[str, Any]) -> List[str]:
    """The text of ``plan`` (without ``--json``): the lines of :func:`_compute_plan`'s data."""
    index = _stack_index(plan)
    model, schedule, unit = plan["model"], plan["schedule"], plan["schedule"]["unit"]
    preallocated = plan["preallocated_layers"]
    lines = [
        f"model     {model['class']} from {model['path']} (built on {model['device']}: no weights)",
        "stacks    " + "; ".join(_stack_text(stack, index.multi) for stack in index.stacks),
        f"schedule  {schedule['description']}",
        f"adapters  {len(preallocated)} layer(s) preallocated: {format_layers(preallocated)}; "
        f"{_count(plan['lora_params_total'])} LoRA parameters",
        "",
        "target modules per layer:",
    ]
    groups: List[Tuple[Tuple[str, ...], List[Any]]] = []
    for layer in plan["layers"]:
        names = tuple(layer["modules"])
        for group_names, members in groups:
            if group_names == names:
                members.append(layer["id"])
                break
        else:
            groups.append((names, [layer["id"]]))
    lines.extend(_table([[f"layers {format_layers(members)}", ", ".join(names)] for names, members in groups]))
    lines += ["", f"timeline, {unit}s 0..{plan['horizon'] - 1}:"]
    lines.extend(_grid(_plan_rows(plan), plan["timeline"], preallocated, unit))
    lines += ["", "phases:"]
    table = [[f"{unit}s", "active layers", "trainable LoRA params"]]
    shown = plan["phases"][:40]
    for phase in shown:
        start, end = phase["start"], phase["end"]
        span = str(start) if start == end else f"{start}-{end}"
        table.append([span, format_layers(phase["active"]), _count(phase["trainable_lora_params"])])
    lines.extend(_table(table))
    if len(plan["phases"]) > len(shown):
        lines.append(f"  ... {len(plan['phases']) - len(shown)} more phases (--json lists them all)")
    if "plot" in plan:
        lines += ["", f"timeline drawn to {plan['plot']}"]
    return lines


def _run_plan(args: argparse.Namespace) -> int:
    plan = _compute_plan(args.model, args.config, epochs=args.epochs, steps=args.steps)
    if args.plot:
        from .plot import plot_timeline

        title = f"{plan['model']['class']}: {plan['schedule']['description']}"
        unit = plan["schedule"]["unit"]
        plan["plot"] = plot_timeline(
            args.plot, _plan_rows(plan), plan["timeline"], plan["preallocated_layers"], unit, title
        )
    return _emit(args, plan, _render_plan(plan))


# ----------------------------------------------------------------------------------------- inspect

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_(?:A|B|embedding_A|embedding_B|magnitude_vector))\b"
)


def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a folder written by save_pretrained")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _unreadable(path: str, kind: str, error: BaseException) -> ValueError:
    return ValueError(
        f"{path}: cannot be read: it is truncated or not a {kind} file "
        f"({type(error).__name__}: {str(error).strip().rstrip('.')}); "
        f"save the adapter again with model.save_pretrained(...), or copy the whole file again if a copy or "
        f"download was cut short."
    )


def _load_weights(folder: str) -> Tuple[str, Dict[str, Any]]:
    import torch

    safetensors_file = os.path.join(folder, "adapter_model.safetensors")
    bin_file = os.path.join(folder, "adapter_model.bin")
    if os.path.isfile(safetensors_file):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        # Every bad header or short file is a SafetensorError (safetensors 0.3.1 to 0.8.0).
        try:
            return os.path.basename(safetensors_file), load_file(safetensors_file)
        except SafetensorError as error:
            raise _unreadable(safetensors_file, "safetensors", error) from error
    if os.path.isfile(bin_file):
        # A cut zip archive is a RuntimeError; a cut or foreign pickle an EOFError or UnpicklingError; a
        # zero-filled file a KeyError under torch 1.13 (its legacy tar reader finds no 'storages').
        try:
            return os.path.basename(bin_file), torch.load(bin_file, map_location="cpu")
        except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as error:
            raise _unreadable(bin_file, "PyTorch (torch.save)", error) from error
    raise ValueError(f"{folder}: no adapter_model.safetensors or adapter_model.bin; is it an adapter folder?")


def _uses_stack_names(config: Any) -> bool:
    ids: List[Any] = list(config.ever_active_layers or []) + list(config.preallocate_layers or [])
    spec = config.layer_schedule
    if isinstance(spec, dict):
        if "type" in spec:
            ids += list(spec.get("layers") or []) + list(spec.get("always") or [])
        else:
            ids += [layer for layers in spec.values() for layer in layers]
    return any(isinstance(layer, str) and "." in layer for layer in ids)


def _layer_namer(module_names: List[str], named_stacks: bool) -> Callable[[str], Any]:
    """Canonical layer id of a saved module name, from the names alone (the model is not needed)."""
    from ..layers import _name_stacks

    def split(name: str) -> Tuple[Optional[str], Optional[int]]:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit() and i > 0:
                return ".".join(parts[:i]), int(part)
        return None, None

    paths: List[str] = []
    for name in module_names:
        path, _ = split(name)
        if path is not None and path not in paths:
            paths.append(path)
    if len(paths) == 1 and named_stacks:
        parent = paths[0].rsplit(".", 1)[0]
        names = {paths[0]: parent.rsplit(".", 1)[-1]}
    else:
        names = dict(zip(paths, _name_stacks(paths))) if len(paths) > 1 else {}

    def layer_of(name: str) -> Any:
        path, index = split(name)
        if path is None:
            return None
        return f"{names[path]}.{index}" if path in names else index

    return layer_of


def _lora_by_module(state: Dict[str, Any]) -> Tuple[Dict[str, Dict[str, Any]], int]:
    """``{module name: {"lora_A": tensor, ...}}`` of a saved state dict, and the count of other parameters."""
    lora: Dict[str, Dict[str, Any]] = {}
    other_params = 0
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            other_params += tensor.numel()
            continue
        lora.setdefault(match.group("module"), {})[match.group("part")] = tensor
    return lora, other_params


def _layer_order(layer: Any) -> Tuple[int, str, int]:
    if layer is None:
        return (2, "", 0)
    if isinstance(layer, int):
        return (0, "", layer)
    stack, _, index = layer.rpartition(".")
    return (1, stack, int(index))


def _export_verdict(
    peft_type: Any, scheduled: bool, ever: List[Any], layers: Dict[Any, Dict[str, Any]], in_stacks: List[Any]
) -> Tuple[bool, str]:
    """Whether ``export_lora`` can turn the adapter into plain LoRA, and what it would write."""
    if peft_type != "SCHEDULED_LORA":
        return False, f"peft_type is {peft_type!r}: already a plain PEFT adapter"
    if scheduled and not ever:
        return False, "no layer has been active yet (ever_active_layers is empty)"
    kept = [layer for layer in in_stacks if not scheduled or layer in ever]
    kept_modules = sum(len(layers[layer]["modules"]) for layer in kept)
    if not scheduled:
        kept_modules += len(layers.get(None, {}).get("modules", []))
    return True, (
        f"export_lora(model, out_dir) writes {kept_modules} module(s) of layer(s) {format_layers(kept)} "
        f"as a plain LoRA adapter"
    )


def _compute_inspect(folder: str) -> Dict[str, Any]:
    """What ``inspect`` shows, as plain data (the ``--json`` output): the saved adapter's schedule, and per
    layer its modules, LoRA parameter count and whether its weights show training."""
    import torch

    from ..schedules import parse_schedule
    from ..tuner import weights_show_training

    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder; give the folder written by model.save_pretrained(...).")
    ignored: List[str] = []
    config = _load_config(folder, ignored)
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        peft_type = json.load(handle).get("peft_type")
    weights_file, state = _load_weights(folder)
    unit = config.schedule_unit
    schedule = parse_schedule(config.layer_schedule) if config.layer_schedule is not None else None

    lora, other_params = _lora_by_module(state)
    layer_of = _layer_namer(list(lora), _uses_stack_names(config))
    init = config.init_lora_weights
    knowable = weights_show_training(init, torch.zeros(1)) is not None
    layers: Dict[Any, Dict[str, Any]] = {}
    for module, parts in lora.items():
        entry = layers.setdefault(
            layer_of(module), {"modules": [], "lora_params": 0, "trained": False if knowable else None}
        )
        entry["modules"].append(module)
        entry["lora_params"] += sum(t.numel() for t in parts.values())
        # Zero at init (True / "gaussian"): lora_B, and lora_embedding_A for embeddings.
        if weights_show_training(init, parts.get("lora_B", parts.get("lora_embedding_A"))):
            entry["trained"] = True

    ids = sorted(layers, key=_layer_order)
    in_stacks = [layer for layer in ids if layer is not None]
    ever = list(config.ever_active_layers or [])
    scheduled = config.layer_schedule is not None
    trained = [layer for layer in in_stacks if layers[layer]["trained"]]
    notes: List[str] = []
    if ignored:
        notes.append(f"{len(ignored)} config key(s) unknown to the installed PEFT were ignored: {', '.join(ignored)}.")
    if knowable:
        stray = [layer for layer in trained if scheduled and layer not in ever]
        if stray:
            notes.append(
                f"layer(s) {format_layers(stray)} have trained weights but are not in ever_active_layers: "
                f"export_lora would leave them out."
            )
        idle = [layer for layer in ever if layer in layers and not layers[layer]["trained"]]
        if idle:
            notes.append(f"layer(s) {format_layers(idle)} are in ever_active_layers but their lora_B is still zero.")
    exportable, export_note = _export_verdict(peft_type, scheduled, ever, layers, in_stacks)
    target = config.target_modules
    return {
        "adapter_dir": folder,
        "peft_type": peft_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "weights_file": weights_file,
        "schedule": {
            "kind": schedule.kind if schedule is not None else None,
            "layer_schedule": config.to_dict().get("layer_schedule"),
            "unit": unit,
            "description": describe_schedule(schedule, unit) if schedule is not None else "none (plain LoRA)",
        },
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(target) if isinstance(target, (set, list, tuple)) else target,
        "init_lora_weights": init,
        "layers": [
            {
                "id": layer,
                "modules": sorted(layers[layer]["modules"]),
                "lora_params": layers[layer]["lora_params"],
                "trained": layers[layer]["trained"],
                "ever_active": (layer in ever) if scheduled else True,
            }
            for layer in ids
        ],
        "preallocated_layers": in_stacks,
        "trained_layers": trained if knowable else None,
        "ever_active_layers": ever if scheduled else in_stacks,
        "lora_params_total": sum(entry["lora_params"] for entry in layers.values()),
        "trained_lora_params": sum(layers[layer]["lora_params"] for layer in trained) if knowable else None,
        "other_params": other_params,
        "exportable": exportable,
        "export": export_note,
        "notes": notes,
    }


def _render_inspect(report: Dict[str, Any]) -> List[str]:
    """The text of ``inspect`` (without ``--json``): the lines of :func:`_compute_inspect`'s data."""
    schedule, init = report["schedule"], report["init_lora_weights"]
    lines = [
        f"adapter   {report['adapter_dir']} ({report['peft_type']}, {report['weights_file']})",
        f"base      {report['base_model_name_or_path'] or '(not recorded)'}",
        f"schedule  {schedule['description']}",
        f"          layer_schedule = {json.dumps(schedule['layer_schedule'])}, unit {schedule['unit']}",
        f"LoRA      r={report['r']}, lora_alpha={report['lora_alpha']}, init_lora_weights={init!r}, "
        f"target_modules={report['target_modules']!r}",
        "",
    ]
    state_word = {True: "trained", False: "untrained", None: "unknown"}
    table = [["layer", "modules", "LoRA params", "weights", "ever active"]]
    for layer in report["layers"]:
        table.append(
            [
                "(outside stacks)" if layer["id"] is None else str(layer["id"]),
                str(len(layer["modules"])),
                _count(layer["lora_params"]),
                state_word[layer["trained"]],
                "yes" if layer["ever_active"] else "no",
            ]
        )
    lines.extend(_table(table))
    trained, in_stacks = report["trained_layers"], report["preallocated_layers"]
    trained_text = (
        f"{len(trained)} ({format_layers(trained)}), {_count(report['trained_lora_params'])} LoRA parameters"
        if trained is not None
        else f"unknown: init_lora_weights={init!r} does not start lora_B at zero"
    )
    lines += [
        "",
        f"preallocated      {len(in_stacks)} layer(s): {format_layers(in_stacks)}; "
        f"{_count(report['lora_params_total'])} LoRA parameters",
        f"trained (weights) {trained_text}",
        f"ever_active       {format_layers(report['ever_active_layers'])} (adapter_config.json)",
        f"other parameters  {_count(report['other_params'])} (modules_to_save and other non-LoRA tensors)",
        f"exportable        {'yes' if report['exportable'] else 'no'}: {report['export']}",
    ]
    lines += [f"note              {note}" for note in report["notes"]]
    return lines


def _run_inspect(args: argparse.Namespace) -> int:
    report = _compute_inspect(args.adapter_dir)
    return _emit(args, report, _render_inspect(report))


register_subcommand(
    "plan", _add_plan_arguments, _run_plan, help="show which layers a schedule trains when, on a model (no weights)"
)
register_subcommand(
    "inspect", _add_inspect_arguments, _run_inspect, help="show a saved adapter's schedule and which adapters trained"
)

