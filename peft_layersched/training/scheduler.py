"""``LayerScheduler``: the one core every training loop drives (Trainer, Lightning, a plain loop).

It is told when an optimizer step or an epoch is done, and switches layers, sets their LRs,
applies the optimizer-state policies, reports metrics and saves what a resume needs.

Example (a plain loop)::

    >>> optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-3)
    >>> sched = LayerScheduler(model, optimizer, new_layer_warmup_steps=20)
    >>> for batch in loader:
    ...     model(**batch).loss.backward()
    ...     optimizer.step(); lr_scheduler.step(); sched.step()
    ...     optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Dict, List, Optional

from ..schedules import LayerId, check_time
from ..tuner import ScheduledLoraModel, adopt, find_scheduled_tuner
from .adaptive_driver import AdaptiveDriver, refuse_adaptive_state
from .clock import Clock, ClockView
from .engines import check_ddp, choose, split_groups
from .lr_factors import LrFactors
from .metrics import StepRecord, schedule_metrics
from .optim import StillCheck
from .options import OptionsHolder, with_options
from .prefix_cache import attach, lowest
from .signals import SignalMeter
from .state_policy import StatePolicy
from .switching import Switcher, SwitchView

logger = logging.getLogger(__name__)


class LayerScheduler(OptionsHolder, ClockView, SwitchView):
    """Drives the layer schedule of a scheduled ``PeftModel`` in any training loop.

    Args:
        model: a ``PeftModel`` built from a ``ScheduledLoraConfig``, or a wrapper around one (DDP, FSDP,
            a DeepSpeed engine, ``torch.compile``).
        optimizer: the optimizer that trains it (``None``: switching only). Build it over
            :meth:`param_groups` for LR factors; else it must hold every preallocated LoRA parameter.
        unit (`str`, *optional*): ``"step"`` or ``"epoch"``; default the config's ``schedule_unit``.
        **options: the :class:`~peft_layersched.training.options.ScheduleOptions` (``new_layer_lr_scale``,
            ``new_layer_warmup_steps``, ``frozen_optimizer_state``, ``reactivated_state``,
            ``warn_on_no_update``, ``adapter_name``, ``schedule_start``, ``prefix_cache``).
        engine: ``"requires_grad"`` (default), ``"lr-zero"`` (DeepSpeed ZeRO) or an ``Engine``.
        total_steps / total_epochs (`int`, *optional*): the run's length; nothing switches in after it.
        steps_per_epoch (`int`, *optional*): optimizer steps per epoch (epoch unit).
        start_step / start_epoch (`int`): where this run starts.
        state_dict (`dict`, *optional*): a :meth:`state_dict` to resume from, loaded after the optimizer's.
        on_switch (`callable`, *optional*): called with a dict for each switch.
        calibration_data (`iterable`, *optional*): batches for an adaptive schedule's ``outlier`` signal.
        on_decision (`callable`, *optional*): called with each decision of an adaptive schedule.
        layer_schedule (*optional*): for a plain ``LoraConfig`` model: scheduled first with ``schedule_lora``.

    Call :meth:`step` after each optimizer step (after ``lr_scheduler.step()``), :meth:`epoch_end` after
    each epoch or :meth:`set_time` to jump, and :meth:`finish` at the end.
    """

    @with_options
    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        unit: Optional[str] = None,
        *,
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
        **options: Any,
    ) -> None:
        taken = self._take_options(options)
        adopt.ensure_scheduled(model, layer_schedule, unit, self.adapter_name, "LayerScheduler")
        self.engine = choose(engine, options=taken)
        self.tuner: ScheduledLoraModel = find_scheduled_tuner(model, "LayerScheduler")
        _check_ddp_wrapper(model)
        self.adapter_name = self.tuner.scheduled_adapter(self.adapter_name).name
        self.clock = Clock(unit or getattr(self.tuner.peft_config[self.adapter_name], "schedule_unit", "epoch"),
                           total_steps, total_epochs, steps_per_epoch)
        self.tuner.set_freezing(self.engine.freezing)
        self.optimizer = optimizer
        self._params = self.tuner.layer_parameters(self.adapter_name)
        self.switcher = Switcher(self.tuner, self.adapter_name, self.clock, self._params, on_switch)
        self.factors = LrFactors(optimizer, self.engine, self._params, self.new_layer_lr_scale,
                                 self.new_layer_warmup_steps)
        # (After the optimizer checks: the driver hooks the optimizer.)
        self.adaptive = AdaptiveDriver.of(self.tuner, self.adapter_name, self._params, self.engine, optimizer,
                                          calibration_data, on_decision)
        self.policy = StatePolicy(optimizer, self.engine, self._params, self.frozen_optimizer_state,
                                  self.reactivated_state)
        self.record = StepRecord()
        self._still = StillCheck()
        applied = None
        if state_dict is not None:
            applied = self._resume(state_dict)
        else:
            self.clock.steps, self.clock.epoch = int(start_step), int(start_epoch)
            position = getattr(self.tuner.peft_config[self.adapter_name], "schedule_position", None)
            self.clock.start_at(position, self.schedule_start)
        self.clock.complete_run_length(self._schedule, self.tuner, self.adapter_name)
        t = self.run_time
        self.switcher.refuse_idle_run(self._schedule, t)
        self.prefix = attach(self.prefix_cache, self.tuner, self.adapter_name, self.engine, self._schedule,
                             range(self.offset + t, self.offset + self.clock.last_time(t) + 1))
        self._switch(t, initial=True, applied=applied, resumed=state_dict is not None)
        self._prepare_next()
        # Weights loaded before this resume are checked now that the schedule stands where they were saved.
        self.tuner.scheduled_adapter().check_deferred_load()

    @staticmethod
    def param_groups(model: Any, base_groups: Any = None, adapter_name: Optional[str] = None) -> List[Dict[str, Any]]:
        """Param groups for a new optimizer, one group per scheduled layer: ``base_groups`` (group dicts or
        parameters; default every parameter that requires grad now) split by layer, each keeping its
        options.  The given dicts are not changed."""
        tuner = find_scheduled_tuner(model, "LayerScheduler.param_groups()")
        layer_of = {id(p): layer for layer, ps in tuner.layer_parameters(adapter_name).items() for p in ps}
        if base_groups is None:
            base_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        base_groups = list(base_groups)
        if base_groups and not isinstance(base_groups[0], dict):
            base_groups = [{"params": base_groups}]
        return split_groups(base_groups, layer_of)

    @property
    def meter(self) -> Optional[SignalMeter]:
        """An adaptive schedule's signal meter (``None`` for other schedules)."""
        return self.adaptive.meter if self.adaptive is not None else None

    @property
    def last_decision(self) -> Optional[Dict[str, Any]]:
        return self.adaptive.last_decision if self.adaptive is not None else None

    def step(self) -> None:
        """One optimizer step is done (after ``optimizer.step()`` and ``lr_scheduler.step()``): the step unit
        switches to the next step's layers and the next step's LR factors are set.  A step AMP skipped
        counts too; in such a loop call :meth:`unscale_lrs` before ``lr_scheduler.step()``."""
        self.factors.check_skipped_step()
        self._still.steps += 1
        self.clock.steps += 1
        self.measure()  # (a no-op if the driver measured this step already)
        if self.adaptive is not None:
            self.adaptive.measured = False
        self.record.step_done(self.active_layers, self.factors.next_lrs)
        if self.unit == "step":
            if self.clock.step_switches():
                self._switch(self.steps)
            self.tuner.scheduled_adapter(self.adapter_name).set_schedule_position(self.offset + self.steps)
        self._prepare_next()

    def measure(self) -> None:
        """Fold the optimizer step just done into an adaptive schedule's signal now, before :meth:`step`
        (for a checkpoint saved between the two)."""
        if self.adaptive is not None:
            self.adaptive.measure(self.current)

    def epoch_end(self) -> None:
        """One epoch is done (epoch unit): the next epoch's layers apply now (not after ``total_epochs``)."""
        self.clock.epoch += 1
        if self.clock.epoch_switches():
            self._switch(self.epoch)
            self._prepare_next()

    def set_time(self, t: int) -> None:
        """Apply the schedule at this run's epoch/step ``t`` now (the Trainer calls it at each epoch's start)."""
        t = check_time(t, "set_time(t): t")
        if self.unit == "epoch":
            self.clock.epoch = t
        self._switch(t)
        self._prepare_next()

    def release(self) -> None:
        """Take the run's hooks and its prefix cache (rows and files) off the model; :meth:`finish` does, and
        the drivers do it when a run fails. The schedule's state stays (a resume reads it)."""
        if self.adaptive is not None:
            self.adaptive.close()
        if self.prefix is not None:
            self.prefix.close()
            self.prefix = None

    def finish(self) -> List[int]:
        """The run is over: the no-update check of the last phase.  A switch made after the run's last
        optimizer step is undone (its layers never trained).  Returns the schedule times of the undone
        switches (no longer in :meth:`state_dict`'s ``switch_steps``)."""
        self.release()
        undo = self.switcher.pending_undo()
        self._check_phase_updates()
        if undo is None:
            self.adaptive_state()
            return []
        undone, switched = self.time, self.current
        if undo["adaptive"] is not None:
            self._load_adaptive(undo["adaptive"])
        active = self.switcher.revert(undo)
        self.policy.move(switched or [], active)
        if self.adaptive is not None:
            self.adaptive.meter.track(active)
        self._prepare_next()
        self.adaptive_state()
        logger.info(
            "layer schedule: the run ended after %s %d: the switch to %s %d (made after its last step) is undone; "
            "active layers %s", self.unit, undo["time"] - self.offset, self.unit, undone, active or "[]",
        )
        return list(undo["added"])

    def unscale_lrs(self) -> None:
        """Put the LR scheduler's own LRs back into the layer groups until :meth:`scale_lrs` or :meth:`step`
        (for an LR scheduler that computes from the group's LR, such as ``ReduceLROnPlateau``)."""
        self.factors.unscale()

    def scale_lrs(self) -> None:
        """Set each layer group's LR to the scheduled LR x the layer's factor again (after :meth:`unscale_lrs`)."""
        self._prepare_next()

    def metrics(self) -> Dict[str, float]:
        """The numbers trackers plot for the optimizer step just done (``layer_schedule/...``: active
        layers, lowest/highest active, trainable parameters, optimizer-state bytes, per-layer active
        flags and LRs, an adaptive schedule's scores)."""
        return schedule_metrics(self)

    def reported_layers(self) -> List[LayerId]:
        """The layers :meth:`metrics` reports (those of the step just done)."""
        return self.record.layers(self.active_layers)

    def state_dict(self) -> Dict[str, Any]:
        """What a resume needs besides the model's, optimizer's and LR scheduler's state (JSON-able)."""
        state = dict(self.clock.state(), time=self.time, switch_steps=sorted(self.switch_steps.items()),
                     trained=self.switcher.trained())
        adaptive = self.adaptive_state()
        if adaptive is not None:
            state["adaptive"] = adaptive
        return state

    def adaptive_state(self) -> Optional[Dict[str, Any]]:
        """An adaptive schedule's decision log and signal state (``None`` for other schedules); written into
        the adapter's config too."""
        return self.adaptive.state() if self.adaptive is not None else None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Go on from a :meth:`state_dict`, after the optimizer's own ``load_state_dict``."""
        applied = self._resume(state)
        self._switch(self.run_time, initial=True, applied=applied, resumed=True)
        self._prepare_next()
        self.tuner.scheduled_adapter().check_deferred_load()

    def restore(self, position: int, applied: int, ever_active_layers: Any = None,
                adaptive: Optional[Dict[str, Any]] = None) -> None:
        """Put the schedule back where a checkpoint had it: schedule time ``applied``'s set, at
        ``schedule_position`` ``position`` (``load_best_model_at_end``)."""
        self.switcher.undo = None
        if adaptive is not None:
            self._load_adaptive(adaptive)
        active = self.switcher.restore(applied, ever_active_layers, position)
        logger.info("layer schedule: restored %s %d (active layers %s)", self.unit, position, active or "[]")

    # -------------------------------------------------------------------------------- internals

    @property
    def _schedule(self) -> Any:
        return self.tuner.scheduled_adapter(self.adapter_name).schedule

    def _resume(self, state: Dict[str, Any]) -> Optional[int]:
        """Take a :meth:`state_dict`'s counters, switch log and adaptive state; returns the schedule time
        whose active set the saved optimizer state belongs to."""
        self.clock.read(state)
        self.switcher.switch_steps.clear()
        self.switcher.switch_steps.update({int(t): int(s) for t, s in state.get("switch_steps", [])})
        if state.get("adaptive") is not None:
            self._load_adaptive(state["adaptive"])
        return None if state.get("time") is None else int(state["time"])

    def _load_adaptive(self, adaptive: Dict[str, Any]) -> None:
        if self.adaptive is None:
            refuse_adaptive_state()
        self.adaptive.load(adaptive)

    def _switch(self, t: int, initial: bool = False, applied: Optional[int] = None, resumed: bool = False) -> None:
        """Apply the schedule at this run's time ``t``.  ``initial``: the run's first switch; ``applied``: then,
        the schedule time a resumed optimizer's state was saved at; ``resumed``: ``switch_steps`` stays as saved."""
        t += self.offset
        schedule = self._schedule
        if schedule is None and not initial:
            return
        if not initial:
            self.switcher.keep_undo(t, self.adaptive.before_decision(t) if self.adaptive is not None else None)
        if self.adaptive is not None:
            self.adaptive.decide(t, self.unit)
        if schedule is not None and not initial and schedule.active_at(t) == self.current:
            self.switcher.stay(t)
            return
        previous = self.current
        if initial and applied is not None and schedule is not None:
            previous = schedule.active_at(applied)
        if not initial:
            self._check_phase_updates()
        active = self.switcher.apply(t)
        if self.prefix is not None:
            self.prefix.move(lowest(active, self.tuner.scheduled_adapter(self.adapter_name).index.all_layers()) or 0)
        self.record.before_switch(self.optimizer)  # the state bytes the step left, before the policy acts
        self.policy.switched(t, previous, active, initial, schedule)
        if self.adaptive is not None:
            self.adaptive.meter.track(active)
        self._start_phase()
        if initial or previous != active:
            self.switcher.logged(t, active, record=not resumed)

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
        schedule = self._schedule
        self.factors.prepare(self.steps + 1, self.current, schedule,
                             lambda layer: self.switcher.join_step(schedule, layer))


def _check_ddp_wrapper(model: Any) -> None:
    ddp = _ddp_module(model)
    if ddp is not None:
        check_ddp(
            "LayerScheduler", ddp.find_unused_parameters, False, "Wrap with DistributedDataParallel(..., "
            "find_unused_parameters=True) (accelerate: Accelerator(kwargs_handlers=[DistributedDataParallel"
            "Kwargs(find_unused_parameters=True)])).", "")


def _ddp_module(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model if isinstance(model, DistributedDataParallel) else None
