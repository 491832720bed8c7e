"""``ScheduledLoraModel``: PEFT's ``LoraModel`` with preallocated adapters and a layer schedule.

PEFT picks it through its ``SCHEDULED_LORA`` entry and injects LoRA as usual. In memory it runs as
``PeftType.LORA``, so every LoRA path of PEFT applies. Its own state lives in one ``TunerState``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .. import _compat, backward_stop
from ..config import ScheduledLoraConfig
from ..layers import exact_names_regex
from ..schedules import LayerId
from .adapter import ScheduledAdapter
from .init import SEEDED_INIT_MODES, module_seed, new_init_seed, seeded_init
from .layer_state import bypassed_modules, unmerged_idle_layers, unwatch
from .layer_state import write as write_layer_state
from .load_checks import check_loaded
from .plan import own_copy, plan_adapter, refuse_wrapped
from .state import OPTIMIZER, REQUIRES_GRAD, AdapterState, TunerState


class ScheduledLoraModel(_compat.TunerHooks, LoraModel):
    """LoRA tuner with a layer schedule. ``get_peft_model(model, ScheduledLoraConfig(...))`` creates it.

    Reach its methods through the ``PeftModel``: ``peft_model.activate_layers(epoch)``,
    ``peft_model.active_layers``, ``peft_model.preallocated_layers``.
    """

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        refuse_wrapped(model)
        self._layersched = TunerState()  # before PEFT's __init__, which injects the first adapter
        if isinstance(config, dict):  # PeftModel's own dict (PEFT 0.3 shares it with the tuner)
            for name in list(config):
                config[name] = own_copy(config[name])
        else:
            config = own_copy(config)
        super().__init__(model, config, adapter_name, *args, **kwargs)
        # Loaded adapter weights are checked against the schedule state that the config carries.
        self.register_load_state_dict_post_hook(_after_load)

    @classmethod
    def adopt(
        cls, tuner: LoraModel, adapter_name: str, config: ScheduledLoraConfig, adapter: AdapterState
    ) -> "ScheduledLoraModel":
        """Give ``tuner``'s LoRA adapter a schedule, in place; its modules and weights stay as they are.

        ``schedule_lora`` calls it once its checks passed. A plain ``LoraModel`` becomes this class.
        """
        if not isinstance(tuner, cls):
            # PEFT 0.3 .. 0.21 build a LoraModel as this class; this class adds only its state and the
            # load hook, so a LoraModel becomes one by its class.
            tuner.__class__ = cls
            tuner._layersched = TunerState()
            tuner.register_load_state_dict_post_hook(_after_load)
        state = tuner._layersched
        tuner.peft_config[adapter_name] = config
        state.adapters[adapter_name] = adapter
        if state.current not in state.adapters:
            state.current = adapter_name
        write_layer_state(tuner, state)
        return tuner

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # PEFT loads with strict=False, so a saved LoRA weight without a module here is dropped silently.
        # The post-load hook gets only the keys: their values are kept for it.
        self._layersched.loading = (prefix, state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------- injection

    def _own_config(self, config: Any) -> Any:
        # PeftModel.add_adapter/load_adapter store the caller's config object: the tuner works on its own.
        return own_copy(config)

    @contextlib.contextmanager
    def _scheduled_injection(self, model: nn.Module, adapter_name: str) -> Iterator[None]:
        # _compat.TunerHooks runs PEFT's injection inside this block.
        config = self.peft_config[adapter_name]
        if not isinstance(config, ScheduledLoraConfig):
            yield
            return
        config.validate()
        adapter = plan_adapter(model, config)
        if adapter.targets is not None and config.init_seed is None:
            config.init_seed = new_init_seed()
        saved_targets = config.target_modules
        if adapter.targets is not None:
            config.target_modules = exact_names_regex(adapter.targets)
        seeded = config.init_seed is not None and config.init_lora_weights in SEEDED_INIT_MODES
        rng = _compat.fork_rng() if seeded else contextlib.nullcontext()
        try:
            with rng:
                yield
                self._after_injection(model, adapter_name, config, adapter, seeded)
        finally:
            if adapter.targets is not None:
                config.target_modules = saved_targets

    def _after_injection(
        self, model: nn.Module, adapter_name: str, config: ScheduledLoraConfig, adapter: AdapterState, seeded: bool
    ) -> None:
        for name, module in model.named_modules():
            if _compat.is_lora_layer(module) and any(True for _ in _compat.adapter_parameters(module, adapter_name)):
                adapter.modules[name] = adapter.index.layer_of(name)
                if seeded:
                    seeded_init(module, adapter_name, config.init_lora_weights, module_seed(config.init_seed, name))
        if config.ever_active_layers:
            adapter.ever = set(adapter.index.canonical_list(config.ever_active_layers, "ever_active_layers"))
        state = self._layersched
        state.adapters[adapter_name] = adapter
        if state.current is None:
            state.current = adapter_name
        write_layer_state(self, state)

    # ------------------------------------------------------------------------------------ schedule

    def _adapter(self, adapter_name: Optional[str]) -> Tuple[str, AdapterState]:
        state = self._layersched
        name = adapter_name if adapter_name is not None else state.current
        if name not in state.adapters:
            raise ValueError(
                f"adapter {name!r} has no layer schedule; scheduled adapters: {sorted(state.adapters)}."
            )
        return name, state.adapters[name]

    def _reapply(self) -> None:
        if self._layersched.adapters:
            write_layer_state(self, self._layersched)

    def scheduled_adapter(self, adapter_name: Optional[str] = None) -> ScheduledAdapter:
        """A scheduled adapter: its layers, and the verbs that drive it.

        Default: the adapter that ``activate_layers`` drives.
        """
        name, _ = self._adapter(adapter_name)
        return ScheduledAdapter(self, name, self._layersched)

    def activate_layers(self, t: Any, adapter_name: Optional[str] = None) -> List[LayerId]:
        """Make exactly the layers scheduled at ``t`` trainable: ``t`` is an epoch or an optimizer step.

        Every other preallocated LoRA parameter gets ``requires_grad=False`` and ``grad=None``, so torch
        optimizers skip it. Adapters that were active before keep contributing to the output; never-active
        ones are bypassed. Idempotent. Returns the active layer ids, canonical and sorted.
        """
        return self.scheduled_adapter(adapter_name).activate_layers(t)

    def set_layer_schedule(self, layer_schedule: Any, adapter_name: Optional[str] = None) -> List[LayerId]:
        """Replace the adapter's schedule, e.g. give a callable back after loading: callables are not saved.

        Any ``layer_schedule`` form works, on the preallocated layers only. Those are also the candidates
        of a schedule without its own ``layers``. Returns the preallocated layers.
        """
        return self.scheduled_adapter(adapter_name).set_layer_schedule(layer_schedule)

    @property
    def freezing(self) -> str:
        """How a frozen layer is frozen: ``"requires_grad"``, the default, or ``"optimizer"``.

        ``"requires_grad"`` sets ``requires_grad=False`` and ``grad=None``. With ``"optimizer"`` every
        preallocated parameter keeps ``requires_grad=True`` and the optimizer's per-layer LR freezes it,
        for engines such as DeepSpeed ZeRO that fix the trainable set when they start. Never-active
        adapters leave the forward either way.
        """
        return self._layersched.freezing

    def set_freezing(self, mode: str) -> None:
        if mode not in (REQUIRES_GRAD, OPTIMIZER):
            raise ValueError(
                f"freezing={mode!r} is not supported; use {REQUIRES_GRAD!r} (frozen layers get "
                f"requires_grad=False) or {OPTIMIZER!r} (the optimizer's per-layer LR freezes them)."
            )
        self._layersched.freezing = mode
        self._reapply()

    @property
    def active_layers(self) -> List[LayerId]:
        """Layers whose adapters train now. Before the first ``activate_layers``: those that get grads."""
        return self.scheduled_adapter().active_layers

    @property
    def preallocated_layers(self) -> List[LayerId]:
        """Layers that carry an adapter: trained, frozen or not yet active."""
        return self.scheduled_adapter().preallocated_layers

    @property
    def ever_active_layers(self) -> List[LayerId]:
        """Layers whose adapters have been active at least once: they carry trained weights."""
        return self.scheduled_adapter().ever_active_layers

    def scheduled_modules(self, adapter_name: Optional[str] = None) -> Dict[str, Optional[LayerId]]:
        """``{module name: layer id}`` of every LoRA module of the adapter, relative to the base model."""
        return self.scheduled_adapter(adapter_name).modules

    def layer_parameters(self, adapter_name: Optional[str] = None) -> Dict[LayerId, List[nn.Parameter]]:
        """The adapter's LoRA parameters grouped by layer, every preallocated layer in layer order."""
        return self.scheduled_adapter(adapter_name).layer_parameters()

    # --------------------------------------------- PEFT calls that reset per-layer flags or merge

    def enable_adapter_layers(self, *args: Any, **kwargs: Any) -> Any:
        # PEFT resets every layer's flag and requires_grad here: the exit of PeftModel.disable_adapter().
        result = super().enable_adapter_layers(*args, **kwargs)
        self._reapply()
        return result

    def set_adapter(self, adapter_name: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().set_adapter(adapter_name, *args, **kwargs)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        scheduled = [name for name in names if name in self._layersched.adapters]
        if scheduled:
            self._layersched.current = scheduled[0]
        self._reapply()
        return result

    def delete_adapter(self, adapter_name: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().delete_adapter(adapter_name, *args, **kwargs)
        state = self._layersched
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            state.adapters.pop(name, None)
        if state.current not in state.adapters:
            active = [name for name in _compat.tuner_active_adapters(self) if name in state.adapters]
            state.current = (active or sorted(state.adapters) or [None])[0]
        if state.adapters:
            self._reapply()
        else:
            backward_stop.remove(self.model)
            unwatch(state)
        return result

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        # A never-active adapter never contributed, but PEFT merges it when named (0.3-0.5: always).
        # Its delta (B) is zeroed first.
        for name, adapter in self._layersched.adapters.items():
            for module_name in bypassed_modules(self.peft_config[name], adapter):
                weights = _compat.lora_weights(self.model.get_submodule(module_name), name)
                if weights is not None:
                    with torch.no_grad():
                        weights[2].zero_()
        merged = super().merge_and_unload(*args, **kwargs)
        backward_stop.remove(merged)  # the plain model gets its input-require-grads hooks back, none of ours
        unwatch(self._layersched)
        return merged

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> Any:
        # A layer whose adapters the schedule bypasses is not merged after merge_adapter(), and PEFT's
        # unmerge would warn "Already unmerged" on it, which plain LoRA never does: it is skipped.
        idle = unmerged_idle_layers(self, self._layersched)
        if not idle:
            return super().unmerge_adapter(*args, **kwargs)
        for module in self.model.modules():
            if _compat.is_tuner_layer(module) and id(module) not in idle:
                _compat.unmerge_layer(module)
        return None

    def _unloaded(self, model: nn.Module) -> None:  # after PEFT's unload() (_compat.TunerHooks)
        backward_stop.remove(model)
        unwatch(self._layersched)


def _after_load(tuner: ScheduledLoraModel, incompatible_keys: Any) -> None:
    check_loaded(tuner, tuner._layersched, incompatible_keys)


@contextlib.contextmanager
def deferred_load_check(model: Any) -> Iterator[None]:
    """Weights loaded into ``model`` inside are checked later, by the driver's ``check_deferred_load``.

    For a resume: its weights come in before the schedule moved to the checkpoint's step, so layers
    that trained after step 0 would look hidden at load time. ``model``: a PeftModel or a wrapper.
    """
    modules = getattr(model, "modules", None)
    tuners = [m for m in (modules() if callable(modules) else []) if isinstance(m, ScheduledLoraModel)]
    for tuner in tuners:
        tuner._layersched.deferrals += 1
    try:
        yield
    finally:
        for tuner in tuners:
            tuner._layersched.deferrals -= 1


def find_scheduled_tuner(model: Any, needed_by: str) -> ScheduledLoraModel:
    """The ``ScheduledLoraModel`` inside ``model``, a PeftModel or a wrapper around one.

    A wrapper is DDP, a DeepSpeed engine or ``torch.compile``. ``needed_by`` names the caller in the
    ``TypeError`` raised when there is none, e.g. ``"export_lora()"``.
    """
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, ScheduledLoraModel):
        return tuner
    modules = getattr(model, "modules", None)
    for module in modules() if callable(modules) else []:
        if isinstance(module, ScheduledLoraModel):
            return module
    plain = (
        " (its LoRA comes from a plain LoraConfig: schedule it with peft_layersched.schedule_lora(model, "
        "layer_schedule=...), or give the callback layer_schedule=...)"
        if isinstance(tuner, LoraModel) else ""
    )
    raise TypeError(
        f"{needed_by} needs a PeftModel built from a ScheduledLoraConfig (get_peft_model(model, "
        f"ScheduledLoraConfig(...)) or PeftModel.from_pretrained of such an adapter), got {type(model).__name__}"
        f"{plain}."
    )


def peft_model_of(model: Any, tuner: ScheduledLoraModel) -> Any:
    """The PeftModel in ``model``, itself or a module of a wrapper, whose ``base_model`` is ``tuner``."""
    if getattr(model, "base_model", None) is tuner:
        return model
    for module in model.modules():
        if getattr(module, "base_model", None) is tuner:
            return module
    return model
