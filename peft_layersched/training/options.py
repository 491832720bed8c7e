"""The options every schedule driver takes, declared once.

``LayerScheduler``, ``LayerScheduleCallback``, ``LayerScheduleFinetuning`` and the axolotl plugin all take
these fields, by keyword, with these defaults; they are checked here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Dict, Optional, Tuple

from .prefix_cache import resolve

FROZEN_STATES = ("keep", "drop", "offload")
REACTIVATED_STATES = ("keep", "reset")
SCHEDULE_STARTS = ("restart", "continue")


@dataclasses.dataclass(frozen=True)
class ScheduleOptions(object):
    """The options of a schedule driver (keyword arguments only)."""

    new_layer_lr_scale: float = dataclasses.field(default=1.0, metadata={
        "help": "LR multiplier for layers that join after the first phase (1.0 = the scheduled LR)."})
    new_layer_warmup_steps: int = dataclasses.field(default=0, metadata={
        "help": "Linear LR warm-up of such layers over this many optimizer steps after they join (0 = none)."})
    frozen_optimizer_state: str = dataclasses.field(default="keep", metadata={
        "help": "What happens to a frozen layer's optimizer state: 'keep' it, 'drop' it (a rejoining layer "
                "starts afresh) or 'offload' it to the CPU until the layer rejoins."})
    reactivated_state: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "'keep' or 'reset' the optimizer state of a layer that rejoins; default 'keep' ('reset' with "
                "frozen_optimizer_state='drop')."})
    warn_on_no_update: bool = dataclasses.field(default=True, metadata={
        "help": "Warn when an active layer's LoRA weights did not change at all over a phase."})
    adapter_name: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "The scheduled adapter to drive; default the active one."})
    schedule_start: str = dataclasses.field(default="restart", metadata={
        "help": "'restart': the schedule begins at t=0; 'continue': where the loaded adapter's schedule stood "
                "(schedule_position)."})
    prefix_cache: Any = dataclasses.field(default=None, metadata={
        "help": "Cache the hidden states entering the lowest active layer per example and skip the frozen layers "
                "below it in later epochs: True, or a PrefixCache (max_bytes, dir, dtype, eval_prefix); "
                "None = off."})

    def __post_init__(self) -> None:
        resolved = check(self)
        object.__setattr__(self, "prefix_cache", resolve(self.prefix_cache))
        object.__setattr__(self, "new_layer_lr_scale", float(self.new_layer_lr_scale))
        object.__setattr__(self, "reactivated_state", resolved)

    def as_dict(self) -> Dict[str, Any]:
        """The options as keyword arguments of any driver."""
        return {name: getattr(self, name) for name in NAMES}


NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ScheduleOptions))
FIELDS = {f.name: f for f in dataclasses.fields(ScheduleOptions)}


def _keyword_only(cls: Any) -> Any:
    # Python 3.7 has no dataclass(kw_only=True): the generated __init__ is wrapped instead.
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError(
                f"{cls.__name__} takes keyword arguments only ({', '.join(NAMES)}), got {len(args)} positional "
                f"argument(s): name them, e.g. {cls.__name__}(new_layer_lr_scale=0.5)."
            )
        unknown = sorted(set(kwargs) - set(NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(NAMES)}.")
        init(self, **kwargs)

    signature = inspect.signature(init)
    __init__.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        p if p.name == "self" else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in signature.parameters.values()
    ])
    cls.__init__ = __init__
    return cls


_keyword_only(ScheduleOptions)


def check(options: Any) -> str:
    """Validate the options (any object with their attributes); returns the ``reactivated_state`` in
    force (``"reset"`` by default with ``frozen_optimizer_state="drop"``)."""
    scale, warmup = options.new_layer_lr_scale, options.new_layer_warmup_steps
    frozen, reactivated = options.frozen_optimizer_state, options.reactivated_state
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"new_layer_lr_scale must be a number, got {scale!r}.")
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"new_layer_lr_scale must be a finite number >= 0 (1.0 = the scheduled LR), got {scale}.")
    if not isinstance(options.warn_on_no_update, bool):
        raise TypeError(f"warn_on_no_update must be True or False, got {options.warn_on_no_update!r}.")
    if options.schedule_start not in SCHEDULE_STARTS:
        raise ValueError(
            f"schedule_start={options.schedule_start!r} is not supported; use one of {list(SCHEDULE_STARTS)} "
            f"('restart': the schedule begins at t=0; 'continue': where the loaded adapter's schedule stood)."
        )
    if isinstance(warmup, bool) or not isinstance(warmup, int):
        raise TypeError(f"new_layer_warmup_steps must be an int, got {warmup!r}.")
    if warmup < 0:
        raise ValueError(f"new_layer_warmup_steps must be >= 0, got {warmup}.")
    if reactivated is not None and reactivated not in REACTIVATED_STATES:
        raise ValueError(
            f"reactivated_state={reactivated!r} is not supported; use one of {list(REACTIVATED_STATES)}."
        )
    if frozen not in FROZEN_STATES:
        raise ValueError(
            f"frozen_optimizer_state={frozen!r} is not supported; use one of {list(FROZEN_STATES)} ('keep': "
            f"frozen layers keep their optimizer state; 'drop': it is freed and starts afresh when the layer "
            f"rejoins; 'offload': it waits on the CPU)."
        )
    if frozen == "drop" and reactivated == "keep":
        raise ValueError(
            "frozen_optimizer_state='drop' frees a frozen layer's optimizer state, so it cannot be kept for "
            "when the layer rejoins (reactivated_state='keep'). Use frozen_optimizer_state='offload' to keep "
            "it off the accelerator, or leave reactivated_state unset."
        )
    return reactivated or ("reset" if frozen == "drop" else "keep")


def check_options(**given: Any) -> str:
    """Validate options given by keyword (defaults for the rest); returns the ``reactivated_state`` in force."""
    return ScheduleOptions(**given).reactivated_state or "keep"


class OptionsHolder(object):
    """A driver's options as attributes (``self.new_layer_lr_scale``, ...), validated once."""

    def _take_options(self, given: Dict[str, Any]) -> ScheduleOptions:
        unknown = sorted(set(given) - set(NAMES))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword argument(s) {', '.join(unknown)}; its schedule "
                f"options are {', '.join(NAMES)}."
            )
        taken = ScheduleOptions(**given)
        for name in NAMES:
            setattr(self, name, getattr(taken, name))
        return taken

    def options(self) -> Dict[str, Any]:
        """The validated options, as keyword arguments of any driver."""
        return {name: getattr(self, name) for name in NAMES}


def with_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Show the options as keyword-only parameters in ``func``'s signature (it takes them as ``**options``)."""
    signature = inspect.signature(func)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=FIELDS[name].default,
                          annotation=FIELDS[name].type)
        for name in NAMES
    ]
    func.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    return func
