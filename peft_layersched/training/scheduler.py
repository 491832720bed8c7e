"""``LayerScheduler``: the one core every training loop drives (the Trainer callback, Lightning, a plain loop).

Like ``torch.optim.lr_scheduler``, it holds a model and an optimizer and is told when an optimizer step (or
an epoch) is done.  It owns everything the package guarantees during training:

* **switching**: the layers of the schedule time that comes next train, the others are frozen (through
  the run's :mod:`~peft_layersched.engines` engine); the active set is a pure function of the schedule
  time, so every rank computes the same one;
* **LR factors**: every scheduled layer has its own optimizer param group (:meth:`LayerScheduler.param_groups`
  builds them for a new optimizer); a group's LR is the scheduled LR x 0 (frozen), ``new_layer_lr_scale`` and
  the linear warm-up (a layer that joined after the first phase), else 1: exact for every optimizer;
* **optimizer-state policies** for frozen and rejoining layers (``frozen_optimizer_state``,
  ``reactivated_state``);
* **the no-update check**: a warning when an active layer did not move at all over a phase;
* **the numbers trackers plot** (:meth:`metrics`) and **resume** (:meth:`state_dict` / ``state_dict=``: with
  the optimizer's and LR scheduler's own state dicts, a resumed loop continues bitwise).

Example (a plain loop)::

    >>> model = get_peft_model(base, ScheduledLoraConfig(..., layer_schedule={0: [-1], 100: [-2, -1]},
    ...                                                  schedule_unit="step"))
    >>> optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-3)
    >>> lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    >>> sched = LayerScheduler(model, optimizer, new_layer_warmup_steps=20)
    >>> for batch in loader:
    ...     model(**batch).loss.backward()
    ...     optimizer.step(); lr_scheduler.step(); sched.step()
    ...     optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import _compat
from ..schedules import AdaptiveSchedule, LayerId, check_time, format_layers
from ..tuner import ScheduledLoraModel, adopt, find_scheduled_tuner
from . import engines, optim
from .signals import SignalMeter

logger = logging.getLogger(__name__)

_REACTIVATED_STATE = ("keep", "reset")
SCHEDULE_STARTS = ("restart", "continue")


def check_options(
    new_layer_lr_scale: Any, new_layer_warmup_steps: Any, reactivated_state: Any, warn_on_no_update: Any,
    schedule_start: Any, frozen_optimizer_state: Any,
) -> str:
    """Validate the scheduler's options (the callback's are the same); returns the ``reactivated_state``
    in force (``"reset"`` by default with ``frozen_optimizer_state="drop"``)."""
    if isinstance(new_layer_lr_scale, bool) or not isinstance(new_layer_lr_scale, (int, float)):
        raise TypeError(f"new_layer_lr_scale must be a number, got {new_layer_lr_scale!r}.")
    if not (new_layer_lr_scale >= 0 and math.isfinite(new_layer_lr_scale)):
        raise ValueError(
            f"new_layer_lr_scale must be a finite number >= 0 (1.0 = the scheduled LR), got {new_layer_lr_scale}."
        )
    if not isinstance(warn_on_no_update, bool):
        raise TypeError(f"warn_on_no_update must be True or False, got {warn_on_no_update!r}.")
    if schedule_start not in SCHEDULE_STARTS:
        raise ValueError(
            f"schedule_start={schedule_start!r} is not supported; use one of {list(SCHEDULE_STARTS)} "
            f"('restart': the schedule begins at t=0; 'continue': where the loaded adapter's schedule stood)."
        )
    if isinstance(new_layer_warmup_steps, bool) or not isinstance(new_layer_warmup_steps, int):
        raise TypeError(f"new_layer_warmup_steps must be an int, got {new_layer_warmup_steps!r}.")
    if new_layer_warmup_steps < 0:
        raise ValueError(f"new_layer_warmup_steps must be >= 0, got {new_layer_warmup_steps}.")
    if reactivated_state is not None and reactivated_state not in _REACTIVATED_STATE:
        raise ValueError(
            f"reactivated_state={reactivated_state!r} is not supported; use one of {list(_REACTIVATED_STATE)}."
        )
    if frozen_optimizer_state not in optim.FROZEN_STATES:
        raise ValueError(
            f"frozen_optimizer_state={frozen_optimizer_state!r} is not supported; use one of "
            f"{list(optim.FROZEN_STATES)} ('keep': frozen layers keep their optimizer state; 'drop': it is "
            f"freed and starts afresh when the layer rejoins; 'offload': it waits on the CPU)."
        )
    if frozen_optimizer_state == "drop" and reactivated_state == "keep":
        raise ValueError(
            "frozen_optimizer_state='drop' frees a frozen layer's optimizer state, so it cannot be kept for "
            "when the layer rejoins (reactivated_state='keep'). Use frozen_optimizer_state='offload' to keep "
            "it off the accelerator, or leave reactivated_state unset."
        )
    return reactivated_state or ("reset" if frozen_optimizer_state == "drop" else "keep")


_OPTION_NAMES = ("new_layer_lr_scale", "new_layer_warmup_steps", "frozen_optimizer_state", "reactivated_state",
                 "warn_on_no_update", "adapter_name", "schedule_start")


class ScheduleOptions(object):
    """The options every driver of a schedule takes (``LayerScheduler``, ``LayerScheduleCallback``,
    ``LayerScheduleFinetuning``): validated once, kept as attributes, handed on with :meth:`options`."""

    def _set_options(
        self, new_layer_lr_scale: Any, new_layer_warmup_steps: Any, frozen_optimizer_state: Any,
        reactivated_state: Any, warn_on_no_update: Any, adapter_name: Any, schedule_start: Any,
    ) -> None:
        self.reactivated_state = check_options(
            new_layer_lr_scale, new_layer_warmup_steps, reactivated_state, warn_on_no_update, schedule_start,
            frozen_optimizer_state,
        )
        self.new_layer_lr_scale = float(new_layer_lr_scale)
        self.new_layer_warmup_steps = new_layer_warmup_steps
        self.frozen_optimizer_state = frozen_optimizer_state
        self.warn_on_no_update = warn_on_no_update
        self.adapter_name = adapter_name
        self.schedule_start = schedule_start

    def options(self) -> Dict[str, Any]:
        """The validated options, as ``LayerScheduler`` keyword arguments."""
        return {name: getattr(self, name) for name in _OPTION_NAMES}


class LayerScheduler(ScheduleOptions):
    """Drives the layer schedule of a scheduled ``PeftModel`` in any training loop.

    Args:
        model: a ``PeftModel`` built from a ``ScheduledLoraConfig`` (or a wrapper around one: DDP, FSDP, a
            DeepSpeed engine, ``torch.compile``).
        optimizer: the optimizer that trains it (``None``: switching only).  Build it over
            :meth:`param_groups` for LR factors (required with ``new_layer_lr_scale`` / warm-up and under
            ``engine="lr-zero"``); else it must hold every preallocated LoRA parameter.  The scheduler
            changes it in these ways only: the LR of each per-layer group (and two keys it keeps there,
            saved by ``optimizer.state_dict()``), a post-step hook that puts the unscaled LRs back, and the
            optimizer state that ``frozen_optimizer_state`` / ``reactivated_state`` move or drop.
        unit (`str`, *optional*): ``"step"`` or ``"epoch"``; default the config's ``schedule_unit``.
        new_layer_lr_scale, new_layer_warmup_steps, frozen_optimizer_state, reactivated_state,
        warn_on_no_update, adapter_name, schedule_start: as for ``LayerScheduleCallback``.
        engine: ``"requires_grad"`` (default; one process, DDP, FSDP), ``"lr-zero"`` (DeepSpeed ZeRO), or an
            :class:`~peft_layersched.engines.Engine`.
        total_steps / total_epochs (`int`, *optional*): the run's length; then nothing switches in after
            its last step/epoch (no layer is marked ever-active without training), and a time in the run
            at which nothing would train is refused up front.
        steps_per_epoch (`int`, *optional*): optimizer steps per epoch (epoch unit: warm-up of layers that
            joined before this run, and the length check).
        start_step / start_epoch (`int`): where this run starts (a Trainer resumed without our state).
        state_dict (`dict`, *optional*): a :meth:`state_dict` to resume from (instead of the run's start);
            after the optimizer's (and LR scheduler's) ``load_state_dict``.  The weights may be loaded
            before or after: both are exact, and weights loaded into the freshly built model are checked
            against the schedule once it stands at their step.
        on_switch (`callable`, *optional*): called with a dict for each switch (``schedule_time``,
            ``schedule_offset``, ``step``, ``active_layers``, ``trainable_params``).
        calibration_data (`iterable`, *optional*): batches (dicts of tensors, or tuples) for the
            ``outlier`` signal of an adaptive schedule, measured once before its first decision (the
            global RNG states are restored afterwards).
        on_decision (`callable`, *optional*): called with each decision of an adaptive schedule (``t``,
            ``layers``, ``scores``; autofreeze also ``rates``, ``threshold``).

    Adaptive schedules (``{"type": "adaptive"}`` / ``{"type": "autofreeze"}``): the scheduler measures
    their signal (:class:`~peft_layersched.signals.SignalMeter`; summed over ranks, in float64), makes each
    decision when its time comes (the same on every rank) and keeps the decision log in the adapter's
    config and in :meth:`state_dict`.
        layer_schedule (*optional*): for a model built from a plain ``LoraConfig``: its LoRA is scheduled
            first with :func:`~peft_layersched.schedule_lora` (in ``unit``, default ``"epoch"``).

    Call :meth:`step` after each optimizer step (after ``lr_scheduler.step()``), :meth:`epoch_end` after each
    epoch (epoch unit) or :meth:`set_time` to jump, and :meth:`finish` at the end.
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        unit: Optional[str] = None,
        new_layer_lr_scale: float = 1.0,
        new_layer_warmup_steps: int = 0,
        frozen_optimizer_state: str = "keep",
        reactivated_state: Optional[str] = None,
        warn_on_no_update: bool = True,
        adapter_name: Optional[str] = None,
        schedule_start: str = "restart",
        engine: Any = None,
        total_steps: Optional[int] = None,
        total_epochs: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        start_step: int = 0,
        start_epoch: int = 0,
        state_dict: Optional[Dict[str, Any]] = None,
        on_switch: Optional[Callable[[Dict[str, Any]], None]] = None,
        calibration_data: Any = None,
        on_decision: Optional[Callable[[Dict[str, Any]], None]] = None,
        layer_schedule: Any = None,
    ) -> None:
        adopt.ensure_scheduled(model, layer_schedule, unit, adapter_name, "LayerScheduler")
        self._set_options(new_layer_lr_scale, new_layer_warmup_steps, frozen_optimizer_state, reactivated_state,
                          warn_on_no_update, adapter_name, schedule_start)
        self.engine = engine if isinstance(engine, engines.Engine) else engines.engine_named(engine)
        self.engine.check_options(frozen_optimizer_state, self.reactivated_state, user_optimizer=False)
        self.tuner: ScheduledLoraModel = find_scheduled_tuner(model, "LayerScheduler")
        _refuse_static_ddp(model)
        plan = self.tuner.scheduled_adapter(adapter_name)
        self.adapter_name = plan.name
        self.unit = unit or getattr(self.tuner.peft_config[plan.name], "schedule_unit", "epoch")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit={self.unit!r} is not supported; use 'epoch' or 'step'.")
        self.tuner.set_freezing(self.engine.freezing)
        self.optimizer = optimizer
        self.total_steps, self.total_epochs = total_steps, total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.on_switch = on_switch
        self.on_decision = on_decision
        self.calibration_data = calibration_data
        self._params = self.tuner.layer_parameters(self.adapter_name)
        self.meter = self._make_meter()
        self.last_decision: Optional[Dict[str, Any]] = None
        self._lrs = self._prepare_optimizer(optimizer)
        self._measured = False  # the meter took the current optimizer step already (measure())
        self._meter_hook = self._hook_meter(optimizer)
        self._still = optim.StillCheck()
        self._offloaded: Dict[Any, Any] = {}
        self._record: Optional[Tuple[List[LayerId], Dict[LayerId, float], Optional[int]]] = None
        self._next_lrs: Dict[LayerId, float] = {}
        self.current: Optional[List[LayerId]] = None
        self.time: Optional[int] = None  # the schedule time whose active set is applied
        self.switch_steps: Dict[int, int] = {}  # schedule time -> the optimizer step count when it was applied
        self._undo: Optional[Dict[str, Any]] = None  # the schedule as the last optimizer step left it
        self._warned_skip = False
        if state_dict is not None:
            applied = self._read_state(state_dict)
        else:
            self.steps, self.epoch = int(start_step), int(start_epoch)
            self.offset = self._offset_from_config()
            applied = None
        self._complete_run_length()
        t = self.run_time
        self._refuse_idle_times(t)
        self._switch(t, initial=True, applied=applied, resumed=state_dict is not None)
        self._prepare_next()
        # Weights loaded into the freshly built model before this resume are checked now that the schedule
        # stands where they were saved (loaded after it, they are checked as they come in).
        self.tuner.check_deferred_load()

    # ------------------------------------------------------------------------------- public API

    @staticmethod
    def param_groups(model: Any, base_groups: Any = None, adapter_name: Optional[str] = None) -> List[Dict[str, Any]]:
        """Param groups for a new optimizer with one group per scheduled layer: ``base_groups`` (a list of
        group dicts or of parameters; default every parameter that requires grad now, i.e. right after
        ``get_peft_model`` every preallocated LoRA parameter and ``modules_to_save``) split by layer, each
        split group keeping its options.  The given dicts are not changed."""
        tuner = find_scheduled_tuner(model, "LayerScheduler.param_groups()")
        layer_of = {id(p): layer for layer, ps in tuner.layer_parameters(adapter_name).items() for p in ps}
        if base_groups is None:
            base_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        base_groups = list(base_groups)
        if base_groups and not isinstance(base_groups[0], dict):
            base_groups = [{"params": base_groups}]
        return engines.split_groups(base_groups, layer_of)

    @property
    def run_time(self) -> int:
        """This run's epoch (epoch unit) or optimizer step count (step unit)."""
        return self.epoch if self.unit == "epoch" else self.steps

    @property
    def active_layers(self) -> List[LayerId]:
        return list(self.current or [])

    def step(self) -> None:
        """One optimizer step is done (call it after ``optimizer.step()`` and ``lr_scheduler.step()``):
        the step unit switches to the next step's layers (not after ``total_steps``), the position the
        adapter saves advances, and the LR factors of the next step are set.

        A step that AMP's ``GradScaler`` skipped (inf/nan gradients) counts like any other, as it does for
        the LR scheduler and the Trainer's ``global_step``: the schedule stays aligned with them.  Call
        :meth:`unscale_lrs` before ``lr_scheduler.step()`` in such a loop: the layer groups still hold the
        scaled LRs then (no post-step hook ran), and a chainable LR scheduler would step from them."""
        if self._lrs is not None and self._lrs.stepped_from_scaled() and not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                "LayerScheduler: the optimizer step was skipped (AMP's GradScaler found inf/nan gradients?) and the "
                "LR scheduler then stepped from the layer groups' scaled LRs (x 0 for frozen layers), so those "
                "groups' LRs are now off. In a loop that may skip optimizer steps, call sched.unscale_lrs() right "
                "before lr_scheduler.step(): scaler.step(optimizer); scaler.update(); sched.unscale_lrs(); "
                "lr_scheduler.step(); sched.step().",
                stacklevel=2,
            )
        self._still.steps += 1
        self.steps += 1
        self.measure()  # (a no-op if the driver measured this step already)
        self._measured = False
        # What this step's metrics report: the layers it trained, the LRs it used (before any switch).
        self._record = (self.active_layers, dict(self._next_lrs), None)
        if self.unit == "step":
            if self.total_steps is None or self.steps < self.total_steps:
                self._switch(self.steps)
            self.tuner.set_schedule_position(self.offset + self.steps, self.adapter_name)
        self._prepare_next()

    def measure(self) -> None:
        """Fold what the optimizer step just done measured into an adaptive schedule's signal now, before
        :meth:`step` (which then does not fold it again): for a checkpoint saved between the two, such as the
        Trainer's just-in-time one at a step's end, whose signal state must include the step."""
        if self.meter is not None and not self._measured:
            self.meter.end_step(self.current or [])
            self._measured = True

    def epoch_end(self) -> None:
        """One epoch is done (epoch unit): the next epoch's layers apply now (not after ``total_epochs``)."""
        self.epoch += 1
        if self.unit == "epoch" and (self.total_epochs is None or self.epoch < self.total_epochs):
            self._switch(self.epoch)
            self._prepare_next()

    def set_time(self, t: int) -> None:
        """Apply the schedule at this run's epoch/step ``t`` now (the epoch unit's epoch begins: the Trainer
        calls it at each epoch's start)."""
        t = check_time(t, "set_time(t): t")
        if self.unit == "epoch":
            self.epoch = t
        self._switch(t)
        self._prepare_next()

    def finish(self) -> List[int]:
        """The run is over: the no-update check of the last phase (and an adaptive schedule's state goes
        into the adapter's config).

        A switch made after the run's last optimizer step (the loop stopped early: early stopping, a
        callback's ``should_training_stop``, Lightning's ``should_stop``, a ``break``) is undone: its layers
        never trained, so they are not left active nor ever-active (``export_lora`` leaves them out), and
        ``schedule_position`` and an adaptive schedule's decision log and signal state are what they were
        after the last step (a run with ``total_steps`` set to this length ends the same way).  Under
        ``frozen_optimizer_state="drop"`` the state the undone switch dropped stays dropped.  Returns the
        schedule times whose switches were undone and are no longer in :meth:`state_dict`'s
        ``switch_steps`` (a driver that logged them drops them from its log)."""
        if self._meter_hook is not None:
            self._meter_hook.remove()
            self._meter_hook = None
        undo = self._undo
        if undo is None or undo["steps"] != self.steps or undo["time"] is None:
            self._check_phase_updates()
            self.adaptive_state()
            return []
        self._undo = None
        self._check_phase_updates()  # (nothing to check if the switch started a phase: no step since)
        undone, switched = self.time, self.current
        if undo["adaptive"] is not None:
            self._load_adaptive(undo["adaptive"])
        for t in undo["added"]:
            self.switch_steps.pop(t, None)
        active = self.tuner.restore_layer_state(undo["time"], undo["ever"], self.adapter_name)
        if undo["position"] is not None:
            self.tuner.set_schedule_position(undo["position"], self.adapter_name)
        self.time, self.current = undo["time"], active
        if self.optimizer is not None and self.engine.moves_layer_state and self.frozen_optimizer_state == "offload":
            params = self._params
            was, now = set(switched or []), set(active)
            self._offloaded.update(optim.offload_state(
                self.optimizer, [p for layer in was - now for p in params.get(layer, [])]))
            joined = [p for layer in now - was for p in params.get(layer, [])]
            optim.reload_state(self.optimizer, self._offloaded, joined)
        if self.meter is not None:
            self.meter.track(active)
        self._prepare_next()
        self.adaptive_state()
        logger.info(
            "layer schedule: the run ended after %s %d: the switch to %s %d (made after its last step) is undone; "
            "active layers %s", self.unit, undo["time"] - self.offset, self.unit, undone, active or "[]",
        )
        return list(undo["added"])

    def unscale_lrs(self) -> None:
        """Put the LR scheduler's own LRs back into the layer groups until :meth:`scale_lrs` (or the next
        :meth:`step`): for an LR scheduler that steps after :meth:`step` and computes from the group's LR
        (``ReduceLROnPlateau`` after validation), whose new LR would otherwise start from a layer's factor
        (a frozen layer's 0 would never be reduced)."""
        if self._lrs is not None:
            self._lrs.restore()

    def scale_lrs(self) -> None:
        """Set each layer group's LR to the LR scheduler's x the layer's factor again, for the next optimizer
        step (right before ``optimizer.step()``, after :meth:`unscale_lrs`)."""
        self._prepare_next()

    def metrics(self) -> Dict[str, float]:
        """The schedule as numbers every experiment tracker plots, for the optimizer step just done (before
        the first step: for the first one).  ``layer_schedule/active_layers`` (how many train),
        ``layer_schedule/lowest_active`` / ``highest_active`` (positions in the model's layer order, -1: none),
        ``layer_schedule/trainable_params``, ``layer_schedule/optimizer_state_bytes`` (state on the parameters'
        devices; offloaded state excluded), and per preallocated layer ``layer_schedule/active/<layer>``
        (1/0) and ``layer_schedule/lr/<layer>`` (the LR its LoRA parameters got: the scheduled LR x
        ``new_layer_lr_scale`` / warm-up, 0 while frozen)."""
        if self.current is None:
            return {}
        if self._record is not None:
            current, lrs, state_bytes = self._record
        else:
            current, lrs, state_bytes = self.active_layers, dict(self._next_lrs), None
        plan = self.tuner.scheduled_adapter(self.adapter_name)
        order = plan.index.all_layers()
        positions = sorted(order.index(layer) for layer in current if layer in order)
        out: Dict[str, float] = {
            "layer_schedule/active_layers": float(len(current)),
            "layer_schedule/lowest_active": float(positions[0] if positions else -1),
            "layer_schedule/highest_active": float(positions[-1] if positions else -1),
            "layer_schedule/trainable_params": float(self.trainable_count(current)),
        }
        if self.optimizer is not None:
            if state_bytes is None:
                state_bytes = optim.state_bytes(self.optimizer)
            out["layer_schedule/optimizer_state_bytes"] = float(state_bytes)
        active = set(current)
        for layer in plan.preallocated_layers:
            out[f"layer_schedule/active/{layer}"] = 1.0 if layer in active else 0.0
            if layer in lrs:
                out[f"layer_schedule/lr/{layer}"] = lrs[layer]
        decision = self.last_decision
        if decision is not None:
            out["layer_schedule/decision_time"] = float(decision["t"])
            chosen = set(decision["layers"])
            for layer, score in decision["scores"].items():
                out[f"layer_schedule/score/{layer}"] = float(score)
            for layer in self._schedule.pool:
                out[f"layer_schedule/chosen/{layer}"] = 1.0 if layer in chosen else 0.0
        return out

    def reported_layers(self) -> List[LayerId]:
        """The layers :meth:`metrics` reports (those of the step just done)."""
        return list(self._record[0]) if self._record is not None else self.active_layers

    def state_dict(self) -> Dict[str, Any]:
        """What a resume needs besides the model's, optimizer's and LR scheduler's own state (JSON-able;
        an adaptive schedule's decision log and signal state under ``"adaptive"``, also written into the
        adapter's config)."""
        state: Dict[str, Any] = {
            "unit": self.unit,
            "offset": self.offset,
            "steps": self.steps,
            "epoch": self.epoch,
            "time": self.time,
            "switch_steps": sorted(self.switch_steps.items()),
        }
        adaptive = self.adaptive_state()
        if adaptive is not None:
            state["adaptive"] = adaptive
        return state

    def adaptive_state(self) -> Optional[Dict[str, Any]]:
        """An adaptive schedule's decision log and signal state (``None`` for other schedules); written
        into the adapter's config too, so a ``save_pretrained`` that follows saves them."""
        if self.meter is None:
            return None
        schedule = self._schedule
        schedule.state = self.meter.state_dict()
        self.tuner.save_schedule_state(self.adapter_name)
        return {"decisions": schedule.decisions_json(), "meter": schedule.state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Go on from a :meth:`state_dict` (after the optimizer's own ``load_state_dict``; load the weights
        after this call, or pass ``state_dict=`` to the constructor instead)."""
        applied = self._read_state(state)
        self._switch(self.run_time, initial=True, applied=applied, resumed=True)
        self._prepare_next()
        self.tuner.check_deferred_load()

    def _read_state(self, state: Dict[str, Any]) -> Optional[int]:
        """Take a :meth:`state_dict`'s counters; returns the schedule time its active set was applied at."""
        if state.get("unit", self.unit) != self.unit:
            raise ValueError(
                f"the saved layer-scheduler state counts {state['unit']}s, but this scheduler's unit is "
                f"{self.unit!r}: resume with the schedule_unit the run was saved with."
            )
        self.offset = int(state["offset"])
        self.steps, self.epoch = int(state["steps"]), int(state["epoch"])
        self.switch_steps = {int(t): int(s) for t, s in state.get("switch_steps", [])}
        adaptive = state.get("adaptive")
        if adaptive is not None:
            self._load_adaptive(adaptive)
        return None if state.get("time") is None else int(state["time"])

    def _load_adaptive(self, adaptive: Dict[str, Any]) -> None:
        if self.meter is None:
            raise ValueError(
                "the saved layer-scheduler state holds an adaptive schedule's decisions, but this model's "
                "layer_schedule is not adaptive: resume with the layer_schedule the run was saved with."
            )
        self._schedule.load_decisions(adaptive.get("decisions") or [])
        if adaptive.get("meter") is not None:
            self.meter.load_state_dict(adaptive["meter"])
        self.tuner.save_schedule_state(self.adapter_name)

    def restore(self, position: int, applied: int, ever_active_layers: Any = None,
                adaptive: Optional[Dict[str, Any]] = None) -> None:
        """Put the schedule back where a checkpoint had it: the active set of schedule time ``applied`` (with
        ``ever_active_layers`` as saved), ``schedule_position`` ``position`` and an adaptive schedule's
        decision log and signal state ``adaptive`` (as in :meth:`state_dict`) (``load_best_model_at_end``)."""
        self._undo = None
        if adaptive is not None:
            self._load_adaptive(adaptive)
        active = self.tuner.restore_layer_state(applied, ever_active_layers, self.adapter_name)
        self.tuner.set_schedule_position(position, self.adapter_name)
        self.time, self.current = applied, active
        logger.info("layer schedule: restored %s %d (active layers %s)", self.unit, position, active or "[]")

    def trainable_count(self, active: List[LayerId]) -> int:
        """Parameters that train while ``active`` are the active layers: their LoRA parameters, and every
        other parameter that requires grad (``modules_to_save``, ...)."""
        lora = {id(p) for params in self._params.values() for p in params}
        count = sum(
            int(getattr(p, "ds_numel", p.numel())) for p in self.tuner.model.parameters()
            if p.requires_grad and id(p) not in lora
        )
        layers = (p for layer in active for p in self._params.get(layer, []))
        return count + sum(int(getattr(p, "ds_numel", p.numel())) for p in layers)

    # -------------------------------------------------------------------------------- internals

    def _offset_from_config(self) -> int:
        position = getattr(self.tuner.peft_config[self.adapter_name], "schedule_position", None)
        if position is None:
            return 0
        unit = self.unit
        if self.schedule_start == "continue":
            offset = position + 1 if unit == "epoch" else position
            logger.warning(
                "layer schedule: schedule_start='continue': the adapter's schedule stood at %s %d; this run's "
                "%s 0 is schedule %s %d.", unit, position, unit, unit, offset,
            )
            return offset
        if position > 0 and not self.steps:
            logger.warning(
                "layer schedule: the adapter's schedule had reached %s %d; this run starts it again at %s 0 "
                "(schedule_start='restart'). Pass schedule_start='continue' (to LayerScheduleCallback or "
                "LayerScheduler) to go on from there.", unit, position, unit,
            )
        return 0

    def _complete_run_length(self) -> None:
        """Give a schedule kind that needs the run's length (progressive) this run's length."""
        schedule = self._schedule
        if schedule is None or not schedule.spec.needs_run_length:
            return
        length = self.total_steps if self.unit == "step" else self.total_epochs
        if length is None:
            which = "total_steps" if self.unit == "step" else "total_epochs"
            raise ValueError(
                f"layer_schedule (type {schedule.kind!r}) needs the run's length, and this run's is unknown: pass "
                f"LayerScheduler({which}=...), give the Trainer max_steps (an IterableDataset has no length), or "
                f"put 'steps' (the run's length in {self.unit}s) in the schedule."
            )
        self.tuner.set_layer_schedule(schedule.spec.with_run_length(self.offset + length).to_json(), self.adapter_name)

    def _prepare_optimizer(self, optimizer: Any) -> Optional[optim.LayerLRs]:
        if optimizer is None:
            return None
        # (Under ZeRO the param groups hold flat partitions: there the per-layer groups are the check.)
        missing = {} if self.engine.needs_layer_groups else optim.missing(optimizer, self._params)
        if missing:
            count = sum(p.numel() for ps in missing.values() for p in ps)
            raise ValueError(
                f"the optimizer does not hold the LoRA parameters of layer(s) {list(missing)} ({count} "
                f"parameters); they would never train when their phase comes. Build the optimizer over "
                f"LayerScheduler.param_groups(model) (or [p for p in model.parameters() if p.requires_grad]) "
                f"right after get_peft_model / PeftModel.from_pretrained (before activate_layers), or let the "
                f"Trainer build it with LayerScheduleCallback passed to Trainer(callbacks=[...])."
            )
        found = engines.layer_groups(optimizer)
        lacking = [layer for layer in self._params if layer not in found]
        needs_factors = self.new_layer_lr_scale != 1.0 or self.new_layer_warmup_steps > 0
        if lacking and (self.engine.needs_layer_groups or needs_factors):
            why = ("under DeepSpeed (engine 'lr-zero') a frozen layer's own group runs at LR 0"
                   if self.engine.needs_layer_groups else "new_layer_lr_scale / new_layer_warmup_steps set each "
                   "layer's LR in its own group")
            raise ValueError(
                f"the optimizer has no param group of their own for layer(s) {lacking}, and {why}. Build it over "
                f"LayerScheduler.param_groups(model, base_groups) (e.g. torch.optim.AdamW("
                f"LayerScheduler.param_groups(model), lr=...)) right after get_peft_model, or let the Trainer "
                f"build it."
            )
        return optim.LayerLRs(optimizer, engines.LAYER_KEY) if found else None

    @property
    def _schedule(self) -> Any:
        return self.tuner.scheduled_adapter(self.adapter_name).schedule

    def _switch(self, t: int, initial: bool = False, applied: Optional[int] = None, resumed: bool = False) -> None:
        """Apply the schedule at this run's time ``t``.  ``initial``: the run's first switch; ``applied``:
        then, the schedule time whose active set a resumed optimizer's state was left at (``None``: a new
        run, whose optimizer holds no state of frozen layers); ``resumed``: the first switch goes on from a
        saved state (no switch happens there: ``switch_steps`` stays as saved)."""
        t += self.offset  # this run's epoch/step -> schedule time
        schedule = self._schedule
        if schedule is None and not initial:
            return
        if not initial:
            self._keep_undo(t)
        if self.meter is not None:
            self._decide(t)
        if schedule is not None and not initial and schedule.active_at(t) == self.current:
            self.time = t
            self.tuner.set_schedule_position(t, self.adapter_name)
            return
        previous = self.current
        if initial and applied is not None and schedule is not None:
            previous = schedule.active_at(applied)
        if not initial:
            self._check_phase_updates()
        active = self.tuner.activate_layers(t, self.adapter_name)
        self.time, self.current = t, active
        if not active:
            self._refuse_idle(t)
        if self._record is not None and self._record[2] is None and self.optimizer is not None:
            # the step just done left this optimizer state; the policies below change it for the next one
            self._record = (self._record[0], self._record[1], optim.state_bytes(self.optimizer))
        self._move_optimizer_state(t, previous, active, initial)
        if self.meter is not None:
            self.meter.track(active)
        self._start_phase()
        if initial or previous != active:
            self._log_change(t, active, record=not resumed)

    def _keep_undo(self, t: int) -> None:
        """Before a switch to schedule time ``t``: what :meth:`finish` puts back if no optimizer step follows
        (only the first switch since the last step is kept: that is the state the step left)."""
        adaptive = None
        if self.meter is not None and self._schedule.due(t) is not None:
            adaptive = {"decisions": self._schedule.decisions_json(), "meter": self.meter.state_dict()}
        undo = self._undo
        if undo is not None and undo["steps"] == self.steps:
            if t not in self.switch_steps:
                undo["added"].append(t)
            if undo["adaptive"] is None:
                undo["adaptive"] = adaptive
            return
        plan = self.tuner.scheduled_adapter(self.adapter_name)
        position = getattr(self.tuner.peft_config[self.adapter_name], "schedule_position", None)
        if self.unit == "step":
            position = self.offset + self.steps  # (step() sets it after the switch)
        self._undo = {
            "steps": self.steps, "time": self.time, "ever": list(plan.ever_active_layers), "adaptive": adaptive,
            "position": position, "added": [] if t in self.switch_steps else [t],
        }

    def _move_optimizer_state(
        self, t: int, previous: Optional[List[LayerId]], active: List[LayerId], initial: bool
    ) -> None:
        """Apply ``frozen_optimizer_state`` to the layers that froze and ``reactivated_state`` / reloading to
        those that rejoined at schedule time ``t``, coming from the active set ``previous`` (``None``: a new
        run's optimizer, which holds no state).  At a run's first switch every inactive layer counts as just
        frozen (a resumed optimizer's state: torch's ``load_state_dict`` put it back on the device), and a
        layer rejoins only if the state was saved before its switch."""
        if self.optimizer is None or not self.engine.moves_layer_state:
            return
        params = self._params
        was = set(params) if initial or previous is None else set(previous)
        now = set(active)
        frozen = [p for layer in params if layer in was and layer not in now for p in params[layer]]
        if self.frozen_optimizer_state == "drop":
            optim.drop_state(self.optimizer, frozen)
        elif self.frozen_optimizer_state == "offload":
            self._offloaded.update(optim.offload_state(self.optimizer, frozen))
        schedule = self._schedule
        if self.reactivated_state == "reset" and schedule is not None and t > 0 and previous is not None:
            before = set(previous)
            earlier = set(schedule.layers_until(t - 1))
            rejoined = [layer for layer in active if layer not in before and layer in earlier]
            optim.drop_state(self.optimizer, [p for layer in rejoined for p in params.get(layer, [])])
        joined = [p for layer in active if layer not in was for p in params.get(layer, [])]
        optim.reload_state(self.optimizer, self._offloaded, joined)

    def _hook_meter(self, optimizer: Any) -> Any:
        """The ``update`` signal measures each step from the weights the optimizer step starts from (an
        optimizer pre-step hook): exact also when the weights were loaded after this scheduler was built."""
        if self.meter is None or optimizer is None or self.meter.signal != "update":
            return None
        meter = self.meter
        return _compat.register_step_pre_hook(optim.inner(optimizer), lambda *args: meter.start_step())

    def _make_meter(self) -> Optional[SignalMeter]:
        schedule = self._schedule
        if not isinstance(schedule, AdaptiveSchedule):
            return None
        spec = schedule.spec
        named = dict(self.tuner.model.named_modules())
        modules: Dict[LayerId, List[Any]] = {}
        for name, layer in self.tuner.scheduled_modules(self.adapter_name).items():
            modules.setdefault(layer, []).append(named[name])
        meter = SignalMeter(
            spec.signal, schedule.pool, self._params, modules, ema=spec.ema,
            sharded=not self.engine.whole_parameters, calibration_batches=spec.calibration_batches,
            outlier_m=spec.outlier_m,
        )
        if schedule.state is not None and schedule.state.get("signal") == spec.signal:
            meter.load_state_dict(schedule.state)  # a reloaded adapter's: its measurements go on
        return meter

    def _decide(self, t: int) -> None:
        """Make the decision schedule time ``t`` is due for, if any (every rank: the same one)."""
        schedule, meter = self._schedule, self.meter
        due = schedule.due(t)
        if due is None:
            return
        if schedule.spec.needs_calibration and not meter.calibrated:
            meter.calibrate(self.tuner.model, self.calibration_data)
        measured = meter.interval_measured() if schedule.kind == "autofreeze" else meter.measured()
        decision = schedule.decide(due, measured)
        meter.start_interval()
        self.last_decision = decision
        self.tuner.save_schedule_state(self.adapter_name)
        logger.info(
            "layer schedule: %s %d: adaptive decision %s (scores %s)", self.unit, due,
            decision["layers"], {k: round(v, 6) for k, v in decision["scores"].items()},
        )
        if self.on_decision is not None:
            self.on_decision(dict(decision))

    def _refuse_idle_times(self, t: int) -> None:
        """Refuse, before the first step, a run in which some epoch/step would train nothing at all."""
        schedule = self._schedule
        if schedule is None or not schedule.runnable or self._others_train():
            return
        if self.unit == "step":
            last = None if self.total_steps is None else self.total_steps - 1
        elif self.total_epochs is not None:
            last = self.total_epochs - 1
        else:
            last = None
        if last is None:
            last = t  # a length nobody told: each time is checked as it comes
        idle = schedule.first_idle(self.offset + t, self.offset + max(last, t))
        if idle is not None:
            self._refuse_idle(idle)

    def _others_train(self) -> bool:
        """Whether parameters other than the scheduled adapter's LoRA ones train (``modules_to_save``, ...)."""
        lora = {id(p) for ps in self._params.values() for p in ps}
        return any(p.requires_grad and id(p) not in lora for p in self.tuner.model.parameters())

    def _refuse_idle(self, t: int) -> None:
        if self._others_train():
            return
        unit = self.unit
        when = f"{unit} {t}" if not self.offset else f"schedule {unit} {t} (this run's {unit} {t - self.offset})"
        raise ValueError(
            f"layer_schedule activates no layer at {when}, and the model has no other trainable parameters "
            f"(no modules_to_save), so its optimizer steps would have nothing to train (autograd fails with "
            f"'element 0 of tensors does not require grad'). Give every {unit} of the run at least one layer "
            f"(no empty milestone phase, gradual 'k' >= 1), or add modules_to_save (e.g. the classifier head) "
            f"that train throughout."
        )

    def _log_change(self, t: int, active: List[LayerId], record: bool = True) -> None:
        trainable = self.trainable_count(active)
        if record:
            self.switch_steps.setdefault(t, self.steps)
        logger.info(
            "layer schedule: %s %d: active layers %s, %d trainable parameters", self.unit, t, active or "[]",
            trainable,
        )
        if self.on_switch is not None:
            self.on_switch({
                "active_layers": format_layers(active, sep=",", ranges=0),
                "trainable_params": trainable,
                "schedule_time": t,
                "schedule_offset": self.offset,
                "step": self.steps,
            })

    def _start_phase(self) -> None:
        watch = self.warn_on_no_update and self.current is not None and self.engine.whole_parameters
        self._still.start({layer: self._params[layer] for layer in self.current or []} if watch else {})

    def _check_phase_updates(self) -> None:
        still = self._still.still(self._params)
        if still:
            warnings.warn(
                f"layer schedule: the LoRA weights of active layer(s) {still} did not change at all "
                f"over the phase that ended at step {self.steps} ({self._still.steps} optimizer steps). "
                f"Check that the optimizer holds them and that their learning rate is not 0.",
                stacklevel=3,
            )

    def _prepare_next(self) -> None:
        """Before the next optimizer step: each layer group's LR (the factors), and the LRs that step uses."""
        if self.optimizer is None:
            return
        factors = self._factors(self.steps + 1)
        grouped = self._lrs.apply(factors) if self._lrs is not None else {}
        if len(grouped) < len(self._params):
            held = self._held_lrs(factors)  # layers without a group of their own
            held.update(grouped)
            grouped = held
        self._next_lrs = grouped

    def _held_lrs(self, factors: Dict[LayerId, float]) -> Dict[LayerId, float]:
        """Each layer's LR in an optimizer without per-layer groups (its group's; 0 while frozen)."""
        held: Dict[int, float] = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                held[id(param)] = float(group["lr"])
        active = set(self.current or [])
        return {
            layer: (held[id(params[0])] * factors.get(layer, 1.0) if layer in active else 0.0)
            for layer, params in self._params.items() if params and id(params[0]) in held
        }

    def _factors(self, step: int) -> Dict[LayerId, float]:
        """Each layer's LR factor for optimizer step number ``step`` (1-based): 0 frozen, the new-layer
        scale and warm-up for a layer that joined after the first phase; layers at 1 are left out."""
        active = set(self.current or [])
        factors: Dict[LayerId, float] = {layer: 0.0 for layer in self._params if layer not in active}
        schedule = self._schedule
        if schedule is None or (self.new_layer_lr_scale == 1.0 and self.new_layer_warmup_steps == 0):
            return factors
        first = set(schedule.initial_layers())
        for layer in self.current or []:
            if layer in first:
                continue
            factor = self.new_layer_lr_scale
            if self.new_layer_warmup_steps:
                done = max(step - self._join_step(layer), 0)
                factor *= min(1.0, done / float(self.new_layer_warmup_steps))
            if factor != 1.0:
                factors[layer] = factor
        return factors

    def _join_step(self, layer: LayerId) -> int:
        """The optimizer step count at which ``layer`` joined its current active run: when that schedule
        time was applied in this run (resumed runs read it from the state); for a join before this run
        began (``schedule_start="continue"``), counted back from the schedule."""
        t = self.time if self.time is not None else 0
        start = self._schedule.run_start(layer, t) or 0
        if start in self.switch_steps:
            return self.switch_steps[start]
        joined = start - self.offset
        return joined * (self.steps_per_epoch or 1) if self.unit == "epoch" else joined


def _refuse_static_ddp(model: Any) -> None:
    """DDP must look for unused parameters: frozen and not-yet-active layers get no gradient."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not getattr(model, "find_unused_parameters", True):
        raise ValueError(
            "LayerScheduler under DDP needs find_unused_parameters=True: frozen and not-yet-active layers get no "
            "gradient, and DDP without it fails at the next backward. Wrap with DistributedDataParallel(..., "
            "find_unused_parameters=True) (accelerate: Accelerator(kwargs_handlers=[DistributedDataParallelKwargs("
            "find_unused_parameters=True)]))."
        )
