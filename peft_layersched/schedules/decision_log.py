"""The decision log of the adaptive kinds: checked on load, written as JSON. No torch.

Each entry is ``{"t": time, "layers": chosen, "scores": {layer: score}}``; autofreeze adds ``rates``
and ``threshold``.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .base import SpecFields
from .ids import check_layer_id, check_layer_list, check_time

Decision = Dict[str, Any]


def check_decisions(check: SpecFields, with_rates: bool) -> List[Decision]:
    """The validated ``decisions`` of an adaptive spec (``with_rates``: autofreeze's keys too)."""
    raw = check.spec.get("decisions")
    if raw is None:
        return []
    where = f"{check.where} 'decisions'"
    if not isinstance(raw, list):
        raise TypeError(
            f"{where} must be a list of {{'t', 'layers', 'scores'}} entries (the decision log), got {raw!r}."
        )
    out: List[Decision] = []
    last = -1
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "t" not in entry or "layers" not in entry:
            raise ValueError(f"{where}[{i}] must be a dict with 't' and 'layers' (and 'scores'), got {entry!r}.")
        t = check_time(entry["t"], f"{where}[{i}]['t']")
        if t <= last:
            raise ValueError(f"{where}: times must increase, but entry {i} has t={t} after t={last}.")
        last = t
        decision: Decision = {"t": t, "layers": check_layer_list(entry["layers"], f"{where}[{i}]['layers']")}
        for key in ("scores", "rates"):
            scores = entry.get(key)
            if scores is None:
                continue
            if not isinstance(scores, dict):
                raise TypeError(f"{where}[{i}]['{key}'] must be a dict {{layer: number}}, got {scores!r}.")
            decision[key] = {check_layer_id(k, f"{where}[{i}]['{key}']"): float(v) for k, v in scores.items()}
        if with_rates and entry.get("threshold") is not None:
            decision["threshold"] = float(entry["threshold"])
        out.append(decision)
    return out


def json_decision(decision: Decision) -> Decision:
    """A decision as JSON: layer ids as strings in the score dicts."""
    out: Decision = {"t": decision["t"], "layers": list(decision["layers"])}
    for key in ("scores", "rates"):
        if key in decision:
            out[key] = {str(layer): value for layer, value in decision[key].items()}
    if "threshold" in decision:
        out["threshold"] = decision["threshold"]
    return out
