"""What happens to the optimizer state of layers that freeze and of layers that rejoin."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from ..schedules import LayerId
from .optim import drop_state, offload_state, reload_state


class StatePolicy(object):
    """``frozen_optimizer_state`` (keep / drop / offload) and ``reactivated_state`` (keep / reset) applied to
    one optimizer; offloaded state stays in the optimizer as CPU tensors."""

    def __init__(self, optimizer: Any, engine: Any, params: Dict[LayerId, List[Any]], frozen: str,
                 reactivated: str) -> None:
        # Under an engine that cannot move one layer's state (ZeRO's flat partitions) the policy is inert.
        self.optimizer = optimizer if engine.moves_layer_state else None
        self.params, self.frozen, self.reactivated = params, frozen, reactivated
        self.offloaded: Dict[Any, Any] = {}

    def switched(self, t: int, previous: Optional[List[LayerId]], active: List[LayerId], initial: bool,
                 schedule: Any) -> None:
        """The active set went from ``previous`` (``None``: a new run's optimizer, holding no state) to
        ``active`` at schedule time ``t``.  At a run's first switch every inactive layer counts as just
        frozen: a resumed optimizer's state was put back on the device by torch's ``load_state_dict``."""
        if self.optimizer is None:
            return
        was = list(self.params) if initial or previous is None else list(previous)
        rejoined: List[LayerId] = []
        if self.reactivated == "reset" and schedule is not None and t > 0 and previous is not None:
            earlier = set(schedule.layers_until(t - 1))
            rejoined = [layer for layer in active if layer not in previous and layer in earlier]
        self.move(was, active, rejoined)

    def move(self, was: Iterable[LayerId], now: List[LayerId], reset: Iterable[LayerId] = ()) -> None:
        """Layers in ``was`` and not in ``now`` froze, those in ``now`` and not in ``was`` joined; the state of
        the ``reset`` layers is dropped."""
        if self.optimizer is None:
            return
        params, was, active = self.params, set(was), set(now)
        frozen = [p for layer in params if layer in was and layer not in active for p in params[layer]]
        if self.frozen == "drop":
            drop_state(self.optimizer, frozen)
        elif self.frozen == "offload":
            self.offloaded.update(offload_state(self.optimizer, frozen))
        drop_state(self.optimizer, [p for layer in reset for p in params.get(layer, [])])
        joined = [p for layer in now if layer not in was for p in params.get(layer, [])]
        reload_state(self.optimizer, self.offloaded, joined)
