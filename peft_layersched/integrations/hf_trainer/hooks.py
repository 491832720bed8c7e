"""The HF ``Trainer`` side of ``LayerScheduleCallback``: the run's engine, and four Trainer methods it reaches.

``create_optimizer`` splits the groups by layer, ``log`` adds the tracker numbers,
``_load_from_checkpoint`` defers the weight check, and a ``train`` that raises takes the run's hooks off
the model. Get them with :class:`LayerScheduleTrainerMixin`, or from the wrappers the callback installs on
``transformers.Trainer``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from ...training import engines, optim
from ...tuner import deferred_load_check

_SPLIT_HOOK = "_peft_layersched_split"
_LOG_HOOK = "_peft_layersched_log"
_FAILED_HOOK = "_peft_layersched_failed"
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


def engine_for(args: Any, options: Any, user_optimizer: bool) -> engines.Engine:
    """The engine of a Trainer run (checked against its ``options``), refusing the settings the schedule
    cannot work under, with the fix."""
    kind = engine_kind(args)
    if kind == "DeepSpeed" and "optimizer" in deepspeed_config(args):
        raise ValueError(
            "LayerScheduleCallback under DeepSpeed needs the Trainer to build the optimizer (it gives each "
            "layer its own param group, whose LR freezes the layer): remove the 'optimizer' section from the "
            "DeepSpeed config and choose it with TrainingArguments(optim=..., learning_rate=..., "
            "weight_decay=...) instead."
        )
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
    engine = engines.choose(deepspeed=kind == "DeepSpeed", zero3=kind == "DeepSpeed" and zero_stage(args) == 3,
                            sharded_state=kind == "FSDP", options=options, user_optimizer=user_optimizer)
    check_ddp(args)
    return engine


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


def release_failed_run(trainer: Any) -> None:
    """``train()`` raised: take the run's hooks and prefix cache off the model (``on_train_end`` never came)."""
    for release in _hooks(trainer, _FAILED_HOOK):
        release()


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
        with deferred_load_check(self.model):
            return super()._load_from_checkpoint(*args, **kwargs)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            release_failed_run(self)
            raise


def _ours(trainer: Any) -> bool:
    """A Trainer the class-level wrappers act for: it holds our callback and is not a mixin subclass."""
    return not isinstance(trainer, LayerScheduleTrainerMixin) and bool(_hooks(trainer, _LOG_HOOK))


def install_trainer_hooks() -> None:
    """Wrap ``Trainer.create_optimizer``, ``Trainer.log``, ``Trainer._load_from_checkpoint`` and ``Trainer.train``
    once (see the module docstring); the wrappers run the originals unchanged for a Trainer without our callback."""
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
            with deferred_load_check(self.model):
                return original_load(self, *args, **kwargs)

        Trainer._load_from_checkpoint = _load_from_checkpoint

    original_train = Trainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_train(self, *args, **kwargs)
        except BaseException:
            if _ours(self):
                release_failed_run(self)
            raise

    Trainer.train = train


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
    engines.check_ddp(
        "LayerScheduleCallback", getattr(args, "ddp_find_unused_parameters", None),
        getattr(args, "ddp_static_graph", None),
        "Set TrainingArguments(ddp_find_unused_parameters=True) (or leave it None).",
        "Set TrainingArguments(ddp_static_graph=False).",
    )
    if getattr(args, "ddp_find_unused_parameters", None) is None:
        args.ddp_find_unused_parameters = True


def distributed(args: Any) -> bool:
    # Not local_rank: transformers 4.30 reports 0 (not -1) in a single process.
    return int(getattr(args, "world_size", 1) or 1) > 1
