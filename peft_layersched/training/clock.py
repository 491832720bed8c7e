"""Where a run stands: its optimizer steps and epochs, and how they map to schedule time."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)


class Clock(object):
    """This run's step and epoch counts, the run's length if known, and ``offset``: the schedule time of
    this run's ``t = 0``."""

    def __init__(self, unit: str, total_steps: Optional[int], total_epochs: Optional[int],
                 steps_per_epoch: Optional[int]) -> None:
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit={unit!r} is not supported; use 'epoch' or 'step'.")
        self.unit = unit
        self.total_steps, self.total_epochs, self.steps_per_epoch = total_steps, total_epochs, steps_per_epoch
        self.offset, self.steps, self.epoch = 0, 0, 0

    @property
    def run_time(self) -> int:
        """This run's epoch (epoch unit) or optimizer step count (step unit)."""
        return self.epoch if self.unit == "epoch" else self.steps

    @property
    def length(self) -> Optional[int]:
        """The run's length in its unit (``None``: not told)."""
        return self.total_steps if self.unit == "step" else self.total_epochs

    def last_time(self, t: int) -> int:
        """The run's last epoch/step (at least ``t``; ``t`` when the length is unknown)."""
        length = self.length
        return t if length is None else max(length - 1, t)

    def step_switches(self) -> bool:
        """Whether the step just counted is followed by a switch (step unit, not after the run's end)."""
        return self.unit == "step" and (self.total_steps is None or self.steps < self.total_steps)

    def epoch_switches(self) -> bool:
        """Whether the epoch just counted is followed by a switch (epoch unit, not after the run's end)."""
        return self.unit == "epoch" and (self.total_epochs is None or self.epoch < self.total_epochs)

    def steps_at(self, schedule_time: int) -> int:
        """The optimizer step count at which schedule time ``schedule_time`` began, counted back."""
        joined = schedule_time - self.offset
        return joined * (self.steps_per_epoch or 1) if self.unit == "epoch" else joined

    def when(self, t: int) -> str:
        """Schedule time ``t`` in words, for messages."""
        unit = self.unit
        return f"{unit} {t}" if not self.offset else f"schedule {unit} {t} (this run's {unit} {t - self.offset})"

    def start_at(self, position: Optional[int], schedule_start: str) -> None:
        """Set ``offset`` for a new run over an adapter whose schedule stood at ``position``."""
        unit, self.offset = self.unit, 0
        if position is None:
            return
        if schedule_start == "continue":
            self.offset = position + 1 if unit == "epoch" else position
            logger.warning(
                "layer schedule: schedule_start='continue': the adapter's schedule stood at %s %d; this run's "
                "%s 0 is schedule %s %d.", unit, position, unit, unit, self.offset,
            )
        elif position > 0 and not self.steps:
            logger.warning(
                "layer schedule: the adapter's schedule had reached %s %d; this run starts it again at %s 0 "
                "(schedule_start='restart'). Pass schedule_start='continue' (to LayerScheduleCallback or "
                "LayerScheduler) to go on from there.", unit, position, unit,
            )

    def complete_run_length(self, schedule: Any, tuner: Any, adapter_name: str) -> None:
        """Give a schedule kind that needs the run's length (progressive) this run's length."""
        if schedule is None or not schedule.spec.needs_run_length:
            return
        if self.length is None:
            which = "total_steps" if self.unit == "step" else "total_epochs"
            raise ValueError(
                f"layer_schedule (type {schedule.kind!r}) needs the run's length, and this run's is unknown: pass "
                f"LayerScheduler({which}=...), give the Trainer max_steps (an IterableDataset has no length), or "
                f"put 'steps' (the run's length in {self.unit}s) in the schedule."
            )
        tuner.set_layer_schedule(schedule.spec.with_run_length(self.offset + self.length).to_json(), adapter_name)

    def state(self) -> Dict[str, Any]:
        return {"unit": self.unit, "offset": self.offset, "steps": self.steps, "epoch": self.epoch}

    def read(self, state: Dict[str, Any]) -> None:
        if state.get("unit", self.unit) != self.unit:
            raise ValueError(
                f"the saved layer-scheduler state counts {state['unit']}s, but this scheduler's unit is "
                f"{self.unit!r}: resume with the schedule_unit the run was saved with."
            )
        self.offset = int(state["offset"])
        self.steps, self.epoch = int(state["steps"]), int(state["epoch"])


class ClockView(object):
    """The clock's counters as attributes of the scheduler that owns ``clock``."""

    clock: Clock

    @property
    def unit(self) -> str:
        return self.clock.unit

    @property
    def offset(self) -> int:
        return self.clock.offset

    @property
    def steps(self) -> int:
        return self.clock.steps

    @property
    def epoch(self) -> int:
        return self.clock.epoch

    @property
    def total_steps(self) -> Optional[int]:
        return self.clock.total_steps

    @property
    def total_epochs(self) -> Optional[int]:
        return self.clock.total_epochs

    @property
    def steps_per_epoch(self) -> Optional[int]:
        return self.clock.steps_per_epoch

    @property
    def run_time(self) -> int:
        """This run's epoch (epoch unit) or optimizer step count (step unit)."""
        return self.clock.run_time
