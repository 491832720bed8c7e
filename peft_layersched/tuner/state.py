"""The tuner's own state: one ``TunerState`` per tuner, one ``AdapterState`` per scheduled adapter.

PEFT's state (configs, LoRA layers) stays where PEFT keeps it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from ..layers import LayerIndex
from ..schedules import LayerId, Schedule

# The freezing modes: frozen layers get requires_grad=False, or the optimizer's per-layer LR freezes them.
REQUIRES_GRAD = "requires_grad"
OPTIMIZER = "optimizer"


def at_start(schedule: Optional[Schedule]) -> List[LayerId]:
    # A callable schedule loaded from disk has no function until set_layer_schedule(): no layer yet.
    if schedule is None or not schedule.runnable:
        return []
    return schedule.active_at(0)


class AdapterState(object):
    """What one adapter's schedule means on this model, and where it stands.

    ``targets`` are the modules planned for injection; ``modules`` the LoRA modules injected, with their
    layer. ``active`` is ``None`` until the first ``activate_layers``. ``ever`` holds the layers that trained.
    """

    def __init__(
        self,
        index: LayerIndex,
        schedule: Optional[Schedule],
        preallocated: Optional[List[LayerId]] = None,
        targets: Optional[Dict[str, Optional[LayerId]]] = None,
    ) -> None:
        self.index = index
        self.schedule = schedule
        self.preallocated = preallocated
        self.targets = targets
        self.modules: Dict[str, Optional[LayerId]] = {}
        self.active: Optional[List[LayerId]] = None
        self.ever: Set[LayerId] = set()
        self.time: Optional[int] = None

    def held_layers(self) -> List[LayerId]:
        """The layers that hold a LoRA module of this adapter, in layer order."""
        return self.index.held_layers(self.modules.values())

    def in_forward(self) -> Set[LayerId]:
        """Layers whose adapter runs: active now or before. Before any activation, the schedule's first."""
        now = self.active if self.active is not None else at_start(self.schedule)
        return self.ever | set(now)


class TunerState(object):
    """Everything a ``ScheduledLoraModel`` keeps besides PEFT's own state.

    ``current`` is the adapter that ``activate_layers`` drives by default. ``undriven`` is set while a
    scheduled adapter has had no ``activate_layers`` yet. The ``load_*`` fields serve the loaded-weights
    checks: ``loading`` is the load in progress, ``deferrals`` the open ``deferred_load_check`` blocks.
    """

    def __init__(self) -> None:
        self.adapters: Dict[str, AdapterState] = {}
        self.current: Optional[str] = None
        self.freezing = REQUIRES_GRAD
        self.undriven = False
        self.warned_undriven = False
        self.watch_hooks: List[Any] = []
        self.loading: Optional[Tuple[str, Dict[str, Any]]] = None
        self.deferrals = 0
        self.load_check_pending = False
        self.load_check_hooks: Optional[List[Any]] = None

    def scheduled(self) -> List[Tuple[str, AdapterState]]:
        """The adapters that run a schedule (not plain LoRA), in insertion order."""
        return [(name, adapter) for name, adapter in self.adapters.items() if adapter.schedule is not None]
