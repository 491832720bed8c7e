"""The public path of the Lightning callback: ``from peft_layersched.lightning import LayerScheduleFinetuning``.

Importing it imports Lightning; ``import peft_layersched`` does not.
"""

from .integrations.lightning import LayerScheduleFinetuning

__all__ = ["LayerScheduleFinetuning"]
