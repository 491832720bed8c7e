"""Registration of ``SCHEDULED_LORA`` with PEFT's own type mappings (runs on import)."""

from __future__ import annotations

from typing import List

from . import _compat
from .config import ScheduledLoraConfig
from .tuner import ScheduledLoraModel


def register() -> List[str]:
    """Make ``get_peft_model`` and ``PeftModel.from_pretrained`` know ``SCHEDULED_LORA``; idempotent.

    Returns the PEFT mappings that now hold the entry.
    """
    _compat.install_legacy_safetensors_reader()
    return _compat.register(ScheduledLoraConfig, ScheduledLoraModel)
