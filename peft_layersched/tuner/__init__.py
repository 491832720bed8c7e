"""The PEFT tuner: LoRA preallocated over every scheduled layer, and the switch of which layers train."""

from .adapter import ScheduledAdapter
from .adopt import schedule_lora
from .init import weights_show_training
from .model import ScheduledLoraModel, deferred_load_check, find_scheduled_tuner, peft_model_of
from .state import OPTIMIZER, REQUIRES_GRAD

__all__ = [
    "OPTIMIZER",
    "REQUIRES_GRAD",
    "ScheduledAdapter",
    "ScheduledLoraModel",
    "deferred_load_check",
    "find_scheduled_tuner",
    "peft_model_of",
    "schedule_lora",
    "weights_show_training",
]
