"""The HF Trainer integration: the schedule callback and the Trainer hooks it installs."""

from .callback import LayerScheduleCallback
from .hooks import LayerScheduleTrainerMixin

__all__ = ["LayerScheduleCallback", "LayerScheduleTrainerMixin"]
