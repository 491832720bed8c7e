"""``peft-layersched inspect ADAPTER_DIR``: a saved adapter's schedule and which adapters trained.

It also counts parameters and says whether ``export_lora`` can turn the adapter into plain LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..schedules import describe_schedule, format_layers, parse_schedule
from .program import emit, format_count, format_table, load_config, register_subcommand

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
    if isinstance(config.layer_schedule, dict):  # (a callable is not saved)
        ids += parse_schedule(config.layer_schedule).named_layers()
    return any(isinstance(layer, str) and "." in layer for layer in ids)


def _layer_namer(module_names: List[str], named_stacks: bool) -> Callable[[str], Any]:
    """Canonical layer id of a saved module name, from the names alone (the model is not needed)."""
    from ..layers import name_stacks

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
        names = dict(zip(paths, name_stacks(paths))) if len(paths) > 1 else {}

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

    from ..tuner import weights_show_training

    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder; give the folder written by model.save_pretrained(...).")
    ignored: List[str] = []
    config = load_config(folder, ignored)
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
                format_count(layer["lora_params"]),
                state_word[layer["trained"]],
                "yes" if layer["ever_active"] else "no",
            ]
        )
    lines.extend(format_table(table))
    trained, in_stacks = report["trained_layers"], report["preallocated_layers"]
    trained_text = (
        f"{len(trained)} ({format_layers(trained)}), {format_count(report['trained_lora_params'])} LoRA parameters"
        if trained is not None
        else f"unknown: init_lora_weights={init!r} does not start lora_B at zero"
    )
    lines += [
        "",
        f"preallocated      {len(in_stacks)} layer(s): {format_layers(in_stacks)}; "
        f"{format_count(report['lora_params_total'])} LoRA parameters",
        f"trained (weights) {trained_text}",
        f"ever_active       {format_layers(report['ever_active_layers'])} (adapter_config.json)",
        f"other parameters  {format_count(report['other_params'])} (modules_to_save and other non-LoRA tensors)",
        f"exportable        {'yes' if report['exportable'] else 'no'}: {report['export']}",
    ]
    lines += [f"note              {note}" for note in report["notes"]]
    return lines


def _run_inspect(args: argparse.Namespace) -> int:
    report = _compute_inspect(args.adapter_dir)
    return emit(args, report, _render_inspect(report))


register_subcommand(
    "inspect", _add_inspect_arguments, _run_inspect, help="show a saved adapter's schedule and which adapters trained"
)
