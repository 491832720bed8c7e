"""``peft-layersched plan``: which layers a schedule trains when, on a model built without weights.

``--model`` is a folder or ``config.json``, a model type (``bert``) or a Hub id; ``--config`` a file
or inline JSON. The output is a timeline grid and a table of phases (``--json``: the data).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from ..schedules import describe_schedule, format_layers, preview_span
from .program import (
    config_label,
    emit,
    format_count,
    format_table,
    load_config,
    quiet_transformers,
    register_subcommand,
)

_GRID_COLUMNS = 64  # beyond this many epochs/steps, one grid column covers several


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

    quiet_transformers()
    config = load_config(config_path)
    label = config_label(config_path)
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
        f"{format_count(plan['lora_params_total'])} LoRA parameters",
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
    lines.extend(format_table([[f"layers {format_layers(members)}", ", ".join(names)] for names, members in groups]))
    lines += ["", f"timeline, {unit}s 0..{plan['horizon'] - 1}:"]
    lines.extend(_grid(_plan_rows(plan), plan["timeline"], preallocated, unit))
    lines += ["", "phases:"]
    table = [[f"{unit}s", "active layers", "trainable LoRA params"]]
    shown = plan["phases"][:40]
    for phase in shown:
        start, end = phase["start"], phase["end"]
        span = str(start) if start == end else f"{start}-{end}"
        table.append([span, format_layers(phase["active"]), format_count(phase["trainable_lora_params"])])
    lines.extend(format_table(table))
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
    return emit(args, plan, _render_plan(plan))


register_subcommand(
    "plan", _add_plan_arguments, _run_plan, help="show which layers a schedule trains when, on a model (no weights)"
)
