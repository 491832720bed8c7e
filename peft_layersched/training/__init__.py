"""The training core: the scheduler every loop drives, the freezing engines, the layer signals."""

from .scheduler import LayerScheduler, ScheduleOptions, check_options

__all__ = ["LayerScheduler", "ScheduleOptions", "check_options"]
