"""The cyclic kind: BAdam-style blocks of layers that take turns. No torch."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .base import Schedule, ScheduleSpec, SpecFields, bind_candidates, candidates_text, register_kind
from .ids import Canonicalizer, LayerId, seeded_permutation, short_layer_list


class CyclicSchedule(Schedule):
    """Block round-robin on a model: ``_blocks`` are the candidate blocks in model order."""

    def __init__(
        self, spec: "CyclicSpec", layers: Sequence[LayerId], canonical: Canonicalizer, default: Sequence[LayerId]
    ) -> None:
        super().__init__(spec, layers)
        self.every, self.order, self.seed = spec.every, spec.order, spec.seed
        self.granule = spec.every
        where = "layer_schedule (type 'cyclic') 'layers'"
        candidates = bind_candidates(spec.layers, where, layers, canonical, default)
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
        return seeded_permutation(count, "cyclic", self.seed, cycle)[position]

    def active_at(self, t: int) -> List[LayerId]:
        return list(self._blocks[self.block_at(t)])

    def all_layers(self) -> List[LayerId]:
        return [layer for block in self._blocks for layer in block]

    def _always_active(self, layer: LayerId) -> bool:
        return len(self._blocks) == 1

    def preview_span(self) -> int:
        return 2 * self.block_count * self.every


@register_kind
class CyclicSpec(ScheduleSpec):
    """BAdam-style blocks of ``block`` layers take turns, each for ``every`` epochs/steps.

    ``order``: ``"ascending"``, ``"descending"`` or ``"random"`` (reshuffled, seeded, every cycle).
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
        check = SpecFields(spec, self.kind, self.FIELDS)
        self.block = check.integer("block", 1, 1, self.FIELDS["block"])
        self.every = check.integer("every", 1, 1, self.FIELDS["every"])
        self.order = check.choice("order", "ascending", self.ORDERS)
        self.seed = check.integer("seed", 0, None, self.FIELDS["seed"])
        self.layers = check.layers("layers", allow_empty=False)

    def describe(self, unit: str) -> str:
        seed = " (seed {})".format(self.seed) if self.order == "random" else ""
        return "cyclic: blocks of {} layer(s), each for {} {}(s), {} order{} ({})".format(
            self.block, self.every, unit, self.order, seed, candidates_text(self.layers)
        )
