"""Each layer's LR factor: 0 while frozen, the new-layer scale and warm-up after it joins, else 1."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

from ..schedules import LayerId
from .engines import LAYER_KEY, layer_groups
from .optim import LayerLRs
from .optim import missing as missing_params


class LrFactors(object):
    """Sets the factors into the optimizer's per-layer param groups before each optimizer step, and keeps
    the LRs each layer got (``next_lrs``: those the next step uses)."""

    def __init__(self, optimizer: Any, engine: Any, params: Dict[LayerId, List[Any]], scale: float,
                 warmup: int) -> None:
        self.optimizer, self.params, self.scale, self.warmup = optimizer, params, scale, warmup
        self.lrs = self._prepare(optimizer, engine)
        self.next_lrs: Dict[LayerId, float] = {}
        self._warned_skip = False

    def _prepare(self, optimizer: Any, engine: Any) -> Optional[LayerLRs]:
        if optimizer is None:
            return None
        # (Under ZeRO the param groups hold flat partitions: there the per-layer groups are the check.)
        missing = {} if engine.needs_layer_groups else missing_params(optimizer, self.params)
        if missing:
            count = sum(p.numel() for ps in missing.values() for p in ps)
            raise ValueError(
                f"the optimizer does not hold the LoRA parameters of layer(s) {list(missing)} ({count} "
                f"parameters); they would never train when their phase comes. Build the optimizer over "
                f"LayerScheduler.param_groups(model) (or [p for p in model.parameters() if p.requires_grad]) "
                f"right after get_peft_model / PeftModel.from_pretrained (before activate_layers), or let the "
                f"Trainer build it with LayerScheduleCallback passed to Trainer(callbacks=[...])."
            )
        found = layer_groups(optimizer)
        lacking = [layer for layer in self.params if layer not in found]
        if lacking and (engine.needs_layer_groups or self.scale != 1.0 or self.warmup > 0):
            why = ("under DeepSpeed (engine 'lr-zero') a frozen layer's own group runs at LR 0"
                   if engine.needs_layer_groups else "new_layer_lr_scale / new_layer_warmup_steps set each "
                   "layer's LR in its own group")
            raise ValueError(
                f"the optimizer has no param group of their own for layer(s) {lacking}, and {why}. Build it over "
                f"LayerScheduler.param_groups(model, base_groups) (e.g. torch.optim.AdamW("
                f"LayerScheduler.param_groups(model), lr=...)) right after get_peft_model, or let the Trainer "
                f"build it."
            )
        return LayerLRs(optimizer, LAYER_KEY) if found else None

    def check_skipped_step(self) -> None:
        """Warn once when the LR scheduler stepped from scaled LRs (a skipped optimizer step)."""
        if self.lrs is None or self._warned_skip or not self.lrs.stepped_from_scaled():
            return
        self._warned_skip = True
        warnings.warn(
            "LayerScheduler: the optimizer step was skipped (AMP's GradScaler found inf/nan gradients?) and the "
            "LR scheduler then stepped from the layer groups' scaled LRs (x 0 for frozen layers), so those "
            "groups' LRs are now off. In a loop that may skip optimizer steps, call sched.unscale_lrs() right "
            "before lr_scheduler.step(): scaler.step(optimizer); scaler.update(); sched.unscale_lrs(); "
            "lr_scheduler.step(); sched.step().",
            stacklevel=3,
        )

    def unscale(self) -> None:
        if self.lrs is not None:
            self.lrs.restore()

    def prepare(self, step: int, current: Optional[List[LayerId]], schedule: Any,
                join_step: Callable[[LayerId], int]) -> None:
        """Before optimizer step number ``step``: each layer group's LR, and the LRs that step uses."""
        if self.optimizer is None:
            return
        factors = self.factors(step, current, schedule, join_step)
        grouped = self.lrs.apply(factors) if self.lrs is not None else {}
        if len(grouped) < len(self.params):
            held = self._held(factors, current)  # layers without a group of their own
            held.update(grouped)
            grouped = held
        self.next_lrs = grouped

    def _held(self, factors: Dict[LayerId, float], current: Optional[List[LayerId]]) -> Dict[LayerId, float]:
        """Each layer's LR in an optimizer without per-layer groups (its group's; 0 while frozen)."""
        held: Dict[int, float] = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                held[id(param)] = float(group["lr"])
        active = set(current or [])
        return {
            layer: (held[id(params[0])] * factors.get(layer, 1.0) if layer in active else 0.0)
            for layer, params in self.params.items() if params and id(params[0]) in held
        }

    def factors(self, step: int, current: Optional[List[LayerId]], schedule: Any,
                join_step: Callable[[LayerId], int]) -> Dict[LayerId, float]:
        """Each layer's LR factor for optimizer step number ``step`` (1-based); layers at 1 are left out."""
        active = set(current or [])
        factors: Dict[LayerId, float] = {layer: 0.0 for layer in self.params if layer not in active}
        if schedule is None or (self.scale == 1.0 and self.warmup == 0):
            return factors
        first = set(schedule.initial_layers())
        for layer in current or []:
            if layer in first:
                continue
            factor = self.scale
            if self.warmup:
                done = max(step - join_step(layer), 0)
                factor *= min(1.0, done / float(self.warmup))
            if factor != 1.0:
                factors[layer] = factor
        return factors
