"""Which modules get LoRA under a scheduled config, and what a schedule cannot take.

PEFT injects; the plan only hands it the exact modules: ``target_modules`` inside the preallocated layers.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from torch import nn

from .. import _compat
from ..config import ScheduledLoraConfig
from ..layers import ALL_LINEAR, LayerIndex, match_targets, no_stacks_message, select_targets
from ..schedules import LayerId, Schedule, short_layer_list
from .state import AdapterState


def own_copy(config: Any) -> Any:
    """The tuner's own copy of a scheduled config, which it writes the schedule's state to.

    The caller's object is never written to, so one config builds any number of models. A config
    without a schedule is plain LoRA and is used as given, as PEFT uses a ``LoraConfig``.
    """
    if not isinstance(config, ScheduledLoraConfig) or not config.restricts_layers:
        return config
    own = copy.deepcopy(config)  # a callable schedule is shared, not copied (deepcopy keeps functions)
    own.validate()
    return own


def refuse_wrapped(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if _compat.is_tuner_layer(module):
            raise ValueError(
                f"get_peft_model() was given a model that already carries PEFT adapter layers ('{name}' is "
                f"a {type(module).__name__}); wrapping it again would target the adapters' own modules "
                f"(PEFT's 'Target module Dropout is not supported'). To continue training a saved adapter, "
                f"load it with PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=True). To add "
                f"a second adapter, call peft_model.add_adapter(name, config). Otherwise pass a fresh base "
                f"model, not a PeftModel or its get_base_model()."
            )


def plan_adapter(model: nn.Module, config: ScheduledLoraConfig) -> AdapterState:
    """The adapter's state before injection: its layer index, bound schedule, layers and target modules."""
    if not config.restricts_layers:
        # Plain LoRA: PEFT targets as it always does; the index only names layers for reporting.
        try:
            index = LayerIndex.from_model(model, config.layer_stacks)
        except ValueError:
            index = LayerIndex([])
        return AdapterState(index, None)
    index = LayerIndex.from_model(model, config.layer_stacks)
    if not index.stacks:
        raise ValueError(no_stacks_message(model))
    found: Dict[str, Any] = {}  # each computed once, when first needed, so errors keep their order

    def requested() -> List[LayerId]:  # preallocate_layers, canonical
        if "requested" not in found:
            found["requested"] = index.canonical_list(config.preallocate_layers, "preallocate_layers")
        return found["requested"]

    def target_modules() -> Any:
        if "target_modules" not in found:
            given = config.target_modules
            found["target_modules"] = given if given is not None else _compat.default_target_modules(model)
        return found["target_modules"]

    def matched() -> Dict[str, Optional[LayerId]]:  # every module matching target_modules -> its layer
        if "matched" not in found:
            found["matched"] = match_targets(model, target_modules(), index)
        return found["matched"]

    spec = config.schedule()
    schedule: Optional[Schedule] = None
    if spec is not None:
        # Kinds that draw (all but milestones) draw from "every layer" unless they list their own: the
        # preallocated layers when preallocate_layers is set, else every layer holding a target module.
        candidates: Optional[List[LayerId]] = None
        if spec.draws_candidates:
            if config.preallocate_layers is not None:
                candidates = requested()
            else:
                candidates = index.held_layers(matched().values())
        schedule = spec.bind(index.all_layers(), index.canonical, candidates)
    scheduled = index.sort(schedule.all_layers()) if schedule is not None else []
    if config.preallocate_layers is not None:
        preallocated = requested()
        missing = [layer for layer in scheduled if layer not in preallocated]
        if missing:
            raise ValueError(
                f"layer_schedule uses layer(s) {missing} that preallocate_layers={config.preallocate_layers!r} "
                f"leaves out; adapters cannot be added later. Add them to preallocate_layers, or drop "
                f"preallocate_layers to preallocate exactly the scheduled layers."
            )
    else:
        preallocated = scheduled
    if not preallocated:
        raise ValueError(
            f"layer_schedule={config.layer_schedule!r} names no layer, so no layer would get a LoRA adapter. "
            f"Schedule at least one layer ({index.describe()}), or set preallocate_layers."
        )
    targets = select_targets(matched(), target_modules(), index, preallocated)
    _refuse_excluded(config, targets, preallocated)  # (select_targets refused layers without targets)
    _refuse_outside(model, config, target_modules(), matched(), index)
    return AdapterState(index, schedule, preallocated, targets)


def _refuse_excluded(config: Any, targets: Dict[str, Any], preallocated: List[LayerId]) -> None:
    """A layer that ``exclude_modules`` empties would be scheduled without an adapter."""
    excluded = _compat.optional_field(config, "exclude_modules")
    if not excluded:
        return
    kept = {name: layer for name, layer in targets.items() if not _compat.module_excluded(name, excluded)}
    empty = [layer for layer in preallocated if layer not in set(kept.values())]
    if empty:
        raise ValueError(
            f"exclude_modules={excluded!r} leaves layer(s) {empty} of the schedule without a LoRA module, so "
            f"they could never train. Take them out of layer_schedule/preallocate_layers, or narrow exclude_modules."
        )


def _refuse_outside(
    model: nn.Module, config: Any, target_modules: Any, matched: Dict[str, Any], index: LayerIndex
) -> None:
    """Target modules outside the layer stacks would get no LoRA with a schedule: refused, not dropped.

    Not refused: modules of a stack that a given ``layer_stacks`` leaves out, and ``"all-linear"``.
    """
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        return
    excluded = _compat.optional_field(config, "exclude_modules")
    outside = [name for name, layer in matched.items() if layer is None and not _compat.module_excluded(name, excluded)]
    if outside and config.layer_stacks is not None:
        discovered = LayerIndex.from_model(model)
        outside = [name for name in outside if discovered.layer_of(name) is None]
    outside.sort()
    if not outside:
        return
    shown = repr(sorted(target_modules)) if isinstance(target_modules, (set, frozenset)) else repr(target_modules)
    raise ValueError(
        f"target_modules={shown} matches module(s) outside the layer stacks ({index.describe()}): "
        f"{short_layer_list(outside)}. A layer schedule gives LoRA only to modules inside the scheduled layers, so "
        f"these would get none (plain PEFT would adapt them). Name only modules inside the layers in target_modules "
        f"(a list entry matches a name or its dotted suffix; a regex the whole name), train the others fully with "
        f"modules_to_save={outside[:1]!r}, or, if a block list that discovery missed holds them, pass layer_stacks "
        f"naming it."
    )
