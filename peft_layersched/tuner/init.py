"""LoRA init of preallocated adapters, and which part of an adapter is zero at init.

A seeded adapter's weights depend only on the seed and its module name.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .. import _compat
from ..schedules import stable_int

# The init modes this package seeds itself; other modes are PEFT's own.
SEEDED_INIT_MODES = (True, False, "gaussian")

# Modes that leave the base weight as it is, so an adapter not yet active can leave the forward.
# pissa*, olora and unknown modes may move base weight into the adapter: those adapters all stay in.
_BASE_WEIGHT_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def keeps_base_weight(init_mode: Any) -> bool:
    """Whether ``init_lora_weights`` leaves the base weight untouched."""
    if isinstance(init_mode, bool):
        return True
    return init_mode in _BASE_WEIGHT_KEEPING_INITS


def new_init_seed() -> int:
    """The seed a config without ``init_seed`` records when its model is built."""
    return int(torch.initial_seed()) & ((1 << 63) - 1)


def module_seed(init_seed: int, module_name: str) -> int:
    return stable_int(init_seed, module_name) & ((1 << 63) - 1)


def _fill_uniform_fan_in(param: torch.Tensor, generator: torch.Generator) -> None:
    # = nn.init.kaiming_uniform_(a=sqrt(5)), PEFT's lora_A init; torch 1.13 has no generator argument.
    fan_in = param[0].numel() if param.dim() > 1 else param.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    values = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    param.copy_(values.to(dtype=param.dtype))


def _fill_normal(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    param.copy_(values.to(dtype=param.dtype))


def seeded_init(layer: nn.Module, adapter_name: str, init_mode: Any, seed: int) -> None:
    """PEFT's LoRA init for the modes in ``SEEDED_INIT_MODES``, from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    r = layer.r[adapter_name]
    weights = _compat.lora_weights(layer, adapter_name)
    if weights is None:
        return
    kind, weight_a, weight_b = weights
    with torch.no_grad():
        if kind == "linear":
            if init_mode == "gaussian":
                _fill_normal(weight_a, 1.0 / r, generator)
            else:
                _fill_uniform_fan_in(weight_a, generator)
            if init_mode is False:
                _fill_uniform_fan_in(weight_b, generator)
            else:
                weight_b.zero_()
        else:
            if init_mode is False:
                _fill_normal(weight_a, 1.0, generator)
            else:
                weight_a.zero_()
            _fill_normal(weight_b, 1.0, generator)


def zero_at_init_part(layer: nn.Module, adapter_name: str) -> Optional[torch.Tensor]:
    """The adapter's weight that PEFT's default init makes zero: ``lora_B``, or ``lora_embedding_A``."""
    weights = _compat.lora_weights(layer, adapter_name)
    if weights is None:
        return None
    kind, weight_a, weight_b = weights
    return weight_a if kind == "embedding" else weight_b


def weights_show_training(init_mode: Any, zero_at_init: Optional[torch.Tensor]) -> Optional[bool]:
    """Whether an adapter's part that is zero at init is not zero any more.

    ``None`` when the init does not tell: a mode other than True or "gaussian", or no such part.
    """
    if zero_at_init is None or not (init_mode is True or init_mode == "gaussian"):
        return None
    return bool(zero_at_init.detach().float().abs().sum() > 0)
