"""The numbers experiment trackers plot for each optimizer step of a scheduled run."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..schedules import LayerId
from .optim import state_bytes as optimizer_state_bytes


class StepRecord(object):
    """What the optimizer step just done trained: its layers, the LRs it used, and the optimizer-state
    bytes it left (``None`` until a switch is about to change them)."""

    def __init__(self) -> None:
        self.last: Optional[Tuple[List[LayerId], Dict[LayerId, float], Optional[int]]] = None

    def step_done(self, layers: List[LayerId], lrs: Dict[LayerId, float]) -> None:
        self.last = (list(layers), dict(lrs), None)

    def before_switch(self, optimizer: Any) -> None:
        """Keep the state bytes the step left, before a switch's state policy changes them."""
        if self.last is not None and self.last[2] is None and optimizer is not None:
            self.last = (self.last[0], self.last[1], optimizer_state_bytes(optimizer))

    def layers(self, current: List[LayerId]) -> List[LayerId]:
        return list(self.last[0]) if self.last is not None else list(current)


def schedule_metrics(sched: Any) -> Dict[str, float]:
    """:meth:`LayerScheduler.metrics` of ``sched``."""
    if sched.current is None:
        return {}
    record = sched.record.last
    if record is not None:
        current, lrs, state_bytes = record
    else:
        current, lrs, state_bytes = sched.active_layers, dict(sched.factors.next_lrs), None
    plan = sched.tuner.scheduled_adapter(sched.adapter_name)
    order = plan.index.all_layers()
    positions = sorted(order.index(layer) for layer in current if layer in order)
    out: Dict[str, float] = {
        "layer_schedule/active_layers": float(len(current)),
        "layer_schedule/lowest_active": float(positions[0] if positions else -1),
        "layer_schedule/highest_active": float(positions[-1] if positions else -1),
        "layer_schedule/trainable_params": float(sched.trainable_count(current)),
    }
    if sched.optimizer is not None:
        if state_bytes is None:
            state_bytes = optimizer_state_bytes(sched.optimizer)
        out["layer_schedule/optimizer_state_bytes"] = float(state_bytes)
    active = set(current)
    for layer in plan.preallocated_layers:
        out[f"layer_schedule/active/{layer}"] = 1.0 if layer in active else 0.0
        if layer in lrs:
            out[f"layer_schedule/lr/{layer}"] = lrs[layer]
    if sched.adaptive is not None:
        sched.adaptive.add_metrics(out)
    if sched.prefix is not None:
        out.update(sched.prefix.metrics())
    return out
