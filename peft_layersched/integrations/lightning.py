"""``LayerScheduleFinetuning``: a Lightning ``Trainer`` drives the schedule stored in the model's config.

It translates Lightning events into :class:`~peft_layersched.training.scheduler.LayerScheduler` calls,
and saves the scheduler's state in every Lightning checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package (pytorch_lightning) is the same code under another name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError(
            "peft_layersched.lightning needs PyTorch Lightning, and neither `lightning` nor `pytorch_lightning` "
            "is installed. Install it with `pip install lightning`, or use LayerScheduleCallback (HF Trainer) "
            "or LayerScheduler (any training loop) instead."
        ) from None

from ..training import LayerScheduler, engines
from ..training.options import OptionsHolder, with_options
from ..tuner import deferred_load_check, find_scheduled_tuner

# Lightning strategies whose sharding the requires_grad engine cannot reach (their optimizer state or
# parameters are flattened / partitioned); tested: one device and DDP.
_UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy")


class LayerScheduleFinetuning(OptionsHolder, pl.Callback):
    """Runs the layer schedule of the model's ``ScheduledLoraConfig`` during Lightning's ``Trainer.fit()``.

    The ``LightningModule`` holds the scheduled ``PeftModel`` (as an attribute, or anywhere among its
    modules).  Its ``configure_optimizers`` builds the optimizer over
    :meth:`LayerScheduler.param_groups` (one param group per scheduled layer): required for
    ``new_layer_lr_scale`` / ``new_layer_warmup_steps``, and it keeps the LR scheduler's LRs exact for each
    layer.  An optimizer over ``[p for p in self.parameters() if p.requires_grad]`` works too when neither
    is used.  One optimizer; any LR scheduler (``"step"`` or ``"epoch"`` interval, ``ReduceLROnPlateau``).

    Args:
        **options: the :class:`~peft_layersched.training.options.ScheduleOptions` (``new_layer_lr_scale``,
            ``new_layer_warmup_steps``, ``frozen_optimizer_state``, ``reactivated_state``,
            ``warn_on_no_update``, ``adapter_name``, ``schedule_start``, ``prefix_cache``), by keyword.
        log_metrics (`bool`): log :meth:`LayerScheduler.metrics` (``layer_schedule/...``: active layers,
            per-layer LRs, trainable parameters, optimizer-state bytes) with ``pl_module.log_dict`` after
            every optimizer step, when the Trainer has a logger.  Default ``True``.

    Runs on one device and under DDP with ``strategy="ddp_find_unused_parameters_true"`` (frozen layers
    get no gradient).  Resume with ``trainer.fit(module, ckpt_path=...)``: the schedule's position is
    saved in every checkpoint and the run goes on bitwise as if uninterrupted (with checkpoints at epoch
    ends, or a resumable dataloader: Lightning restarts a plain dataloader's epoch from its first batch).

    Example:

    ```py
    >>> from peft_layersched import LayerScheduler, ScheduledLoraConfig
    >>> from peft_layersched.lightning import LayerScheduleFinetuning
    >>> class Module(lightning.pytorch.LightningModule):
    ...     def __init__(self, peft_model):
    ...         super().__init__()
    ...         self.model = peft_model
    ...     def training_step(self, batch, batch_idx):
    ...         return self.model(**batch).loss
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(LayerScheduler.param_groups(self.model), lr=1e-3)
    >>> model = get_peft_model(bert, ScheduledLoraConfig(target_modules=["query", "value"],
    ...                                                  layer_schedule={0: [11], 300: [1, 11]},
    ...                                                  schedule_unit="step"))
    >>> trainer = lightning.pytorch.Trainer(max_steps=1000,
    ...                                     callbacks=[LayerScheduleFinetuning(new_layer_warmup_steps=50)])
    >>> trainer.fit(Module(model), loader)
    ```
    """

    @with_options
    def __init__(self, *, log_metrics: bool = True, **options: Any) -> None:
        self._take_options(options)
        if not isinstance(log_metrics, bool):
            raise TypeError(f"log_metrics must be True or False, got {log_metrics!r}.")
        self.log_metrics = log_metrics
        self.scheduler: Optional[LayerScheduler] = None  # the run's core, from on_train_start on
        self._saved: Optional[Dict[str, Any]] = None  # the scheduler state of the checkpoint resumed from
        self._last_step = 0
        self._deferred: Optional[contextlib.ExitStack] = None

    @property
    def state_key(self) -> str:
        # One instance per scheduled adapter may run in a Trainer: each has its own entry in a checkpoint.
        return self._generate_state_key(adapter_name=self.adapter_name)

    # ------------------------------------------------------------------------------------ events

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        tuner = find_scheduled_tuner(pl_module, "LayerScheduleFinetuning")
        self.scheduler, self._saved = None, None
        tuner.set_freezing(self._engine(trainer).freezing)
        # configure_optimizers (and DDP) come next, building from `requires_grad` as it is then: make it all.
        tuner.scheduled_adapter(self.adapter_name).register_all_for_optimizer()
        # A ckpt_path's weights load before the schedule is at the checkpoint's step: layers that joined
        # later would look as if they carried weights the schedule never trained.  Check at on_train_start.
        self._end_deferral()
        self._deferred = contextlib.ExitStack()
        self._deferred.enter_context(deferred_load_check(tuner))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_ddp(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            raise ValueError(
                f"LayerScheduleFinetuning drives one optimizer, and configure_optimizers returned "
                f"{len(optimizers)}; Lightning's global_step counts the steps of them all. Train the scheduled "
                f"PeftModel with one optimizer (other modules may be param groups of the same one)."
            )
        saved = self._saved  # (LayerScheduler refuses a state saved with another schedule unit)
        total_steps, total_epochs, steps_per_epoch = _run_length(trainer)
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        self.scheduler = LayerScheduler(
            pl_module, optimizers[0] if optimizers else None, engine=self._engine(trainer), **self.options(),
            total_steps=total_steps, total_epochs=total_epochs, steps_per_epoch=steps_per_epoch,
            start_step=step, start_epoch=epoch, state_dict=saved,
            calibration_data=getattr(trainer, "train_dataloader", None),
        )
        self._last_step = step
        self.scheduler.unscale_lrs()
        self._end_deferral()
        self.scheduler.tuner.scheduled_adapter().check_deferred_load()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        sched = self.scheduler
        if sched is not None and sched.unit == "epoch":
            sched.set_time(int(trainer.current_epoch))
            sched.unscale_lrs()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.scale_lrs()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        sched = self.scheduler
        step = int(trainer.global_step)
        if sched is None or step == self._last_step:
            return  # inside an accumulation window (or a skipped batch): no optimizer step yet
        for _ in range(step - self._last_step):
            sched.step()
        self._last_step = step
        # Plateau LR schedulers step after this hook (after validation, at the epoch's end): the layer groups
        # hold the LR scheduler's own LRs until on_before_optimizer_step.
        sched.unscale_lrs()
        if self.log_metrics and trainer.loggers:
            metrics = sched.metrics()
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end_deferral()
        if self.scheduler is not None:  # (on_train_end does not come after a failed fit)
            self.scheduler.release()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._end_deferral()

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's position (:meth:`LayerScheduler.state_dict`): Lightning saves it in checkpoints."""
        if self.scheduler is not None:
            return self.scheduler.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Keep a checkpoint's schedule state for ``on_train_start`` (the optimizer's is restored after
        callbacks' state, and the scheduler needs both)."""
        self._saved = dict(state_dict)

    # ---------------------------------------------------------------------------------- internals

    def _engine(self, trainer: Any) -> engines.Engine:
        names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
        unsupported = [name for name in _UNSUPPORTED_STRATEGIES if name in names]
        if unsupported:
            raise ValueError(
                f"LayerScheduleFinetuning does not support Lightning's {unsupported[0]} yet (it shards the "
                f"parameters or their optimizer state, which per-layer freezing must reach). Supported: one "
                f"device, and DDP with strategy='ddp_find_unused_parameters_true'. For DeepSpeed ZeRO or FSDP "
                f"use the HF Trainer with LayerScheduleCallback."
            )
        return engines.choose(options=self, user_optimizer=True)

    @staticmethod
    def _check_ddp(trainer: Any) -> None:
        """Refuse the DDP settings a changing trainable set breaks (the model is wrapped by now)."""
        import torch

        wrapped = getattr(trainer.strategy, "model", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            engines.check_ddp(
                "LayerScheduleFinetuning", bool(wrapped.find_unused_parameters),
                getattr(wrapped, "static_graph", False),
                "Use Trainer(strategy='ddp_find_unused_parameters_true') or "
                "Trainer(strategy=DDPStrategy(find_unused_parameters=True)) instead of strategy='ddp'.",
                "Use DDPStrategy(find_unused_parameters=True) without static_graph.",
            )

    def _end_deferral(self) -> None:
        if self._deferred is not None:
            self._deferred.close()
            self._deferred = None


def _run_length(trainer: Any) -> Any:
    """``(total_steps, total_epochs, steps_per_epoch)`` of a fit, each ``None`` where Lightning does not know
    it (an iterable dataset without ``max_steps``, ``max_epochs=-1``)."""
    estimated = trainer.estimated_stepping_batches
    total_steps = int(estimated) if math.isfinite(estimated) and estimated > 0 else None
    batches = trainer.num_training_batches
    steps_per_epoch = None
    if isinstance(batches, int) or (isinstance(batches, float) and math.isfinite(batches)):
        if batches > 0:
            # Lightning steps on the last batch of an epoch even inside an accumulation window.
            steps_per_epoch = int(math.ceil(batches / float(trainer.accumulate_grad_batches)))
    total_epochs = None
    if total_steps is not None and steps_per_epoch:
        total_epochs = int(math.ceil(total_steps / float(steps_per_epoch)))
    elif trainer.max_epochs is not None and trainer.max_epochs > 0:
        total_epochs = int(trainer.max_epochs)
    return total_steps, total_epochs, steps_per_epoch
