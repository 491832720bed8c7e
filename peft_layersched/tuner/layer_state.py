"""Writes the schedule's state into the LoRA layers: routing, ``requires_grad``, grads, the backward stop.

An adapter runs in a layer when the model runs it and the layer is active now or was before.
Its parameters train when the layer is active now. Before the first ``activate_layers`` every
preallocated layer trains, so an optimizer built the usual way holds them all.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Set

import torch
from torch import nn

from .. import _compat, backward_stop
from ..config import ScheduledLoraConfig
from .init import keeps_base_weight
from .state import OPTIMIZER, AdapterState, TunerState


def bypassed_modules(config: Any, adapter: AdapterState) -> List[str]:
    """The adapter's modules whose layer has never been active: left out of the forward.

    None when the init moved base weight into the adapters: the output needs them all.
    """
    if adapter.schedule is None or not keeps_base_weight(config.init_lora_weights):
        return []
    enabled = adapter.in_forward()
    return [name for name, layer_id in adapter.modules.items() if layer_id not in enabled]


def stacks(state: TunerState) -> List[Any]:
    for _, adapter in state.scheduled():
        return list(adapter.index.stacks)
    return []


def write(tuner: nn.Module, state: TunerState) -> None:
    """Write every scheduled adapter's state into its LoRA layers. Unscheduled adapters keep PEFT's."""
    model_active = _compat.tuner_active_adapters(tuner)
    by_optimizer = state.freezing == OPTIMIZER
    bypassed: Dict[str, Set[str]] = {}
    undriven = False
    scheduled = state.scheduled()
    for name, adapter in scheduled:
        undriven = undriven or adapter.active is None
        config = tuner.peft_config[name]
        trainable = None if adapter.active is None else set(adapter.active)
        left_out = set(bypassed_modules(config, adapter))
        train_adapter = name in model_active and not bool(getattr(config, "inference_mode", False))
        for module_name, layer_id in adapter.modules.items():
            module = tuner.model.get_submodule(module_name)
            bypassed.setdefault(module_name, set())
            if module_name in left_out:
                bypassed[module_name].add(name)
            frozen = not (trainable is None or layer_id in trainable or by_optimizer)
            train = train_adapter and not frozen
            for param in _compat.adapter_parameters(module, name):
                param.requires_grad_(train)
                # Only the schedule drops grads: set_adapter() / disable_adapter() between micro-batches
                # (TRL's reference passes) must leave an accumulation window's grads as PEFT does.
                if frozen:
                    param.grad = None
    for module_name, names in bypassed.items():
        _compat.route_layer(tuner.model.get_submodule(module_name), model_active, names)
    if scheduled:
        # Backward, with or without gradient checkpointing, ends at the lowest layer that now trains.
        backward_stop.update(tuner.model, stacks(state))
        watch(tuner, state)
    state.undriven = undriven


def record_undriven_training(tuner: nn.Module, state: TunerState) -> None:
    """A forward with grad before any ``activate_layers``: the layers that get grads count as ever active.

    The first time, a warning says that no driver moves the schedule.
    """
    state.undriven = False  # until write() changes the state again
    model_active = _compat.tuner_active_adapters(tuner)
    for name, adapter in state.scheduled():
        if adapter.active is not None or name not in model_active:
            continue
        config = tuner.peft_config[name]
        left_out = set(bypassed_modules(config, adapter))
        training = set()
        for module_name, layer_id in adapter.modules.items():
            if module_name in left_out:
                continue
            module = tuner.model.get_submodule(module_name)
            if any(p.requires_grad for p in _compat.adapter_parameters(module, name)):
                training.add(layer_id)
        new = training - adapter.ever
        if not new:
            continue
        adapter.ever.update(new)
        if isinstance(config, ScheduledLoraConfig):
            config.ever_active_layers = adapter.index.sort(adapter.ever)
        if state.warned_undriven:
            continue
        state.warned_undriven = True
        unit = getattr(config, "schedule_unit", "epoch")
        warnings.warn(
            f"adapter {name!r} is training with no layer-schedule driver: layer(s) {adapter.index.sort(training)} "
            f"get gradients (the schedule's layers at {unit} 0), and the schedule never moves on. They are "
            f"recorded in ever_active_layers. Pass LayerScheduleCallback() to Trainer(callbacks=[...]), or "
            f"drive a plain loop with LayerScheduler(model, optimizer) (sched.step() after each optimizer "
            f"step) or model.activate_layers(t) at each {unit}.",
            stacklevel=3,
        )


def unmerged_idle_layers(tuner: nn.Module, state: TunerState) -> Set[int]:
    """ids of the unmerged LoRA layers that run none of the model's active adapters: the schedule bypasses
    them there."""
    model_active = _compat.tuner_active_adapters(tuner)
    left_out: Set[str] = set()
    for name, adapter in state.adapters.items():
        if name in model_active:
            left_out.update(bypassed_modules(tuner.peft_config[name], adapter))
    idle = set()
    for module_name in left_out:
        module = tuner.model.get_submodule(module_name)
        runs = any(_compat.layer_runs(module, name) for name in model_active)
        if not runs and not bool(getattr(module, "merged", False)):
            idle.add(id(module))
    return idle


def forward_entries(tuner: nn.Module) -> List[nn.Module]:
    """The modules whose forward pre-hooks see every forward.

    The base model: a plain ``PeftModel`` calls it directly. The tuner: PEFT < 0.4's tuner calls
    ``self.model.forward``, which runs no hooks. A hook on both runs twice, so it must be idempotent.
    """
    return [tuner, tuner.model]


class _UndrivenWatch(object):
    """Forward pre-hook: a forward with grad enabled while a scheduled adapter has no driver yet."""

    def __init__(self, tuner: nn.Module, state: TunerState) -> None:
        self.tuner = tuner
        self.state = state

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.state.undriven and torch.is_grad_enabled():
            record_undriven_training(self.tuner, self.state)


def watch(tuner: nn.Module, state: TunerState) -> None:
    if not state.watch_hooks:
        hook = _UndrivenWatch(tuner, state)
        state.watch_hooks = [entry.register_forward_pre_hook(hook) for entry in forward_entries(tuner)]


def unwatch(state: TunerState) -> None:
    for handle in state.watch_hooks:
        handle.remove()
    state.watch_hooks = []
