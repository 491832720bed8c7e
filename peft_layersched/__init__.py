"""peft-layersched: LoRA on chosen transformer layers, with a schedule of which layers train when.

Importing the package registers the ``SCHEDULED_LORA`` PEFT type, so ``get_peft_model(model,
ScheduledLoraConfig(...))`` and ``PeftModel.from_pretrained(base, path)`` work as for plain LoRA.
"""

from .config import ScheduledLoraConfig
from .export import export_lora
from .integrations.hf_trainer import LayerScheduleCallback, LayerScheduleTrainerMixin
from .registration import register
from .training import LayerScheduler, PrefixCache
from .tuner import ScheduledAdapter, ScheduledLoraModel, schedule_lora

__version__ = "0.2.0"

register()

__all__ = [
    "ScheduledLoraConfig",
    "ScheduledLoraModel",
    "ScheduledAdapter",
    "LayerScheduler",
    "PrefixCache",
    "LayerScheduleCallback",
    "LayerScheduleTrainerMixin",
    "export_lora",
    "schedule_lora",
    "__version__",
]


# PEP 562: ``from peft_layersched import LayerScheduleFinetuning`` imports Lightning only then (not in
# __all__: a star import must not need Lightning).
def __getattr__(name):
    if name == "LayerScheduleFinetuning":
        from .integrations.lightning import LayerScheduleFinetuning

        return LayerScheduleFinetuning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
