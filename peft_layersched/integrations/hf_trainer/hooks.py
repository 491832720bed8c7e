"""The HF ``Trainer`` side of ``LayerScheduleCallback``: the engine a run uses, and the three Trainer methods the
schedule needs to reach.

A ``TrainerCallback`` sees events, not the Trainer; three things happen inside Trainer methods:

============================== ============================================================================
``Trainer.create_optimizer``   right after the optimizer is built (before accelerate / DeepSpeed wrap it),
                               its param groups are split by layer (one group per scheduled layer), so each
                               layer's LR factor is exact and a DeepSpeed-frozen layer runs at LR 0
``Trainer.log``                each training record gets the tracker numbers before the ``report_to``
                               integrations (which run before user callbacks) see it
``Trainer._load_from_checkpoint`` a resume's weights are checked against the schedule only once the callback
                               has moved it to the checkpoint's step (no false "carry trained LoRA weights")
============================== ============================================================================

Two ways to get them: subclass with :class:`LayerScheduleTrainerMixin` first
(``class MyTrainer(LayerScheduleTrainerMixin, SFTTrainer)``), or let the callback install the same three
wrappers on ``transformers.Trainer`` itself (:func:`install_trainer_hooks`, done when a
``LayerScheduleCallback`` is created): for a Trainer class you do not choose (TRL's, axolotl's, ...).  The
wrappers act only for a Trainer that holds a ``LayerScheduleCallback`` (and is not a mixin subclass); any
other Trainer runs the original methods unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from ...training import engines, optim
from ...tuner import deferred_load_check

_SPLIT_HOOK = "_peft_layersched_split"
_LOG_HOOK = "_peft_layersched_log"
_PATCHED = "_peft_layersched_hook"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def engine_kind(args: Any) -> Any:
    """``"DeepSpeed"``, ``"FSDP"`` or ``None`` for the Trainer's ``TrainingArguments`` (or the variables
    ``accelerate launch`` sets)."""
    if getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def deepspeed_config(args: Any) -> Dict[str, Any]:
    """The DeepSpeed config the Trainer uses (a dict, or the JSON file ``args.deepspeed`` names)."""
    plugin = getattr(args, "hf_deepspeed_config", None)
    config = getattr(plugin, "config", None)
    if isinstance(config, dict):
        return config
    given = getattr(args, "deepspeed", None)
    if isinstance(given, dict):
        return given
    if isinstance(given, str) and os.path.isfile(given):
        with open(given) as handle:
            return json.load(handle)
    return {}


def zero_stage(args: Any) -> int:
    return int(deepspeed_config(args).get("zero_optimization", {}).get("stage", 0) or 0)


def engine_for(args: Any) -> engines.Engine:
    """The engine of a Trainer run, refusing the settings the schedule cannot work under (with the fix)."""
    kind = engine_kind(args)
    if kind == "DeepSpeed":
        if "optimizer" in deepspeed_config(args):
            raise ValueError(
                "LayerScheduleCallback under DeepSpeed needs the Trainer to build the optimizer (it gives each "
                "layer its own param group, whose LR freezes the layer): remove the 'optimizer' section from the "
                "DeepSpeed config and choose it with TrainingArguments(optim=..., learning_rate=..., "
                "weight_decay=...) instead."
            )
        return engines.LrZeroEngine(zero3=zero_stage(args) == 3)
    if kind == "FSDP":
        # TrainingArguments(fsdp_config=...), or the variables `accelerate launch --use_fsdp` sets.
        fsdp_config = getattr(args, "fsdp_config", None) or {}
        version = fsdp_config.get("version", fsdp_config.get("fsdp_version", os.environ.get("FSDP_VERSION", 1)))
        version = int(version or 1)
        orig = fsdp_config.get("use_orig_params", fsdp_config.get("fsdp_use_orig_params"))
        if orig is None:
            orig = os.environ.get("FSDP_USE_ORIG_PARAMS")
        if version == 1 and str(orig).lower() not in ("true", "1"):
            raise ValueError(
                "LayerScheduleCallback under FSDP1 needs use_orig_params=True: without it FSDP flattens the "
                "parameters at wrap time and per-layer freezing cannot reach them. Set "
                "TrainingArguments(fsdp_config={'use_orig_params': True, ...}), or use FSDP2 "
                "(fsdp_config={'version': 2})."
            )
        return engines.RequiresGradEngine(sharded_state=True)
    return engines.RequiresGradEngine()


def _hooks(trainer: Any, name: str) -> List[Any]:
    """The ``name`` methods of the trainer's callbacks that have one (our callbacks' Trainer hooks)."""
    found = (getattr(cb, name, None) for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []))
    return [hook for hook in found if callable(hook)]


def split_optimizer(trainer: Any) -> None:
    """Give each scheduled layer its own param group in the optimizer the Trainer just built."""
    for split in _hooks(trainer, _SPLIT_HOOK):
        split(trainer)


def add_tracker_numbers(trainer: Any, logs: Any) -> None:
    """Add the schedule's tracker numbers to a training log record (before the integrations see it)."""
    if isinstance(logs, dict):
        for add in _hooks(trainer, _LOG_HOOK):
            add(trainer, logs)


class LayerScheduleTrainerMixin(object):
    """Gives a ``Trainer`` class what ``LayerScheduleCallback`` needs from inside it, without patching
    ``transformers.Trainer``: put it first, ``class MyTrainer(LayerScheduleTrainerMixin, Trainer)`` (works with
    TRL's ``SFTTrainer`` / ``DPOTrainer`` / ``GRPOTrainer`` too), and pass the callback as usual."""

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        fresh = getattr(self, "optimizer", None) is None
        result = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        if fresh:
            split_optimizer(self)
        return result

    def log(self, logs: Dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        add_tracker_numbers(self, logs)
        return super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _load_from_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        with deferred_load_check():
            return super()._load_from_checkpoint(*args, **kwargs)  # type: ignore[misc]


def _ours(trainer: Any) -> bool:
    """A Trainer the class-level wrappers act for: it holds our callback and is not a mixin subclass."""
    return not isinstance(trainer, LayerScheduleTrainerMixin) and bool(_hooks(trainer, _LOG_HOOK))


def install_trainer_hooks() -> None:
    """Wrap ``Trainer.create_optimizer``, ``Trainer.log`` and ``Trainer._load_from_checkpoint`` once (see the
    module docstring); the wrappers run the originals unchanged for a Trainer without our callback."""
    from transformers import Trainer

    original = Trainer.create_optimizer
    if getattr(original, _PATCHED, False):
        return

    def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        fresh = getattr(self, "optimizer", None) is None
        result = original(self, *args, **kwargs)
        if fresh and _ours(self):
            split_optimizer(self)
        return result

    setattr(create_optimizer, _PATCHED, True)
    Trainer.create_optimizer = create_optimizer

    original_log = Trainer.log

    def log(self: Any, logs: Dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if _ours(self):
            add_tracker_numbers(self, logs)
        return original_log(self, logs, *args, **kwargs)

    Trainer.log = log

    original_load = getattr(Trainer, "_load_from_checkpoint", None)
    if original_load is not None:

        def _load_from_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not _ours(self):
                return original_load(self, *args, **kwargs)
            with deferred_load_check():
                return original_load(self, *args, **kwargs)

        Trainer._load_from_checkpoint = _load_from_checkpoint


def split_trainer_optimizer(trainer: Any, layer_params: Dict[Any, List[Any]]) -> None:
    """Split the Trainer's fresh optimizer into one param group per layer (``layer_params``: the layers'
    LoRA parameters)."""
    layer_of = {id(p): layer for layer, ps in layer_params.items() for p in ps}
    engines.split_by_layer(optim.inner(trainer.optimizer), layer_of)


def ensure_optimized(optimizer: Any, args: Any, layer_params: Dict[Any, List[Any]], user_optimizer: bool) -> None:
    """A Trainer optimizer that lacks some scheduled layers' LoRA parameters (``activate_layers()`` ran before
    ``train()`` and the callback came after ``Trainer.__init__``): refused under DDP; else, when the Trainer
    built it, they are put into its existing non-layer groups (the LR scheduler covers them; no group is
    added), with a warning.  A user-built optimizer is left to ``LayerScheduler``, which refuses it."""
    import warnings

    missing = optim.missing(optimizer, layer_params)
    if not missing:
        return
    if distributed(args):
        raise ValueError(
            f"the LoRA parameters of layer(s) {list(missing)} did not require grad when DDP wrapped the "
            f"model, so DDP would never all-reduce them and the ranks would silently diverge once they "
            f"train. Pass LayerScheduleCallback to Trainer(callbacks=[...]) (it prepares the model before "
            f"the optimizer and DDP are built), and do not call activate_layers() before trainer.train()."
        )
    if user_optimizer or not optimizer.param_groups:
        return
    params = [p for ps in missing.values() for p in ps]
    if not optim.add_to_group(optimizer, params, getattr(args, "weight_decay", 0.0), engines.LAYER_KEY):
        return  # every group is a layer's own: LayerScheduler refuses it, saying how to build it
    warnings.warn(
        f"LayerScheduleCallback: the optimizer lacked the LoRA parameters of layer(s) {list(missing)}; "
        f"they were added to its existing param groups. Pass the callback to Trainer(callbacks=[...]) "
        f"so the optimizer is built with them (needed for resume_from_checkpoint to match).",
        stacklevel=3,
    )


def read_json(checkpoint: str, subfolder: Optional[str], name: str) -> Dict[str, Any]:
    """A JSON file of a checkpoint folder (in the adapter's subfolder if there), ``{}`` if none."""
    for folder in ([os.path.join(checkpoint, subfolder)] if subfolder else []) + [checkpoint]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
    return {}


def check_ddp(args: Any) -> None:
    """Refuse the DDP settings a changing trainable set breaks; find unused parameters by default."""
    if not distributed(args) or engine_kind(args) is not None:
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


def distributed(args: Any) -> bool:
    # Not local_rank: transformers 4.30 reports 0 (not -1) in a single process.
    return int(getattr(args, "world_size", 1) or 1) > 1


class RunRecord(object):
    """What a resumed run's Trainer state says of the schedule: the log-history entries the callback
    appended at each switch (``schedule_time``, ``schedule_offset``, ``step``), saved in every checkpoint's
    ``trainer_state.json``.

    ``offset``: the schedule time of the run's Trainer ``t = 0`` (``None``: a new run, or entries from a
    version that did not record it); ``last_time``: the schedule time whose active set the checkpoint was
    saved with; ``switch_steps``: schedule time -> the global step at which it was applied; ``adaptive``:
    an adaptive schedule's decision log and signal state as the checkpoint was saved (the one entry
    ``ADAPTIVE_KEY`` that the callback keeps up to date before each save).
    """

    def __init__(self, offset: Optional[int], last_time: Optional[int], switch_steps: Dict[int, int],
                 adaptive: Optional[Dict[str, Any]] = None) -> None:
        self.offset, self.last_time, self.switch_steps = offset, last_time, switch_steps
        self.adaptive = adaptive

    @classmethod
    def of(cls, state: Any) -> "RunRecord":
        if not int(getattr(state, "global_step", 0) or 0):
            return cls(None, None, {})
        return cls.of_history(getattr(state, "log_history", None) or [])

    @classmethod
    def of_history(cls, log_history: List[Dict[str, Any]]) -> "RunRecord":
        entries = [e for e in log_history if "schedule_time" in e]
        if not entries or "schedule_offset" not in entries[-1]:
            return cls(None, None, {})
        steps: Dict[int, int] = {}
        for entry in entries:
            steps.setdefault(int(entry["schedule_time"]), int(entry["step"]))
        adaptive = adaptive_entry(log_history)
        return cls(int(entries[-1]["schedule_offset"]), int(entries[-1]["schedule_time"]), steps,
                   None if adaptive is None else adaptive[ADAPTIVE_KEY])


ADAPTIVE_KEY = "layer_schedule_adaptive"


def adaptive_entry(log_history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The log-history entry that holds an adaptive schedule's state (``None``: there is none yet)."""
    for entry in log_history:
        if ADAPTIVE_KEY in entry:
            return entry
    return None


def keep_adaptive_state(state: Any, adaptive: Dict[str, Any]) -> None:
    """Put an adaptive schedule's state into the Trainer state's log history, for the checkpoint that
    is saved next (``trainer_state.json``): one entry, updated in place, so the history grows by one entry
    however many checkpoints there are."""
    entry = adaptive_entry(state.log_history)
    if entry is None:
        entry = {}
        state.log_history.append(entry)
    entry[ADAPTIVE_KEY] = adaptive
    entry["step"] = int(state.global_step)
