"""Switching: which layers train, when each switch happened, and undoing a switch no step followed."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

from ..schedules import LayerId, format_layers
from .clock import Clock

logger = logging.getLogger(__name__)


class Switcher(object):
    """Applies the schedule's active sets through the tuner and keeps the switch log.

    ``current``: the active layers; ``time``: the schedule time they belong to; ``switch_steps``: schedule
    time -> the optimizer step count when its set was applied.
    """

    def __init__(self, tuner: Any, adapter_name: str, clock: Clock, params: Dict[LayerId, List[Any]],
                 on_switch: Optional[Callable[[Dict[str, Any]], None]]) -> None:
        self.tuner, self.adapter_name, self.clock, self.params = tuner, adapter_name, clock, params
        self.on_switch = on_switch
        self.current: Optional[List[LayerId]] = None
        self.time: Optional[int] = None
        self.switch_steps: Dict[int, int] = {}
        self.undo: Optional[Dict[str, Any]] = None  # the schedule as the last optimizer step left it

    def apply(self, t: int) -> List[LayerId]:
        """Activate schedule time ``t``'s layers; refuse a time that would train nothing."""
        active = self.tuner.activate_layers(t, self.adapter_name)
        self.time, self.current = t, active
        if not active:
            self.refuse_idle(t)
        return active

    def stay(self, t: int) -> None:
        """Schedule time ``t`` keeps the active set."""
        self.time = t
        self.tuner.scheduled_adapter(self.adapter_name).set_schedule_position(t)

    def logged(self, t: int, active: List[LayerId], record: bool = True) -> None:
        """Log the switch to ``active`` at schedule time ``t`` (``record``: into ``switch_steps`` too)."""
        steps = self.clock.steps
        trainable = self.trainable_count(active)
        if record:
            self.switch_steps.setdefault(t, steps)
        logger.info("layer schedule: %s %d: active layers %s, %d trainable parameters", self.clock.unit, t,
                    active or "[]", trainable)
        if self.on_switch is not None:
            self.on_switch({
                "active_layers": format_layers(active, sep=",", ranges=0),
                "trainable_params": trainable,
                "schedule_time": t,
                "schedule_offset": self.clock.offset,
                "step": steps,
            })

    def keep_undo(self, t: int, adaptive: Optional[Dict[str, Any]]) -> None:
        """Before a switch to schedule time ``t``: keep what ``finish()`` puts back if no optimizer step follows
        (only the first switch since the last step: that is the state the step left)."""
        steps, undo = self.clock.steps, self.undo
        if undo is not None and undo["steps"] == steps:
            if t not in self.switch_steps:
                undo["added"].append(t)
            if undo["adaptive"] is None:
                undo["adaptive"] = adaptive
            return
        plan = self.tuner.scheduled_adapter(self.adapter_name)
        position = getattr(self.tuner.peft_config[self.adapter_name], "schedule_position", None)
        if self.clock.unit == "step":
            position = self.clock.offset + steps  # (step() sets it after the switch)
        self.undo = {
            "steps": steps, "time": self.time, "ever": list(plan.ever_active_layers), "adaptive": adaptive,
            "position": position, "added": [] if t in self.switch_steps else [t],
        }

    def pending_undo(self) -> Optional[Dict[str, Any]]:
        """The switch made since the last optimizer step, if any (taken: it is undone once)."""
        undo, self.undo = self.undo, None
        if undo is None or undo["steps"] != self.clock.steps or undo["time"] is None:
            return None
        return undo

    def trained(self, stepped: bool = False) -> Dict[str, Any]:
        """The schedule time and ever-active layers the last optimizer step trained with (a switch made after
        it does not count; ``stepped``: a step was taken since the last switch, not yet counted)."""
        undo = self.undo
        if not stepped and undo is not None and undo["steps"] == self.clock.steps and undo["time"] is not None:
            return {"time": undo["time"], "ever_active_layers": list(undo["ever"])}
        plan = self.tuner.scheduled_adapter(self.adapter_name)
        return {"time": self.time, "ever_active_layers": list(plan.ever_active_layers)}

    def revert(self, undo: Dict[str, Any]) -> List[LayerId]:
        """Put back the schedule as :meth:`pending_undo` found it; returns the active layers."""
        for t in undo["added"]:
            self.switch_steps.pop(t, None)
        return self.restore(undo["time"], undo["ever"], undo["position"])

    def restore(self, applied: int, ever: Any, position: Optional[int]) -> List[LayerId]:
        """Schedule time ``applied``'s set (``ever``: the ever-active layers as saved), at ``position``."""
        active = self.tuner.scheduled_adapter(self.adapter_name).restore_layer_state(applied, ever)
        if position is not None:
            self.tuner.scheduled_adapter(self.adapter_name).set_schedule_position(position)
        self.time, self.current = applied, active
        return active

    def others_train(self) -> bool:
        """Whether parameters other than the scheduled adapter's LoRA ones train (``modules_to_save``, ...)."""
        lora = {id(p) for ps in self.params.values() for p in ps}
        return any(p.requires_grad and id(p) not in lora for p in self.tuner.model.parameters())

    def refuse_idle_run(self, schedule: Any, t: int) -> None:
        """Refuse, before the first step, a run in which some epoch/step would train nothing at all."""
        if schedule is None or not schedule.runnable or self.others_train():
            return
        offset = self.clock.offset
        idle = schedule.first_idle(offset + t, offset + self.clock.last_time(t))
        if idle is not None:
            self.refuse_idle(idle)

    def refuse_idle(self, t: int) -> None:
        if self.others_train():
            return
        unit = self.clock.unit
        raise ValueError(
            f"layer_schedule activates no layer at {self.clock.when(t)}, and the model has no other trainable "
            f"parameters (no modules_to_save), so its optimizer steps would have nothing to train (autograd "
            f"fails with 'element 0 of tensors does not require grad'). Give every {unit} of the run at least "
            f"one layer (no empty milestone phase, gradual 'k' >= 1), or add modules_to_save (e.g. the "
            f"classifier head) that train throughout."
        )

    def trainable_count(self, active: List[LayerId]) -> int:
        """Parameters that train while ``active`` are the active layers: their LoRA parameters, and every
        other parameter that requires grad (``modules_to_save``, ...)."""
        lora = {id(p) for params in self.params.values() for p in params}
        count = sum(
            int(getattr(p, "ds_numel", p.numel())) for p in self.tuner.model.parameters()
            if p.requires_grad and id(p) not in lora
        )
        layers = (p for layer in active for p in self.params.get(layer, []))
        return count + sum(int(getattr(p, "ds_numel", p.numel())) for p in layers)

    def join_step(self, schedule: Any, layer: LayerId) -> int:
        """The optimizer step count at which ``layer`` joined its current active run (counted back from the
        schedule for a join before this run began)."""
        start = schedule.run_start(layer, self.time if self.time is not None else 0) or 0
        if start in self.switch_steps:
            return self.switch_steps[start]
        return self.clock.steps_at(start)


class SwitchView(object):
    """The switcher's state as attributes of the scheduler that owns ``switcher``."""

    switcher: Switcher

    @property
    def current(self) -> Optional[List[LayerId]]:
        return self.switcher.current

    @property
    def time(self) -> Optional[int]:
        """The schedule time whose active set is applied."""
        return self.switcher.time

    @property
    def switch_steps(self) -> Dict[int, int]:
        return self.switcher.switch_steps

    @property
    def active_layers(self) -> List[LayerId]:
        return list(self.switcher.current or [])

    def trainable_count(self, active: List[LayerId]) -> int:
        """Parameters that train while ``active`` are the active layers (LoRA and ``modules_to_save``, ...)."""
        return self.switcher.trainable_count(active)
