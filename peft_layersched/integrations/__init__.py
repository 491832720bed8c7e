"""Integrations with training frameworks.

Each submodule imports its framework and is imported only by that framework (or by you): importing
``peft_layersched`` imports none of them.

* :mod:`peft_layersched.integrations.axolotl`: the axolotl plugin (``adapter: scheduled_lora``).
"""
