"""``ScheduledLoraModel``: PEFT's ``LoraModel`` with preallocated adapters and a layer schedule.

How it plugs into PEFT (every version 0.3.0 .. newest):

* PEFT picks this class through the ``SCHEDULED_LORA`` entry of its mappings; the tuner then runs as
  ``PeftType.LORA`` in memory so every LoRA-only branch inside PEFT (state dicts, DoRA renames,
  transformers-v5 conversion) applies.  The config flips the type back when written to disk.
* Injection is PEFT's own.  We only hand it an exact regex of the modules to wrap: the user's
  ``target_modules`` inside the preallocated layers, resolved by :mod:`peft_layersched.layers`.
* A never-active adapter is bypassed with the LoRA layer's own disable flag (base output only: no
  dropout, no matmul, no RNG).  A trained-then-frozen adapter keeps contributing, with
  ``requires_grad=False`` and ``grad=None`` so torch optimizers skip it (no momentum, no decay).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .. import _compat, backward_stop
from ..config import ScheduledLoraConfig
from ..layers import ALL_LINEAR, LayerIndex, exact_names_regex, match_targets, no_stacks_message, select_targets
from ..schedules import AdaptiveSchedule, LayerId, Schedule, check_time, parse_schedule, short_layer_list, stable_int

# The freezing modes: frozen layers get requires_grad=False, or the optimizer's per-layer LR freezes them.
REQUIRES_GRAD = "requires_grad"
OPTIMIZER = "optimizer"


class ScheduledAdapter(object):
    """What one scheduled adapter is, read-only (``ScheduledLoraModel.scheduled_adapter(name)``).

    Attributes: ``name``; ``index`` (the model's :class:`~peft_layersched.layers.LayerIndex`); ``schedule``
    (bound to the model's layers, ``None`` without one); ``modules`` (``{module name: layer id}``);
    ``preallocated_layers``, ``active_layers``, ``ever_active_layers``; ``time`` (the last ``t`` given
    to ``activate_layers``, ``None`` before).
    """

    __slots__ = ("name", "index", "schedule", "modules", "preallocated_layers", "active_layers",
                 "ever_active_layers", "time")

    def __init__(self, name: str, index: LayerIndex, schedule: Optional[Schedule], modules: Dict[str, Any],
                 preallocated: List[LayerId], active: List[LayerId], ever: List[LayerId], time: Optional[int]) -> None:
        self.name, self.index, self.schedule, self.modules = name, index, schedule, modules
        self.preallocated_layers, self.active_layers, self.ever_active_layers = preallocated, active, ever
        self.time = time

    def __repr__(self) -> str:
        return (f"ScheduledAdapter({self.name!r}, preallocated={self.preallocated_layers}, "
                f"active={self.active_layers}, ever_active={self.ever_active_layers}, time={self.time})")


class _Plan(object):
    """What one adapter's schedule means on this model."""

    def __init__(
        self,
        index: LayerIndex,
        schedule: Optional[Schedule],
        preallocated: Optional[List[LayerId]],
        targets: Optional[Dict[str, Optional[LayerId]]],
    ) -> None:
        self.index = index
        self.schedule = schedule
        self.preallocated = preallocated
        self.targets = targets
        # Set after injection:
        self.modules: Dict[str, Optional[LayerId]] = {}
        self.active: Optional[List[LayerId]] = None  # None until the first activate_layers()
        self.ever: Set[LayerId] = set()
        self.time: Optional[int] = None


def _refuse_wrapped(model: nn.Module) -> None:
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


def _refuse_excluded(config: Any, targets: Dict[str, Any], preallocated: List[LayerId]) -> None:
    """``exclude_modules`` (PEFT >= 0.14) takes modules out of the scheduled layers; a layer it empties
    would be scheduled without an adapter.  (PEFT itself still applies exclude_modules at injection.)"""
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
    """Modules that ``target_modules`` names outside the layer stacks (``lm_head``, a pooler) would get no LoRA
    with a schedule, where plain PEFT adapts them: refused, not dropped.  Not refused: modules of a stack that a
    given ``layer_stacks`` leaves out (the user chose the stacks), and ``"all-linear"``, which names no module
    (with a schedule: the Linear modules of the scheduled layers, as documented)."""
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


def weights_show_training(init_mode: Any, zero_at_init: Optional[torch.Tensor]) -> Optional[bool]:
    """Whether an adapter's weights show it trained: its part that is zero at init (``lora_B``;
    ``lora_embedding_A`` for embeddings) is not zero any more.  ``None``: the init does not tell
    (``init_lora_weights`` other than True / "gaussian", or no such part)."""
    if zero_at_init is None or not (init_mode is True or init_mode == "gaussian"):
        return None
    return bool(zero_at_init.detach().float().abs().sum() > 0)


def _zero_at_init_part(layer: nn.Module, adapter_name: str) -> Optional[torch.Tensor]:
    weights = _compat.lora_weights(layer, adapter_name)
    if weights is None:
        return None
    kind, weight_a, weight_b = weights
    return weight_a if kind == "embedding" else weight_b


_DEFERRED_LOAD_CHECKS: List[int] = [0]  # > 0: inside deferred_load_check()


@contextlib.contextmanager
def deferred_load_check() -> Iterator[None]:
    """Weights loaded inside are checked later, by :meth:`ScheduledLoraModel.check_deferred_load`.

    For ``Trainer`` resume: the checkpoint's weights come in before the schedule has been moved to the
    checkpoint's step, so layers that trained after step 0 would look hidden at load time.
    """
    _DEFERRED_LOAD_CHECKS[0] += 1
    try:
        yield
    finally:
        _DEFERRED_LOAD_CHECKS[0] -= 1


def _unloaded_lora_modules(state_dict: Dict[str, Any], head: str, unexpected_keys: List[str]) -> List[str]:
    """The modules (names relative to the tuner's model) whose saved LoRA weights nothing in the model took
    (keys under ``head``, the model's own prefix, among torch's unexpected keys), leaving out those whose
    part that is zero at init (``lora_B``; ``lora_embedding_A`` for embeddings) is still zero."""
    parts: Dict[str, Dict[str, Any]] = {}
    for key in unexpected_keys:
        if not key.startswith(head) or key not in state_dict:
            continue
        # "<module>.lora_A[.<adapter>].weight": the saved key (PEFT 0.21 passes a key it has no place for on
        # as it is) or the key with the adapter name put in (PEFT 0.3 - 0.20).
        module_name, found, rest = key[len(head):].partition(".lora_")
        if found:
            parts.setdefault(module_name, {})["lora_" + rest.split(".", 1)[0]] = state_dict[key]
    unloaded = []
    for module_name, saved in parts.items():
        zero_at_init = saved.get("lora_B", saved.get("lora_embedding_A"))
        if zero_at_init is not None and bool(zero_at_init.detach().ne(0).any()):
            unloaded.append(module_name)
    return unloaded


def _warn_unloaded_weights(tuner: nn.Module, incompatible_keys: Any) -> None:
    prefix, state_dict = tuner.__dict__.pop("_loading_state", ("", None))
    if state_dict is None or incompatible_keys is None:
        return
    unloaded = _unloaded_lora_modules(state_dict, prefix + "model.", list(incompatible_keys.unexpected_keys))
    if not unloaded:
        return
    plans = tuner._plans
    index = plans[tuner._current_adapter()].index if tuner._current_adapter() in plans else LayerIndex([])
    layer_of = {name: index.layer_of(name) for name in unloaded}
    layers = index.held_layers(layer_of.values())
    outside = sorted(name for name, layer in layer_of.items() if layer is None)
    where = f"layer(s) {layers}" if layers else ""
    if outside:
        where += (" and " if where else "") + f"module(s) {outside}"
    # The loaded adapter's config is one of peft_config's by now (PEFT injects it before loading).
    zero_b = all(weights_show_training(config.init_lora_weights, torch.zeros(1)) is not None
                 for config in tuner.peft_config.values())
    what = "trained LoRA weights (lora_B is not zero)" if zero_b else "LoRA weights whose lora_B is not zero"
    warnings.warn(
        f"the loaded adapter weights carry {what} for {where}, but the model has no LoRA adapter there (the "
        f"adapter_config.json loaded does not preallocate them), so they were not loaded. To load them, "
        f"preallocate them again in adapter_config.json (layer_schedule / preallocate_layers; 'peft-layersched "
        f"inspect' shows the layers the saved weights hold).",
        stacklevel=2,
    )


def _never_scheduled(tuner: nn.Module) -> bool:
    """No schedule has been applied to this model yet and its config records none (a model just built by
    ``get_peft_model``): weights loaded into it are a resume's, which cannot be judged before the schedule
    is moved to their time."""
    plans = [(name, plan) for name, plan in tuner._plans.items() if plan.schedule is not None]
    return bool(plans) and all(
        plan.time is None and getattr(tuner.peft_config[name], "schedule_position", None) is None
        for name, plan in plans
    )


def _check_at_first_forward(tuner: nn.Module) -> None:
    """Run a put-off check at the model's next forward if nothing (a ``LayerScheduler``) ran it before."""
    if tuner.__dict__.get("_load_check_hook") is not None:
        return

    def check(module: nn.Module, args: Any) -> None:
        tuner.check_deferred_load()

    tuner.__dict__["_load_check_hook"] = [entry.register_forward_pre_hook(check) for entry in _forward_entries(tuner)]


def _check_loaded_weights(tuner: nn.Module, incompatible_keys: Any = None) -> None:
    _warn_unloaded_weights(tuner, incompatible_keys)
    if _DEFERRED_LOAD_CHECKS[0]:
        tuner.__dict__["_load_check_pending"] = True
        return
    if _never_scheduled(tuner):
        # A plain loop's resume may load the weights before LayerScheduler(..., state_dict=...) moves the
        # schedule to their step: it checks them then (or the next forward does).
        tuner.__dict__["_load_check_pending"] = True
        _check_at_first_forward(tuner)
        return
    _check_hidden_weights(tuner)


def _check_hidden_weights(tuner: nn.Module) -> None:
    for name, plan in tuner._plans.items():
        hidden = []
        for module_name in tuner._bypassed_modules(name, plan):
            module = tuner.model.get_submodule(module_name)
            init_mode = tuner.peft_config[name].init_lora_weights
            if weights_show_training(init_mode, _zero_at_init_part(module, name)):
                hidden.append(plan.modules[module_name])
        if hidden:
            layers = plan.index.sort(set(hidden))
            warnings.warn(
                f"adapter {name!r}: layer(s) {layers} carry trained LoRA weights (lora_B is not zero), but the "
                f"config's layer_schedule / ever_active_layers ({plan.index.sort(plan.ever)}) say they never "
                f"trained, so they are left out of the forward. If they did train, add them to "
                f"ever_active_layers in adapter_config.json ('peft-layersched inspect' shows the mismatch).",
                stacklevel=2,
            )


def _refuse_undecided(schedule: Optional[Schedule], t: int, unit: str) -> None:
    """An adaptive schedule's layers at ``t`` are a decision from measured signals: ``activate_layers`` replays
    logged decisions and cannot make one."""
    if not isinstance(schedule, AdaptiveSchedule):
        return
    due = schedule.due(t)
    if due is None:
        return
    logged = [decision["t"] for decision in schedule.decisions]
    has = f"its decision log covers {unit}s {logged[0]}..{logged[-1]}" if logged else "its decision log is empty"
    raise ValueError(
        f"activate_layers({t}): the {schedule.kind} schedule has no decision for {unit} {due} ({has}). Its layers "
        f"are chosen from signals measured during training, which activate_layers() cannot do. Drive the schedule "
        f"with LayerScheduleCallback (Trainer(callbacks=[...])), LayerScheduler (a plain loop: sched.step() / "
        f"sched.epoch_end()) or LayerScheduleFinetuning (Lightning); they decide when a decision is due and "
        f"activate its layers."
    )


_WATCH = "_peft_layersched_undriven_watch"


class _UndrivenWatch(object):
    """Forward pre-hook on the base model (every PEFT forward reaches it; a plain ``PeftModel`` calls the
    base model directly): a forward with grad enabled while a scheduled adapter has no driver yet."""

    def __init__(self, tuner: "ScheduledLoraModel") -> None:
        self.tuner = tuner

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.tuner.__dict__.get("_undriven") and torch.is_grad_enabled():
            self.tuner._record_undriven_training()


def _forward_entries(tuner: nn.Module) -> List[nn.Module]:
    """The modules whose forward pre-hooks see every forward: the base model (a plain ``PeftModel`` calls
    it directly) and the tuner (PEFT < 0.4's tuner calls ``self.model.forward`` itself, which runs no hooks).
    A hook on both runs twice per forward, so it must be idempotent."""
    return [tuner, tuner.model]


def _watch_undriven(tuner: "ScheduledLoraModel") -> None:
    for entry in _forward_entries(tuner):
        if _WATCH not in entry.__dict__:
            entry.__dict__[_WATCH] = entry.register_forward_pre_hook(_UndrivenWatch(tuner))


def _unwatch(model: nn.Module) -> None:
    handle = model.__dict__.pop(_WATCH, None)
    if handle is not None:
        handle.remove()


def _at_start(schedule: Schedule) -> List[LayerId]:
    # A callable schedule loaded from disk has no function until set_layer_schedule(); its adapters
    # still load (bypassed unless ever active) and activate_layers() says how to give it back.
    return schedule.active_at(0) if schedule.runnable else []


def _own_copy(config: Any) -> Any:
    """The tuner's own copy of a scheduled ``ScheduledLoraConfig``, which it writes the schedule's state
    to (``init_seed``, ``ever_active_layers``): the caller's object is never written to, so one config
    builds any number of models.  A config without a schedule is plain LoRA and is used as given, as
    PEFT uses a ``LoraConfig`` (``PeftModel.from_pretrained(config=...)`` keeps that very object)."""
    if not isinstance(config, ScheduledLoraConfig) or not config.restricts_layers:
        return config
    own = copy.deepcopy(config)  # a callable schedule is shared, not copied (deepcopy keeps functions)
    own.validate()
    return own


# init_lora_weights modes that leave the base weight as it is: an adapter not yet active can be left out
# of the forward.  The others (pissa*, olora; and any mode this list does not know) may move part of the
# base weight into the adapter at init, so every adapter stays in the forward and the output is unchanged
# until one trains.  (EVA, CorDA, LoftQ and LoRA-GA are refused with a schedule by the config.)
_BASE_WEIGHT_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _init_keeps_base_weight(init_mode: Any) -> bool:
    if isinstance(init_mode, bool):
        return True
    return init_mode in _BASE_WEIGHT_KEEPING_INITS


def _module_seed(init_seed: int, module_name: str) -> int:
    return stable_int(init_seed, module_name) & ((1 << 63) - 1)


def _fill_uniform_fan_in(param: torch.Tensor, generator: torch.Generator) -> None:
    # = nn.init.kaiming_uniform_(a=sqrt(5)), PEFT's lora_A init; torch 1.13 has no generator argument.
    fan_in = param[0].numel() if param.dim() > 1 else param.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    values = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    param.copy_(values.to(dtype=param.dtype))


def _fill_normal(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    param.copy_(values.to(dtype=param.dtype))


def _seeded_init(layer: nn.Module, adapter_name: str, init_mode: Any, seed: int) -> None:
    """PEFT's LoRA init for ``init_lora_weights`` in (True, False, "gaussian"), from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    r = layer.r[adapter_name]
    weights = _compat.lora_weights(layer, adapter_name)
    if weights is None:
        return
    kind, weight_a, weight_b = weights
    with torch.no_grad():
        if kind == "linear":
            if init_mode == "gaussian":
                _fill_normal(weight_a, 1.0 / r, generator)
            else:
                _fill_uniform_fan_in(weight_a, generator)
            if init_mode is False:
                _fill_uniform_fan_in(weight_b, generator)
            else:
                weight_b.zero_()
        else:
            if init_mode is False:
                _fill_normal(weight_a, 1.0, generator)
            else:
                weight_a.zero_()
            _fill_normal(weight_b, 1.0, generator)


_SEEDED_INIT_MODES = (True, False, "gaussian")


class ScheduledLoraModel(_compat.TunerHooks, LoraModel):
    """LoRA tuner with a layer schedule.  Created by ``get_peft_model(model, ScheduledLoraConfig(...))``.

    Reach its methods through the ``PeftModel``: ``peft_model.activate_layers(epoch)``,
    ``peft_model.active_layers``, ``peft_model.preallocated_layers``.
    """

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        _refuse_wrapped(model)
        if isinstance(config, dict):  # PeftModel's own dict (PEFT 0.3 shares it with the tuner)
            for name in list(config):
                config[name] = _own_copy(config[name])
        else:
            config = _own_copy(config)
        super().__init__(model, config, adapter_name, *args, **kwargs)
        # After PEFT loads adapter weights (from_pretrained, load_adapter, a Trainer resume), check them
        # against the schedule state the config carries, and that every saved LoRA weight found its module.
        self.register_load_state_dict_post_hook(_check_loaded_weights)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # PEFT loads adapter weights with load_state_dict(strict=False) on every version, so a saved LoRA weight
        # whose module carries no adapter here (not preallocated) is dropped without a word.  The post-load hook
        # gets only the names of such keys (torch's unexpected_keys); their values are kept for it here.
        self.__dict__["_loading_state"] = (prefix, state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------- injection

    # Injection: _compat.TunerHooks runs PEFT's (inject_adapter / add_adapter) inside _scheduled_injection.

    def _own_config(self, config: Any) -> Any:
        # PeftModel.add_adapter/load_adapter store the caller's config object: the tuner works on its own.
        return _own_copy(config)

    @property
    def _plans(self) -> Dict[str, _Plan]:
        plans = self.__dict__.get("_layer_plans")
        if plans is None:
            plans = {}
            self.__dict__["_layer_plans"] = plans
        return plans

    @contextlib.contextmanager
    def _scheduled_injection(self, model: nn.Module, adapter_name: str) -> Iterator[None]:
        config = self.peft_config[adapter_name]
        if not isinstance(config, ScheduledLoraConfig):
            yield
            return
        config.validate()
        plan = self._plan(model, config)
        if plan.targets is not None and config.init_seed is None:
            config.init_seed = int(torch.initial_seed()) & ((1 << 63) - 1)
        saved_targets = config.target_modules
        if plan.targets is not None:
            config.target_modules = exact_names_regex(plan.targets)
        seeded = config.init_seed is not None and config.init_lora_weights in _SEEDED_INIT_MODES
        rng = _compat.fork_rng() if seeded else contextlib.nullcontext()
        try:
            with rng:
                yield
                self._after_injection(model, adapter_name, config, plan, seeded)
        finally:
            if plan.targets is not None:
                config.target_modules = saved_targets

    def _plan(self, model: nn.Module, config: ScheduledLoraConfig) -> _Plan:
        if not config.restricts_layers:
            # Plain LoRA: PEFT targets as it always does; the index only names layers for reporting.
            try:
                index = LayerIndex.from_model(model, config.layer_stacks)
            except ValueError:
                index = LayerIndex([])
            return _Plan(index, None, None, None)
        index = LayerIndex.from_model(model, config.layer_stacks)
        if not index.stacks:
            raise ValueError(no_stacks_message(model))
        found: Dict[str, Any] = {}  # each computed once, when first needed (errors keep their order)

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
            # On this model's canonical layers.  Gradual/cyclic/sampled/callable schedules draw from "every
            # layer" unless they list their own: the preallocated layers when preallocate_layers is set,
            # else every layer holding a target module.
            candidates: Optional[List[LayerId]] = None
            if spec.kind != "milestones":
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
        return _Plan(index, schedule, preallocated, targets)

    def _after_injection(
        self, model: nn.Module, adapter_name: str, config: ScheduledLoraConfig, plan: _Plan, seeded: bool
    ) -> None:
        for name, module in model.named_modules():
            if _compat.is_lora_layer(module) and any(True for _ in _compat.adapter_parameters(module, adapter_name)):
                plan.modules[name] = plan.index.layer_of(name)
                if seeded:
                    _seeded_init(module, adapter_name, config.init_lora_weights, _module_seed(config.init_seed, name))
        if config.ever_active_layers:
            plan.ever = set(plan.index.canonical_list(config.ever_active_layers, "ever_active_layers"))
        self._plans[adapter_name] = plan
        if self.__dict__.get("_scheduled_adapter") is None:
            self.__dict__["_scheduled_adapter"] = adapter_name
        self._write_layer_state()

    # ------------------------------------------------------------------------------------ schedule

    def _adapter(self, adapter_name: Optional[str]) -> Tuple[str, _Plan]:
        name = adapter_name if adapter_name is not None else self.__dict__.get("_scheduled_adapter")
        if name not in self._plans:
            raise ValueError(
                f"adapter {name!r} has no layer schedule; scheduled adapters: {sorted(self._plans)}."
            )
        return name, self._plans[name]

    def activate_layers(self, t: Any, adapter_name: Optional[str] = None) -> List[LayerId]:
        """Make exactly the layers scheduled at ``t`` (epoch or optimizer step) trainable.

        Every other preallocated LoRA parameter gets ``requires_grad=False`` and ``grad=None`` (torch
        optimizers then skip it: no momentum, no weight decay).  Adapters that were active before keep
        contributing to the output; never-active ones are bypassed.  Idempotent; returns the active
        layer ids, canonical and sorted.
        """
        name, plan = self._adapter(adapter_name)
        t = check_time(t)
        _refuse_undecided(plan.schedule, t, getattr(self.peft_config[name], "schedule_unit", "epoch"))
        if plan.schedule is None:
            active = plan.index.held_layers(plan.modules.values())
            plan.ever.update(active)
        else:
            active = plan.schedule.active_at(t)  # bound: canonical ids in layer order
            plan.ever.update(plan.schedule.layers_until(t))
        plan.active = active
        plan.time = t
        config = self.peft_config[name]
        if isinstance(config, ScheduledLoraConfig) and plan.schedule is not None:
            config.ever_active_layers = plan.index.sort(plan.ever)
            config.schedule_position = t
        self._write_layer_state()
        return list(active)

    def set_schedule_position(self, t: Any, adapter_name: Optional[str] = None) -> None:
        """Record that the adapter's schedule has run up to ``t`` (what ``adapter_config.json`` saves as
        ``schedule_position``) without changing which layers train: for the times at which the active set
        stays as it is, and for the step after a run's last optimizer step (whose layers never trained,
        so they are not made ever-active).  ``LayerScheduler`` calls it after every optimizer step (step
        unit) and at every epoch (epoch unit)."""
        name, plan = self._adapter(adapter_name)
        t = check_time(t)
        config = self.peft_config[name]
        if isinstance(config, ScheduledLoraConfig) and plan.schedule is not None:
            config.schedule_position = t

    def save_schedule_state(self, adapter_name: Optional[str] = None) -> None:
        """Write an adaptive schedule as it stands (its decision log and signal state) into the adapter's
        config, so ``save_pretrained`` saves the realized schedule.  ``LayerScheduler`` calls it at each
        decision, from ``state_dict()`` and at the end of a run; other schedules are left as they are."""
        name, plan = self._adapter(adapter_name)
        config = self.peft_config[name]
        if isinstance(config, ScheduledLoraConfig) and isinstance(plan.schedule, AdaptiveSchedule):
            config.layer_schedule = plan.schedule.as_spec().to_json()

    def check_deferred_load(self) -> None:
        """Run the check of loaded weights that :func:`deferred_load_check` put off, if it did (a warning
        naming layers whose LoRA weights show training although the schedule so far leaves them out)."""
        for hook in self.__dict__.pop("_load_check_hook", None) or []:
            hook.remove()
        if self.__dict__.pop("_load_check_pending", False):
            _check_hidden_weights(self)

    def restore_layer_state(
        self, t: Any, ever_active_layers: Any = None, adapter_name: Optional[str] = None
    ) -> List[LayerId]:
        """Put the schedule back where a checkpoint recorded it: ``activate_layers(t)`` with the
        ever-active set replaced by ``ever_active_layers`` (default: what the schedule activated up to
        ``t``).  ``LayerScheduleCallback`` calls it after ``load_best_model_at_end``.
        """
        name, plan = self._adapter(adapter_name)
        t = check_time(t)
        if ever_active_layers is not None:
            plan.ever = set(plan.index.canonical_list(list(ever_active_layers), "ever_active_layers"))
        else:
            plan.ever = set()
        return self.activate_layers(t, name)

    def set_layer_schedule(self, layer_schedule: Any, adapter_name: Optional[str] = None) -> List[LayerId]:
        """Replace the adapter's schedule, e.g. give a Python callable back after loading (callables are
        not saved).  Any ``layer_schedule`` form works; it may use only the preallocated layers (those are
        also the candidates of a schedule without its own ``layers``).  Returns the preallocated layers.
        """
        name, plan = self._adapter(adapter_name)
        preallocated = self.preallocated_layers
        schedule = parse_schedule(layer_schedule).bind(plan.index.all_layers(), plan.index.canonical, preallocated)
        missing = [layer for layer in plan.index.sort(schedule.all_layers()) if layer not in preallocated]
        if missing:
            raise ValueError(
                f"the new layer_schedule uses layer(s) {missing}, which carry no adapter (preallocated: "
                f"{preallocated}); adapters cannot be added later. Schedule only preallocated layers, or build "
                f"the model again with preallocate_layers covering them."
            )
        config = self.peft_config[name]
        config.layer_schedule = layer_schedule
        config.validate()
        plan.schedule = schedule
        self._write_layer_state()
        return preallocated

    @property
    def freezing(self) -> str:
        """How a frozen layer is frozen: ``"requires_grad"`` (default: ``requires_grad=False`` and
        ``grad=None``) or ``"optimizer"`` (every preallocated parameter keeps ``requires_grad=True``; the
        optimizer's per-layer LR freezes it, for engines such as DeepSpeed ZeRO that fix the trainable
        set when they initialize).  Never-active adapters are left out of the forward either way."""
        return self.__dict__.get("_freezing", REQUIRES_GRAD)

    def set_freezing(self, mode: str) -> None:
        if mode not in (REQUIRES_GRAD, OPTIMIZER):
            raise ValueError(
                f"freezing={mode!r} is not supported; use {REQUIRES_GRAD!r} (frozen layers get "
                f"requires_grad=False) or {OPTIMIZER!r} (the optimizer's per-layer LR freezes them)."
            )
        self.__dict__["_freezing"] = mode
        self._reapply()

    def register_all_for_optimizer(self, adapter_name: Optional[str] = None) -> None:
        """Back to the state right after ``get_peft_model``: every preallocated LoRA parameter requires
        grad (so an optimizer built now holds them all), never-active adapters stay bypassed.  The next
        ``activate_layers`` call applies the schedule again.
        """
        name, plan = self._adapter(adapter_name)
        plan.active = None
        self._write_layer_state()

    def _write_layer_state(self) -> None:
        """Write every scheduled adapter's state into the LoRA layers (routing, requires_grad, grad).

        An adapter runs in a layer when it is one of the model's active adapters and, if scheduled, the
        layer is active now or was before (or the init moved base weight into it).  Its parameters train
        when the adapter is active (and not ``inference_mode``) and the layer is in the active set;
        before the first ``activate_layers()`` every preallocated layer's do, so an optimizer built the
        usual way (``p.requires_grad`` filter) holds them all.  Adapters without a schedule keep PEFT's
        own state.
        """
        model_active = _compat.tuner_active_adapters(self)
        by_optimizer = self.freezing == OPTIMIZER
        bypassed: Dict[str, Set[str]] = {}
        scheduled = undriven = False
        for name, plan in self._plans.items():
            if plan.schedule is None:
                continue
            scheduled = True
            undriven = undriven or plan.active is None
            config = self.peft_config[name]
            trainable = None if plan.active is None else set(plan.active)
            left_out = set(self._bypassed_modules(name, plan))
            train_adapter = name in model_active and not bool(getattr(config, "inference_mode", False))
            for module_name, layer_id in plan.modules.items():
                module = self.model.get_submodule(module_name)
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
            _compat.route_layer(self.model.get_submodule(module_name), model_active, names)
        if scheduled:
            # Backward (with or without gradient checkpointing) ends at the lowest layer that now trains.
            backward_stop.update(self.model, self._stacks())
            _watch_undriven(self)
        self.__dict__["_undriven"] = undriven

    def _record_undriven_training(self) -> None:
        """A forward with grad enabled before any ``activate_layers`` (no driver: a hand-written loop without
        ``LayerScheduler``, a Trainer without ``LayerScheduleCallback``): the layers whose adapters run and
        require grad now train, so they are recorded as ever active; the first time, a warning says so."""
        self.__dict__["_undriven"] = False  # until _write_layer_state changes the state again
        model_active = _compat.tuner_active_adapters(self)
        for name, plan in self._plans.items():
            if plan.schedule is None or plan.active is not None or name not in model_active:
                continue
            config = self.peft_config[name]
            left_out = set(self._bypassed_modules(name, plan))
            training = set()
            for module_name, layer_id in plan.modules.items():
                if module_name in left_out:
                    continue
                module = self.model.get_submodule(module_name)
                if any(p.requires_grad for p in _compat.adapter_parameters(module, name)):
                    training.add(layer_id)
            new = training - plan.ever
            if not new:
                continue
            plan.ever.update(new)
            if isinstance(config, ScheduledLoraConfig):
                config.ever_active_layers = plan.index.sort(plan.ever)
            if self.__dict__.get("_warned_undriven"):
                continue
            self.__dict__["_warned_undriven"] = True
            unit = getattr(config, "schedule_unit", "epoch")
            warnings.warn(
                f"adapter {name!r} is training with no layer-schedule driver: layer(s) {plan.index.sort(training)} "
                f"get gradients (the schedule's layers at {unit} 0), and the schedule never moves on. They are "
                f"recorded in ever_active_layers. Pass LayerScheduleCallback() to Trainer(callbacks=[...]), or "
                f"drive a plain loop with LayerScheduler(model, optimizer) (sched.step() after each optimizer "
                f"step) or model.activate_layers(t) at each {unit}.",
                stacklevel=3,
            )

    def _bypassed_modules(self, adapter_name: str, plan: _Plan) -> List[str]:
        """The adapter's modules whose layer has never been active (nor is active now): left out of the
        forward.  None when the init moved base weight into the adapters (the output needs them all)."""
        if plan.schedule is None or not _init_keeps_base_weight(self.peft_config[adapter_name].init_lora_weights):
            return []
        if plan.active is None:
            enabled = plan.ever | set(_at_start(plan.schedule))
        else:
            enabled = plan.ever | set(plan.active)
        return [name for name, layer_id in plan.modules.items() if layer_id not in enabled]

    def _stacks(self) -> List[Any]:
        for plan in self._plans.values():
            if plan.schedule is not None:
                return list(plan.index.stacks)
        return []

    def _current_adapter(self) -> Optional[str]:
        return self.__dict__.get("_scheduled_adapter")

    def _reapply(self) -> None:
        if self._plans:
            self._write_layer_state()

    def scheduled_adapter(self, adapter_name: Optional[str] = None) -> "ScheduledAdapter":
        """A read-only view of a scheduled adapter (default: the one ``activate_layers`` drives)."""
        name, plan = self._adapter(adapter_name)
        preallocated = plan.index.held_layers(plan.modules.values())
        if plan.active is not None:
            active = list(plan.active)
        elif plan.schedule is None:
            active = list(preallocated)
        else:
            active = plan.index.sort(plan.ever | set(_at_start(plan.schedule)))
        ever = list(preallocated) if plan.schedule is None else plan.index.sort(plan.ever)
        return ScheduledAdapter(name, plan.index, plan.schedule, dict(plan.modules), preallocated, active, ever,
                                plan.time)

    @property
    def active_layers(self) -> List[LayerId]:
        """Layers whose adapters train now (before the first ``activate_layers``: those that get grads)."""
        return self.scheduled_adapter().active_layers

    @property
    def preallocated_layers(self) -> List[LayerId]:
        """Layers that carry an adapter (trained, frozen or not yet active)."""
        return self.scheduled_adapter().preallocated_layers

    @property
    def ever_active_layers(self) -> List[LayerId]:
        """Layers whose adapters have been active at least once (they carry trained weights)."""
        return self.scheduled_adapter().ever_active_layers

    def scheduled_modules(self, adapter_name: Optional[str] = None) -> Dict[str, Optional[LayerId]]:
        """``{module name: layer id}`` of every LoRA module of the adapter (relative to the base model)."""
        return dict(self._adapter(adapter_name)[1].modules)

    def layer_parameters(self, adapter_name: Optional[str] = None) -> Dict[LayerId, List[nn.Parameter]]:
        """The adapter's LoRA parameters grouped by layer (every preallocated layer, in layer order)."""
        name, plan = self._adapter(adapter_name)
        grouped: Dict[Any, List[nn.Parameter]] = {}
        for module_name, layer_id in plan.modules.items():
            module = self.model.get_submodule(module_name)
            grouped.setdefault(layer_id, []).extend(_compat.adapter_parameters(module, name))
        return {layer: grouped[layer] for layer in plan.index.held_layers(grouped)}

    # --------------------------------------------- PEFT calls that reset per-layer flags or merge

    def enable_adapter_layers(self, *args: Any, **kwargs: Any) -> Any:
        # PEFT resets every layer's flag and requires_grad here (the exit of PeftModel.disable_adapter()).
        result = super().enable_adapter_layers(*args, **kwargs)
        self._reapply()
        return result

    def set_adapter(self, adapter_name: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().set_adapter(adapter_name, *args, **kwargs)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        scheduled = [name for name in names if name in self._plans]
        if scheduled:
            self.__dict__["_scheduled_adapter"] = scheduled[0]
        self._reapply()
        return result

    def delete_adapter(self, adapter_name: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().delete_adapter(adapter_name, *args, **kwargs)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._plans.pop(name, None)
        if self._current_adapter() not in self._plans:
            active = [name for name in _compat.tuner_active_adapters(self) if name in self._plans]
            self.__dict__["_scheduled_adapter"] = (active or sorted(self._plans) or [None])[0]
        if self._plans:
            self._reapply()
        else:
            backward_stop.remove(self.model)
            _unwatch(self.model)
            _unwatch(self)
        return result

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        # An adapter that a layer leaves out of its forward (never active) never contributed there, but
        # PEFT merges it when named explicitly (and on PEFT 0.3-0.5 always): its delta (B) is zeroed first.
        for name, plan in self._plans.items():
            for module_name in self._bypassed_modules(name, plan):
                module = self.model.get_submodule(module_name)
                weights = _compat.lora_weights(module, name)
                if weights is not None:
                    with torch.no_grad():
                        weights[2].zero_()
        merged = super().merge_and_unload(*args, **kwargs)
        backward_stop.remove(merged)  # the plain model gets its input-require-grads hooks back, none of ours
        _unwatch(merged)
        return merged

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> Any:
        # A layer that runs none of the model's active adapters (the schedule bypasses them there) is not
        # merged after merge_adapter(): PEFT >= 0.6 merges a layer's own active adapters; 0.3-0.5 merge it, but
        # its disable flag makes its next forward unmerge it.  PEFT's unmerge then warns "Already unmerged" on
        # each such layer, which a plain LoRA model never does: those layers are skipped.
        idle = self._unmerged_idle_layers()
        if not idle:
            return super().unmerge_adapter(*args, **kwargs)
        for module in self.model.modules():
            if _compat.is_tuner_layer(module) and id(module) not in idle:
                _compat.unmerge_layer(module)
        return None

    def _unmerged_idle_layers(self) -> Set[int]:
        """ids of the LoRA layers that are not merged and run none of the model's active adapters because the
        schedule bypasses them there."""
        model_active = _compat.tuner_active_adapters(self)
        left_out: Set[str] = set()
        for name, plan in self._plans.items():
            if name in model_active:
                left_out.update(self._bypassed_modules(name, plan))
        idle = set()
        for module_name in left_out:
            module = self.model.get_submodule(module_name)
            runs = any(_compat.layer_runs(module, name) for name in model_active)
            if not runs and not bool(getattr(module, "merged", False)):
                idle.add(id(module))
        return idle

    def _unloaded(self, model: nn.Module) -> None:  # after PEFT's unload() (_compat.TunerHooks)
        backward_stop.remove(model)
        _unwatch(model)


def find_scheduled_tuner(model: Any, needed_by: str) -> ScheduledLoraModel:
    """The ``ScheduledLoraModel`` inside ``model``: a PeftModel's ``base_model``, or the first one among the
    modules of a wrapper around a PeftModel (DDP, a DeepSpeed engine, ``torch.compile``).  ``needed_by``
    names the caller in the ``TypeError`` raised when there is none (e.g. ``"export_lora()"``).
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
    """The PeftModel in ``model`` (itself, or a module of a wrapper) whose ``base_model`` is ``tuner``."""
    if getattr(model, "base_model", None) is tuner:
        return model
    for module in model.modules():
        if getattr(module, "base_model", None) is tuner:
            return module
    return model
