"""Presentation of layers and schedules for people (CLI, demo, logs); no torch.

The schedule core (:mod:`peft_layersched.schedule`) computes; this module words it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from .adaptive import AdaptiveSchedule, AdaptiveSpec, AutofreezeSpec
from .base import (
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
    if hasattr(spec, "describe"):  # kinds that word themselves
        return spec.describe(unit)
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
    if isinstance(spec, (AdaptiveSpec, AutofreezeSpec)):
        return _describe_adaptive(schedule, spec, unit)
    if isinstance(spec, UnsavedCallableSpec):
        return "callable (not saved): {}".format(spec.name)
    if isinstance(spec, CallableSpec):
        return "callable: {}({})".format(spec.name, unit)
    return spec.kind


def _describe_adaptive(schedule: Any, spec: Any, unit: str) -> str:
    always = ", always {}".format(spec.always) if spec.always else ""
    if isinstance(spec, AdaptiveSpec):
        head = "adaptive: {} layer(s) by {} ({}, explore {}), every {} {}(s){}".format(
            spec.k, spec.signal, spec.policy, spec.explore, spec.every, unit, always)
    else:
        head = "autofreeze: layers leave bottom-up when their {} changes less than the {}th percentile, " \
               "checked every {} {}(s){}".format(spec.signal, spec.percentile, spec.every, unit, always)
    decisions = schedule.decisions if isinstance(schedule, AdaptiveSchedule) else spec.decisions
    if not decisions:
        prior = "; before training: what the prior scores alone choose" if isinstance(spec, AdaptiveSpec) else ""
        return head + " ({}; decided during training{})".format(_candidates(spec.layers), prior)
    last = decisions[-1]
    return head + " ({} decision(s) made, the last at {} {}: {})".format(
        len(decisions), unit, last["t"], list(last["layers"]))


def preview_span(schedule: Schedule) -> int:
    """How many epochs/steps show the bound ``schedule``'s whole pattern (the CLI's default horizon)."""
    if hasattr(schedule, "preview_span"):  # kinds that know their own horizon
        return schedule.preview_span()
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
    if isinstance(schedule, AdaptiveSchedule):
        last = schedule.decisions[-1]["t"] if schedule.decisions else 0
        return last + 2 * schedule.every
    return 10
