"""The gradual kind: ULMFiT-style gradual unfreezing, one more layer every few epochs/steps. No torch."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .base import Schedule, ScheduleSpec, SpecFields, bind_candidates, candidates_text, register_kind
from .ids import Canonicalizer, LayerId, short_layer_list


class GradualSchedule(Schedule):
    """Gradual unfreezing on a model: ``_ranked`` are the candidates, first to join first."""

    def __init__(
        self, spec: "GradualSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.k, self.n, self.every = spec.k, spec.n, spec.every
        self.granule = spec.every
        where = "layer_schedule (type 'gradual') 'layers'"
        candidates = bind_candidates(spec.layers, where, layers, canonical, default)
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

    def preview_span(self) -> int:
        cap = len(self.all_layers())
        full = -(-(cap - self.k) // self.n) if self.n else 0
        return (max(full, 0) + 2) * self.every

    def run_start(self, layer: LayerId, t: int) -> Optional[int]:
        if layer not in self.active_at(t):
            return None
        rank = self._ranked.index(layer)
        if rank < self.k:
            return 0
        return -(-(rank + 1 - self.k) // self.n) * self.every  # first period whose count exceeds rank


@register_kind
class GradualSpec(ScheduleSpec):
    """ULMFiT-style gradual unfreezing: ``k`` layers from the top, ``n`` more every ``every`` times.

    ``{"type": "gradual", "k": 1, "n": 1, "every": 2, "from": "top", "limit": 6}``. Layers, once
    added, stay active.
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
        check = SpecFields(spec, self.kind, self.FIELDS)
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

    def _json_field(self, key: str) -> Any:
        return self.side if key == "from" else super()._json_field(key)

    def describe(self, unit: str) -> str:
        limit = "" if self.limit is None else ", up to {}".format(self.limit)
        return "gradual: {} layer(s) from the {}, +{} every {} {}(s){} ({})".format(
            self.k, self.side, self.n, self.every, unit, limit, candidates_text(self.layers)
        )
