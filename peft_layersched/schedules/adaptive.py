"""The adaptive kind: ``k`` layers chosen from measured signals; the shared adaptive runtime. No torch.

A decision log (``{"t", "layers", "scores"}`` entries) is part of the spec: ``active_at`` replays it,
so a resumed or reloaded run computes the same sets. Draws are seeded by ``(seed, t, slot)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .base import Schedule, ScheduleSpec, SpecFields, bind_candidates, candidates_text, register_kind
from .decision_log import Decision, check_decisions, json_decision
from .ids import (
    Canonicalizer,
    LayerId,
    check_layer_id,
    check_time,
    seeded_permutation,
    short_layer_list,
    stable_int,
)

MEASURED_SIGNALS = ("grad_norm", "update", "outlier", "weight_norm")
ADAPTIVE_SIGNALS = MEASURED_SIGNALS + ("weights",)
CALIBRATION_SIGNALS = ("outlier", "weight_norm")  # measured once, before the first decision
INTERVAL_SIGNALS = ("grad_norm", "update")  # what autofreeze can compare between intervals
POLICIES = ("sample", "top")

def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _unit_float(*key: Any) -> float:
    """A number in [0, 1) that depends only on ``key``."""
    return stable_int(*key) / float(1 << 64)


def _check_weights(check: SpecFields) -> Optional[Dict[LayerId, float]]:
    raw = check.spec.get("weights")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise TypeError(
            f"{check.where}: 'weights' must be a non-empty dict {{layer: weight}} (e.g. {{\"0\": 0.5, \"-1\": 2}}; "
            f"0 = never chosen), got {raw!r}."
        )
    weights: Dict[LayerId, float] = {}
    for layer, weight in raw.items():
        key = check_layer_id(layer, f"{check.where} 'weights'")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            math.isfinite(weight) and weight >= 0
        ):
            raise ValueError(
                f"{check.where}: 'weights'[{layer!r}] must be a finite number >= 0 (0 = never chosen), got "
                f"{weight!r}."
            )
        weights[key] = float(weight)
    return weights


COMMON_FIELDS = {
    "every": "epochs/steps between decisions, default 1",
    "ema": "weight of the past in the per-step average of the signal, default 0.9",
    "always": "layers active at every time, default none",
    "layers": "candidate layers, default every layer",
    "decisions": "the decision log (written by training; replayed)",
    "state": "the signal meter's state (written by training)",
}


class AdaptiveSpecBase(ScheduleSpec):
    """What both adaptive kinds share: candidates, ``always`` layers, ``every``, the signal, the log."""

    signal = "grad_norm"
    every = 1
    ema = 0.9
    calibration_batches = 8
    outlier_m = 5.0
    compares_intervals = False  # True: decisions compare the signal of an interval with the previous one
    reactivates = True  # False: a layer that a decision freezes never trains again
    always: List[LayerId]
    layers: Optional[List[LayerId]]
    decisions: List[Decision]
    state: Optional[Dict[str, Any]]

    def _check_common(self, check: SpecFields, signals: Tuple[str, ...], default_signal: str) -> None:
        self.every = check.integer("every", 1, 1, COMMON_FIELDS["every"])
        self.layers = check.layers("layers", allow_empty=False)
        self.always = check.layers("always", allow_empty=True) or []
        self.signal = check.choice("signal", default_signal, signals)
        self.ema = check.number("ema", 0.9, 0.0, 1.0, COMMON_FIELDS["ema"])
        if self.ema >= 1.0:
            raise ValueError(
                f"{check.where}: 'ema' must be < 1 (1 would never take a new measurement), got {self.ema}."
            )
        state = check.spec.get("state")
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"{check.where}: 'state' (the signal meter's saved state) must be a dict, got {state!r}.")
        self.state = state

    def _json_field(self, key: str) -> Any:
        if key == "always":
            return list(self.always) or None
        if key == "decisions":
            return [json_decision(d) for d in self.decisions] or None
        return super()._json_field(key)

    @property
    def needs_calibration(self) -> bool:
        return self.signal in CALIBRATION_SIGNALS

    def _head(self, unit: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    prior_note = ""  # what describe() says a schedule shows before its first decision

    def describe(self, unit: str) -> str:
        head = self._head(unit) + (", always {}".format(self.always) if self.always else "")
        if not self.decisions:
            return head + " ({}; decided during training{})".format(candidates_text(self.layers), self.prior_note)
        last = self.decisions[-1]
        return head + " ({} decision(s) made, the last at {} {}: {})".format(
            len(self.decisions), unit, last["t"], list(last["layers"]))


class AdaptiveSchedule(Schedule):
    """An adaptive schedule on a model: candidates ``pool``, ``fixed`` (always) layers, the decision log.

    ``decide(t, measured)`` makes (and logs) the decision at ``t`` from the measured scores;
    ``due(t)`` says whether the schedule time ``t`` needs one; ``decisions`` is the log (canonical ids).
    """

    def __init__(
        self, spec: "AdaptiveSpecBase", layers: Sequence[LayerId], canonical: Canonicalizer,
        default: Sequence[LayerId],
    ) -> None:
        super().__init__(spec, layers)
        self.every = self.granule = spec.every
        where = f"layer_schedule (type {spec.kind!r})"
        self.fixed = bind_candidates(spec.always or None, f"{where} 'always'", layers, canonical, [])
        candidates = bind_candidates(spec.layers, f"{where} 'layers'", layers, canonical, default)
        self.pool = [layer for layer in candidates if layer not in set(self.fixed)]
        if not self.pool:
            raise ValueError(
                f"{where}: no candidate layer is left to choose from ({short_layer_list(candidates)} minus "
                f"'always' {self.fixed}); widen 'layers' or shorten 'always'."
            )
        self._canonical = canonical
        # {layer: first period whose preview holds it}, and the last period looked at (see _first_preview)
        self._previews: Tuple[Dict[LayerId, int], int] = ({}, -1)
        self.decisions: List[Decision] = []
        self.state: Optional[Dict[str, Any]] = spec.state  # the signal meter's, as last saved
        self._bind_log(spec.decisions)

    def as_spec(self) -> "ScheduleSpec":
        """The spec with the decision log and meter state as they are now (what the config saves)."""
        spec = copy.copy(self.spec)
        spec.decisions = [dict(d) for d in self.decisions]
        spec.state = self.state
        return spec

    # ----------------------------------------------------------------------- the log

    def _bind_log(self, decisions: Sequence[Decision]) -> None:
        where = f"layer_schedule (type {self.kind!r}) 'decisions'"
        allowed = set(self.pool)
        bound = []
        for entry in decisions:
            layers = self._sorted(self._canonical(layer, where) for layer in entry["layers"])
            stray = [layer for layer in layers if layer not in allowed]
            if stray:
                raise ValueError(
                    f"{where}: the decision at t={entry['t']} chose layer(s) {stray}, which are not candidates "
                    f"({short_layer_list(self.pool)}, 'always' layers excluded)."
                )
            out = dict(entry, layers=layers)
            for key in ("scores", "rates"):
                if key in entry:
                    out[key] = {self._canonical(k, where): v for k, v in entry[key].items()}
            bound.append(out)
        self.decisions = bound

    def load_decisions(self, decisions: Sequence[Decision]) -> None:
        """Replace the log with ``decisions`` (JSON form, e.g. from a checkpoint)."""
        check = SpecFields({"decisions": list(decisions)}, self.kind, {"decisions": "the decision log"})
        self._bind_log(check_decisions(check, with_rates=True))

    def decisions_json(self) -> List[Decision]:
        return [json_decision(d) for d in self.decisions]

    def _last(self, t: int) -> Optional[Decision]:
        found = None
        for decision in self.decisions:
            if decision["t"] > t:
                break
            found = decision
        return found

    def due(self, t: int) -> Optional[int]:
        """The decision time at or before ``t`` that the log lacks (``None``: nothing to decide)."""
        slot = (t // self.every) * self.every
        last = self._last(t)
        if last is not None and last["t"] >= slot:
            return None
        return slot if self._decides_at(slot) else None

    def _decides_at(self, t: int) -> bool:
        return True

    # ----------------------------------------------------------------------- Schedule

    def _before_decisions(self, t: int) -> List[LayerId]:  # pragma: no cover - abstract
        """The chosen layers at a time ``t`` before the log's first decision."""
        raise NotImplementedError

    def _previews_vary(self) -> bool:
        """Whether :meth:`_before_decisions` can differ from one period (``every``) to the next."""
        return False

    def _choosable(self) -> List[LayerId]:
        """The candidates a decision can choose."""
        return list(self.pool)

    def _chosen(self, t: int) -> List[LayerId]:
        last = self._last(t)
        return list(last["layers"]) if last is not None else self._before_decisions(t)

    def active_at(self, t: int) -> List[LayerId]:
        return self._sorted(self.fixed + self._chosen(t))

    def all_layers(self) -> List[LayerId]:
        return self._sorted(self.fixed + self.pool)

    def _always_active(self, layer: LayerId) -> bool:
        return layer in self.fixed

    def _first_preview(self, layer: LayerId, periods: int) -> Optional[int]:
        """The first period ``p <= periods`` whose preview holds ``layer`` (``None``: none).
        A preview depends only on the spec, so periods are walked once and remembered."""
        if not self._previews_vary():
            return 0 if layer in self._before_decisions(0) else None
        found, done = self._previews
        choosable = set(self._choosable())
        while done < periods and not choosable <= set(found):
            done += 1
            for chosen in self._before_decisions(done * self.every):
                found.setdefault(chosen, done)
        self._previews = (found, done)
        first = found.get(layer)
        return first if first is not None and first <= periods else None

    def layers_until(self, t: int) -> List[LayerId]:
        # Every layer active at some time in 0..t: the fixed ones, what each period before the first decision
        # previews (active_at shows it there), and every decision up to t.
        seen = set(self.fixed)
        last_preview = t if not self.decisions else min(t, self.decisions[0]["t"] - 1)
        if last_preview >= 0:
            periods = last_preview // self.every
            seen.update(layer for layer in self.pool if self._first_preview(layer, periods) is not None)
        for decision in self.decisions:
            if decision["t"] > t:
                break
            seen.update(decision["layers"])
        return self._sorted(seen)

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        if layer not in self.active_at(t):
            return None
        if layer in self.fixed:
            return 0
        past = [d for d in self.decisions if d["t"] <= t]
        if past:
            start = past[-1]["t"]
            for decision in reversed(past):
                if layer not in decision["layers"]:
                    return start
                start = decision["t"]
            if start == 0:
                return 0
            before = start - 1  # every decision so far holds it: the run may begin before the first one
        else:
            start, before = t, t
        period = before // self.every
        if layer not in self._before_decisions(period * self.every):
            return start
        if not self._previews_vary():
            return 0
        while period > 0 and layer in self._before_decisions((period - 1) * self.every):
            period -= 1
        return period * self.every

    def first_idle(self, start: int, end: int, budget: int = 100000) -> Optional[int]:
        return None  # every decision keeps at least one layer (k >= 1, min_active >= 1)

    def preview_span(self) -> int:
        last = self.decisions[-1]["t"] if self.decisions else 0
        return last + 2 * self.every


class AdaptiveImportance(AdaptiveSchedule):
    """``{"type": "adaptive"}`` on a model."""

    def __init__(self, spec: "AdaptiveSpec", layers: Sequence[LayerId], canonical: Canonicalizer,
                 default: Sequence[LayerId]) -> None:
        super().__init__(spec, layers, canonical, default)
        where = "layer_schedule (type 'adaptive')"
        self.k, self.policy, self.seed = spec.k, spec.policy, spec.seed
        self.explore, self.temperature = spec.explore, spec.temperature
        self.weights: Dict[LayerId, float] = {}
        for raw, weight in (spec.weights or {}).items():
            layer = canonical(raw, f"{where} 'weights'")
            if layer not in set(self.pool):
                raise ValueError(
                    f"{where}: 'weights' names layer {raw!r} ({layer}), which is not a candidate "
                    f"({short_layer_list(self.pool)}, 'always' layers excluded)."
                )
            self.weights[layer] = weight
        self.eligible = [layer for layer in self.pool if self.weights.get(layer, 1.0) > 0]
        if self.k > len(self.eligible):
            raise ValueError(
                f"{where}: 'k' is {self.k} but only {len(self.eligible)} candidate layer(s) can be chosen "
                f"({short_layer_list(self.eligible)}: 'always' layers and weight-0 layers excluded); lower 'k', "
                f"widen 'layers' or give fewer layers weight 0."
            )
        self._tie = {layer: i for i, layer in zip(seeded_permutation(len(self.pool), "adaptive-ties", self.seed),
                                                  self.pool)}

    def _before_decisions(self, t: int) -> List[LayerId]:
        slot = (max(t, 0) // self.every) * self.every
        return self._pick(slot, self.scores_from({}))[0]  # what the prior alone would choose

    def _previews_vary(self) -> bool:
        # The draws depend on the period (seeded by t) unless every pick is the top score.
        return self.policy != "top" or self.explore > 0

    def _choosable(self) -> List[LayerId]:
        return list(self.eligible)

    def scores_from(self, measured: Dict[LayerId, Optional[float]]) -> Dict[LayerId, float]:
        """The score of each eligible candidate: the user's weight x the measured value (an unmeasured
        layer: twice the best measured value, 1.0 before any), or the weight alone (signal ``weights``)."""
        if self.spec.signal == "weights":
            base = {layer: 1.0 for layer in self.eligible}
        else:
            seen = [v for layer, v in measured.items() if layer in set(self.eligible) and v is not None]
            best = max(seen) if seen else 0.0
            prior = 2.0 * best if best > 0 else 1.0
            base = {}
            for layer in self.eligible:
                value = measured.get(layer)
                base[layer] = prior if value is None else float(value)
        return {layer: self.weights.get(layer, 1.0) * base[layer] for layer in self.eligible}

    def _pick(self, t: int, scores: Dict[LayerId, float]) -> Tuple[List[LayerId], List[str]]:
        remaining = list(self.eligible)
        chosen: List[LayerId] = []
        how: List[str] = []
        for slot in range(self.k):
            if self.explore > 0 and _unit_float("adaptive-explore", self.seed, t, slot) < self.explore and (
                self.policy == "top"
            ):
                index = int(_unit_float("adaptive-uniform", self.seed, t, slot) * len(remaining))
                layer = remaining[min(index, len(remaining) - 1)]
                how.append("explore")
            elif self.policy == "top":
                layer = min(remaining, key=lambda la: (-scores[la], self._tie[la]))
                how.append("top")
            else:
                layer = self._draw(remaining, scores, _unit_float("adaptive-draw", self.seed, t, slot))
                how.append("sample")
            chosen.append(layer)
            remaining.remove(layer)
        return self._sorted(chosen), how

    def _draw(self, remaining: List[LayerId], scores: Dict[LayerId, float], u: float) -> LayerId:
        powered = [max(scores[layer], 0.0) ** (1.0 / self.temperature) for layer in remaining]
        total = sum(powered)
        n = len(remaining)
        if total > 0 and math.isfinite(total):
            probs = [(1.0 - self.explore) * p / total + self.explore / n for p in powered]
        else:
            probs = [1.0 / n] * n
        acc = 0.0
        for layer, p in zip(remaining, probs):
            acc += p
            if u < acc:
                return layer
        return remaining[-1]

    def decide(self, t: int, measured: Dict[LayerId, Optional[float]]) -> Decision:
        """Choose the layers of schedule time ``t`` from ``measured`` (layer -> value, ``None``: not
        measured yet) and append the decision to the log; returns it."""
        t = check_time(t, "decide(t): t")
        scores = self.scores_from(measured)
        chosen, _ = self._pick(t, scores)
        decision: Decision = {"t": t, "layers": chosen, "scores": scores}
        self.decisions = [d for d in self.decisions if d["t"] < t] + [decision]
        return decision


@register_kind
class AdaptiveSpec(AdaptiveSpecBase):
    """Importance-driven choice of ``k`` layers every ``every`` epochs/steps.

    ``{"type": "adaptive", "k": 2, "every": 50, "signal": "grad_norm", "policy": "sample"}``.
    ``"weights": {"0": 0, "5": 2.0}`` multiplies the scores (0: never chosen).
    """

    kind = "adaptive"
    runtime = AdaptiveImportance
    prior_note = "; before training: what the prior scores alone choose"
    FIELDS = {
        "k": "layers chosen at each decision, default 1",
        "every": COMMON_FIELDS["every"],
        "signal": f"what scores a layer: one of {list(ADAPTIVE_SIGNALS)}, default 'grad_norm'",
        "policy": "'sample' (default: drawn ~ score ** (1/temperature)) or 'top' (the k highest)",
        "explore": "chance that a pick is uniform over the other candidates, default 0.1",
        "temperature": "sharpness of 'sample' (lower: closer to 'top'), default 1.0",
        "seed": "seed of the draws and tie-breaks, default 0",
        "ema": COMMON_FIELDS["ema"],
        "weights": "{layer: weight >= 0} multiplying the scores (0: never chosen)",
        "calibration_batches": "batches the 'outlier' signal measures before the first decision, default 8",
        "outlier_m": "'outlier': an entry counts when |W| x ||X|| > outlier_m x its mean, default 5",
        "always": COMMON_FIELDS["always"],
        "layers": COMMON_FIELDS["layers"],
        "decisions": COMMON_FIELDS["decisions"],
        "state": COMMON_FIELDS["state"],
    }

    def __init__(self, spec: Dict[Any, Any]) -> None:
        check = SpecFields(spec, self.kind, self.FIELDS)
        self.k = check.integer("k", 1, 1, self.FIELDS["k"])
        self.weights = _check_weights(check)
        self._check_common(check, ADAPTIVE_SIGNALS, "weights" if self.weights is not None else "grad_norm")
        if self.signal == "weights" and self.weights is None:
            raise ValueError(
                f"{check.where}: signal 'weights' scores layers by the 'weights' you give, but there is no "
                f"'weights'; add e.g. \"weights\": {{\"0\": 1, \"-1\": 3}}, or pick a measured signal "
                f"({', '.join(MEASURED_SIGNALS)})."
            )
        self.policy = check.choice("policy", "sample", POLICIES)
        self.explore = check.number("explore", 0.1, 0.0, 1.0, self.FIELDS["explore"])
        self.temperature = check.number("temperature", 1.0, 0.0, None, self.FIELDS["temperature"], low_open=True)
        self.seed = check.integer("seed", 0, None, self.FIELDS["seed"])
        self.calibration_batches = check.integer("calibration_batches", 8, 1, self.FIELDS["calibration_batches"])
        self.outlier_m = check.number("outlier_m", 5.0, 0.0, None, self.FIELDS["outlier_m"], low_open=True)
        self.decisions = check_decisions(check, with_rates=False)

    def _json_field(self, key: str) -> Any:
        if key == "weights":
            return None if self.weights is None else {str(layer): w for layer, w in self.weights.items()}
        if key in ("calibration_batches", "outlier_m") and self.signal != "outlier":
            return None
        return super()._json_field(key)

    def _head(self, unit: str) -> str:
        return "adaptive: {} layer(s) by {} ({}, explore {}), every {} {}(s)".format(
            self.k, self.signal, self.policy, self.explore, self.every, unit)
