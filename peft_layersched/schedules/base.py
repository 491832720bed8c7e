"""The schedule core: ``t -> layer ids``, pure Python, no torch.

Every schedule is a pure, deterministic function of the time ``t`` (an epoch or an optimizer step) and
its own spec (seeds included; the adaptive kinds: their decision log), so every DDP rank and every
resumed run computes the same active set with no extra state.  Kinds (the ``layer_schedule`` value of
``ScheduledLoraConfig``):

* milestones ``{start: layers}`` (:class:`MilestoneSpec`);
* ``{"type": "gradual", ...}``: ULMFiT-style gradual unfreezing (:class:`GradualSpec`);
* ``{"type": "cyclic", ...}``: BAdam-style blocks taking turns (:class:`CyclicSpec`);
* ``{"type": "sampled", ...}``: LISA-style seeded draws of ``k`` layers (:class:`SampledSpec`);
* ``{"type": "adaptive", ...}`` / ``{"type": "autofreeze", ...}``: chosen from measured signals, with the
  decisions logged in the spec (:mod:`peft_layersched.adaptive`);
* a Python callable ``t -> layers`` (:class:`CallableSpec`; not serialized, see its docstring).

A *raw* layer id is what a user writes: an ``int`` (negative counts from the top) or a string
``"<stack>.<index>"``.  :func:`parse_schedule` validates a ``layer_schedule`` value into its *spec* (a
:class:`ScheduleSpec`: validated data, whose ``to_json`` the config stores); schedules that speak of "every layer"
or "the top k" need the model's layer list, so :meth:`ScheduleSpec.bind` builds the *runtime*
(:class:`Schedule`) on it (the tuner passes ``LayerIndex.all_layers()`` and ``LayerIndex.canonical``),
which maps ``t`` to canonical ids.  A milestone spec answers ``active_at``/``all_layers`` on raw ids too.  Everything
here can be validated and property-tested without a model.  Wording for people (descriptions, preview
spans) lives in :mod:`peft_layersched._describe`.
"""

from __future__ import annotations

import hashlib
import operator
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

LayerId = Union[int, str]
Canonicalizer = Callable[[Any, str], LayerId]

SCHEDULE_UNITS = ("epoch", "step")
SCHEDULE_TYPES = ("gradual", "cyclic", "sampled", "progressive", "adaptive", "autofreeze")

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


def check_layer_list(layers: Any, where: str) -> List[LayerId]:
    """A list (tuple, set) of layer ids, each checked by :func:`check_layer_id`; sets in a fixed order."""
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


class LayerStack(object):
    """One repeated block stack: ``length`` blocks named ``name`` (``"<name>.<index>"`` ids with several
    stacks), at the dotted module ``path`` (``None`` when only the ids are known)."""

    def __init__(self, name: str, path: Optional[str], length: int) -> None:
        self.name = name
        self.path = path
        self.length = length

    @property
    def aliases(self) -> Set[str]:
        if self.path is None:
            return {self.name}
        parent = self.path.rsplit(".", 1)[0] if "." in self.path else self.path
        return {self.name, self.path, parent}

    def __repr__(self) -> str:
        return f"LayerStack(name={self.name!r}, path={self.path!r}, length={self.length})"


class StackIndex(object):
    """Raw -> canonical layer ids (and layer order) for a model's layer stacks, without the model.

    ``named``: whether ids carry the stack name (``"decoder.5"``); default: with several stacks.
    ``LayerIndex`` (:mod:`peft_layersched.layers`) adds discovery on a model and module names.
    """

    def __init__(self, stacks: Sequence[LayerStack], named: Optional[bool] = None) -> None:
        self.stacks = list(stacks)
        self._order = {stack.name: i for i, stack in enumerate(self.stacks)}
        self._named = len(self.stacks) > 1 if named is None else bool(named)

    @classmethod
    def from_layer_ids(cls, layers: Sequence[LayerId]) -> "StackIndex":
        """The stacks that canonical ``layers`` (every layer of a model, in order) come from."""
        lengths: Dict[Optional[str], int] = {}
        for layer in layers:
            stack, index = split_layer_id(layer)
            lengths[stack] = max(lengths.get(stack, 0), index + 1)
        named = [name for name in lengths if name is not None]
        if named:  # (a bare id is ambiguous there: ints mixed in cannot be addressed)
            return cls([LayerStack(name, None, lengths[name]) for name in named], named=True)
        return cls([LayerStack("", None, lengths[None])] if lengths else [], named=False)

    @property
    def multi(self) -> bool:
        return self._named

    def describe(self) -> str:
        if not self.stacks:
            return "no layer stacks (no nn.ModuleList of repeated blocks) were found"
        if not self.multi:
            stack = self.stacks[0]
            where = f" in '{stack.path}'" if stack.path is not None else ""
            return f"{stack.length} layers{where} (ids 0..{stack.length - 1}, or -{stack.length}..-1)"
        parts = [
            f"'{s.name}' ({s.path + ', ' if s.path is not None else ''}{s.length} layers)" for s in self.stacks
        ]
        return "stacks " + ", ".join(parts)

    def _require_stacks(self, raw: Any) -> None:
        if not self.stacks:
            raise ValueError(
                f"cannot place layer {raw!r}: {self.describe()}. Set layer_stacks to the dotted path of "
                f"the model's block list (e.g. 'encoder.layer' or 'model.layers')."
            )

    def _stack_for(self, alias: str, raw: Any) -> LayerStack:
        for stack in self.stacks:
            if alias in stack.aliases:
                return stack
        raise ValueError(
            f"layer {raw!r}: unknown stack {alias!r}; the model has {self.describe()}. "
            f"Write e.g. {self.example()!r}."
        )

    def example(self) -> LayerId:
        if not self.stacks:
            return 0
        if not self.multi:
            return -1
        return f"{self.stacks[-1].name}.-1"

    def canonical(self, raw: Any, where: str = "layer") -> LayerId:
        """Canonical id for a user id: ``-1 -> 11``, ``"decoder.-1" -> "decoder.5"``."""
        raw = check_layer_id(raw, where)
        self._require_stacks(raw)
        alias, index = split_layer_id(raw)
        if alias is None:
            if self.multi:
                raise ValueError(
                    f"{where}: bare layer id {raw!r} is ambiguous: the model has {self.describe()}. "
                    f"Write '<stack>.<index>', e.g. '{self.stacks[0].name}.{index}' or "
                    f"'{self.stacks[-1].name}.{index}'."
                )
            stack = self.stacks[0]
        else:
            stack = self._stack_for(alias, raw)
        if not -stack.length <= index < stack.length:
            if self.multi or stack.path is not None:
                path = f" ({stack.path})" if stack.path is not None else ""
                size = f"stack '{stack.name}'{path} has {stack.length} layers"
            else:
                size = f"{stack.length} layers"
            raise ValueError(
                f"{where}: layer {raw!r} is out of range: {size}, valid indices are 0..{stack.length - 1} or "
                f"-{stack.length}..-1."
            )
        index %= stack.length
        return index if not self.multi else f"{stack.name}.{index}"

    def canonical_list(self, raws: Iterable[Any], where: str = "layer") -> List[LayerId]:
        return self.sort({self.canonical(raw, where) for raw in raws})

    def sort_key(self, layer: LayerId) -> Tuple[int, int]:
        if isinstance(layer, int):
            return (0, layer)
        name, index = layer.rsplit(".", 1)
        return (self._order.get(name, len(self._order)), int(index))

    def sort(self, layers: Iterable[LayerId]) -> List[LayerId]:
        return sorted(set(layers), key=self.sort_key)

    def held_layers(self, layers: Iterable[Optional[LayerId]]) -> List[LayerId]:
        """The layers among ``layers`` (``None``: outside every stack, left out), sorted."""
        return self.sort(layer for layer in layers if layer is not None)

    def all_layers(self) -> List[LayerId]:
        if not self.multi:
            return list(range(self.stacks[0].length)) if self.stacks else []
        return [f"{s.name}.{i}" for s in self.stacks for i in range(s.length)]


def check_time(t: Any, where: str = "activate_layers(t): t") -> int:
    """An epoch or optimizer step: an int >= 0; integer-like values (numpy/torch integer scalars, whole
    floats) are accepted as the int they hold."""
    if isinstance(t, float) and t.is_integer():
        t = int(t)  # then the t >= 0 check below applies to -1.0 too
    if not isinstance(t, (bool, int)) and hasattr(t, "__index__"):
        try:
            t = operator.index(t)  # numpy.int64, a 0-d integer torch tensor, ...
        except TypeError:
            pass
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"{where} must be an int (epoch or optimizer step), got {t!r} ({type(t).__name__}).")
    if t < 0:
        raise ValueError(f"{where} must be >= 0, got {t}.")
    return t


def check_unit(unit: Any) -> str:
    if unit not in SCHEDULE_UNITS:
        raise ValueError(f"schedule_unit={unit!r} is not supported; use one of {list(SCHEDULE_UNITS)}.")
    return unit


# ------------------------------------------------------------------------------------ the two halves
#
# A schedule comes in two objects: its *spec* (:class:`ScheduleSpec`: the validated ``layer_schedule``
# value; ``to_json`` gives what the config stores) and, once the model's layers are known, its
# *runtime* (:class:`Schedule`: ``t -> canonical layer ids``), which ``spec.bind(layers)`` builds from the
# spec.  A runtime is always bound; a spec never is.


class Schedule(object):
    """A schedule on a model's layers (what the tuner and the callback use); built by
    :meth:`ScheduleSpec.bind`, never unbound.

    * ``active_at(t)``: the layers that train at epoch/step ``t``;
    * ``all_layers()``: every layer the schedule can ever activate (the default preallocated set);
    * ``initial_layers()``: the layers of the first phase (``new_layer_lr_scale`` spares them);
    * ``layers_until(t)``: every layer active at some time in ``0..t`` (the ever-active set);
    * ``run_start(layer, t)``: when the run of consecutive active times of ``layer`` that holds ``t``
      began (``None`` if ``layer`` is not active at ``t``);
    * ``spec``: the :class:`ScheduleSpec` it was bound from (``kind`` is its kind).

    The active set only changes at multiples of ``granule`` (``every``; 1 for callables); the generic
    ``layers_until``/``run_start`` walk those periods, with caches that make the monotone queries of a
    training run O(1) amortized.
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
    """A validated ``layer_schedule`` value (what :func:`parse_schedule` returns; ``to_json()`` is what the
    config stores).

    * ``kind``: ``"milestones"``, ``"gradual"``, ``"cyclic"``, ``"sampled"`` or ``"callable"``;
    * ``to_json()``: the spec as written to ``adapter_config.json``;
    * ``bind(layers, canonical, default_candidates)``: the :class:`Schedule` on a model's layers.
    """

    kind = ""
    runtime: Callable[..., Schedule]  # the Schedule class bind() builds: runtime(spec, layers, canonical, default)
    needs_run_length = False  # True: the driver completes the spec with with_run_length(the run's length)

    def to_json(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

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


def _bind_candidates(
    raw: Optional[List[LayerId]],
    where: str,
    layers: Sequence[LayerId],
    canonical: Canonicalizer,
    default: Sequence[LayerId],
) -> List[LayerId]:
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


# ------------------------------------------------------------------------------------ milestones

Phases = List[Tuple[int, List[LayerId]]]


def _phase_at(phases: Phases, t: int) -> List[LayerId]:
    active: List[LayerId] = []
    for start, layers in phases:
        if start > t:
            break
        active = layers
    return list(active)


class MilestoneSchedule(Schedule):
    """Milestones on a model: the phases of a :class:`MilestoneSpec` with canonical ids."""

    def __init__(
        self, spec: "MilestoneSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.phases: Phases = [
            (start, self._sorted(canonical(layer, f"layer_schedule[{start}]") for layer in raw))
            for start, raw in spec.phases
        ]

    def active_at(self, t: int) -> List[LayerId]:
        return _phase_at(self.phases, t)

    def all_layers(self) -> List[LayerId]:
        return self._sorted(layer for _, layers in self.phases for layer in layers)

    def initial_layers(self) -> List[LayerId]:
        return list(self.phases[0][1])

    def layers_until(self, t: int) -> List[LayerId]:
        return self._sorted(layer for start, layers in self.phases if start <= t for layer in layers)

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        joined: Optional[int] = None
        for start, layers in self.phases:
            if start > t:
                break
            if layer in layers:
                joined = start if joined is None else joined
            else:
                joined = None
        return joined

    def boundaries(self) -> List[int]:
        return [start for start, _ in self.phases]

    def first_idle(self, start: int, end: int, budget: int = 100000) -> Optional[int]:
        for t in [start] + [b for b in self.boundaries() if start < b <= end]:
            if not self.active_at(t):
                return t
        return None

    def as_spec(self) -> "MilestoneSpec":
        return MilestoneSpec(dict(self.phases))


class MilestoneSpec(ScheduleSpec):
    """``{start: layers}``: from ``start`` on exactly ``layers`` train, until the next start.

    Before the first start nothing is scheduled (only ``modules_to_save`` train).  The spec answers
    ``active_at(t)`` and ``all_layers()`` on the raw ids as written; bound (:class:`MilestoneSchedule`)
    on canonical ids.
    """

    kind = "milestones"
    runtime = MilestoneSchedule

    def __init__(self, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise TypeError(
                f"layer_schedule must be a dict {{start: layers}}, a dict with a 'type' key "
                f"({', '.join(SCHEDULE_TYPES)}) or a callable t -> layers, got {type(spec).__name__} {spec!r}; "
                f"e.g. {{0: [11], 3: [1, 11]}} or {{'type': 'gradual', 'k': 1, 'n': 1, 'every': 1}}."
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
            phases[start] = check_layer_list(layers, f"layer_schedule[{start}]")
        self.phases: Phases = sorted(phases.items())

    def active_at(self, t: int) -> List[LayerId]:
        return _phase_at(self.phases, t)

    def all_layers(self) -> List[LayerId]:
        """Every layer of every phase, raw, in the order first written."""
        seen: List[LayerId] = []
        for _, layers in self.phases:
            seen.extend(layer for layer in layers if layer not in seen)
        return seen

    def boundaries(self) -> List[int]:
        return [start for start, _ in self.phases]

    def to_json(self) -> Dict[int, List[LayerId]]:
        return {start: list(layers) for start, layers in self.phases}


# ------------------------------------------------------------------------------------ typed specs

_REQUIRED = object()


class _Spec(object):
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


def stable_int(*parts: Any) -> int:
    """A 64-bit int that depends only on ``parts`` (sha256 of their ``str`` joined by ``":"``), the same
    on every Python, platform and run (unlike ``hash``)."""
    text = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _seeded_permutation(n: int, *key: Any) -> List[int]:
    """A permutation of ``range(n)`` that depends only on ``key`` (same on every Python and platform)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = stable_int(*(key + (i,))) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _seeded_sample(pool: List[LayerId], k: int, *key: Any) -> List[LayerId]:
    pool = list(pool)
    for i in range(k):
        j = i + stable_int(*(key + (i,))) % (len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


class GradualSchedule(Schedule):
    """Gradual unfreezing on a model: ``_ranked`` are the candidates, first to join first."""

    def __init__(
        self, spec: "GradualSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.k, self.n, self.every = spec.k, spec.n, spec.every
        self.granule = spec.every
        where = "layer_schedule (type 'gradual') 'layers'"
        candidates = _bind_candidates(spec.layers, where, layers, canonical, default)
        if spec.k > len(candidates):
            raise ValueError(
                f"layer_schedule (type 'gradual'): 'k' is {spec.k} but there are only {len(candidates)} candidate "
                f"layers ({short_layer_list(candidates)}); lower 'k' or widen 'layers'."
            )
        self._ranked: List[LayerId] = list(reversed(candidates)) if spec.side == "top" else candidates
        most = len(candidates) if spec.n > 0 else spec.k
        self._cap = most if spec.limit is None else min(spec.limit, most)

    def _count(self, period: int) -> int:
        return min(self.k + self.n * period, self._cap)

    def active_at(self, t: int) -> List[LayerId]:
        return self._sorted(self._ranked[: self._count(t // self.every)])

    def all_layers(self) -> List[LayerId]:
        return self._sorted(self._ranked[: self._cap])

    def layers_until(self, t: int) -> List[LayerId]:
        return self.active_at(t)  # layers only join

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        if layer not in self.active_at(t):
            return None
        rank = self._ranked.index(layer)
        if rank < self.k:
            return 0
        return -(-(rank + 1 - self.k) // self.n) * self.every  # first period whose count exceeds rank


class GradualSpec(ScheduleSpec):
    """ULMFiT-style gradual unfreezing: ``k`` layers from the top (or bottom), ``n`` more every ``every``
    epochs/steps, up to ``limit`` layers.

    ``{"type": "gradual", "k": 1, "n": 1, "every": 2, "from": "top", "limit": 6}``: top layer at
    0-1, top two at 2-3, ... up to the top six.  ``layers`` restricts the candidates (default: every layer
    that holds a target module, or ``preallocate_layers``).  Layers, once added, stay active.
    """

    kind = "gradual"
    runtime = GradualSchedule
    FIELDS = {
        "k": "layers active from the start, default 1",
        "n": "layers added each time, default 1",
        "every": "epochs/steps between additions, default 1",
        "from": "'top' (default) or 'bottom'",
        "limit": "most layers active at once, default all candidates",
        "layers": "candidate layers, default every layer",
    }

    def __init__(self, spec: Dict[Any, Any]) -> None:
        check = _Spec(spec, self.kind, self.FIELDS)
        self.k = check.integer("k", 1, 0, self.FIELDS["k"])
        self.n = check.integer("n", 1, 0, self.FIELDS["n"])
        self.every = check.integer("every", 1, 1, self.FIELDS["every"])
        self.side = check.choice("from", "top", ("top", "bottom"))
        self.limit = check.integer("limit", None, 1, self.FIELDS["limit"])
        self.layers = check.layers("layers", allow_empty=False)
        if self.k == 0 and self.n == 0:
            raise ValueError(f"{check.where}: 'k' and 'n' are both 0, so no layer would ever train; set k >= 1.")
        if self.limit is not None and self.limit < self.k:
            raise ValueError(
                f"{check.where}: 'limit' ({self.limit}) is smaller than 'k' ({self.k}), the layers active from "
                f"the start; raise 'limit' or lower 'k'."
            )

    def to_json(self) -> Dict[str, Any]:
        spec: Dict[str, Any] = {"type": self.kind, "k": self.k, "n": self.n, "every": self.every, "from": self.side}
        if self.limit is not None:
            spec["limit"] = self.limit
        if self.layers is not None:
            spec["layers"] = list(self.layers)
        return spec


class CyclicSchedule(Schedule):
    """Block round-robin on a model: ``_blocks`` are the candidate blocks in model order."""

    def __init__(
        self, spec: "CyclicSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.every, self.order, self.seed = spec.every, spec.order, spec.seed
        self.granule = spec.every
        where = "layer_schedule (type 'cyclic') 'layers'"
        candidates = _bind_candidates(spec.layers, where, layers, canonical, default)
        if not candidates:
            raise ValueError("layer_schedule (type 'cyclic'): there are no candidate layers to cycle through.")
        if spec.block > len(candidates):
            raise ValueError(
                f"layer_schedule (type 'cyclic'): 'block' is {spec.block} but there are only {len(candidates)} "
                f"candidate layers ({short_layer_list(candidates)}), so one block would hold them all and every layer "
                f"would train at every step; lower 'block' (at most {len(candidates)}) or widen 'layers'."
            )
        self._blocks = [candidates[i : i + spec.block] for i in range(0, len(candidates), spec.block)]

    @property
    def block_count(self) -> int:
        return len(self._blocks)

    def block_at(self, t: int) -> int:
        """Index of the block (in model order) that trains at ``t``."""
        period = t // self.every
        count = len(self._blocks)
        cycle, position = divmod(period, count)
        if self.order == "ascending":
            return position
        if self.order == "descending":
            return count - 1 - position
        return _seeded_permutation(count, "cyclic", self.seed, cycle)[position]

    def active_at(self, t: int) -> List[LayerId]:
        return list(self._blocks[self.block_at(t)])

    def all_layers(self) -> List[LayerId]:
        return [layer for block in self._blocks for layer in block]

    def _always_active(self, layer: LayerId) -> bool:
        return len(self._blocks) == 1


class CyclicSpec(ScheduleSpec):
    """BAdam-style block round-robin: the candidates, in model order, are cut into blocks of ``block``
    layers (the last one may be smaller), and one block at a time trains for ``every`` epochs/steps.

    ``order``: ``"ascending"`` (bottom block first), ``"descending"`` or ``"random"`` (a new seeded
    permutation of the blocks in every cycle).
    ``{"type": "cyclic", "block": 2, "every": 10, "order": "random", "seed": 0}``.
    """

    kind = "cyclic"
    runtime = CyclicSchedule
    ORDERS = ("ascending", "descending", "random")
    FIELDS = {
        "block": "layers per block, default 1",
        "every": "epochs/steps each block trains, default 1",
        "order": "'ascending' (default), 'descending' or 'random'",
        "seed": "seed of the random order, default 0",
        "layers": "candidate layers, default every layer",
    }

    def __init__(self, spec: Dict[Any, Any]) -> None:
        check = _Spec(spec, self.kind, self.FIELDS)
        self.block = check.integer("block", 1, 1, self.FIELDS["block"])
        self.every = check.integer("every", 1, 1, self.FIELDS["every"])
        self.order = check.choice("order", "ascending", self.ORDERS)
        self.seed = check.integer("seed", 0, None, self.FIELDS["seed"])
        self.layers = check.layers("layers", allow_empty=False)

    def to_json(self) -> Dict[str, Any]:
        spec: Dict[str, Any] = {
            "type": self.kind,
            "block": self.block,
            "every": self.every,
            "order": self.order,
            "seed": self.seed,
        }
        if self.layers is not None:
            spec["layers"] = list(self.layers)
        return spec


class SampledSchedule(Schedule):
    """Seeded sampling on a model: ``k`` of ``_pool`` drawn per period, plus the ``_fixed`` layers."""

    def __init__(
        self, spec: "SampledSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.k, self.every, self.seed = spec.k, spec.every, spec.seed
        self.granule = spec.every
        where = "layer_schedule (type 'sampled')"
        self._fixed = _bind_candidates(spec.always, f"{where} 'always'", layers, canonical, [])
        candidates = _bind_candidates(spec.layers, f"{where} 'layers'", layers, canonical, default)
        self._pool = [layer for layer in candidates if layer not in set(self._fixed)]
        if spec.k > len(self._pool):
            raise ValueError(
                f"{where}: 'k' is {spec.k} but there are only {len(self._pool)} candidate layers to draw from "
                f"({short_layer_list(self._pool)}, 'always' layers excluded); lower 'k' or widen 'layers'."
            )

    def active_at(self, t: int) -> List[LayerId]:
        drawn = _seeded_sample(self._pool, self.k, "sampled", self.seed, t // self.every)
        return self._sorted(self._fixed + drawn)

    def all_layers(self) -> List[LayerId]:
        return self._sorted(self._fixed + self._pool)

    def _always_active(self, layer: LayerId) -> bool:
        return layer in self._fixed or self.k == len(self._pool)


class SampledSpec(ScheduleSpec):
    """LISA-style sampling: every ``every`` epochs/steps, ``k`` candidate layers drawn without replacement
    by a generator seeded with ``(seed, period)``, plus the ``always`` layers.

    ``{"type": "sampled", "k": 2, "every": 5, "seed": 0, "always": [-1]}``.
    """

    kind = "sampled"
    runtime = SampledSchedule
    FIELDS = {
        "k": "layers drawn each time, default 1",
        "every": "epochs/steps between draws, default 1",
        "seed": "seed of the draws, default 0",
        "always": "layers active at every time, default none",
        "layers": "candidate layers to draw from, default every layer",
    }

    def __init__(self, spec: Dict[Any, Any]) -> None:
        check = _Spec(spec, self.kind, self.FIELDS)
        self.k = check.integer("k", 1, 1, self.FIELDS["k"])
        self.every = check.integer("every", 1, 1, self.FIELDS["every"])
        self.seed = check.integer("seed", 0, None, self.FIELDS["seed"])
        self.always = check.layers("always", allow_empty=True) or []
        self.layers = check.layers("layers", allow_empty=False)

    def to_json(self) -> Dict[str, Any]:
        spec: Dict[str, Any] = {
            "type": self.kind,
            "k": self.k,
            "every": self.every,
            "seed": self.seed,
            "always": list(self.always),
        }
        if self.layers is not None:
            spec["layers"] = list(self.layers)
        return spec


# ------------------------------------------------------------------------------------ callables


def _fn_hint(name: str) -> str:
    short = name.rsplit(".", 1)[-1]
    return short if short.isidentifier() else "fn"


def _callable_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{module}.{name}" if module else str(name)


class CallableSchedule(Schedule):
    """A callable schedule on a model: ``fn(t)``, checked against the allowed (preallocated) layers."""

    def __init__(
        self, spec: "CallableSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.fn = spec.fn
        self.name = spec.name
        self._canonical = canonical
        self._allowed = self._sorted(default)

    def active_at(self, t: int) -> List[LayerId]:
        assert self.fn is not None
        where = f"layer_schedule {self.name}({t})"
        raw = check_layer_list(self.fn(t), where)
        active = self._sorted(self._canonical(layer, where) for layer in raw)
        extra = [layer for layer in active if layer not in self._order or layer not in set(self._allowed)]
        if extra:
            raise ValueError(
                f"{where} returned layer(s) {extra}, which carry no adapter; adapters exist on "
                f"{short_layer_list(self._allowed)}. Add the layers to preallocate_layers (a callable schedule cannot "
                f"tell in advance which layers it will use)."
            )
        return active

    def all_layers(self) -> List[LayerId]:
        return list(self._allowed)


class UnsavedCallableSchedule(CallableSchedule):
    """A saved callable schedule on a model: its layers are known, the function is not."""

    runnable = False

    def active_at(self, t: int) -> List[LayerId]:
        raise ValueError(
            f"layer_schedule was the Python callable {self.name}, which is not saved with the adapter "
            f"(adapter_config.json only records its name). Give it back before training: "
            f"model.set_layer_schedule({_fn_hint(self.name)}) on the loaded PeftModel, or set "
            f"layer_schedule to a milestone/gradual/cyclic/sampled dict, which are saved."
        )

    def initial_layers(self) -> List[LayerId]:
        return []

    def layers_until(self, t: int) -> List[LayerId]:
        return self.active_at(t)

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        return None


class CallableSpec(ScheduleSpec):
    """A Python function ``t -> layers`` (it must be pure: the same ``t`` always gives the same layers).

    Allowed at runtime only: ``save_pretrained`` writes ``{"type": "callable", "name": ...}`` in its
    place (with a warning); after loading, give the function back with
    ``model.set_layer_schedule(fn)``.  The layers it may return are the preallocated ones
    (``preallocate_layers``, default every layer that holds a target module).
    """

    kind = "callable"
    runtime = CallableSchedule

    def __init__(self, fn: Optional[Callable[[int], Any]], name: Optional[str] = None) -> None:
        self.fn = fn
        self.name = _callable_name(fn) if name is None else name

    def to_json(self) -> Dict[str, Any]:
        return {"type": self.kind, "name": self.name}


class UnsavedCallableSpec(CallableSpec):
    """What a saved callable schedule loads as (``{"type": "callable", "name": ...}``): no function."""

    runtime = UnsavedCallableSchedule

    def __init__(self, spec: Dict[Any, Any]) -> None:
        unknown = [key for key in spec if key not in ("type", "name")]
        if unknown:
            raise ValueError(f"layer_schedule (type 'callable'): unknown key(s) {unknown}; valid keys: 'type', 'name'.")
        name = spec.get("name", "<callable>")
        if not isinstance(name, str):
            raise TypeError(f"layer_schedule (type 'callable'): 'name' must be a string, got {name!r}.")
        super().__init__(None, name)


# ------------------------------------------------------------------------------------ parsing

_TYPED: Dict[str, Any] = {"gradual": GradualSpec, "cyclic": CyclicSpec, "sampled": SampledSpec}


def register_kind(spec_class: Any) -> None:
    """Make ``{"type": spec_class.kind, ...}`` parse to ``spec_class`` (:mod:`peft_layersched.adaptive`
    registers its kinds when the package is imported)."""
    _TYPED[spec_class.kind] = spec_class


def parse_schedule(spec: Any) -> ScheduleSpec:
    """Validate a ``layer_schedule`` value and return its spec (:meth:`ScheduleSpec.bind` puts it on a model).

    ``spec``: a milestone dict ``{start: layers}``, a dict with a ``"type"`` key (``"gradual"``,
    ``"cyclic"``, ``"sampled"``, ``"adaptive"``, ``"autofreeze"``; ``"callable"`` is what a saved callable
    schedule loads as), a callable
    ``t -> layers``, a :class:`ScheduleSpec`, or a bound :class:`Schedule` (its spec as bound).  Raises
    ``TypeError``/``ValueError`` naming the field.
    """
    if isinstance(spec, ScheduleSpec):
        return spec
    if isinstance(spec, Schedule):
        return spec.as_spec()
    if callable(spec) and not isinstance(spec, (dict, type)):
        return CallableSpec(spec)
    if isinstance(spec, dict) and "type" in spec:
        kind = spec["type"]
        if kind == "callable":
            return UnsavedCallableSpec(spec)
        typed = _TYPED
        if not isinstance(kind, str) or kind not in typed:
            raise ValueError(
                f"layer_schedule: 'type' must be one of {list(SCHEDULE_TYPES)}, got {kind!r}; for milestones "
                f"give a dict {{start: layers}} without 'type', e.g. {{0: [11], 3: [1, 11]}}."
            )
        return typed[kind](spec)
    return MilestoneSpec(spec)


def short_layer_list(layers: List[LayerId]) -> str:
    """A layer list for an error message: whole up to 12 layers, else its ends and its length."""
    if len(layers) <= 12:
        return repr(layers)
    return f"{layers[:6]} ... {layers[-3:]} ({len(layers)} layers)"
