"""Engines: how a frozen layer is frozen under each training engine, chosen once per run (:func:`choose`).

:class:`RequiresGradEngine` sets ``requires_grad=False`` (one process, DDP, FSDP).
:class:`LrZeroEngine` runs the layer's param group at LR 0 (DeepSpeed ZeRO).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List

from ..tuner import OPTIMIZER, REQUIRES_GRAD  # noqa: F401  (the freezing modes, named by the tuner)

# The key this package adds to the param groups it splits off: the layer id whose LoRA parameters the
# group holds.  torch optimizers (and ZeRO, which keeps the group dicts) carry unknown keys along, into
# optimizer.state_dict() too.
LAYER_KEY = "peft_layersched_layer"


class Engine(object):
    """How layers are frozen: ``freezing`` (the tuner's mode), whether the optimizer must have per-layer
    param groups, whether a rank holds each parameter whole (the no-update check compares them), and
    which optimizer-state policies can work."""

    name = ""
    freezing = REQUIRES_GRAD
    needs_layer_groups = False
    whole_parameters = True
    moves_layer_state = True  # drop / offload / reset one layer's optimizer state

    def check_options(self, frozen_optimizer_state: str, reactivated_state: str, user_optimizer: bool) -> None:
        """Refuse the options that cannot work under this engine, saying what to use instead."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RequiresGradEngine(Engine):
    """``requires_grad=False`` and ``grad=None`` freeze a layer (one process, DDP, FSDP)."""

    name = "requires_grad"

    def __init__(self, sharded_state: bool = False) -> None:
        self.sharded_state = sharded_state

    def check_options(self, frozen_optimizer_state: str, reactivated_state: str, user_optimizer: bool) -> None:
        if self.sharded_state and frozen_optimizer_state != "keep":
            raise ValueError(
                f"frozen_optimizer_state={frozen_optimizer_state!r} is not supported under FSDP yet (its "
                f"optimizer state is sharded DTensors); use frozen_optimizer_state='keep'."
            )

    def __repr__(self) -> str:
        return f"RequiresGradEngine(sharded_state={self.sharded_state})"


class LrZeroEngine(Engine):
    """LR 0 in the layer's own param group freezes it (DeepSpeed ZeRO; ``zero3``: parameters partitioned)."""

    name = "lr-zero"
    freezing = OPTIMIZER
    needs_layer_groups = True
    moves_layer_state = False

    def __init__(self, zero3: bool = False) -> None:
        self.zero3 = zero3
        self.whole_parameters = not zero3

    def check_options(self, frozen_optimizer_state: str, reactivated_state: str, user_optimizer: bool) -> None:
        if frozen_optimizer_state != "keep":
            raise ValueError(
                f"frozen_optimizer_state={frozen_optimizer_state!r} is not available under DeepSpeed: ZeRO "
                f"keeps the optimizer state of all layers in flat partitions, so one layer's state cannot be "
                f"dropped or moved. Use frozen_optimizer_state='keep' (DeepSpeed's own zero_optimization."
                f"offload_optimizer moves all of it to the CPU)."
            )
        if reactivated_state == "reset":
            raise ValueError(
                "reactivated_state='reset' is not available under DeepSpeed: ZeRO keeps the optimizer state of "
                "all layers in flat partitions, so one layer's state cannot be dropped. Use the default "
                "reactivated_state='keep'."
            )
        if user_optimizer:
            raise ValueError(
                "LayerScheduleCallback under DeepSpeed needs the Trainer to build the optimizer (it splits the "
                "param groups by layer before ZeRO flattens them); do not pass Trainer(optimizers=(...))."
            )

    def __repr__(self) -> str:
        return f"LrZeroEngine(zero3={self.zero3})"


def split_by_layer(optimizer: Any, layer_of: Dict[int, Any]) -> int:
    """Split each param group of a fresh torch optimizer into one group per layer, in place.

    ``layer_of`` maps ``id(param)`` to its layer id; other parameters stay together in a group of their
    own (same options).  Each new group keeps every option of the group it came from and gets
    ``LAYER_KEY``.  Returns the number of groups.  Only before the first step (no optimizer state).
    """
    if getattr(optimizer, "state", None):
        raise ValueError("split_by_layer: the optimizer has already stepped; split it right after building it.")
    split = split_groups(optimizer.param_groups, layer_of)
    del optimizer.param_groups[:]
    for group in split:
        optimizer.add_param_group(group)
    return len(optimizer.param_groups)


def split_groups(groups: Iterable[Dict[str, Any]], layer_of: Dict[int, Any]) -> List[Dict[str, Any]]:
    """Param-group dicts split by layer (see :func:`split_by_layer`); the given dicts are not changed."""
    split: List[Dict[str, Any]] = []
    for group in groups:
        params = group["params"]
        params = [params] if hasattr(params, "data") and not isinstance(params, (list, tuple)) else list(params)
        buckets: "OrderedDict[Any, List[Any]]" = OrderedDict()
        for param in params:
            buckets.setdefault(layer_of.get(id(param)), []).append(param)
        for layer, members in buckets.items():
            options = {key: value for key, value in group.items() if key != "params"}
            options["params"] = members
            if layer is not None:
                options[LAYER_KEY] = layer
            split.append(options)
    return split


def layer_groups(optimizer: Any) -> Dict[Any, List[int]]:
    """``{layer: [group index, ...]}`` of the groups ``split_by_layer`` made."""
    found: Dict[Any, List[int]] = {}
    for index, group in enumerate(optimizer.param_groups):
        if LAYER_KEY in group:
            found.setdefault(group[LAYER_KEY], []).append(index)
    return found


# The tuner names the freezing mode of LrZeroEngine "optimizer": accepted here as the same engine.
_ALIASES = {"optimizer": "lr-zero"}


def choose(engine: Any = None, deepspeed: bool = False, zero3: bool = False, sharded_state: bool = False,
           options: Any = None, user_optimizer: bool = False) -> Engine:
    """The run's engine, checked against its ``options`` (a ``ScheduleOptions``): ``engine`` when given (an
    :class:`Engine`, ``"requires_grad"`` or ``"lr-zero"``), else the one the runtime needs (``deepspeed``:
    ZeRO, ``zero3``: its stage 3; ``sharded_state``: FSDP)."""
    if isinstance(engine, Engine):
        chosen = engine
    elif engine is None:
        chosen = LrZeroEngine(zero3=zero3) if deepspeed else RequiresGradEngine(sharded_state=sharded_state)
    elif _ALIASES.get(engine, engine) == RequiresGradEngine.name:
        chosen = RequiresGradEngine()
    elif _ALIASES.get(engine, engine) == LrZeroEngine.name:
        chosen = LrZeroEngine()
    else:
        raise ValueError(
            f"engine={engine!r} is not supported; use 'requires_grad' (one process, DDP, FSDP) or 'lr-zero' "
            f"(DeepSpeed ZeRO: the optimizer's per-layer LR freezes a layer), or pass an Engine object."
        )
    if options is not None:
        chosen.check_options(options.frozen_optimizer_state, options.reactivated_state, user_optimizer)
    return chosen


def check_ddp(who: str, find_unused_parameters: Any, static_graph: Any, fix_unused: str, fix_static: str) -> None:
    """Refuse the DDP settings a changing trainable set breaks (``find_unused_parameters=None``: not set)."""
    if static_graph:
        raise ValueError(
            f"{who} under DDP cannot use static_graph=True: the set of parameters that get gradients changes "
            f"with the schedule. {fix_static}"
        )
    if find_unused_parameters is False:
        raise ValueError(
            f"{who} under DDP needs find_unused_parameters=True: frozen and not-yet-active layers get no "
            f"gradient, and DDP without it fails at the next backward. {fix_unused}"
        )
