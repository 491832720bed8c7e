"""Schedules: which layers train at time t. Pure Python, no torch.

A schedule is data (a dict, a JSON string) parsed into a spec; a spec binds to the model's layer ids.
"""

from .adaptive import AdaptiveSchedule
from .base import (
    CallableSpec,
    LayerId,
    LayerStack,
    Schedule,
    ScheduleSpec,
    StackIndex,
    check_layer_list,
    check_time,
    check_unit,
    parse_schedule,
    short_layer_list,
    stable_int,
)
from .describe import describe_schedule, format_layers, preview_span

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
    "parse_schedule",
    "preview_span",
    "short_layer_list",
    "stable_int",
]
