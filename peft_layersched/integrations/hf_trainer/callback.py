"""``LayerScheduleCallback``: the HF Trainer drives the schedule stored in the model's config.

A translator of Trainer events into :class:`~peft_layersched.scheduler.LayerScheduler` calls (the core that
plain loops and Lightning drive too), plus what only a Trainer run has:

* **Newly active layers train.**  ``Trainer.create_optimizer`` keeps only parameters that require grad
  *when it runs*; the callback puts the model back into "every preallocated parameter requires grad" at
  ``on_init_end``, and the optimizer gets one param group per scheduled layer as it is built
  (:mod:`peft_layersched.trainer`), so the LR scheduler covers every layer.  At ``on_train_begin`` it checks
  that the optimizer holds every preallocated parameter; if not it adds them to the optimizer's existing
  groups (with a warning), or refuses a user-built optimizer.
* **Switches at optimizer-step boundaries only**: ``on_step_end`` for step schedules (not after the run's
  last step, however it ends: one made before a callback stopped the run is undone at ``on_train_end``),
  ``on_epoch_begin`` for epoch ones, deferred to the next ``on_step_end`` when an accumulation
  window spans the epoch boundary (transformers <= 4.46).  A log record made after step ``n`` describes step
  ``n`` (the layers it trained, the LRs it used).
* **Resume** reads what it needs (the run's offset, the set the optimizer state was saved with, the step at
  which each schedule time was applied) from the callback's entries in the checkpoint's log history
  (``trainer_state.json``: regular, DeepSpeed and just-in-time checkpoints alike).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from transformers import TrainerCallback

from ... import _compat
from ...schedules import format_layers
from ...training import LayerScheduler, ScheduleOptions, engines
from ...tuner import adopt, find_scheduled_tuner
from . import hooks


class LayerScheduleCallback(ScheduleOptions, TrainerCallback):
    """Runs the layer schedule of the model's ``ScheduledLoraConfig`` during ``Trainer.train()``.

    Args:
        new_layer_lr_scale (`float`): learning-rate multiplier for layers that join after the first
            phase (a lower LR for newly added modules is common advice).  1.0 (default) = same LR.
        new_layer_warmup_steps (`int`): linear warm-up of such layers' LR over this many optimizer
            steps after they join.  0 (default) = none.
        frozen_optimizer_state (`str`): what happens to the optimizer state (Adam moments, step count)
            of a layer while it is frozen.  ``"keep"`` (default): it stays where it is, so with cyclic or
            sampled schedules optimizer memory grows to that of LoRA on every layer the schedule visits.
            ``"drop"``: freed when the layer freezes; the layer starts with fresh state when it rejoins
            (as with ``reactivated_state="reset"``), and optimizer memory is that of the active layers.
            ``"offload"``: moved to the CPU when the layer freezes and back to the layer's device when it
            rejoins (training as with ``"keep"``; accelerator memory holds the active layers' state).
            Resume is exact with each: dropped state is not in the checkpoint, offloaded state is (as
            CPU tensors in ``optimizer.pt``) and is offloaded again as training resumes.
        reactivated_state (`str`): ``"keep"`` (default) the optimizer state of a layer that is frozen
            and later active again, or ``"reset"`` it when the layer rejoins.  With
            ``frozen_optimizer_state="drop"`` a rejoining layer always starts afresh.
        warn_on_no_update (`bool`): warn when an active layer's LoRA weights did not change at all
            over a phase (a silent no-update).
        adapter_name (`str`, *optional*): the scheduled adapter; default the active one.
        layer_schedule / schedule_unit (*optional*): for a model built from a plain ``LoraConfig`` (by a tool
            that takes only callbacks): ``on_init_end`` schedules its LoRA with
            :func:`~peft_layersched.schedule_lora` (``schedule_unit`` default ``"epoch"``).
        schedule_start (`str`): where the schedule starts when this Trainer's run begins.
            ``"restart"`` (default): at ``t = 0`` (the Trainer's own epoch/step).  ``"continue"``: where
            the adapter's schedule stood when it was saved (``schedule_position`` in its
            ``adapter_config.json``), for a second training stage on a loaded adapter; the Trainer's
            epoch/step ``t`` then runs the schedule at ``position + 1 + t`` (epochs) or
            ``position + t`` (steps).  The choice is logged, with a warning when ``"restart"`` starts
            over an adapter that had been trained further.

    Each scheduled layer has its own optimizer param group, whose LR is the scheduled LR x the layer's
    factor (0 while frozen): the LR multiplier and warm-up are exact for every optimizer.

    Example:

    ```py
    >>> model = get_peft_model(bert, ScheduledLoraConfig(target_modules=["query", "value"],
    ...                                                  layer_schedule={0: [11], 3: [1, 11]}))
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LayerScheduleCallback()])
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        new_layer_lr_scale: float = 1.0,
        new_layer_warmup_steps: int = 0,
        reactivated_state: Optional[str] = None,
        warn_on_no_update: bool = True,
        adapter_name: Optional[str] = None,
        schedule_start: str = "restart",
        frozen_optimizer_state: str = "keep",
        layer_schedule: Any = None,
        schedule_unit: Optional[str] = None,
    ) -> None:
        adopt.check_schedule_options(layer_schedule, schedule_unit, "LayerScheduleCallback")
        self._adopted_schedule = (layer_schedule, schedule_unit)
        self._set_options(new_layer_lr_scale, new_layer_warmup_steps, frozen_optimizer_state, reactivated_state,
                          warn_on_no_update, adapter_name, schedule_start)
        self.scheduler: Optional[LayerScheduler] = None  # the run's core, from on_train_begin on
        self._user_optimizer = False
        self._next_epoch = 0
        self._pending_epoch: Optional[int] = None
        self._micro_steps = 0
        self._unscaled = False  # the layer groups hold the LR scheduler's own LRs since an evaluation
        self._decision_due = False  # an adaptive decision not logged yet
        hooks.install_trainer_hooks()

    # ------------------------------------------------------------------------------------ events

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any):
        adopt.ensure_scheduled(model, *self._adopted_schedule, self.adapter_name, "LayerScheduleCallback")
        tuner = find_scheduled_tuner(model, "LayerScheduleCallback")
        self._user_optimizer = optimizer is not None
        tuner.set_freezing(self._engine(args).freezing)
        # The Trainer's optimizer is built later from `requires_grad` as it is then: make it all.
        tuner.register_all_for_optimizer(self.adapter_name)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        tuner = find_scheduled_tuner(model, "LayerScheduleCallback")
        engine = self._engine(args)
        optimizer = kwargs.get("optimizer")
        if optimizer is not None and not engine.needs_layer_groups:
            hooks.ensure_optimized(optimizer, args, tuner.layer_parameters(self.adapter_name), self._user_optimizer)
        loader = kwargs.get("train_dataloader")
        steps_per_epoch = _compat.update_steps_per_epoch(loader, args.gradient_accumulation_steps)
        step, max_steps = int(state.global_step), int(getattr(state, "max_steps", 0) or 0)
        # The Trainer's own epoch count (on resume: global_step // its steps per epoch, whatever the
        # checkpoint's batch size was); without a dataloader length, the checkpoint's epoch.
        epoch = step // steps_per_epoch if steps_per_epoch else int(math.floor((state.epoch or 0.0) + 1e-6))
        self._next_epoch, self._pending_epoch, self._micro_steps = epoch, None, 0
        record = hooks.RunRecord.of(state)
        resumed = None if record.offset is None else {
            "offset": record.offset, "steps": step, "epoch": epoch, "time": record.last_time,
            "switch_steps": sorted(record.switch_steps.items()), "adaptive": record.adaptive,
        }

        def log_switch(entry: Dict[str, Any]) -> None:
            # ever_active_layers: what a checkpoint saved after the next step trained (load_best_model_at_end).
            state.log_history.append(dict(entry, epoch=state.epoch, step=state.global_step,
                                          ever_active_layers=list(tuner.ever_active_layers)))

        self.scheduler = LayerScheduler(
            model, optimizer, engine=engine, **self.options(),
            total_steps=max_steps or None,
            total_epochs=-(-max_steps // steps_per_epoch) if steps_per_epoch and max_steps > 0 else None,
            steps_per_epoch=steps_per_epoch, start_step=step, start_epoch=epoch, state_dict=resumed,
            on_switch=log_switch, calibration_data=loader, on_decision=self._decided,
        )
        tuner.check_deferred_load()  # a resumed checkpoint's weights, against the schedule at its step

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.scheduler is None or self.scheduler.unit != "epoch":
            return
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        if self._micro_steps:
            # An accumulation window spans the epoch boundary (transformers <= 4.46): switching now
            # would change the trainable set inside the window.  Switch after its optimizer step.
            self._pending_epoch = epoch
        else:
            self.scheduler.set_time(epoch)
        return self._report(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        return self._report(args, state, control)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self._micro_steps += 1

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any):
        # The Trainer steps ReduceLROnPlateau after evaluating, from the groups' LRs: give it its own.
        if self.scheduler is not None:
            self.scheduler.unscale_lrs()
            self._unscaled = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.scheduler is not None and self._unscaled:
            self.scheduler.scale_lrs()
            self._unscaled = False

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        # (transformers >= 4.44) The step is done, though global_step counts it only before on_step_end:
        # a just-in-time checkpoint taken at this step's end, before our on_step_end, records it already.
        sched = self.scheduler
        if sched is not None and sched.unit == "step":
            sched.tuner.set_schedule_position(sched.offset + int(state.global_step) + 1, sched.adapter_name)
        if sched is not None and sched.meter is not None and _jit(args):
            # ... and with the step's signal measured: what on_step_end would fold in comes in now.
            sched.measure()
            hooks.keep_adaptive_state(state, sched.adaptive_state())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.scheduler is None:
            return
        self._micro_steps = 0
        self.scheduler.step()
        if self._pending_epoch is not None:
            epoch, self._pending_epoch = self._pending_epoch, None
            self.scheduler.set_time(epoch)
        return self._report(args, state, control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.scheduler is None:
            return
        # A switch after the run's last step (early stopping, should_training_stop from any callback) is
        # undone: its layers never trained.  Its log entry goes too.
        undone = set(self.scheduler.finish())
        if undone:
            step = int(state.global_step)
            state.log_history[:] = [
                e for e in state.log_history if not ("schedule_time" in e and e.get("step") == step
                                                     and int(e["schedule_time"]) in undone)
            ]
        best = getattr(state, "best_model_checkpoint", None)
        if getattr(args, "load_best_model_at_end", False) and best:
            self._restore_checkpoint_state(best)
        adaptive = self.scheduler.adaptive_state()
        if adaptive is not None:
            hooks.keep_adaptive_state(state, adaptive)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if model is not None:  # transformers 4.30 resumes only from a full weights file: write the trainable part
            _compat.write_legacy_resume_weights(model, args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
        if self.scheduler is None or logs is None:
            return
        # Callbacks that run after this one (and the log history entry) see the schedule too.
        logs["active_layers"] = format_layers(self.scheduler.reported_layers(), sep=",", ranges=0)

    def tracker_scalars(self, state: Any = None) -> Dict[str, float]:
        """The numbers each training log record gets for experiment trackers (:meth:`LayerScheduler.metrics`)."""
        return self.scheduler.metrics() if self.scheduler is not None else {}

    # ------------------------------------------------- Trainer hooks (peft_layersched.trainer)

    def _peft_layersched_split(self, trainer_: Any) -> None:
        tuner = find_scheduled_tuner(trainer_.model, "LayerScheduleCallback")
        hooks.split_trainer_optimizer(trainer_, tuner.layer_parameters(self.adapter_name))

    def _peft_layersched_log(self, trainer_: Any, logs: Dict[str, Any]) -> None:
        if "loss" in logs or "learning_rate" in logs:  # training records, not evaluation ones
            logs.update(self.tracker_scalars())

    # ---------------------------------------------------------------------------------- internals

    def _decided(self, decision: Dict[str, Any]) -> None:
        self._decision_due = True

    def _report(self, args: Any, state: Any, control: Any) -> Any:
        """An adaptive schedule's decision is logged at once (its scores reach every tracker), and its
        state rides in the log history of the checkpoint about to be saved (with just-in-time checkpoints,
        which the Trainer saves from its own callback at any step's start or end, at every event)."""
        if self.scheduler is None or self.scheduler.meter is None:
            return None
        if self._decision_due:
            control.should_log, self._decision_due = True, False
        if control.should_save or _jit(args):
            hooks.keep_adaptive_state(state, self.scheduler.adaptive_state())
        return control

    def _engine(self, args: Any) -> engines.Engine:
        engine = hooks.engine_for(args)
        engine.check_options(self.frozen_optimizer_state, self.reactivated_state, self._user_optimizer)
        hooks.check_ddp(args)
        return engine

    def _restore_checkpoint_state(self, checkpoint: str) -> None:
        """After ``load_best_model_at_end`` the weights are the best checkpoint's: so is the schedule, as it
        stood after the checkpoint's last optimizer step.  A switch made right before the save (at that same
        step) trained nothing yet: its layers are neither active nor ever-active.  An adaptive schedule's
        decision log and signal state are the checkpoint's (later decisions were taken on discarded weights)."""
        assert self.scheduler is not None
        saved = hooks.read_json(checkpoint, self.scheduler.adapter_name, "adapter_config.json")
        position = saved.get("schedule_position")
        if position is None:
            return
        trainer_state = hooks.read_json(checkpoint, None, "trainer_state.json")
        history = trainer_state.get("log_history") or []
        record = hooks.RunRecord.of_history(history)
        step = int(trainer_state.get("global_step") or 0)
        # The switches that some optimizer step up to the checkpoint trained after (each entry records the
        # ever-active set it left); a checkpoint of the run's last step was saved without the next switch.
        trained = [e for e in history if "schedule_time" in e and int(e["step"]) < step]
        applied, ever = record.last_time, saved.get("ever_active_layers")
        if trained and "ever_active_layers" in trained[-1]:
            applied, ever = int(trained[-1]["schedule_time"]), trained[-1]["ever_active_layers"]
        self.scheduler.restore(position, position if applied is None else applied, ever, adaptive=record.adaptive)


def _jit(args: Any) -> bool:
    """Whether the run takes just-in-time checkpoints (transformers 5.x ``enable_jit_checkpoint``: on SIGTERM,
    saved from the Trainer's callback, which runs before ours at a step's start and end)."""
    return bool(getattr(args, "enable_jit_checkpoint", False))
