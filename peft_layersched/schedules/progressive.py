"""The progressive kind (CoTo-like): each layer trains with a chance rising to 1. No torch.

Draws are seeded by ``(seed, period, layer)``: the same on every rank and on resume.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .base import Schedule, ScheduleSpec, SpecFields, bind_candidates, register_kind
from .ids import Canonicalizer, LayerId, stable_int

_TWO_64 = float(2 ** 64)


class ProgressiveSchedule(Schedule):
    """The progressive kind on a model: ``_pool`` are the candidates in layer order."""

    def __init__(
        self, spec: "ProgressiveSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.start, self.full_at, self.steps = spec.start, spec.full_at, spec.steps
        self.every, self.seed = spec.every, spec.seed
        self.granule = spec.every
        where = "layer_schedule (type 'progressive') 'layers'"
        self._pool = bind_candidates(spec.layers, where, layers, canonical, default)
        if not self._pool:
            raise ValueError("layer_schedule (type 'progressive'): there are no candidate layers.")

    def probability(self, t: int) -> float:
        """The chance that a candidate layer trains at ``t`` (1 from ``full_at`` of the run on)."""
        period_start = (t // self.every) * self.every
        if self.start >= 1.0 or period_start == 0:
            return self.start
        if self.steps is None:
            raise ValueError(
                "layer_schedule (type 'progressive') needs the run's length to place 'full_at': drive it with "
                "LayerScheduleCallback (it reads the Trainer's max_steps) or LayerScheduler(total_steps=... / "
                "total_epochs=...), or give 'steps' (the run's length in schedule units) in the schedule."
            )
        ramp = period_start / (self.full_at * self.steps)
        return min(1.0, self.start + (1.0 - self.start) * ramp)

    def active_at(self, t: int) -> List[LayerId]:
        p = self.probability(t)
        if p >= 1.0:
            return list(self._pool)
        period = t // self.every
        kept = [layer for i, layer in enumerate(self._pool)
                if stable_int("progressive", self.seed, period, i) / _TWO_64 < p]
        if not kept:  # at least one layer every step
            kept = [self._pool[stable_int("progressive-one", self.seed, period) % len(self._pool)]]
        return kept

    def all_layers(self) -> List[LayerId]:
        return list(self._pool)

    def _always_active(self, layer: LayerId) -> bool:
        return self.start >= 1.0

    def preview_span(self) -> int:
        """Epochs/steps that show the whole pattern: the run, or 100 periods without a length."""
        return self.steps if self.steps is not None else 100 * self.every


@register_kind
class ProgressiveSpec(ScheduleSpec):
    """Each layer trains with a chance rising from ``start`` at time 0 to 1 at ``full_at`` of the run.

    At least one layer trains at every period. ``{"type": "progressive", "start": 0.1, "full_at": 0.75}``.
    The run's length comes from the driver and is saved as ``steps``.
    """

    kind = "progressive"
    runtime = ProgressiveSchedule
    FIELDS = {
        "start": "chance that a layer trains at time 0, default 0.1",
        "full_at": "fraction of the run from which every layer trains, default 0.75",
        "every": "epochs/steps between draws, default 1",
        "seed": "seed of the draws, default 0",
        "steps": "the run's length in epochs/steps, default: from the driver",
        "layers": "candidate layers, default every layer",
    }

    def __init__(self, spec: Dict[Any, Any]) -> None:
        check = SpecFields(spec, self.kind, self.FIELDS)
        self.start = check.fraction("start", 0.1, self.FIELDS["start"], zero_ok=True)
        self.full_at = check.fraction("full_at", 0.75, self.FIELDS["full_at"], zero_ok=False)
        self.steps: Optional[int] = check.integer("steps", None, 1, self.FIELDS["steps"])
        self.every = check.integer("every", 1, 1, self.FIELDS["every"])
        self.seed = check.integer("seed", 0, None, self.FIELDS["seed"])
        self.layers = check.layers("layers", allow_empty=False)

    @property
    def needs_run_length(self) -> bool:
        return self.steps is None and self.start < 1.0

    def with_run_length(self, length: int) -> "ProgressiveSpec":
        spec = self.to_json()
        spec["steps"] = int(length)
        return ProgressiveSpec(spec)

    def describe(self, unit: str) -> str:
        length = "the run" if self.steps is None else "{} {}s".format(self.steps, unit)
        candidates = "every layer" if self.layers is None else str(self.layers)
        return ("progressive: each layer trains with a chance rising from {} to 1 at {:g} % of {}, drawn every "
                "{} {}(s), seed {} (candidates: {})".format(
                    self.start, 100 * self.full_at, length, self.every, unit, self.seed, candidates))
