"""The autofreeze kind (AutoFreeze): converged layers leave bottom-up, for good. No torch.

Every ``every`` epochs/steps each active layer's signal is compared with the previous interval's.
Layers whose rate of change is under the ``percentile``-th percentile leave, bottom first.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .adaptive import (
    COMMON_FIELDS,
    INTERVAL_SIGNALS,
    AdaptiveSchedule,
    AdaptiveSpecBase,
    percentile,
)
from .base import SpecFields, register_kind
from .decision_log import Decision, check_decisions
from .ids import Canonicalizer, LayerId, check_time, short_layer_list


class AutofreezeSchedule(AdaptiveSchedule):
    """``{"type": "autofreeze"}`` on a model: candidates in model order, bottom first."""

    def __init__(self, spec: "AutofreezeSpec", layers: Sequence[LayerId], canonical: Canonicalizer,
                 default: Sequence[LayerId]) -> None:
        super().__init__(spec, layers, canonical, default)
        self.pct, self.min_active = spec.percentile, spec.min_active
        if self.min_active > len(self.pool):
            raise ValueError(
                f"layer_schedule (type 'autofreeze'): 'min_active' is {self.min_active} but there are only "
                f"{len(self.pool)} candidate layers ({short_layer_list(self.pool)}); lower 'min_active'."
            )
        for before, after in zip(self.decisions, self.decisions[1:]):
            back = [layer for layer in after["layers"] if layer not in set(before["layers"])]
            if back:
                raise ValueError(
                    f"layer_schedule (type 'autofreeze') 'decisions': layer(s) {back} come back at t={after['t']} "
                    f"after being frozen; autofreeze only freezes."
                )

    def _decides_at(self, t: int) -> bool:
        return t > 0

    def _before_decisions(self, t: int) -> List[LayerId]:
        return list(self.pool)  # every candidate trains until the first decision

    def decide(self, t: int, measured: Dict[LayerId, Optional[float]]) -> Decision:
        """Compare each active layer's signal over the interval ending at ``t`` (``measured``) with the
        previous interval's (the last decision's ``scores``) and freeze the converged bottom layers."""
        t = check_time(t, "decide(t): t")
        previous = self._last(t - 1) if t > 0 else None
        active = self._chosen(t - 1 if t > 0 else 0)
        current = {layer: measured.get(layer) for layer in active}
        scores = {layer: float(v) for layer, v in current.items() if v is not None}
        decision: Decision = {"t": t, "layers": list(active), "scores": scores}
        prior = previous.get("scores") if previous is not None else None
        if prior:
            rates: Dict[LayerId, float] = {}
            for layer in active:
                before, now = prior.get(layer), current.get(layer)
                if before is not None and before > 0 and now is not None:
                    rates[layer] = abs(before - now) / before
            if rates:
                threshold = percentile(list(rates.values()), self.pct)
                keep = list(active)
                while len(keep) > self.min_active and keep[0] in rates and rates[keep[0]] < threshold:
                    keep.pop(0)
                decision.update(layers=keep, rates=rates, threshold=threshold)
        self.decisions = [d for d in self.decisions if d["t"] < t] + [decision]
        return decision


@register_kind
class AutofreezeSpec(AdaptiveSpecBase):
    """AutoFreeze: layers leave bottom-up, for good, once their signal stops changing.

    ``{"type": "autofreeze", "every": 50, "percentile": 50, "signal": "grad_norm", "min_active": 1}``.
    """

    kind = "autofreeze"
    runtime = AutofreezeSchedule
    compares_intervals = True
    reactivates = False
    FIELDS = {
        "every": COMMON_FIELDS["every"],
        "signal": f"what is compared between intervals: one of {list(INTERVAL_SIGNALS)}, default 'grad_norm'",
        "percentile": "a layer has converged when its rate of change is under this percentile (0-100) of "
                      "the active layers' rates, default 50",
        "min_active": "candidate layers that always stay active, default 1",
        "ema": COMMON_FIELDS["ema"],
        "always": COMMON_FIELDS["always"],
        "layers": COMMON_FIELDS["layers"],
        "decisions": COMMON_FIELDS["decisions"],
        "state": COMMON_FIELDS["state"],
    }

    def __init__(self, spec: Dict[Any, Any]) -> None:
        check = SpecFields(spec, self.kind, self.FIELDS)
        self._check_common(check, INTERVAL_SIGNALS, "grad_norm")
        self.percentile = check.number("percentile", 50, 0.0, 100.0, self.FIELDS["percentile"])
        self.min_active = check.integer("min_active", 1, 1, self.FIELDS["min_active"])
        self.decisions = check_decisions(check, with_rates=True)

    def _head(self, unit: str) -> str:
        return "autofreeze: layers leave bottom-up when their {} changes less than the {}th percentile, " \
               "checked every {} {}(s)".format(self.signal, self.percentile, self.every, unit)
