"""The adaptive driver: measures an adaptive schedule's signal and makes its decisions on time."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

from .. import _compat
from ..schedules import AdaptiveSchedule, LayerId
from .optim import inner
from .signals import SignalMeter

logger = logging.getLogger(__name__)


class AdaptiveDriver(object):
    """Present only for an adaptive schedule (:meth:`of` returns ``None`` for the others)."""

    def __init__(self, tuner: Any, adapter_name: str, meter: SignalMeter, optimizer: Any, calibration_data: Any,
                 on_decision: Optional[Callable[[Dict[str, Any]], None]]) -> None:
        self.tuner, self.adapter_name, self.meter = tuner, adapter_name, meter
        self.calibration_data, self.on_decision = calibration_data, on_decision
        self.last_decision: Optional[Dict[str, Any]] = None
        self.measured = False  # the meter took the current optimizer step already
        self._hook = None
        if optimizer is not None and meter.signal == "update":
            # The update signal measures from the weights the step starts from (an optimizer pre-step hook):
            # exact also when the weights were loaded after the scheduler was built.
            self._hook = _compat.register_step_pre_hook(inner(optimizer), lambda *args: meter.start_step())

    @classmethod
    def of(cls, tuner: Any, adapter_name: str, params: Dict[LayerId, List[Any]], engine: Any, optimizer: Any,
           calibration_data: Any, on_decision: Any) -> Optional["AdaptiveDriver"]:
        schedule = tuner.scheduled_adapter(adapter_name).schedule
        if not isinstance(schedule, AdaptiveSchedule):
            return None
        spec = schedule.spec
        named = dict(tuner.model.named_modules())
        modules: Dict[LayerId, List[Any]] = {}
        for name, layer in tuner.scheduled_modules(adapter_name).items():
            modules.setdefault(layer, []).append(named[name])
        meter = SignalMeter(
            spec.signal, schedule.pool, params, modules, ema=spec.ema, sharded=not engine.whole_parameters,
            calibration_batches=spec.calibration_batches, outlier_m=spec.outlier_m,
        )
        if schedule.state is not None and schedule.state.get("signal") == spec.signal:
            meter.load_state_dict(schedule.state)  # a reloaded adapter's: its measurements go on
        return cls(tuner, adapter_name, meter, optimizer, calibration_data, on_decision)

    @property
    def schedule(self) -> Any:
        return self.tuner.scheduled_adapter(self.adapter_name).schedule

    def measure(self, current: Optional[List[LayerId]]) -> None:
        """Fold the optimizer step just done into the signal (once per step)."""
        if not self.measured:
            self.meter.end_step(current or [])
            self.measured = True

    def decide(self, t: int, unit: str) -> None:
        """Make the decision schedule time ``t`` is due for, if any (every rank: the same one)."""
        schedule, meter = self.schedule, self.meter
        due = schedule.due(t)
        if due is None:
            return
        if schedule.spec.needs_calibration and not meter.calibrated:
            meter.calibrate(self.tuner.model, self.calibration_data)
        measured = meter.interval_measured() if schedule.spec.compares_intervals else meter.measured()
        decision = schedule.decide(due, measured)
        meter.start_interval()
        self.last_decision = decision
        self.tuner.scheduled_adapter(self.adapter_name).save_schedule_state()
        logger.info(
            "layer schedule: %s %d: adaptive decision %s (scores %s)", unit, due,
            decision["layers"], {k: round(v, 6) for k, v in decision["scores"].items()},
        )
        if self.on_decision is not None:
            self.on_decision(dict(decision))

    def before_decision(self, t: int) -> Optional[Dict[str, Any]]:
        """The state as it is before the decision due at ``t`` (``None``: none is due)."""
        if self.schedule.due(t) is None:
            return None
        return {"decisions": self.schedule.decisions_json(), "meter": self.meter.state_dict()}

    def state(self) -> Dict[str, Any]:
        """The decision log and signal state; written into the adapter's config too."""
        schedule = self.schedule
        schedule.state = self.meter.state_dict()
        self.tuner.scheduled_adapter(self.adapter_name).save_schedule_state()
        return {"decisions": schedule.decisions_json(), "meter": schedule.state}

    def load(self, adaptive: Dict[str, Any]) -> None:
        self.schedule.load_decisions(adaptive.get("decisions") or [])
        if adaptive.get("meter") is not None:
            self.meter.load_state_dict(adaptive["meter"])
        self.tuner.scheduled_adapter(self.adapter_name).save_schedule_state()

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def add_metrics(self, out: Dict[str, float]) -> None:
        decision = self.last_decision
        if decision is None:
            return
        out["layer_schedule/decision_time"] = float(decision["t"])
        chosen = set(decision["layers"])
        for layer, score in decision["scores"].items():
            out[f"layer_schedule/score/{layer}"] = float(score)
        for layer in self.schedule.pool:
            out[f"layer_schedule/chosen/{layer}"] = 1.0 if layer in chosen else 0.0


def refuse_adaptive_state() -> None:
    raise ValueError(
        "the saved layer-scheduler state holds an adaptive schedule's decisions, but this model's "
        "layer_schedule is not adaptive: resume with the layer_schedule the run was saved with."
    )
