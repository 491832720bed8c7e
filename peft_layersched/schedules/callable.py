"""The callable kind: a Python function ``t -> layers``, not saved with the adapter. No torch."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from .base import Schedule, ScheduleSpec, kind_names, register_kind
from .ids import Canonicalizer, LayerId, check_layer_list, short_layer_list


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
            f"layer_schedule to a milestone dict {{start: layers}} or a dict with a 'type' "
            f"({', '.join(kind_names())}), which are saved."
        )

    def initial_layers(self) -> List[LayerId]:
        return []

    def layers_until(self, t: int) -> List[LayerId]:
        return self.active_at(t)

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        return None


@register_kind
class CallableSpec(ScheduleSpec):
    """A pure Python function ``t -> layers``, at runtime only.

    It is saved as ``{"type": "callable", "name": ...}``; after loading, give it back with
    ``model.set_layer_schedule(fn)``. It may return the preallocated layers only.
    """

    kind = "callable"
    runtime = CallableSchedule
    takes_function = True
    listed = False  # users never write {"type": "callable"}: a saved callable loads as it
    FIELDS = {"name": "the function's qualified name"}

    def __init__(self, fn: Optional[Callable[[int], Any]], name: Optional[str] = None) -> None:
        self.fn = fn
        self.name = _callable_name(fn) if name is None else name

    @classmethod
    def from_json(cls, value: Any) -> "ScheduleSpec":
        return UnsavedCallableSpec(value)

    def describe(self, unit: str) -> str:
        return "callable: {}({})".format(self.name, unit)


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

    def describe(self, unit: str) -> str:
        return "callable (not saved): {}".format(self.name)
