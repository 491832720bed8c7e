"""The milestone kind, ``{start: layers}``: the dict form without a ``type`` key. No torch."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .base import Schedule, ScheduleSpec, kind_names, register_kind
from .ids import Canonicalizer, LayerId, check_layer_list


def _check_start(raw: Any) -> int:
    if isinstance(raw, bool):
        raise TypeError(f"layer_schedule: start {raw!r} is a bool; starts are non-negative ints (epoch or step).")
    if isinstance(raw, int):
        start = raw
    elif isinstance(raw, str) and re.match(r"^\s*-?\d+\s*$", raw):
        # JSON turns int keys into strings; accept them back.
        start = int(raw)
    elif isinstance(raw, float) and raw.is_integer():
        start = int(raw)
    else:
        raise TypeError(
            f"layer_schedule: start {raw!r} ({type(raw).__name__}) is not an int; keys are the epoch "
            f"(or optimizer step) at which a phase begins, e.g. {{0: [11], 3: [1, 11]}}."
        )
    if start < 0:
        raise ValueError(
            f"layer_schedule: start {start} is negative; phases start at epoch/step 0 or later, "
            f"e.g. {{0: [11], 3: [1, 11]}}."
        )
    return start


Phases = List[Tuple[int, List[LayerId]]]


def _phase_at(phases: Phases, t: int) -> List[LayerId]:
    active: List[LayerId] = []
    for start, layers in phases:
        if start > t:
            break
        active = layers
    return list(active)


class MilestoneSchedule(Schedule):
    """Milestones on a model: the phases of a :class:`MilestoneSpec` with canonical ids."""

    def __init__(
        self, spec: "MilestoneSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.phases: Phases = [
            (start, self._sorted(canonical(layer, f"layer_schedule[{start}]") for layer in raw))
            for start, raw in spec.phases
        ]

    def active_at(self, t: int) -> List[LayerId]:
        return _phase_at(self.phases, t)

    def all_layers(self) -> List[LayerId]:
        return self._sorted(layer for _, layers in self.phases for layer in layers)

    def initial_layers(self) -> List[LayerId]:
        return list(self.phases[0][1])

    def layers_until(self, t: int) -> List[LayerId]:
        return self._sorted(layer for start, layers in self.phases if start <= t for layer in layers)

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        joined: Optional[int] = None
        for start, layers in self.phases:
            if start > t:
                break
            if layer in layers:
                joined = start if joined is None else joined
            else:
                joined = None
        return joined

    def boundaries(self) -> List[int]:
        return [start for start, _ in self.phases]

    def first_idle(self, start: int, end: int, budget: int = 100000) -> Optional[int]:
        for t in [start] + [b for b in self.boundaries() if start < b <= end]:
            if not self.active_at(t):
                return t
        return None

    def as_spec(self) -> "MilestoneSpec":
        return MilestoneSpec(dict(self.phases))

    def preview_span(self) -> int:
        last = self.boundaries()[-1]
        return max(3, last + max(2, last // 4))


@register_kind
class MilestoneSpec(ScheduleSpec):
    """``{start: layers}``: from ``start`` on exactly ``layers`` train, until the next start.

    Before the first start only ``modules_to_save`` train. The spec answers ``active_at`` on raw ids.
    """

    kind = "milestones"
    runtime = MilestoneSchedule
    untyped = True
    draws_candidates = False

    def __init__(self, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise TypeError(
                f"layer_schedule must be a dict {{start: layers}}, a dict with a 'type' key "
                f"({', '.join(kind_names())}) or a callable t -> layers, got {type(spec).__name__} {spec!r}; "
                f"e.g. {{0: [11], 3: [1, 11]}} or {{'type': 'gradual', 'k': 1, 'n': 1, 'every': 1}}."
            )
        if not spec:
            raise ValueError(
                "layer_schedule is empty; give at least one phase, e.g. {0: [11]}, or pass "
                "layer_schedule=None to train every targeted layer (plain LoRA)."
            )
        phases: Dict[int, List[LayerId]] = {}
        for raw_start, layers in spec.items():
            start = _check_start(raw_start)
            if start in phases:
                raise ValueError(f"layer_schedule: start {start} appears twice ({raw_start!r}).")
            phases[start] = check_layer_list(layers, f"layer_schedule[{start}]")
        self.phases: Phases = sorted(phases.items())

    def active_at(self, t: int) -> List[LayerId]:
        return _phase_at(self.phases, t)

    def all_layers(self) -> List[LayerId]:
        """Every layer of every phase, raw, in the order first written."""
        seen: List[LayerId] = []
        for _, layers in self.phases:
            seen.extend(layer for layer in layers if layer not in seen)
        return seen

    def boundaries(self) -> List[int]:
        return [start for start, _ in self.phases]

    def named_layers(self) -> List[LayerId]:
        return self.all_layers()

    def to_json(self) -> Dict[int, List[LayerId]]:
        return {start: list(layers) for start, layers in self.phases}

    def describe(self, unit: str) -> str:
        return "milestones: " + "; ".join(
            "from {} {}: {}".format(unit, start, list(layers) or "none") for start, layers in self.phases
        )
