"""Layer ids, layer stacks, times and seeded draws: what every schedule kind uses. No torch."""

from __future__ import annotations

import hashlib
import operator
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

LayerId = Union[int, str]
Canonicalizer = Callable[[Any, str], LayerId]

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


def stable_int(*parts: Any) -> int:
    """A 64-bit int that depends only on ``parts`` (sha256 of their ``str`` joined by ``":"``), the same
    on every Python, platform and run (unlike ``hash``)."""
    text = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def seeded_permutation(n: int, *key: Any) -> List[int]:
    """A permutation of ``range(n)`` that depends only on ``key`` (same on every Python and platform)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = stable_int(*(key + (i,))) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def seeded_sample(pool: List[LayerId], k: int, *key: Any) -> List[LayerId]:
    pool = list(pool)
    for i in range(k):
        j = i + stable_int(*(key + (i,))) % (len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def short_layer_list(layers: List[LayerId]) -> str:
    """A layer list for an error message: whole up to 12 layers, else its ends and its length."""
    if len(layers) <= 12:
        return repr(layers)
    return f"{layers[:6]} ... {layers[-3:]} ({len(layers)} layers)"
