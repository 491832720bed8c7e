"""The PEFT tuner: LoRA preallocated over every scheduled layer, and the switch of which layers train."""

from .adopt import schedule_lora
from .model import (
    OPTIMIZER,
    REQUIRES_GRAD,
    ScheduledLoraModel,
    deferred_load_check,
    find_scheduled_tuner,
    peft_model_of,
    weights_show_training,
)

__all__ = [
    "OPTIMIZER",
    "REQUIRES_GRAD",
    "ScheduledLoraModel",
    "deferred_load_check",
    "find_scheduled_tuner",
    "peft_model_of",
    "schedule_lora",
    "weights_show_training",
]
