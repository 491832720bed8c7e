"""Schedules: which layers train at time t. Pure Python, no torch.

A schedule is data (a dict, a JSON string) parsed into a spec; a spec binds to the model's layer ids.
Each kind lives in its own module and registers itself; importing this package imports them all.
"""

# isort: off
# Each kind registers itself when imported, in this order: the order messages list the kinds in.
from . import milestones, gradual, cyclic, sampled, progressive, adaptive, autofreeze, callable  # noqa: F401
# isort: on
from .adaptive import AdaptiveSchedule
from .base import Schedule, ScheduleSpec, kind_names, parse_schedule, register_kind, registered_kinds
from .callable import CallableSpec
from .describe import describe_schedule, format_layers, preview_span
from .ids import (
    LayerId,
    LayerStack,
    StackIndex,
    check_layer_list,
    check_time,
    check_unit,
    short_layer_list,
    stable_int,
)

__all__ = [
    "AdaptiveSchedule",
    "CallableSpec",
    "LayerId",
    "LayerStack",
    "Schedule",
    "ScheduleSpec",
    "StackIndex",
    "check_layer_list",
    "check_time",
    "check_unit",
    "describe_schedule",
    "format_layers",
    "kind_names",
    "parse_schedule",
    "preview_span",
    "register_kind",
    "registered_kinds",
    "short_layer_list",
    "stable_int",
]
