"""peft-layersched: LoRA on chosen transformer layers, with a schedule of which layers train when.

Importing the package registers the ``SCHEDULED_LORA`` PEFT type, so ``get_peft_model(model,
ScheduledLoraConfig(...))`` and ``PeftModel.from_pretrained(base, path)`` work as for plain LoRA.
"""

from .adopt import schedule_lora
from .callback import LayerScheduleCallback
from .config import ScheduledLoraConfig
from .export import export_lora
from .registration import register
from .scheduler import LayerScheduler
from .trainer import LayerScheduleTrainerMixin

__version__ = "0.2.0"

register()

__all__ = [
    "ScheduledLoraConfig",
    "LayerScheduler",
    "LayerScheduleCallback",
    "LayerScheduleTrainerMixin",
    "export_lora",
    "schedule_lora",
    "__version__",
]
