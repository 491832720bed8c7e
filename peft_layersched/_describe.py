"""Presentation of layers and schedules for people (CLI, demo, logs); no torch.

The schedule core (:mod:`peft_layersched.schedule`) computes; this module words it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from .schedule import (
    CallableSpec,
    CyclicSchedule,
    CyclicSpec,
    GradualSchedule,
    GradualSpec,
    LayerId,
    MilestoneSchedule,
    MilestoneSpec,
    SampledSchedule,
    SampledSpec,
    Schedule,
    ScheduleSpec,
    UnsavedCallableSpec,
)


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


def _candidates(layers: Optional[List[LayerId]]) -> str:
    return "candidates: every layer" if layers is None else "candidates: {}".format(layers)


def describe_schedule(schedule: Union[ScheduleSpec, Schedule], unit: str = "epoch") -> str:
    """One line on what ``schedule`` (a spec or a bound schedule) does, time in ``unit``s."""
    spec = schedule.spec if isinstance(schedule, Schedule) else schedule
    if isinstance(schedule, (MilestoneSpec, MilestoneSchedule)):  # bound: the canonical ids
        return "milestones: " + "; ".join(
            "from {} {}: {}".format(unit, start, list(layers) or "none") for start, layers in schedule.phases
        )
    if isinstance(spec, GradualSpec):
        limit = "" if spec.limit is None else ", up to {}".format(spec.limit)
        return "gradual: {} layer(s) from the {}, +{} every {} {}(s){} ({})".format(
            spec.k, spec.side, spec.n, spec.every, unit, limit, _candidates(spec.layers)
        )
    if isinstance(spec, CyclicSpec):
        seed = " (seed {})".format(spec.seed) if spec.order == "random" else ""
        return "cyclic: blocks of {} layer(s), each for {} {}(s), {} order{} ({})".format(
            spec.block, spec.every, unit, spec.order, seed, _candidates(spec.layers)
        )
    if isinstance(spec, SampledSpec):
        always = ", always {}".format(spec.always) if spec.always else ""
        return "sampled: {} layer(s) drawn every {} {}(s), seed {}{} ({})".format(
            spec.k, spec.every, unit, spec.seed, always, _candidates(spec.layers)
        )
    if isinstance(spec, UnsavedCallableSpec):
        return "callable (not saved): {}".format(spec.name)
    if isinstance(spec, CallableSpec):
        return "callable: {}({})".format(spec.name, unit)
    return spec.kind


def preview_span(schedule: Schedule) -> int:
    """How many epochs/steps show the bound ``schedule``'s whole pattern (the CLI's default horizon)."""
    if isinstance(schedule, MilestoneSchedule):
        last = schedule.boundaries()[-1]
        return max(3, last + max(2, last // 4))
    if isinstance(schedule, GradualSchedule):
        cap = len(schedule.all_layers())
        full = -(-(cap - schedule.k) // schedule.n) if schedule.n else 0
        return (max(full, 0) + 2) * schedule.every
    if isinstance(schedule, CyclicSchedule):
        return 2 * schedule.block_count * schedule.every
    if isinstance(schedule, SampledSchedule):
        return 8 * schedule.every
    return 10
