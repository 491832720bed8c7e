"""Wording of layers and schedules for people (CLI, demo, logs). No torch.

Each kind words itself (``ScheduleSpec.describe``) and knows its preview span; this module asks it.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Union

from .base import Schedule, ScheduleSpec


def format_layers(layers: Sequence[Any], sep: str = ", ", ranges: int = 2, empty: str = "none") -> str:
    """A layer list as text: consecutive ids of one stack, at least ``ranges`` of them, as ``first-last``.

    ``[1, 2, 3, 7]`` -> ``"1-3, 7"``; ``["decoder.0", "decoder.1"]`` -> ``"decoder.0-1"``;
    ``sep=","``, ``ranges=0`` (never a range) -> ``"1,2,3,7"``; ``[]`` -> ``empty``.  The ids are
    written in the order given.
    """
    if not layers:
        return empty
    runs: List[List[Any]] = []  # [stack, first, last]
    for layer in layers:
        stack, _, index = str(layer).rpartition(".")
        number = int(index)
        if runs and runs[-1][0] == stack and runs[-1][2] == number - 1:
            runs[-1][2] = number
        else:
            runs.append([stack, number, number])
    parts: List[str] = []
    for stack, first, last in runs:
        prefix = stack + "." if stack else ""
        if ranges and last - first + 1 >= max(ranges, 2):
            parts.append(f"{prefix}{first}-{last}")
        else:
            parts.extend(f"{prefix}{number}" for number in range(first, last + 1))
    return sep.join(parts)


def describe_schedule(schedule: Union[ScheduleSpec, Schedule], unit: str = "epoch") -> str:
    """One line on what ``schedule`` (a spec or a bound schedule) does, time in ``unit``s."""
    # A bound schedule words its spec as bound: milestones with canonical ids, adaptive with its log.
    spec = schedule.as_spec() if isinstance(schedule, Schedule) else schedule
    return spec.describe(unit)


def preview_span(schedule: Schedule) -> int:
    """How many epochs/steps show the bound ``schedule``'s whole pattern (the CLI's default horizon)."""
    return schedule.preview_span()
