"""``export_lora``: write a plain PEFT LoRA adapter that vanilla PEFT loads without this package."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from peft import LoraConfig

from . import _compat
from .tuner import find_scheduled_tuner, peft_model_of


def export_lora(
    model: Any,
    output_dir: str,
    adapter_name: Optional[str] = None,
    safe_serialization: Optional[bool] = None,
) -> LoraConfig:
    """Write ``model``'s adapter to ``output_dir`` as a plain LoRA adapter, ``peft_type`` ``LORA``.

    Only the layers that were ever active are written: the others never contributed. ``target_modules``
    lists their modules by full name; ``modules_to_save`` comes along. Any PEFT loads it with
    ``PeftModel.from_pretrained(base, output_dir)``, without this package, and gives the same outputs.
    ``safe_serialization`` defaults to safetensors where the installed PEFT reads them. Returns the config.
    """
    tuner = find_scheduled_tuner(model, "export_lora()")
    model = peft_model_of(model, tuner)  # a wrapper's PeftModel: its state dict keys are the adapter's
    plan = tuner.scheduled_adapter(adapter_name)
    name = plan.name
    source = tuner.peft_config[name]
    kept_layers = set(plan.ever_active_layers) if plan.schedule is not None else None
    kept = sorted(n for n, layer in plan.modules.items() if kept_layers is None or layer in kept_layers)
    dropped = sorted(set(plan.modules) - set(kept))
    if not kept:
        raise ValueError(
            f"nothing to export: no layer of adapter {name!r} has been active yet (preallocated: "
            f"{tuner.preallocated_layers}). Call activate_layers(t) / train first."
        )
    # The target list is exact: PEFT's layer filter goes.
    config = source.to_lora_config(target_modules=kept, layers_to_transform=None, layers_pattern=None,
                                   inference_mode=True)

    prefixes = tuple(f"base_model.model.{n}.lora_" for n in dropped)
    state = _compat.get_adapter_state_dict(model, name)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if not k.startswith(prefixes)}

    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    if safe_serialization is None:
        safe_serialization = _compat.PEFT_READS_SAFETENSORS
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(output_dir, "adapter_model.bin"))
    return config
