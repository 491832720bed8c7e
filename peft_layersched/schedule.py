"""The schedule core: ``t -> raw layer ids``, pure Python, no torch.

A *raw* layer id is what a user writes: an ``int`` (negative counts from the top) or a string
``"<stack>.<index>"``.  Turning raw ids into canonical ids needs the model's layer stacks and
lives in :mod:`peft_layersched.layers`; this module only checks their *form*, so schedules can be
validated and property-tested without a model.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple, Union

LayerId = Union[int, str]

SCHEDULE_UNITS = ("epoch", "step")

_STR_ID = re.compile(r"^(?:(?P<stack>[A-Za-z_][\w.]*?)\.)?(?P<index>-?\d+)$")


def check_layer_id(raw: Any, where: str) -> LayerId:
    """Return ``raw`` if it has the form of a layer id, else raise ``TypeError``/``ValueError``.

    ``where`` names the place in the config (e.g. ``"layer_schedule[3]"``) for the message.
    """
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise TypeError(
            f"{where}: layer id {raw!r} has type {type(raw).__name__}; a layer id is an int "
            f"(e.g. 11, or -1 for the top layer) or a string '<stack>.<index>' (e.g. 'decoder.-1')."
        )
    if isinstance(raw, str) and not _STR_ID.match(raw.strip()):
        raise ValueError(
            f"{where}: {raw!r} is not a layer id; write an int (e.g. 11, -1 for the top layer) or "
            f"'<stack>.<index>' for models with several stacks (e.g. 'encoder.0', 'decoder.-1')."
        )
    return raw.strip() if isinstance(raw, str) else raw


def split_layer_id(raw: LayerId) -> Tuple[Union[str, None], int]:
    """``11 -> (None, 11)``, ``"decoder.-1" -> ("decoder", -1)``, ``"3" -> (None, 3)``."""
    if isinstance(raw, int):
        return None, raw
    match = _STR_ID.match(raw)
    if match is None:  # pragma: no cover - check_layer_id rejects these first
        raise ValueError(f"{raw!r} is not a layer id")
    return match.group("stack"), int(match.group("index"))


def _check_layer_list(layers: Any, where: str) -> List[LayerId]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{where}: expected a list of layer ids, got {layers!r} ({type(layers).__name__}); "
            f"e.g. [11] or [1, 11] (an empty list trains only modules_to_save in that phase)."
        )
    checked = [check_layer_id(layer, where) for layer in layers]
    # Sets have no order; keep a deterministic one so JSON round trips compare equal.
    if isinstance(layers, (set, frozenset)):
        checked = sorted(checked, key=lambda x: (isinstance(x, str), str(x) if isinstance(x, str) else x))
    return checked


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


class MilestoneSchedule(object):
    """``{start: layers}``: from ``start`` on exactly ``layers`` train, until the next start.

    Before the first start nothing is scheduled (only ``modules_to_save`` train).
    """

    kind = "milestones"

    def __init__(self, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise TypeError(
                f"layer_schedule must be a dict {{start: layers}}, got {type(spec).__name__} {spec!r}; "
                f"e.g. {{0: [11], 3: [1, 11]}}."
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
            phases[start] = _check_layer_list(layers, f"layer_schedule[{start}]")
        self.phases: List[Tuple[int, List[LayerId]]] = sorted(phases.items())

    def active_at(self, t: int) -> List[LayerId]:
        active: List[LayerId] = []
        for start, layers in self.phases:
            if start > t:
                break
            active = layers
        return list(active)

    def all_layers(self) -> List[LayerId]:
        seen: List[LayerId] = []
        for _, layers in self.phases:
            for layer in layers:
                if layer not in seen:
                    seen.append(layer)
        return seen

    def boundaries(self) -> List[int]:
        return [start for start, _ in self.phases]

    def to_json(self) -> Dict[int, List[LayerId]]:
        return {start: list(layers) for start, layers in self.phases}


def parse_schedule(spec: Any) -> MilestoneSchedule:
    """Validate a ``layer_schedule`` value and return its schedule object."""
    return MilestoneSchedule(spec)


def check_time(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, int):
        if isinstance(t, float) and t.is_integer():
            return int(t)
        raise TypeError(
            f"activate_layers(t): t must be an int (epoch or optimizer step), got {t!r} ({type(t).__name__})."
        )
    if t < 0:
        raise ValueError(f"activate_layers(t): t must be >= 0, got {t}.")
    return t


def check_unit(unit: Any) -> str:
    if unit not in SCHEDULE_UNITS:
        raise ValueError(f"schedule_unit={unit!r} is not supported; use one of {list(SCHEDULE_UNITS)}.")
    return unit


def check_layer_list(layers: Any, where: str) -> List[LayerId]:
    return _check_layer_list(layers, where)

