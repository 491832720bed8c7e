"""Checks of loaded adapter weights against the schedule state that the loaded config carries.

Two warnings: saved LoRA weights that found no module here, and trained weights in layers the
schedule says never trained. A resume loads weights before the schedule stands at their time:
its check waits until then.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List

import torch
from torch import nn

from ..layers import LayerIndex
from .init import weights_show_training, zero_at_init_part
from .layer_state import bypassed_modules, forward_entries
from .state import TunerState


def unloaded_lora_modules(state_dict: Dict[str, Any], head: str, unexpected_keys: List[str]) -> List[str]:
    """The modules whose saved LoRA weights nothing in the model took.

    Names are relative to the tuner's model; ``head`` is its prefix in the keys. Modules whose part that
    is zero at init is still zero are left out: they carry nothing.
    """
    parts: Dict[str, Dict[str, Any]] = {}
    for key in unexpected_keys:
        if not key.startswith(head) or key not in state_dict:
            continue
        # "<module>.lora_A[.<adapter>].weight": PEFT 0.21 passes a key it has no place for as saved,
        # PEFT 0.3 - 0.20 with the adapter name put in.
        module_name, found, rest = key[len(head):].partition(".lora_")
        if found:
            parts.setdefault(module_name, {})["lora_" + rest.split(".", 1)[0]] = state_dict[key]
    unloaded = []
    for module_name, saved in parts.items():
        zero_at_init = saved.get("lora_B", saved.get("lora_embedding_A"))
        if zero_at_init is not None and bool(zero_at_init.detach().ne(0).any()):
            unloaded.append(module_name)
    return unloaded


def _warn_unloaded_weights(tuner: nn.Module, state: TunerState, incompatible_keys: Any) -> None:
    prefix, state_dict = state.loading or ("", None)
    state.loading = None
    if state_dict is None or incompatible_keys is None:
        return
    unloaded = unloaded_lora_modules(state_dict, prefix + "model.", list(incompatible_keys.unexpected_keys))
    if not unloaded:
        return
    current = state.adapters.get(state.current) if state.current is not None else None
    index = current.index if current is not None else LayerIndex([])
    layer_of = {name: index.layer_of(name) for name in unloaded}
    layers = index.held_layers(layer_of.values())
    outside = sorted(name for name, layer in layer_of.items() if layer is None)
    where = f"layer(s) {layers}" if layers else ""
    if outside:
        where += (" and " if where else "") + f"module(s) {outside}"
    # The loaded adapter's config is one of peft_config's by now: PEFT injects it before loading.
    zero_b = all(weights_show_training(config.init_lora_weights, torch.zeros(1)) is not None
                 for config in tuner.peft_config.values())
    what = "trained LoRA weights (lora_B is not zero)" if zero_b else "LoRA weights whose lora_B is not zero"
    warnings.warn(
        f"the loaded adapter weights carry {what} for {where}, but the model has no LoRA adapter there (the "
        f"adapter_config.json loaded does not preallocate them), so they were not loaded. To load them, "
        f"preallocate them again in adapter_config.json (layer_schedule / preallocate_layers; 'peft-layersched "
        f"inspect' shows the layers the saved weights hold).",
        stacklevel=3,
    )


def _never_scheduled(tuner: nn.Module, state: TunerState) -> bool:
    """No schedule has been applied yet and the configs record none: a model just built.

    Weights loaded into it are a resume's, which cannot be judged before the schedule moves to their time.
    """
    scheduled = state.scheduled()
    return bool(scheduled) and all(
        adapter.time is None and getattr(tuner.peft_config[name], "schedule_position", None) is None
        for name, adapter in scheduled
    )


def _check_at_first_forward(tuner: nn.Module, state: TunerState) -> None:
    """Run a put-off check at the next forward, unless a driver runs it before."""
    if state.load_check_hooks is not None:
        return

    def check(module: nn.Module, args: Any) -> None:
        check_deferred(tuner, state)

    state.load_check_hooks = [entry.register_forward_pre_hook(check) for entry in forward_entries(tuner)]


def check_loaded(tuner: nn.Module, state: TunerState, incompatible_keys: Any = None) -> None:
    """After a load into the tuner: warn now, or put the check off until the schedule is in place."""
    _warn_unloaded_weights(tuner, state, incompatible_keys)
    if state.deferrals:
        state.load_check_pending = True
        return
    if _never_scheduled(tuner, state):
        # A plain loop's resume may load the weights before LayerScheduler(..., state_dict=...) moves the
        # schedule to their step: it checks them then, or the next forward does.
        state.load_check_pending = True
        _check_at_first_forward(tuner, state)
        return
    _check_hidden_weights(tuner, state)


def check_deferred(tuner: nn.Module, state: TunerState) -> None:
    """Run the check that a load put off, if it did."""
    for hook in state.load_check_hooks or []:
        hook.remove()
    state.load_check_hooks = None
    if state.load_check_pending:
        state.load_check_pending = False
        _check_hidden_weights(tuner, state)


def _check_hidden_weights(tuner: nn.Module, state: TunerState) -> None:
    for name, adapter in state.adapters.items():
        hidden = []
        config = tuner.peft_config[name]
        for module_name in bypassed_modules(config, adapter):
            module = tuner.model.get_submodule(module_name)
            if weights_show_training(config.init_lora_weights, zero_at_init_part(module, name)):
                hidden.append(adapter.modules[module_name])
        if hidden:
            layers = adapter.index.sort(set(hidden))
            warnings.warn(
                f"adapter {name!r}: layer(s) {layers} carry trained LoRA weights (lora_B is not zero), but the "
                f"config's layer_schedule / ever_active_layers ({adapter.index.sort(adapter.ever)}) say they never "
                f"trained, so they are left out of the forward. If they did train, add them to "
                f"ever_active_layers in adapter_config.json ('peft-layersched inspect' shows the mismatch).",
                stacklevel=3,
            )
