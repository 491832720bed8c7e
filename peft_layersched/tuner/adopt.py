"""Bring your own LoRA: schedule a ``PeftModel`` that another tool built from a plain ``peft.LoraConfig``.

LLaMA-Factory, axolotl and TRL build their ``PeftModel`` themselves. :func:`schedule_lora` adopts its
LoRA modules as they are. The tool's ``LoraConfig`` object is left as it is.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

from peft.tuners.lora import LoraModel

from .. import _compat
from ..config import ScheduledLoraConfig
from ..layers import LayerIndex, exact_names_regex, no_stacks_message
from ..schedules import LayerId, Schedule, check_unit, parse_schedule
from .init import zero_at_init_part
from .model import ScheduledLoraModel
from .plan import plan_adapter
from .state import AdapterState


def schedule_lora(
    model: Any,
    layer_schedule: Any,
    schedule_unit: str = "epoch",
    adapter_name: Optional[str] = None,
    layer_stacks: Any = None,
) -> Any:
    """Give the LoRA adapter of a ``PeftModel`` built from a plain ``LoraConfig`` a layer schedule, in place.

    The LoRA modules stay as they are, weights included. The preallocated layers are the layers that
    hold them, and ``layer_schedule`` may use only those. Layers whose ``lora_B`` is not zero already
    contribute: they count as ever active, so the model's output does not change. From then on the
    model is what ``get_peft_model(model, ScheduledLoraConfig(...))`` builds, saving included.

    Args:
        model: a ``PeftModel`` whose adapter is LoRA (``get_peft_model(base, LoraConfig(...))``).
        layer_schedule: any ``ScheduledLoraConfig.layer_schedule`` form (``{0: [-1], 2: [-2, -1]}``, a typed
            dict, a callable); a schedule without its own ``layers`` draws from the layers that hold LoRA.
        schedule_unit (`str`): ``"epoch"`` (default) or ``"step"``.
        adapter_name (`str`, *optional*): the adapter to schedule; default the active one.
        layer_stacks (`str` or `list[str]`, *optional*): as for ``ScheduledLoraConfig``, when layer discovery
            needs help.

    Returns the same ``model``.

    Example:

    ```py
    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # by the tool
    >>> schedule_lora(model, layer_schedule={0: [-1], 2: [-2, -1]})
    >>> trainer = Trainer(model=model, ..., callbacks=[LayerScheduleCallback()])
    ```
    """
    if layer_schedule is None:
        raise ValueError(
            "schedule_lora() needs a layer_schedule, e.g. {0: [-1], 2: [-2, -1]} or {'type': 'gradual', 'k': 1, "
            "'n': 1, 'every': 1}; without one the adapter is plain LoRA as it is."
        )
    tuner = _lora_tuner(model, "schedule_lora()")
    name = _adapter_name(tuner, adapter_name, "schedule_lora()")
    if _schedule_of(tuner, name) is not None:
        raise ValueError(
            f"adapter {name!r} already has a layer schedule ({tuner.peft_config[name].layer_schedule!r}). To "
            f"replace it, call model.set_layer_schedule(new_schedule); to schedule another LoRA adapter, pass "
            f"its adapter_name."
        )
    source = tuner.peft_config[name]
    config = _scheduled_config(source, layer_schedule, check_unit(schedule_unit), layer_stacks)
    modules = _lora_modules(tuner, name)
    index = LayerIndex.from_model(tuner.model, config.layer_stacks)
    if not index.stacks:
        raise ValueError(no_stacks_message(tuner.model))
    layer_of = {module_name: index.layer_of(module_name) for module_name in modules}
    outside = sorted(module_name for module_name, layer in layer_of.items() if layer is None)
    if outside:
        raise ValueError(
            f"adapter {name!r} has LoRA modules outside the layer stacks ({index.describe()}): {outside}. A schedule "
            f"trains layers, so those would never train. Build the LoraConfig with target_modules inside the "
            f"layers (e.g. without lm_head), or pass layer_stacks naming the block list that holds them."
        )
    preallocated = index.held_layers(layer_of.values())
    schedule = parse_schedule(config.layer_schedule).bind(index.all_layers(), index.canonical, preallocated)
    without_lora = [layer for layer in index.sort(schedule.all_layers()) if layer not in preallocated]
    if without_lora:
        raise ValueError(
            f"layer_schedule uses layer(s) {without_lora}, which have no LoRA module of adapter {name!r} (LoRA sits "
            f"in layer(s) {preallocated}); schedule_lora() adopts the LoRA the model has and cannot add more. "
            f"Schedule only those layers, or build the LoraConfig so that LoRA reaches the others too (its "
            f"target_modules / layers_to_transform)."
        )
    config.preallocate_layers = list(preallocated)
    ever = _contributing_layers(tuner, name, layer_of)
    config.ever_active_layers = index.sort(ever) if ever else None
    _target_exactly(tuner, config, set(modules))
    adopted = AdapterState(index, schedule, list(preallocated), dict(layer_of))
    adopted.modules = dict(layer_of)
    adopted.ever = set(ever)
    ScheduledLoraModel.adopt(tuner, name, config, adopted)
    return model


def ensure_scheduled(
    model: Any, layer_schedule: Any, schedule_unit: Optional[str], adapter_name: Optional[str], needed_by: str
) -> None:
    """Adopt the model's plain LoRA adapter for a driver given a ``layer_schedule``.

    A model that already runs that very schedule is left as it is: a second run of one callback. A model
    scheduled otherwise is refused, since two schedules would compete.
    """
    if layer_schedule is None:
        return
    unit = schedule_unit or "epoch"
    tuner = _lora_tuner(model, needed_by)
    name = _adapter_name(tuner, adapter_name, needed_by)
    if _schedule_of(tuner, name) is None:
        schedule_lora(model, layer_schedule, unit, name)
        return
    config = tuner.peft_config[name]
    wanted = parse_schedule(layer_schedule).to_json()
    if parse_schedule(config.layer_schedule).to_json() == wanted and config.schedule_unit == unit:
        return
    raise ValueError(
        f"{needed_by} was given layer_schedule={layer_schedule!r} (schedule_unit={unit!r}), but adapter {name!r} "
        f"already has layer_schedule={config.layer_schedule!r} (schedule_unit={config.schedule_unit!r}) from its "
        f"ScheduledLoraConfig. Give the schedule in one place: drop layer_schedule from {needed_by}, or build the "
        f"model from a plain LoraConfig."
    )


def check_schedule_options(layer_schedule: Any, schedule_unit: Optional[str], needed_by: str) -> None:
    """Refuse a bad ``layer_schedule`` / ``schedule_unit`` when a callback or scheduler is built, not later."""
    if layer_schedule is None:
        if schedule_unit is not None:
            raise ValueError(
                f"{needed_by}(schedule_unit={schedule_unit!r}) without layer_schedule: schedule_unit is the unit of "
                f"a layer_schedule given here (for a model built from a plain LoraConfig). Give layer_schedule too, "
                f"or set schedule_unit in the ScheduledLoraConfig."
            )
        return
    parse_schedule(layer_schedule)
    if schedule_unit is not None:
        check_unit(schedule_unit)


# --------------------------------------------------------------------------------------- internals


def _peft_model_in(model: Any) -> Any:
    """``model`` if it is a PeftModel, else the first PeftModel among its modules: a DDP or compile wrapper."""
    modules = getattr(model, "modules", None)
    for module in [model] + (list(modules()) if callable(modules) else []):
        if hasattr(module, "peft_config") and hasattr(module, "active_adapter") and hasattr(module, "base_model"):
            return module
    return None


def _lora_tuner(model: Any, needed_by: str) -> Any:
    peft_model = _peft_model_in(model)
    tuner = getattr(peft_model, "base_model", None)
    if tuner is None:
        raise TypeError(
            f"{needed_by} needs a PeftModel with a LoRA adapter (get_peft_model(model, LoraConfig(...))), got "
            f"{type(model).__name__}, which carries no PEFT adapter. Wrap the model with get_peft_model first, or "
            f"build it from a ScheduledLoraConfig."
        )
    if isinstance(tuner, ScheduledLoraModel):
        return tuner
    if type(tuner) is not LoraModel:
        kinds = sorted({str(getattr(getattr(c, "peft_type", None), "value", getattr(c, "peft_type", None)))
                        for c in peft_model.peft_config.values()})
        raise TypeError(
            f"{needed_by} schedules LoRA adapters only; this PeftModel's tuner is {type(tuner).__name__} "
            f"(peft_type {kinds}). Build the model from a peft.LoraConfig (or a ScheduledLoraConfig)."
        )
    return tuner


def _schedule_of(tuner: Any, adapter_name: str) -> Optional[Schedule]:
    """The adapter's schedule; ``None`` for plain LoRA."""
    if not isinstance(tuner, ScheduledLoraModel):
        return None
    try:
        return tuner.scheduled_adapter(adapter_name).schedule
    except ValueError:
        return None


def _adapter_name(tuner: Any, adapter_name: Optional[str], needed_by: str) -> str:
    if adapter_name is None:
        active = _compat.tuner_active_adapters(tuner)
        adapter_name = active[0] if active else "default"
    if adapter_name not in tuner.peft_config:
        raise ValueError(
            f"{needed_by}: the model has no adapter {adapter_name!r}; its adapters: {sorted(tuner.peft_config)}."
        )
    return adapter_name


def _scheduled_config(source: Any, layer_schedule: Any, schedule_unit: str, layer_stacks: Any) -> ScheduledLoraConfig:
    """A new ``ScheduledLoraConfig``: ``source``'s LoRA fields and the schedule.

    PEFT's layer filter is dropped: the preallocated layers replace it.
    """
    if layer_stacks is None and _compat.optional_field(source, "layers_to_transform") is not None:
        layer_stacks = _compat.optional_field(source, "layers_pattern")  # PEFT's name of the block list
    if isinstance(source, ScheduledLoraConfig) and layer_stacks is None:
        layer_stacks = source.layer_stacks
    return ScheduledLoraConfig.from_lora_config(
        source, layer_schedule=layer_schedule, schedule_unit=schedule_unit, layer_stacks=copy.deepcopy(layer_stacks),
        layers_to_transform=None, layers_pattern=None,
    )


def _lora_modules(tuner: Any, adapter_name: str) -> List[str]:
    modules = [
        module_name for module_name, module in tuner.model.named_modules()
        if _compat.is_lora_layer(module) and any(True for _ in _compat.adapter_parameters(module, adapter_name))
    ]
    if not modules:
        raise ValueError(
            f"adapter {adapter_name!r} has no LoRA module in the model (its target_modules matched nothing, or its "
            f"modules were unloaded), so there is nothing to schedule."
        )
    return modules


def _contributing_layers(tuner: Any, adapter_name: str, layer_of: Dict[str, Any]) -> List[LayerId]:
    """Layers with a module whose part that is zero at init is not zero: they contribute already.

    Such a module trained, or came from another init. Its layer stays in the forward.
    """
    layers = []
    for module_name, layer in layer_of.items():
        part = zero_at_init_part(tuner.model.get_submodule(module_name), adapter_name)
        if part is not None and bool(part.detach().ne(0).any()) and layer not in layers:
            layers.append(layer)
    return layers


def _target_exactly(tuner: Any, config: ScheduledLoraConfig, modules: set) -> None:
    """Make the config rebuild exactly ``modules`` when loaded.

    Its ``target_modules`` may reach other modules in the preallocated layers: PEFT versions differ in
    how a list matches, and ``exclude_modules``. Then it names the modules one by one.
    """
    try:
        targets: Optional[Tuple[str, ...]] = tuple(sorted(plan_adapter(tuner.model, config).targets or ()))
    except ValueError:
        targets = None
    if targets != tuple(sorted(modules)):
        config.target_modules = exact_names_regex(modules)
