"""``LayerScheduleCallback``: the HF Trainer drives the schedule stored in the model's config.

What it guarantees, and how:

* Newly active layers train.  ``Trainer.create_optimizer`` keeps only parameters that require grad
  *when it runs*; the callback puts the model back into "every preallocated parameter requires grad"
  at ``on_init_end``, so the Trainer's optimizer holds all of them, in the Trainer's own groups (no
  groups are ever added: the LR scheduler covers them and ``optimizer.pt`` keeps its layout on
  resume).  At ``on_train_begin`` it checks that the optimizer holds every preallocated parameter;
  if not it adds them to the optimizer's existing groups, or refuses a user-built optimizer.
* Frozen layers stay put: freezing sets ``requires_grad=False`` and ``grad=None``; torch optimizers
  skip ``grad is None`` (no momentum, no weight decay).
* Switches happen at optimizer-step boundaries only: ``on_step_end`` for step schedules (not after a
  run's last step: no layer is marked ever-active without training), ``on_epoch_begin`` for epoch ones,
  deferred to the next ``on_step_end`` when an accumulation window spans the epoch boundary
  (transformers <= 4.46).  The log record made after step ``n`` describes step ``n`` (the layers it
  trained, the LRs it used), though the switch for step ``n + 1`` has happened.  ``schedule_position``
  advances at every step (step unit: the steps done) or epoch.
* The active set is a pure function of the schedule time (the Trainer's ``state.global_step`` or epoch
  plus the run's offset), so every DDP rank computes the same one.  What a resume needs beyond that (the
  offset, the step at which each schedule time was applied, the set the checkpoint was saved with) is
  read back from the callback's entries in the checkpoint's log history (``trainer_state.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

from transformers import TrainerCallback

from . import _compat, _optim, sharded
from ._describe import format_layers
from .schedule import LayerId
from .tuner import ScheduledLoraModel, find_scheduled_tuner

logger = logging.getLogger(__name__)

_REACTIVATED_STATE = ("keep", "reset")
_SCHEDULE_STARTS = ("restart", "continue")


class LayerScheduleCallback(TrainerCallback):
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
        schedule_start (`str`): where the schedule starts when this Trainer's run begins.
            ``"restart"`` (default): at ``t = 0`` (the Trainer's own epoch/step).  ``"continue"``: where
            the adapter's schedule stood when it was saved (``schedule_position`` in its
            ``adapter_config.json``), for a second training stage on a loaded adapter; the Trainer's
            epoch/step ``t`` then runs the schedule at ``position + 1 + t`` (epochs) or
            ``position + t`` (steps).  The choice is logged, with a warning when ``"restart"`` starts
            over an adapter that had been trained further.

    The LR multiplier and warm-up scale the optimizer's update of those layers' parameters (exactly
    an LR multiplier for SGD/Adam/AdamW, whose updates are proportional to the LR), so the optimizer
    layout never changes and resume keeps working.

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
    ) -> None:
        if isinstance(new_layer_lr_scale, bool) or not isinstance(new_layer_lr_scale, (int, float)):
            raise TypeError(f"new_layer_lr_scale must be a number, got {new_layer_lr_scale!r}.")
        if not (new_layer_lr_scale >= 0 and math.isfinite(new_layer_lr_scale)):
            raise ValueError(
                f"new_layer_lr_scale must be a finite number >= 0 (1.0 = the scheduled LR), got {new_layer_lr_scale}."
            )
        if not isinstance(warn_on_no_update, bool):
            raise TypeError(f"warn_on_no_update must be True or False, got {warn_on_no_update!r}.")
        if schedule_start not in _SCHEDULE_STARTS:
            raise ValueError(
                f"schedule_start={schedule_start!r} is not supported; use one of {list(_SCHEDULE_STARTS)} "
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
        if frozen_optimizer_state not in _optim.FROZEN_STATES:
            raise ValueError(
                f"frozen_optimizer_state={frozen_optimizer_state!r} is not supported; use one of "
                f"{list(_optim.FROZEN_STATES)} ('keep': frozen layers keep their optimizer state; 'drop': it is "
                f"freed and starts afresh when the layer rejoins; 'offload': it waits on the CPU)."
            )
        if frozen_optimizer_state == "drop" and reactivated_state == "keep":
            raise ValueError(
                "frozen_optimizer_state='drop' frees a frozen layer's optimizer state, so it cannot be kept for "
                "when the layer rejoins (reactivated_state='keep'). Use frozen_optimizer_state='offload' to keep "
                "it off the accelerator, or leave reactivated_state unset."
            )
        self.new_layer_lr_scale = float(new_layer_lr_scale)
        self.new_layer_warmup_steps = new_layer_warmup_steps
        self.reactivated_state = reactivated_state or ("reset" if frozen_optimizer_state == "drop" else "keep")
        self.frozen_optimizer_state = frozen_optimizer_state
        self.warn_on_no_update = warn_on_no_update
        self.adapter_name = adapter_name
        self.schedule_start = schedule_start
        self._user_optimizer = False
        self._freezing = sharded.REQUIRES_GRAD
        self._zero3 = False
        self._reset_run()
        # DeepSpeed: the Trainer's optimizer gets per-layer param groups as it is built (see sharded.py);
        # every Trainer log record gets tracker_scalars() before the report_to integrations see it.
        sharded.install_trainer_hook()

    def _reset_run(self) -> None:
        self._tuner: Optional[ScheduledLoraModel] = None
        self._next_epoch = 0
        self._pending_epoch: Optional[int] = None
        self._micro_steps = 0
        self._current: Optional[List[LayerId]] = None
        self._time: Optional[int] = None  # the schedule time whose active set is applied
        self._offset = 0  # schedule time of the Trainer's t = 0 (set at each train())
        self._steps_per_epoch: Optional[int] = None  # None: the dataloader has no length
        self._switch_steps: Dict[int, int] = {}  # schedule time -> global step at which it was applied
        self._next_lrs: Dict[LayerId, float] = {}  # each layer's LR in the next optimizer step
        # (active layers, LRs, optimizer state bytes or None) of the step just done, for its log record
        self._record: Optional[Tuple[List[LayerId], Dict[LayerId, float], Optional[int]]] = None
        self._optimizer: Any = None
        self._still = _optim.StillCheck()  # warn_on_no_update: an active layer that did not move in a phase
        self._scaler = _optim.UpdateScaler()  # new_layer_lr_scale / warm-up
        self._scheduler: Any = None
        self._offloaded: Dict[Any, Any] = {}  # param -> state entries offload_state moved to the CPU

    # ------------------------------------------------------------------------------------ events

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any):
        tuner = find_scheduled_tuner(model, "LayerScheduleCallback")
        self._user_optimizer = optimizer is not None
        self._use_engine(args, tuner)
        # The Trainer's optimizer is built later from `requires_grad` as it is then: make it all.
        tuner.register_all_for_optimizer(self.adapter_name)
        self._check_ddp(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        self._reset_run()
        self._tuner = find_scheduled_tuner(model, "LayerScheduleCallback")
        self._use_engine(args, self._tuner)
        self._check_ddp(args)
        optimizer = kwargs.get("optimizer")
        self._optimizer = optimizer
        self._scheduler = kwargs.get("lr_scheduler")
        self._steps_per_epoch = _compat.update_steps_per_epoch(
            kwargs.get("train_dataloader"), args.gradient_accumulation_steps
        )
        if self._freezing == sharded.OPTIMIZER:
            self._check_layer_groups(optimizer)
        elif optimizer is not None:
            self._ensure_optimized(optimizer, args)
        # A resumed run goes on from the record its checkpoint's log history holds (every rank reads the same
        # trainer_state.json); a new train() takes its offset from the adapter's schedule_position.
        record = _RunRecord.of(state)
        self._offset = record.offset if record.offset is not None else self._schedule_offset(state)
        self._switch_steps = dict(record.switch_steps)
        if self._unit == "epoch":
            # The Trainer's own epoch count (on resume: global_step // its steps per epoch, whatever the
            # checkpoint's batch size was); without a dataloader length, the checkpoint's epoch.
            if self._steps_per_epoch is not None:
                epoch = int(state.global_step) // self._steps_per_epoch
            else:
                epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
            self._next_epoch = epoch
            t = epoch
        else:
            t = int(state.global_step)
        self._refuse_idle_times(state, t)
        self._switch(t, state, initial=True, applied=record.last_time)
        self._tuner.check_deferred_load()  # a resumed checkpoint's weights, against the schedule at its step
        self._prepare_step(state)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._tuner is None or self._unit != "epoch":
            return
        epoch = self._next_epoch
        self._next_epoch += 1
        if self._micro_steps:
            # An accumulation window spans the epoch boundary (transformers <= 4.46): switching now
            # would change the trainable set inside the window.  Switch after its optimizer step.
            self._pending_epoch = epoch
        else:
            self._switch(epoch, state)
            self._prepare_step(state)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self._micro_steps += 1

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        # (transformers >= 4.44) The step is done, though global_step counts it only before on_step_end:
        # a just-in-time checkpoint taken at this step's end, before our on_step_end, records it already.
        if self._tuner is not None and self._unit == "step":
            self._tuner.set_schedule_position(self._offset + int(state.global_step) + 1, self.adapter_name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._tuner is None:
            return
        self._micro_steps = 0
        self._still.steps += 1
        if kwargs.get("lr_scheduler") is not None:
            self._scheduler = kwargs["lr_scheduler"]
        if self._freezing != sharded.OPTIMIZER:
            self._scale_updates(state)
        # What this step's log record reports: the layers it trained, the LRs it used (before any switch).
        self._record = (list(self._current or []), dict(self._next_lrs), None)
        step = int(state.global_step)
        if self._unit == "step":
            if step < int(getattr(state, "max_steps", 0) or 0) or not getattr(state, "max_steps", 0):
                self._switch(step, state)  # the layers of the next step
            # step optimizer steps are done: the schedule stands there (what the adapter saves), and after
            # the run's last step nothing switches in (no layer is marked ever-active without training).
            self._tuner.set_schedule_position(self._offset + step, self.adapter_name)
        elif self._pending_epoch is not None:
            epoch, self._pending_epoch = self._pending_epoch, None
            self._switch(epoch, state)
        self._prepare_step(state)

    def _prepare_step(self, state: Any) -> None:
        """Before the next optimizer step: per-layer LRs (DeepSpeed), the update snapshot (LR factors), and
        the per-layer LRs that step will use (its log record reports them)."""
        self._set_layer_lrs(state)
        self._snapshot_before_step()
        self._next_lrs = self._layer_lrs(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._tuner is None:
            return
        self._check_phase_updates(state)
        best = getattr(state, "best_model_checkpoint", None)
        if getattr(args, "load_best_model_at_end", False) and best:
            self._restore_checkpoint_state(best)

    def _restore_checkpoint_state(self, checkpoint: str) -> None:
        """After ``load_best_model_at_end`` the weights are the best checkpoint's: so is the schedule."""
        assert self._tuner is not None
        name = self._tuner.scheduled_adapter(self.adapter_name).name
        for folder in (os.path.join(checkpoint, name), checkpoint):
            path = os.path.join(folder, "adapter_config.json")
            if os.path.isfile(path):
                break
        else:
            return
        with open(path) as handle:
            saved = json.load(handle)
        position = saved.get("schedule_position")
        if position is None:
            return
        # The set the checkpoint was saved with: the last switch its log history records (a checkpoint of
        # the run's last step was saved without the switch to the next step's layers).
        applied = position
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if os.path.isfile(state_file):
            with open(state_file) as handle:
                record = _RunRecord.of_history(json.load(handle).get("log_history") or [])
            if record.last_time is not None:
                applied = record.last_time
        active = self._tuner.restore_layer_state(applied, saved.get("ever_active_layers"), name)
        self._tuner.set_schedule_position(position, name)
        self._time, self._current = applied, active
        logger.info(
            "layer schedule: restored the state of %s (%s %d, active layers %s)", checkpoint, self._unit, position,
            active or "[]",
        )

    def _schedule_offset(self, state: Any) -> int:
        assert self._tuner is not None
        name = self._tuner.scheduled_adapter(self.adapter_name).name
        position = getattr(self._tuner.peft_config[name], "schedule_position", None)
        if position is None:
            return 0
        unit = self._unit
        if self.schedule_start == "continue":
            offset = position + 1 if unit == "epoch" else position
            logger.warning(
                "layer schedule: schedule_start='continue': the adapter's schedule stood at %s %d; this run's "
                "%s 0 is schedule %s %d.", unit, position, unit, unit, offset,
            )
            return offset
        if int(state.global_step) == 0 and position > 0:
            logger.warning(
                "layer schedule: the adapter's schedule had reached %s %d; this run starts it again at %s 0 "
                "(schedule_start='restart'). Pass LayerScheduleCallback(schedule_start='continue') to go on "
                "from there.", unit, position, unit,
            )
        return 0

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if model is not None:  # transformers 4.30 resumes only from a full weights file: write the trainable part
            _compat.write_legacy_resume_weights(model, args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
        if self._tuner is None or logs is None or self._current is None:
            return
        # Callbacks that run after this one (and the log history entry) see the schedule too.
        active = self._record[0] if self._record is not None else self._current
        logs["active_layers"] = format_layers(active, sep=",", ranges=0)

    # ---------------------------------------------------------------------------------- internals

    @property
    def _unit(self) -> str:
        assert self._tuner is not None
        name = self._tuner.scheduled_adapter(self.adapter_name).name
        return getattr(self._tuner.peft_config[name], "schedule_unit", "epoch")

    def _use_engine(self, args: Any, tuner: ScheduledLoraModel) -> None:
        """Pick how layers are frozen for the Trainer's engine (sharded.py) and refuse what cannot work."""
        sharded.check_engine(args)
        engine = sharded.engine_of(args)
        self._freezing = sharded.freezing_for(engine)
        self._zero3 = engine == "DeepSpeed" and sharded.zero_stage(args) == 3
        if self._freezing == sharded.OPTIMIZER and self.frozen_optimizer_state != "keep":
            raise ValueError(
                f"frozen_optimizer_state={self.frozen_optimizer_state!r} is not available under DeepSpeed: ZeRO "
                f"keeps the optimizer state of all layers in flat partitions, so one layer's state cannot be "
                f"dropped or moved. Use frozen_optimizer_state='keep' (DeepSpeed's own zero_optimization."
                f"offload_optimizer moves all of it to the CPU)."
            )
        if self._freezing == sharded.OPTIMIZER and self.reactivated_state == "reset":
            raise ValueError(
                "reactivated_state='reset' is not available under DeepSpeed: ZeRO keeps the optimizer state of "
                "all layers in flat partitions, so one layer's state cannot be dropped. Use the default "
                "reactivated_state='keep'."
            )
        if engine == "FSDP" and self.frozen_optimizer_state != "keep":
            raise ValueError(
                f"frozen_optimizer_state={self.frozen_optimizer_state!r} is not supported under FSDP yet (its "
                f"optimizer state is sharded DTensors); use frozen_optimizer_state='keep'."
            )
        if self._freezing == sharded.OPTIMIZER and self._user_optimizer:
            raise ValueError(
                "LayerScheduleCallback under DeepSpeed needs the Trainer to build the optimizer (it splits the "
                "param groups by layer before ZeRO flattens them); do not pass Trainer(optimizers=(...))."
            )
        tuner.set_freezing(self._freezing)

    def _split_optimizer(self, trainer: Any) -> None:
        """Called right after ``trainer.create_optimizer`` builds the optimizer (sharded.install_trainer_hook)."""
        if sharded.freezing_for(sharded.engine_of(trainer.args)) != sharded.OPTIMIZER:
            return
        tuner = find_scheduled_tuner(trainer.model, "LayerScheduleCallback")
        layer_of = {id(p): layer for layer, ps in tuner.layer_parameters(self.adapter_name).items() for p in ps}
        sharded.split_by_layer(_optim.inner(trainer.optimizer), layer_of)

    _peft_layersched_split = _split_optimizer

    def _add_tracker_scalars(self, trainer: Any, logs: Dict[str, Any]) -> None:
        """Called by ``Trainer.log`` before the callbacks' ``on_log`` (sharded.install_trainer_hook)."""
        if "loss" in logs or "learning_rate" in logs:  # training records, not evaluation ones
            logs.update(self.tracker_scalars(trainer.state))

    _peft_layersched_log = _add_tracker_scalars

    def _check_layer_groups(self, optimizer: Any) -> None:
        assert self._tuner is not None
        found = sharded.layer_groups(optimizer) if optimizer is not None else {}
        missing = [layer for layer in self._tuner.layer_parameters(self.adapter_name) if layer not in found]
        if missing:
            raise ValueError(
                f"under DeepSpeed every scheduled layer needs its own optimizer param group, and layer(s) "
                f"{missing} have none: the optimizer was not built by Trainer.create_optimizer (a Trainer "
                f"subclass that overrides it without calling super(), or an 'optimizer' section in the DeepSpeed "
                f"config). Let the Trainer build it."
            )

    def _set_layer_lrs(self, state: Any) -> None:
        """DeepSpeed: each layer group's LR = the scheduled LR x (0 if frozen, else its join factor)."""
        if self._freezing != sharded.OPTIMIZER or self._tuner is None or self._scheduler is None:
            return
        active = set(self._current or [])
        factors = self._update_factors(state, ahead=1)
        scheduled = list(self._scheduler.get_last_lr())
        sharded.set_layer_lrs(
            self._optimizer, scheduled, lambda layer: factors.get(layer, 1.0) if layer in active else 0.0
        )

    def _check_ddp(self, args: Any) -> None:
        if not _distributed(args) or sharded.engine_of(args) is not None:
            return
        if getattr(args, "ddp_static_graph", None):
            raise ValueError(
                "LayerScheduleCallback under DDP cannot use ddp_static_graph=True: the set of parameters that "
                "get gradients changes with the schedule. Set TrainingArguments(ddp_static_graph=False)."
            )
        if getattr(args, "ddp_find_unused_parameters", None) is False:
            raise ValueError(
                "LayerScheduleCallback under DDP needs ddp_find_unused_parameters=True: frozen and not-yet-"
                "active layers get no gradient, and DDP without it fails at the next forward. Set "
                "TrainingArguments(ddp_find_unused_parameters=True) (or leave it None)."
            )
        if getattr(args, "ddp_find_unused_parameters", None) is None:
            args.ddp_find_unused_parameters = True

    def _ensure_optimized(self, optimizer: Any, args: Any) -> None:
        assert self._tuner is not None
        missing = _optim.missing(optimizer, self._tuner.layer_parameters(self.adapter_name))
        if not missing:
            return
        count = sum(p.numel() for ps in missing.values() for p in ps)
        if _distributed(args):
            raise ValueError(
                f"the LoRA parameters of layer(s) {list(missing)} did not require grad when DDP wrapped the "
                f"model, so DDP would never all-reduce them and the ranks would silently diverge once they "
                f"train. Pass LayerScheduleCallback to Trainer(callbacks=[...]) (it prepares the model before "
                f"the optimizer and DDP are built), and do not call activate_layers() before trainer.train()."
            )
        if self._user_optimizer or not optimizer.param_groups:
            raise ValueError(
                f"the optimizer does not hold the LoRA parameters of layer(s) {list(missing)} ({count} "
                f"parameters); they would never train when their phase comes. Build the optimizer over "
                f"[p for p in model.parameters() if p.requires_grad] right after get_peft_model / "
                f"PeftModel.from_pretrained (before activate_layers), or let the Trainer build it with "
                f"LayerScheduleCallback passed to Trainer(callbacks=[...])."
            )
        # The Trainer built its optimizer while some layers were frozen (activate_layers() ran before
        # train() and the callback was added after Trainer.__init__).  Put them into the Trainer's
        # existing groups, so the LR scheduler covers them; no group is added.
        _optim.add_to_group(optimizer, [p for ps in missing.values() for p in ps], getattr(args, "weight_decay", 0.0))
        warnings.warn(
            f"LayerScheduleCallback: the optimizer lacked the LoRA parameters of layer(s) {list(missing)}; "
            f"they were added to its existing param groups. Pass the callback to Trainer(callbacks=[...]) "
            f"so the optimizer is built with them (needed for resume_from_checkpoint to match).",
            stacklevel=2,
        )

    def _switch(self, t: int, state: Any, initial: bool = False, applied: Optional[int] = None) -> None:
        """Apply the schedule at the Trainer's epoch/step ``t``.  ``initial``: the run's first switch;
        ``applied``: then, the schedule time whose active set a resumed checkpoint's optimizer state was
        left at (``None``: a new run)."""
        assert self._tuner is not None
        t += self._offset  # the Trainer's epoch/step -> schedule time
        tuner = self._tuner
        plan = tuner.scheduled_adapter(self.adapter_name)
        name = plan.name
        if plan.schedule is None and not initial:
            return
        if plan.schedule is not None and not initial and plan.schedule.active_at(t) == self._current:
            self._time = t
            tuner.set_schedule_position(t, name)
            return
        previous = self._current
        if initial and applied is not None and plan.schedule is not None:
            previous = plan.schedule.active_at(applied)
        if not initial:
            self._check_phase_updates(state)
        active = tuner.activate_layers(t, name)
        self._time = t
        self._current = active
        if not active:
            self._refuse_idle(t)
        if self._record is not None and self._record[2] is None and self._optimizer is not None:
            # the step just done left this optimizer state; the policies below change it for the next one
            self._record = (self._record[0], self._record[1], _optim.state_bytes(self._optimizer))
        self._move_optimizer_state(plan, t, previous, active, initial)
        self._start_phase()
        if initial or previous != active:
            self._log_change(t, active, state)

    def _move_optimizer_state(
        self, plan: Any, t: int, previous: Optional[List[LayerId]], active: List[LayerId], initial: bool
    ) -> None:
        """Apply ``frozen_optimizer_state`` to the layers that froze and ``reactivated_state`` /
        reloading to those that rejoined at schedule time ``t``, coming from the active set ``previous``
        (``None``: a new run's optimizer, which holds no state).  At a run's first switch every inactive
        layer counts as just frozen (a resumed checkpoint's state: ``optimizer.pt`` put it back on the
        device), and a layer rejoins only if the checkpoint was saved before its switch."""
        if self._optimizer is None or self._tuner is None or self._freezing == sharded.OPTIMIZER:
            return
        params = self._tuner.layer_parameters(self.adapter_name)
        was = set(params) if initial or previous is None else set(previous)
        now = set(active)
        frozen = [p for layer in params if layer in was and layer not in now for p in params[layer]]
        if self.frozen_optimizer_state == "drop":
            _optim.drop_state(self._optimizer, frozen)
        elif self.frozen_optimizer_state == "offload":
            self._offloaded.update(_optim.offload_state(self._optimizer, frozen))
        if self.reactivated_state == "reset" and plan.schedule is not None and t > 0 and previous is not None:
            before = set(previous)
            earlier = set(plan.schedule.layers_until(t - 1))
            rejoined = [layer for layer in active if layer not in before and layer in earlier]
            _optim.drop_state(self._optimizer, [p for layer in rejoined for p in params.get(layer, [])])
        joined = [p for layer in active if layer not in was for p in params.get(layer, [])]
        _optim.reload_state(self._optimizer, self._offloaded, joined)

    def _refuse_idle_times(self, state: Any, t: int) -> None:
        """Refuse, before the first step, a run in which some epoch/step would train nothing at all."""
        assert self._tuner is not None
        plan = self._tuner.scheduled_adapter(self.adapter_name)
        steps = int(getattr(state, "max_steps", 0) or 0)
        if plan.schedule is None or not plan.schedule.runnable or steps <= 0 or self._others_train():
            return
        if self._unit == "step":
            last = steps - 1
        elif self._steps_per_epoch is not None:
            last = -(-steps // self._steps_per_epoch) - 1
        else:
            last = t  # an epoch count the Trainer cannot know: each epoch is checked as it begins
        idle = plan.schedule.first_idle(self._offset + t, self._offset + max(last, t))
        if idle is not None:
            self._refuse_idle(idle)

    def _others_train(self) -> bool:
        """Whether parameters other than the scheduled adapter's LoRA ones train (``modules_to_save``, ...)."""
        assert self._tuner is not None
        lora = {id(p) for ps in self._tuner.layer_parameters(self.adapter_name).values() for p in ps}
        return any(p.requires_grad and id(p) not in lora for p in self._tuner.model.parameters())

    def _refuse_idle(self, t: int) -> None:
        if self._others_train():
            return
        unit = self._unit
        run_t = t - self._offset
        when = f"{unit} {t}" if not self._offset else f"schedule {unit} {t} (this run's {unit} {run_t})"
        raise ValueError(
            f"layer_schedule activates no layer at {when}, and the model has no other trainable parameters "
            f"(no modules_to_save), so its optimizer steps would have nothing to train (autograd fails with "
            f"'element 0 of tensors does not require grad'). Give every {unit} of the run at least one layer "
            f"(no empty milestone phase, gradual 'k' >= 1), or add modules_to_save (e.g. the classifier head) "
            f"that train throughout."
        )

    def _trainable_count(self, active: List[LayerId]) -> int:
        """Parameters that train while ``active`` are the active layers: their LoRA parameters, and every
        other parameter that requires grad (``modules_to_save``, ...)."""
        assert self._tuner is not None
        layers = self._tuner.layer_parameters(self.adapter_name)
        lora = {id(p) for params in layers.values() for p in params}
        count = sum(
            int(getattr(p, "ds_numel", p.numel())) for p in self._tuner.model.parameters()
            if p.requires_grad and id(p) not in lora
        )
        return count + sum(int(getattr(p, "ds_numel", p.numel())) for layer in active for p in layers.get(layer, []))

    def tracker_scalars(self, state: Any) -> Dict[str, float]:
        """The schedule as numbers every experiment tracker plots (``report_to``: TensorBoard, W&B, MLflow,
        ...), added to each Trainer log record before the integrations see it.  A record logged after
        optimizer step ``n`` describes step ``n``: the layers it trained and the learning rates it used
        (the switch to the layers of step ``n + 1`` happens just before that step runs):

        * ``layer_schedule/active_layers``: how many layers train; ``layer_schedule/lowest_active`` and
          ``layer_schedule/highest_active``: their positions in the model's layer order (-1: none);
        * ``layer_schedule/trainable_params``; ``layer_schedule/optimizer_state_bytes``: bytes of optimizer
          state on the parameters' devices (step counters aside; offloaded state excluded);
        * ``layer_schedule/active/<layer>``: 1.0 while that layer trains, else 0.0, for every preallocated
          layer; ``layer_schedule/lr/<layer>``: the learning rate its LoRA parameters got in that step
          (the scheduled LR x ``new_layer_lr_scale`` / warm-up; 0 while frozen).
        """
        if self._tuner is None or self._current is None:
            return {}
        if self._record is not None:
            current, lrs, state_bytes = self._record
        else:
            current, lrs, state_bytes = self._current, self._layer_lrs(state), None
        plan = self._tuner.scheduled_adapter(self.adapter_name)
        order = plan.index.all_layers()
        positions = sorted(order.index(layer) for layer in current if layer in order)
        out: Dict[str, float] = {
            "layer_schedule/active_layers": float(len(current)),
            "layer_schedule/lowest_active": float(positions[0] if positions else -1),
            "layer_schedule/highest_active": float(positions[-1] if positions else -1),
            "layer_schedule/trainable_params": float(self._trainable_count(current)),
        }
        if self._optimizer is not None:
            if state_bytes is None:
                state_bytes = _optim.state_bytes(self._optimizer)
            out["layer_schedule/optimizer_state_bytes"] = float(state_bytes)
        active = set(current)
        for layer in plan.preallocated_layers:
            out[f"layer_schedule/active/{layer}"] = 1.0 if layer in active else 0.0
            if layer in lrs:
                out[f"layer_schedule/lr/{layer}"] = lrs[layer]
        return out

    def _layer_lrs(self, state: Any) -> Dict[LayerId, float]:
        """Each preallocated layer's effective learning rate for the next optimizer step."""
        if self._optimizer is None or self._tuner is None:
            return {}
        held: Dict[int, float] = {}
        for group in self._optimizer.param_groups:
            for param in group["params"]:
                held[id(param)] = float(group["lr"])
        by_group = sharded.layer_groups(self._optimizer)
        active = set(self._current or [])
        factors = {} if self._freezing == sharded.OPTIMIZER else self._update_factors(state, ahead=1)
        out: Dict[LayerId, float] = {}
        for layer, params in self._tuner.layer_parameters(self.adapter_name).items():
            if layer in by_group:  # DeepSpeed: the layer's own group carries every factor
                out[layer] = float(self._optimizer.param_groups[by_group[layer][0]]["lr"])
            elif params and id(params[0]) in held:
                out[layer] = held[id(params[0])] * factors.get(layer, 1.0) if layer in active else 0.0
        return out

    def _log_change(self, t: int, active: List[LayerId], state: Any) -> None:
        assert self._tuner is not None
        trainable = self._trainable_count(active)
        entry = {
            "active_layers": format_layers(active, sep=",", ranges=0),
            "trainable_params": trainable,
            "schedule_time": t,
            "schedule_offset": self._offset,
            "epoch": state.epoch,
            "step": state.global_step,
        }
        self._switch_steps.setdefault(t, int(state.global_step))
        state.log_history.append(entry)
        unit = self._unit
        logger.info(
            "layer schedule: %s %d: active layers %s, %d trainable parameters", unit, t, active or "[]", trainable
        )

    def _start_phase(self) -> None:
        assert self._tuner is not None
        watch = self.warn_on_no_update and self._current is not None and not self._zero3
        # (ZeRO-3 partitions the parameters: a rank does not hold them whole)
        params = self._tuner.layer_parameters(self.adapter_name) if watch else {}
        self._still.start({layer: params[layer] for layer in self._current or []} if watch else {})

    def _check_phase_updates(self, state: Any) -> None:
        if self._tuner is None:
            return
        still = self._still.still(self._tuner.layer_parameters(self.adapter_name))
        if still:
            warnings.warn(
                f"LayerScheduleCallback: the LoRA weights of active layer(s) {still} did not change at all "
                f"over the phase that ended at step {state.global_step} ({self._still.steps} optimizer steps). "
                f"Check that the optimizer holds them and that their learning rate is not 0.",
                stacklevel=2,
            )

    # LR multiplier / warm-up for layers that join later ------------------------------------------

    def _update_factors(self, state: Any, ahead: int = 0) -> Dict[LayerId, float]:
        """The factor on each active layer's update for the optimizer step that just ran (``ahead=1``:
        for the next one)."""
        if self._tuner is None or self._current is None:
            return {}
        if self.new_layer_lr_scale == 1.0 and self.new_layer_warmup_steps == 0:
            return {}
        plan = self._tuner.scheduled_adapter(self.adapter_name)
        if plan.schedule is None:
            return {}
        first = set(plan.schedule.initial_layers())
        step = int(state.global_step) + ahead
        factors: Dict[LayerId, float] = {}
        for layer in self._current:
            if layer in first:
                continue
            factor = self.new_layer_lr_scale
            if self.new_layer_warmup_steps:
                joined = self._join_step(layer, plan)
                done = max(step - joined, 0)
                factor *= min(1.0, done / float(self.new_layer_warmup_steps))
            if factor != 1.0:
                factors[layer] = factor
        return factors

    def _join_step(self, layer: LayerId, plan: Any) -> int:
        """Global step at which ``layer`` joined its current active run: the step at which that schedule
        time was applied in this run (resumed runs read it from the checkpoint's log history); for a
        join before this run began (``schedule_start="continue"``), counted back from the schedule."""
        t = self._time if self._time is not None else 0
        start = plan.schedule.run_start(layer, t) or 0
        if start in self._switch_steps:
            return self._switch_steps[start]
        joined = start - self._offset
        return joined * (self._steps_per_epoch or 1) if self._unit == "epoch" else joined

    def _snapshot_before_step(self) -> None:
        if self._tuner is None or (self.new_layer_lr_scale == 1.0 and self.new_layer_warmup_steps == 0):
            return
        params = self._tuner.layer_parameters(self.adapter_name)
        self._scaler.snapshot(p for layer in self._current or [] for p in params.get(layer, []))

    def _scale_updates(self, state: Any) -> None:
        factors = self._update_factors(state)
        if not factors or self._tuner is None:
            return
        params = self._tuner.layer_parameters(self.adapter_name)
        self._scaler.scale({p: factor for layer, factor in factors.items() for p in params.get(layer, [])})


def _distributed(args: Any) -> bool:
    # Not local_rank: transformers 4.30 reports 0 (not -1) in a single process.
    return int(getattr(args, "world_size", 1) or 1) > 1


class _RunRecord(object):
    """What a resumed run's Trainer state says of the schedule: the log-history entries the callback
    appended at each switch (``schedule_time``, ``schedule_offset``, ``step``), saved in every checkpoint's
    ``trainer_state.json`` (regular, just-in-time and DeepSpeed checkpoints alike).

    ``offset``: the schedule time of the run's Trainer ``t = 0`` (``None``: a new run, or entries from a
    version that did not record it); ``last_time``: the schedule time whose active set the checkpoint was
    saved with; ``switch_steps``: schedule time -> the global step at which it was applied.
    """

    def __init__(self, offset: Optional[int], last_time: Optional[int], switch_steps: Dict[int, int]) -> None:
        self.offset, self.last_time, self.switch_steps = offset, last_time, switch_steps

    @classmethod
    def of(cls, state: Any) -> "_RunRecord":
        if not int(getattr(state, "global_step", 0) or 0):
            return cls(None, None, {})
        return cls.of_history(getattr(state, "log_history", None) or [])

    @classmethod
    def of_history(cls, log_history: List[Dict[str, Any]]) -> "_RunRecord":
        entries = [e for e in log_history if "schedule_time" in e]
        if not entries or "schedule_offset" not in entries[-1]:
            return cls(None, None, {})
        steps: Dict[int, int] = {}
        for entry in entries:
            steps.setdefault(int(entry["schedule_time"]), int(entry["step"]))
        return cls(int(entries[-1]["schedule_offset"]), int(entries[-1]["schedule_time"]), steps)
