"""The training core: the scheduler every loop drives, the freezing engines, the layer signals."""

from .options import ScheduleOptions, check_options
from .prefix_cache import PrefixCache
from .scheduler import LayerScheduler

__all__ = ["LayerScheduler", "PrefixCache", "ScheduleOptions", "check_options"]
