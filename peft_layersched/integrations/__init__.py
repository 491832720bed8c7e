"""Integrations with training frameworks.

* :mod:`peft_layersched.integrations.hf_trainer`: the HF Trainer callback and hooks (imported by the package).
* :mod:`peft_layersched.integrations.lightning`: the Lightning callback (imports Lightning; import it yourself,
  or ``peft_layersched.lightning``).
* :mod:`peft_layersched.integrations.axolotl`: the axolotl plugin (``adapter: scheduled_lora``; imports axolotl).
"""
