"""``LayerScheduleCallback``: the HF Trainer drives the schedule stored in the model's config.

It translates Trainer events into :class:`~peft_layersched.training.scheduler.LayerScheduler` calls.
Switches happen at optimizer-step boundaries only. The scheduler's state rides in every checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from transformers import TrainerCallback

from ... import _compat
from ...schedules import format_layers
from ...training import LayerScheduler, engines
from ...training.options import OptionsHolder, with_options
from ...tuner import adopt, find_scheduled_tuner
from .hooks import engine_for, ensure_optimized, install_trainer_hooks, read_json, split_trainer_optimizer
from .run_state import keep_state, saved_state


class LayerScheduleCallback(OptionsHolder, TrainerCallback):
    """Runs the layer schedule of the model's ``ScheduledLoraConfig`` during ``Trainer.train()``.

    Args:
        **options: the :class:`~peft_layersched.training.options.ScheduleOptions` (``new_layer_lr_scale``,
            ``new_layer_warmup_steps``, ``frozen_optimizer_state``, ``reactivated_state``,
            ``warn_on_no_update``, ``adapter_name``, ``schedule_start``, ``prefix_cache``), by keyword.
        layer_schedule / schedule_unit (*optional*): for a model built from a plain ``LoraConfig``:
            ``on_init_end`` schedules its LoRA with :func:`~peft_layersched.schedule_lora`.

    Each scheduled layer has its own optimizer param group, whose LR is the scheduled LR x the layer's
    factor (0 while frozen).

    Example:

    ```py
    >>> model = get_peft_model(bert, ScheduledLoraConfig(target_modules=["query", "value"],
    ...                                                  layer_schedule={0: [11], 3: [1, 11]}))
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LayerScheduleCallback()])
    >>> trainer.train()
    ```
    """

    @with_options
    def __init__(self, *, layer_schedule: Any = None, schedule_unit: Optional[str] = None, **options: Any) -> None:
        self._take_options(options)
        adopt.check_schedule_options(layer_schedule, schedule_unit, "LayerScheduleCallback")
        self._adopted_schedule = (layer_schedule, schedule_unit)
        self.scheduler: Optional[LayerScheduler] = None  # the run's core, from on_train_begin on
        self._user_optimizer = False
        self._next_epoch = 0
        self._pending_epoch: Optional[int] = None
        self._micro_steps = 0
        self._unscaled = False  # the layer groups hold the LR scheduler's own LRs since an evaluation
        self._decision_due = False  # an adaptive decision not logged yet
        install_trainer_hooks()

    # ------------------------------------------------------------------------------------ events

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any):
        adopt.ensure_scheduled(model, *self._adopted_schedule, self.adapter_name, "LayerScheduleCallback")
        tuner = find_scheduled_tuner(model, "LayerScheduleCallback")
        self._user_optimizer = optimizer is not None
        tuner.set_freezing(self._engine(args).freezing)
        # The Trainer's optimizer is built later from `requires_grad` as it is then: make it all.
        tuner.scheduled_adapter(self.adapter_name).register_all_for_optimizer()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        tuner = find_scheduled_tuner(model, "LayerScheduleCallback")
        engine = self._engine(args)
        optimizer = kwargs.get("optimizer")
        if optimizer is not None and not engine.needs_layer_groups:
            ensure_optimized(optimizer, args, tuner.layer_parameters(self.adapter_name), self._user_optimizer)
        loader = kwargs.get("train_dataloader")
        steps_per_epoch = _compat.update_steps_per_epoch(loader, args.gradient_accumulation_steps)
        step, max_steps = int(state.global_step), int(getattr(state, "max_steps", 0) or 0)
        # The Trainer's own epoch count (on resume: global_step // its steps per epoch, whatever the
        # checkpoint's batch size was); without a dataloader length, the checkpoint's epoch.
        epoch = step // steps_per_epoch if steps_per_epoch else int(math.floor((state.epoch or 0.0) + 1e-6))
        self._next_epoch, self._pending_epoch, self._micro_steps = epoch, None, 0
        saved = saved_state(state.log_history, step)
        # The Trainer's own counts govern (a just-in-time checkpoint counts the step it was taken in).
        resumed = None if saved is None else dict(saved, steps=step, epoch=epoch)

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
        # A resumed checkpoint's weights, against the schedule at its step:
        tuner.scheduled_adapter().check_deferred_load()

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
            # save_strategy="best" decides to save after this evaluation.
            keep_state(state, self.scheduler.state_dict())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.scheduler is not None and self._unscaled:
            self.scheduler.scale_lrs()
            self._unscaled = False

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        # (transformers >= 4.44) The step is done, though global_step counts it only before on_step_end:
        # a just-in-time checkpoint taken at this step's end, before our on_step_end, records it already.
        sched = self.scheduler
        if sched is not None and sched.unit == "step":
            position = sched.offset + int(state.global_step) + 1
            sched.tuner.scheduled_adapter(sched.adapter_name).set_schedule_position(position)
        if sched is not None and _jit(args):
            # ... and with the step's signal measured: what on_step_end would fold in comes in now.
            sched.measure()
            keep_state(state, dict(sched.state_dict(), trained=sched.switcher.trained(stepped=True)))

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
        keep_state(state, self.scheduler.state_dict())

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
        split_trainer_optimizer(trainer_, tuner.layer_parameters(self.adapter_name))

    def _peft_layersched_failed(self) -> None:
        if self.scheduler is not None:
            self.scheduler.release()

    def _peft_layersched_log(self, trainer_: Any, logs: Dict[str, Any]) -> None:
        if "loss" in logs or "learning_rate" in logs:  # training records, not evaluation ones
            logs.update(self.tracker_scalars())

    # ---------------------------------------------------------------------------------- internals

    def _decided(self, decision: Dict[str, Any]) -> None:
        self._decision_due = True

    def _report(self, args: Any, state: Any, control: Any) -> Any:
        """An adaptive decision is logged at once; the scheduler's state goes into the log history for the
        checkpoint saved next (every time for other schedules: it is cheap and no save can miss it)."""
        sched = self.scheduler
        if sched is None:
            return None
        if self._decision_due:
            control.should_log, self._decision_due = True, False
        if control.should_save or _jit(args) or sched.adaptive is None:
            keep_state(state, sched.state_dict())
        return control

    def _engine(self, args: Any) -> engines.Engine:
        return engine_for(args, self, self._user_optimizer)

    def _restore_checkpoint_state(self, checkpoint: str) -> None:
        """After ``load_best_model_at_end`` the weights are the best checkpoint's: so is the schedule, as it
        stood after the checkpoint's last optimizer step (a switch made at that same step trained nothing)."""
        assert self.scheduler is not None
        saved = read_json(checkpoint, self.scheduler.adapter_name, "adapter_config.json")
        position = saved.get("schedule_position")
        if position is None:
            return
        trainer_state = read_json(checkpoint, None, "trainer_state.json")
        state = saved_state(trainer_state.get("log_history") or [], int(trainer_state.get("global_step") or 0))
        state = state or {}
        applied, ever = state.get("time"), saved.get("ever_active_layers")
        if state.get("trained") and state["trained"].get("time") is not None:
            applied, ever = state["trained"]["time"], state["trained"]["ever_active_layers"]
        self.scheduler.restore(position, position if applied is None else applied, ever,
                               adaptive=state.get("adaptive"))


def _jit(args: Any) -> bool:
    """Whether the run takes just-in-time checkpoints (transformers 5.x ``enable_jit_checkpoint``: on SIGTERM,
    saved from the Trainer's callback, which runs before ours at a step's start and end)."""
    return bool(getattr(args, "enable_jit_checkpoint", False))
