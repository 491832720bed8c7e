"""The schedule contract and the one registry of kinds. No torch.

A spec (:class:`ScheduleSpec`) is a validated ``layer_schedule`` value; ``bind`` puts it on a
model's layers as a :class:`Schedule`. Each kind module registers its spec class when imported.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .ids import Canonicalizer, LayerId, StackIndex, check_layer_list


class Schedule(object):
    """A schedule bound to a model's layers: ``t -> canonical layer ids``.

    A kind overrides ``active_at`` and ``all_layers``. The history queries (``layers_until``,
    ``run_start``) walk periods of ``granule`` times, cached for monotone queries.
    """

    runnable = True  # False for a callable schedule loaded from disk (the function was not saved)
    granule = 1

    def __init__(self, spec: "ScheduleSpec", layers: Sequence[LayerId]) -> None:
        self.spec = spec
        self._order: Dict[LayerId, int] = {layer: i for i, layer in enumerate(layers)}
        self._until: Tuple[int, Set[LayerId]] = (-1, set())
        self._runs: Dict[LayerId, Tuple[int, int]] = {}

    @property
    def kind(self) -> str:
        return self.spec.kind

    def as_spec(self) -> "ScheduleSpec":
        """The spec of this schedule as bound (milestones: with canonical ids)."""
        return self.spec

    # --------------------------------------------------------------------------- to override

    def active_at(self, t: int) -> List[LayerId]:  # pragma: no cover - abstract
        raise NotImplementedError

    def all_layers(self) -> List[LayerId]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --------------------------------------------------------------------------- common

    def initial_layers(self) -> List[LayerId]:
        return self.active_at(0)

    def _sorted(self, layers: Any) -> List[LayerId]:
        big = len(self._order)
        return sorted(set(layers), key=lambda layer: (self._order.get(layer, big), str(layer)))

    def _always_active(self, layer: LayerId) -> bool:
        return False

    def layers_until(self, t: int) -> List[LayerId]:
        period = t // self.granule
        everything = set(self.all_layers())
        done, seen = self._until
        if done > period:
            done, seen = -1, set()
        seen = set(seen)
        while done < period and not everything <= seen:
            done += 1
            seen.update(self.active_at(done * self.granule))
        if everything <= seen:
            done = max(done, period)
        self._until = (done, seen)
        return self._sorted(seen)

    def preview_span(self) -> int:
        """How many epochs/steps show the whole pattern (the CLI's default horizon)."""
        return 10

    def first_idle(self, start: int, end: int, budget: int = 100000) -> Optional[int]:
        """The first time in ``start..end`` at which no layer is active (``None``: there is none).  The
        active set only changes at multiples of ``granule``, so one time per period is looked at, at most
        ``budget`` of them (a longer range is checked that far)."""
        g = self.granule
        t = start
        for _ in range(max(budget, 1)):
            if t > end:
                return None
            if not self.active_at(t):
                return t
            t = (t // g + 1) * g
        return None

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        g = self.granule
        period = t // g
        if layer not in self.active_at(period * g):
            return None
        if self._always_active(layer):
            return 0
        cached = self._runs.get(layer)
        if cached is not None and cached[0] <= period:
            checked, start = cached
            while checked < period and layer in self.active_at((checked + 1) * g):
                checked += 1
            if checked == period:
                self._runs[layer] = (period, start)
                return start * g
        start = period
        while start > 0 and layer in self.active_at((start - 1) * g):
            start -= 1
        self._runs[layer] = (period, start)
        return start * g


class ScheduleSpec(object):
    """A validated ``layer_schedule`` value: one kind's contract.

    A kind declares ``kind`` (its ``type``), ``FIELDS`` (key -> help) and ``runtime`` (its
    :class:`Schedule`), and words itself in ``describe``. ``to_json`` follows ``FIELDS``.
    """

    kind = ""
    FIELDS: Dict[str, str] = {}
    runtime: Callable[..., Schedule]  # the Schedule class bind() builds: runtime(spec, layers, canonical, default)
    needs_run_length = False  # True: the driver completes the spec with with_run_length(the run's length)
    untyped = False  # True: the kind of a dict without 'type' (milestones)
    takes_function = False  # True: the kind of a Python callable
    draws_candidates = True  # False: bind() ignores default_candidates (milestones name their layers)
    listed = True  # False: a type written by the package, never by users (a saved callable)

    @classmethod
    def from_json(cls, value: Any) -> "ScheduleSpec":
        """The spec of a ``layer_schedule`` value of this kind."""
        return cls(value)  # type: ignore[call-arg]

    def _json_field(self, key: str) -> Any:
        """The JSON value of field ``key`` (``None``: left out)."""
        value = getattr(self, key)
        return list(value) if isinstance(value, list) else value

    def to_json(self) -> Any:
        """The spec as ``adapter_config.json`` stores it: ``type``, then the fields that are set."""
        spec: Dict[str, Any] = {"type": self.kind}
        for key in self.FIELDS:
            value = self._json_field(key)
            if value is not None:
                spec[key] = value
        return spec

    def describe(self, unit: str) -> str:
        """One line for people on what the schedule does, time in ``unit``s."""
        return self.kind

    def named_layers(self) -> List[LayerId]:
        """The layer ids the spec names, raw, as written (its candidates and ``always`` layers)."""
        return [layer for key in ("layers", "always") if key in self.FIELDS for layer in getattr(self, key) or []]

    def with_run_length(self, length: int) -> "ScheduleSpec":
        """This spec for a run of ``length`` epochs/steps (kinds that need no length: itself)."""
        return self

    def bind(
        self,
        layers: Sequence[LayerId],
        canonical: Optional[Canonicalizer] = None,
        default_candidates: Optional[Sequence[LayerId]] = None,
    ) -> Schedule:
        """This schedule on a model: ``layers`` are all its canonical layer ids in model order
        (``LayerIndex.all_layers()``), ``canonical`` turns a raw id into a canonical one (default: from
        ``layers`` alone), ``default_candidates`` are the layers a schedule without its own ``layers``
        list draws from (default: ``layers``).  Returns a :class:`Schedule` whose ids are canonical.
        """
        layers = list(layers)
        if canonical is None:
            canonical = StackIndex.from_layer_ids(layers).canonical
        default = list(layers) if default_candidates is None else list(default_candidates)
        return type(self).runtime(self, layers, canonical, default)


def bind_candidates(
    raw: Optional[List[LayerId]],
    where: str,
    layers: Sequence[LayerId],
    canonical: Canonicalizer,
    default: Sequence[LayerId],
) -> List[LayerId]:
    """The canonical candidate layers of a spec's ``raw`` list (``None``: ``default``), in model order."""
    order = {layer: i for i, layer in enumerate(layers)}
    if raw is None:
        return sorted(set(default), key=lambda layer: order.get(layer, len(order)))
    chosen = []
    for item in raw:
        layer = canonical(item, where)
        if layer not in order:  # pragma: no cover - a canonicalizer only returns the model's layers
            raise ValueError(f"{where}: layer {item!r} is not a layer of the model.")
        chosen.append(layer)
    return sorted(set(chosen), key=lambda layer: order[layer])


def candidates_text(layers: Optional[List[LayerId]]) -> str:
    """How a description names a spec's candidate layers."""
    return "candidates: every layer" if layers is None else "candidates: {}".format(layers)


_REQUIRED = object()


class SpecFields(object):
    """Checks the keys of a ``{"type": ...}`` dict, with messages that name the field and valid values."""

    def __init__(self, spec: Dict[Any, Any], kind: str, fields: Dict[str, str]) -> None:
        self.spec = spec
        self.kind = kind
        self.where = f"layer_schedule (type {kind!r})"
        unknown = [key for key in spec if key != "type" and key not in fields]
        if unknown:
            valid = ", ".join(f"'{name}' ({meaning})" for name, meaning in fields.items())
            raise ValueError(f"{self.where}: unknown key(s) {unknown}; valid keys: 'type', {valid}.")

    def integer(self, key: str, default: Any, minimum: Optional[int], meaning: str) -> Any:
        value = self.spec.get(key, default)
        if value is _REQUIRED:
            raise ValueError(f"{self.where}: '{key}' is required ({meaning}).")
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"{self.where}: '{key}' must be an int ({meaning}), got {value!r} ({type(value).__name__})."
            )
        if minimum is not None and value < minimum:
            raise ValueError(f"{self.where}: '{key}' must be >= {minimum} ({meaning}), got {value}.")
        return value

    def choice(self, key: str, default: str, choices: Tuple[str, ...]) -> str:
        value = self.spec.get(key, default)
        if value not in choices:
            raise ValueError(f"{self.where}: '{key}' must be one of {list(choices)}, got {value!r}.")
        return value

    def number(self, key: str, default: float, low: float, high: Optional[float], meaning: str,
               low_open: bool = False) -> float:
        """A finite float in ``low..high`` (``low_open``: ``low`` itself refused)."""
        value = self.spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{self.where}: '{key}' must be a finite number ({meaning}), got {value!r}.")
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
            raise ValueError(f"{self.where}: '{key}' must be {bounds} ({meaning}), got {value}.")
        return float(value)

    def fraction(self, key: str, default: float, meaning: str, zero_ok: bool) -> float:
        """A float in ``0..1`` (``zero_ok=False``: 0 refused)."""
        value = self.spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{self.where}: '{key}' must be a number ({meaning}), got {value!r} ({type(value).__name__})."
            )
        value = float(value)
        low_ok = value >= 0.0 if zero_ok else value > 0.0
        if not (low_ok and value <= 1.0) or math.isnan(value):
            bound = "0 <= x <= 1" if zero_ok else "0 < x <= 1"
            raise ValueError(f"{self.where}: '{key}' must be a fraction, {bound} ({meaning}), got {value!r}.")
        return value

    def layers(self, key: str, allow_empty: bool) -> Optional[List[LayerId]]:
        value = self.spec.get(key)
        if value is None:
            return None
        checked = check_layer_list(value, f"{self.where} '{key}'")
        if not checked and not allow_empty:
            raise ValueError(
                f"{self.where}: '{key}' is an empty list; list candidate layers (e.g. [8, 9, 10, 11]) or "
                f"leave '{key}' out to use every layer that holds a target module."
            )
        return checked


# ------------------------------------------------------------------------------------ the registry

_KINDS: Dict[str, Any] = {}  # kind -> spec class, in registration order


def register_kind(spec_class: Any) -> Any:
    """Make ``{"type": spec_class.kind, ...}`` parse to ``spec_class`` (a class decorator)."""
    _KINDS[spec_class.kind] = spec_class
    return spec_class


def registered_kinds() -> Dict[str, Any]:
    """Every registered kind: ``{kind: spec class}``, in registration order."""
    return dict(_KINDS)


def kind_names() -> List[str]:
    """The ``type`` values a user can write in a ``layer_schedule`` dict."""
    return [kind for kind, spec_class in _KINDS.items() if spec_class.listed and not spec_class.untyped]


def _kind_of(form: str) -> Any:
    for spec_class in _KINDS.values():
        if getattr(spec_class, form, False):
            return spec_class
    raise ValueError(f"layer_schedule: no schedule kind takes a {form.replace('_', ' ')}.")  # pragma: no cover


def parse_schedule(spec: Any) -> ScheduleSpec:
    """Validate a ``layer_schedule`` value and return its spec (:meth:`ScheduleSpec.bind` puts it on a model).

    ``spec``: a milestone dict ``{start: layers}``, a dict with a ``"type"`` key (see :func:`kind_names`), a
    callable ``t -> layers``, a :class:`ScheduleSpec`, or a bound :class:`Schedule` (its spec as bound).
    """
    if isinstance(spec, ScheduleSpec):
        return spec
    if isinstance(spec, Schedule):
        return spec.as_spec()
    if callable(spec) and not isinstance(spec, (dict, type)):
        return _kind_of("takes_function")(spec)
    if isinstance(spec, dict) and "type" in spec:
        kind = spec["type"]
        if not isinstance(kind, str) or kind not in _KINDS or _KINDS[kind].untyped:
            raise ValueError(
                f"layer_schedule: 'type' must be one of {kind_names()}, got {kind!r}; for milestones "
                f"give a dict {{start: layers}} without 'type', e.g. {{0: [11], 3: [1, 11]}}."
            )
        return _KINDS[kind].from_json(spec)
    return _kind_of("untyped").from_json(spec)
