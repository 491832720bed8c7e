"""Engine adapters: how ``LayerScheduleCallback`` freezes and unfreezes layers under each training engine.

* **One process, DDP, FSDP** (``"requires_grad"``): a frozen layer's LoRA parameters get
  ``requires_grad=False`` and ``grad=None``; torch optimizers skip a parameter without a gradient (no
  momentum, no weight decay), so it stays bitwise still.  FSDP2 (``fully_shard``) and FSDP1 with
  ``use_orig_params=True`` keep per-parameter ``requires_grad``; FSDP1 without it flattens the
  parameters at wrap time and is refused.
* **DeepSpeed ZeRO 1/2/3** (``"optimizer"``): ZeRO fixes the trainable set when it initializes (it hooks
  the gradients of the parameters that require grad then, and zero-fills the ones it does not get), so
  ``requires_grad`` never changes after the Trainer built the optimizer.  Instead the Trainer's optimizer
  gets one param group per layer (split inside ``Trainer.create_optimizer``, before ZeRO flattens the
  groups), and a frozen layer's group runs at LR 0: AdamW/Adam/SGD with ``lr == 0`` leave a parameter
  bitwise unchanged, whatever its gradient and momentum.  The same factor carries
  ``new_layer_lr_scale`` and the warm-up, so they are exact for every optimizer there.  What frozen
  layers cost under ZeRO: their optimizer state (Adam moments) exists from the start, and a layer that
  trained and is frozen still gets a gradient (it stays in the forward) and a moment update at LR 0.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

# The key this package adds to the param groups it splits off: the layer id whose LoRA parameters the
# group holds.  torch optimizers (and ZeRO, which keeps the group dicts) carry unknown keys along, into
# optimizer.state_dict() too.
LAYER_KEY = "peft_layersched_layer"

REQUIRES_GRAD = "requires_grad"
OPTIMIZER = "optimizer"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def engine_of(args: Any) -> Optional[str]:
    """``"DeepSpeed"``, ``"FSDP"`` or ``None`` for the Trainer's ``TrainingArguments``."""
    if getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def freezing_for(engine: Optional[str]) -> str:
    return OPTIMIZER if engine == "DeepSpeed" else REQUIRES_GRAD


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
        import json

        with open(given) as handle:
            return json.load(handle)
    return {}


def zero_stage(args: Any) -> int:
    return int(deepspeed_config(args).get("zero_optimization", {}).get("stage", 0) or 0)


def check_engine(args: Any) -> None:
    """Refuse the engine settings the schedule cannot work under, saying what to change."""
    engine = engine_of(args)
    if engine == "DeepSpeed" and "optimizer" in deepspeed_config(args):
        raise ValueError(
            "LayerScheduleCallback under DeepSpeed needs the Trainer to build the optimizer (it gives each "
            "layer its own param group, whose LR freezes the layer): remove the 'optimizer' section from the "
            "DeepSpeed config and choose it with TrainingArguments(optim=..., learning_rate=..., "
            "weight_decay=...) instead."
        )
    if engine == "FSDP":
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


def split_by_layer(optimizer: Any, layer_of: Dict[int, Any]) -> int:
    """Split each param group of a fresh torch optimizer into one group per layer, in place.

    ``layer_of`` maps ``id(param)`` to its layer id; other parameters stay together in a group of their
    own (same options).  Each new group keeps every option of the group it came from and gets
    ``LAYER_KEY``.  Returns the number of groups.  Only before the first step (no optimizer state).
    """
    if getattr(optimizer, "state", None):
        raise ValueError("split_by_layer: the optimizer has already stepped; split it right after building it.")
    split: List[Dict[str, Any]] = []
    for group in optimizer.param_groups:
        buckets: "OrderedDict[Any, List[Any]]" = OrderedDict()
        for param in group["params"]:
            buckets.setdefault(layer_of.get(id(param)), []).append(param)
        for layer, params in buckets.items():
            options = {key: value for key, value in group.items() if key != "params"}
            options["params"] = params
            if layer is not None:
                options[LAYER_KEY] = layer
            split.append(options)
    del optimizer.param_groups[:]
    for group in split:
        optimizer.add_param_group(group)
    return len(optimizer.param_groups)


def layer_groups(optimizer: Any) -> Dict[Any, List[int]]:
    """``{layer: [group index, ...]}`` of the groups ``split_by_layer`` made."""
    found: Dict[Any, List[int]] = {}
    for index, group in enumerate(optimizer.param_groups):
        if LAYER_KEY in group:
            found.setdefault(group[LAYER_KEY], []).append(index)
    return found


def set_layer_lrs(optimizer: Any, scheduled: List[float], factor: Callable[[Any], float]) -> None:
    """Each layer group's LR = the LR the scheduler gave that group x ``factor(layer)``; other groups get
    the scheduler's LR.  Run after every LR-scheduler step (the Trainer's schedulers recompute the LR
    from their base LRs, so the factor never compounds)."""
    groups = optimizer.param_groups
    if len(scheduled) != len(groups):
        raise ValueError(
            f"the LR scheduler reports {len(scheduled)} learning rates for {len(groups)} param groups; "
            f"build the scheduler after the optimizer (as the Trainer does)."
        )
    for group, lr in zip(groups, scheduled):
        group["lr"] = lr * factor(group[LAYER_KEY]) if LAYER_KEY in group else lr


_TRAINER_HOOK = "_peft_layersched_split"
_LOG_HOOK = "_peft_layersched_log"


def _hooks(trainer: Any, name: str) -> List[Any]:
    """The ``name`` methods of the trainer's callbacks that have one (our callbacks' Trainer hooks)."""
    found = (getattr(cb, name, None) for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []))
    return [hook for hook in found if callable(hook)]


def install_trainer_hook() -> None:
    """Wrap ``transformers.Trainer.create_optimizer``, ``Trainer.log`` and ``Trainer._load_from_checkpoint``
    once.  Right after the Trainer builds its optimizer (before DeepSpeed/accelerate wrap it), every
    callback with a ``_peft_layersched_split`` method gets ``(trainer)`` and may split the groups; before a
    log record goes to the callbacks, every callback with ``_peft_layersched_log`` gets ``(trainer, logs)``
    and may add to it; a resume loads the checkpoint's weights with the scheduled tuner's check of loaded
    weights put off until the callback has moved the schedule to the checkpoint's step.  A Trainer
    without such a callback is not touched."""
    from transformers import Trainer

    from .tuner import deferred_load_check

    original = Trainer.create_optimizer
    if getattr(original, "_peft_layersched_hook", False):
        return

    def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        fresh = getattr(self, "optimizer", None) is None
        result = original(self, *args, **kwargs)
        if fresh:
            for split in _hooks(self, _TRAINER_HOOK):
                split(self)
        return result

    create_optimizer._peft_layersched_hook = True  # type: ignore[attr-defined]
    Trainer.create_optimizer = create_optimizer

    # transformers runs the report_to integrations before user callbacks: a value added in on_log would
    # reach log_history but no tracker.  Trainer.log is where the record is made, before any on_log.
    original_log = Trainer.log

    def log(self: Any, logs: Dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(logs, dict):
            for add in _hooks(self, _LOG_HOOK):
                add(self, logs)
        return original_log(self, logs, *args, **kwargs)

    Trainer.log = log

    original_load = getattr(Trainer, "_load_from_checkpoint", None)
    if original_load is not None:

        def _load_from_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not _hooks(self, _LOG_HOOK):  # no LayerScheduleCallback on this Trainer
                return original_load(self, *args, **kwargs)
            with deferred_load_check():
                return original_load(self, *args, **kwargs)

        Trainer._load_from_checkpoint = _load_from_checkpoint
