"""The sampled kind: LISA-style seeded draws of ``k`` layers. No torch."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import Schedule, ScheduleSpec, SpecFields, bind_candidates, candidates_text, register_kind
from .ids import Canonicalizer, LayerId, seeded_sample, short_layer_list


class SampledSchedule(Schedule):
    """Seeded sampling on a model: ``k`` of ``_pool`` drawn per period, plus the ``_fixed`` layers."""

    def __init__(
        self, spec: "SampledSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.k, self.every, self.seed = spec.k, spec.every, spec.seed
        self.granule = spec.every
        where = "layer_schedule (type 'sampled')"
        self._fixed = bind_candidates(spec.always, f"{where} 'always'", layers, canonical, [])
        candidates = bind_candidates(spec.layers, f"{where} 'layers'", layers, canonical, default)
        self._pool = [layer for layer in candidates if layer not in set(self._fixed)]
        if spec.k > len(self._pool):
            raise ValueError(
                f"{where}: 'k' is {spec.k} but there are only {len(self._pool)} candidate layers to draw from "
                f"({short_layer_list(self._pool)}, 'always' layers excluded); lower 'k' or widen 'layers'."
            )

    def active_at(self, t: int) -> List[LayerId]:
        drawn = seeded_sample(self._pool, self.k, "sampled", self.seed, t // self.every)
        return self._sorted(self._fixed + drawn)

    def all_layers(self) -> List[LayerId]:
        return self._sorted(self._fixed + self._pool)

    def _always_active(self, layer: LayerId) -> bool:
        return layer in self._fixed or self.k == len(self._pool)

    def preview_span(self) -> int:
        return 8 * self.every


@register_kind
class SampledSpec(ScheduleSpec):
    """LISA-style sampling: ``k`` layers drawn every ``every`` epochs/steps, plus the ``always`` layers.

    Draws are seeded by ``(seed, period)``.

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
        check = SpecFields(spec, self.kind, self.FIELDS)
        self.k = check.integer("k", 1, 1, self.FIELDS["k"])
        self.every = check.integer("every", 1, 1, self.FIELDS["every"])
        self.seed = check.integer("seed", 0, None, self.FIELDS["seed"])
        self.always = check.layers("always", allow_empty=True) or []
        self.layers = check.layers("layers", allow_empty=False)

    def describe(self, unit: str) -> str:
        always = ", always {}".format(self.always) if self.always else ""
        return "sampled: {} layer(s) drawn every {} {}(s), seed {}{} ({})".format(
            self.k, self.every, unit, self.seed, always, candidates_text(self.layers)
        )
