"""Every difference between PEFT/transformers/torch versions lives here.

The rest of the package reads as if there were one PEFT, one transformers and one torch.  We detect
features, not version numbers, except where noted.  Each function's docstring says which versions
behave how.  One module per library: :mod:`._peft`, :mod:`._transformers`, :mod:`._torch`; the rest
of the package imports this package (``from . import _compat``) and uses the names below.
"""

from __future__ import annotations

from ._peft import (
    LORA,
    PEFT_READS_SAFETENSORS,
    PEFT_VERSION,
    SCHEDULED_LORA,
    TunerHooks,
    UniformLoraConfig,
    adapter_parameters,
    base_weight,
    default_target_modules,
    get_adapter_state_dict,
    install_legacy_safetensors_reader,
    is_lora_layer,
    is_tuner_layer,
    layer_runs,
    lora_weights,
    module_excluded,
    optional_field,
    register,
    route_layer,
    tuner_active_adapters,
    unmerge_layer,
)
from ._torch import (
    empty_weights,
    fork_rng,
    put_forward_hook,
    register_step_post_hook,
    register_step_pre_hook,
    take_forward_hook,
)
from ._transformers import (
    checkpoint_reentrant,
    checkpointing_flag_holder,
    checkpointing_skips_layer_hooks,
    enable_gradient_checkpointing,
    input_require_grads_hooks,
    input_require_grads_hooks_of,
    linear_types,
    trainer_resumes_adapter_checkpoints,
    update_steps_per_epoch,
    write_legacy_resume_weights,
)

__all__ = [
    "LORA",
    "PEFT_READS_SAFETENSORS",
    "PEFT_VERSION",
    "SCHEDULED_LORA",
    "TunerHooks",
    "UniformLoraConfig",
    "adapter_parameters",
    "base_weight",
    "checkpoint_reentrant",
    "checkpointing_flag_holder",
    "checkpointing_skips_layer_hooks",
    "default_target_modules",
    "empty_weights",
    "enable_gradient_checkpointing",
    "fork_rng",
    "get_adapter_state_dict",
    "input_require_grads_hooks",
    "input_require_grads_hooks_of",
    "install_legacy_safetensors_reader",
    "is_lora_layer",
    "is_tuner_layer",
    "layer_runs",
    "lora_weights",
    "linear_types",
    "module_excluded",
    "optional_field",
    "put_forward_hook",
    "register",
    "route_layer",
    "register_step_post_hook",
    "register_step_pre_hook",
    "take_forward_hook",
    "trainer_resumes_adapter_checkpoints",
    "tuner_active_adapters",
    "unmerge_layer",
    "update_steps_per_epoch",
    "write_legacy_resume_weights",
]
