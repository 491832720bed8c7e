"""transformers version differences (4.30 .. 5.x): Trainer counting and resume, Conv1D, gradient checkpointing."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


def _transformers_version() -> Any:
    import transformers
    from packaging.version import Version

    return Version(Version(transformers.__version__).base_version)


def update_steps_per_epoch(train_dataloader: Any, gradient_accumulation_steps: int) -> Optional[int]:
    """Optimizer steps per epoch the way the installed Trainer counts them (floor <= 4.51, ceil >= 4.52);
    ``None`` for a dataloader without a length (an ``IterableDataset``)."""
    from packaging.version import Version

    try:
        batches = len(train_dataloader)
    except TypeError:
        return None
    accumulation = max(int(gradient_accumulation_steps or 1), 1)
    if _transformers_version() >= Version("4.52"):
        return max(int(math.ceil(batches / float(accumulation))), 1)
    return max(batches // accumulation, 1)


def trainer_resumes_adapter_checkpoints() -> bool:
    """transformers >= 4.31 resumes a PeftModel from its adapter files; 4.30 needs a full weights file."""
    from packaging.version import Version

    return _transformers_version() >= Version("4.31")


def write_legacy_resume_weights(model: Any, args: Any, state: Any) -> Optional[str]:
    """Make the Trainer checkpoint just saved resumable on transformers 4.30; a no-op on 4.31+.

    transformers 4.30 resumes only from a full weights file, which a PeftModel checkpoint lacks: the
    trainable part (LoRA + ``modules_to_save``) is written to ``checkpoint-<step>/pytorch_model.bin``,
    which that Trainer loads non-strictly.  For ``TrainerCallback.on_save(args, state, ...)``; returns
    the path written, or ``None``.
    """
    import os

    if trainer_resumes_adapter_checkpoints() or model is None:
        return None
    folder = os.path.join(args.output_dir, "checkpoint-{}".format(state.global_step))
    if not (os.path.isdir(folder) and args.should_save):
        return None
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    path = os.path.join(folder, "pytorch_model.bin")
    torch.save(weights, path)
    return path


def linear_types() -> Tuple[type, ...]:
    """The module types ``target_modules="all-linear"`` means: ``nn.Linear`` and transformers' ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


# The input-require-grads forward hooks (``output.requires_grad_(True)`` on the input embeddings):
# transformers' ``enable_input_require_grads`` (4.30 .. 5.x; 5.x's gradient_checkpointing_enable calls it
# for every model that reads input_ids) and PEFT's fallback for models without that method (0.4+).
# transformers 4.x keeps only the last handle (a second call orphans the first hook) and 5.x keeps a
# list, so they are found on the modules themselves rather than through transformers' handles.
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def input_require_grads_hooks_of(module: nn.Module) -> List[Any]:
    """``(key, hook)`` for each input-require-grads hook registered on ``module`` itself."""
    found = []
    for key, hook in module._forward_hooks.items():
        if getattr(hook, "__name__", None) in _INPUT_GRAD_HOOKS:
            origin = str(getattr(hook, "__module__", "") or "").split(".")[0]
            if origin in ("transformers", "peft"):
                found.append((key, hook))
    return found


def input_require_grads_hooks(model: nn.Module) -> List[Any]:
    """``(module, key, hook)`` for each input-require-grads hook registered on a module of ``model``."""
    return [(m, key, hook) for m in model.modules() for key, hook in input_require_grads_hooks_of(m)]


def checkpoint_reentrant(holder: nn.Module) -> bool:
    """Whether the gradient checkpointing that ``holder``'s flag switches is torch's reentrant kind.

    transformers >= 4.35 store ``functools.partial(checkpoint, **gradient_checkpointing_kwargs)`` as
    ``_gradient_checkpointing_func`` (4.35 .. 4.57 default ``use_reentrant=True``, 5.x ``False``);
    < 4.35 call ``torch.utils.checkpoint.checkpoint`` without ``use_reentrant``, which is reentrant on
    every torch this package supports (1.13 .. 2.13).  An unknown function counts as reentrant: that
    is the kind that needs a leaf input, and a leaf is correct for either kind.
    """
    func = getattr(holder, "_gradient_checkpointing_func", None)
    if func is None:
        return True
    keywords = getattr(func, "keywords", None)
    if not isinstance(keywords, dict):
        return True
    return keywords.get("use_reentrant", True) is not False


# transformers 4.35 .. 4.51 T5-family stacks (t5, mt5, umt5, longt5, switch_transformers, ...) checkpoint
# ``layer_module.forward`` instead of the module: the blocks' forward hooks do not run under checkpointing.
_CHECKPOINTS_FORWARD = re.compile(r"_gradient_checkpointing_func\(\s*[\w.]+\.forward\s*,")
_SKIPS_HOOKS: Dict[type, bool] = {}


def checkpointing_skips_layer_hooks(stack_parent: nn.Module) -> bool:
    """Whether ``stack_parent`` (the module that loops over a layer stack) calls the layers' ``forward``
    directly when it checkpoints them, so their forward hooks do not run (transformers 4.35 .. 4.51,
    T5 family); everywhere else the checkpointed call is ``layer(...)`` / ``layer.__call__``.
    """
    cls = type(stack_parent)
    if cls not in _SKIPS_HOOKS:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):  # pragma: no cover - source not available (frozen app)
            source = ""
        _SKIPS_HOOKS[cls] = bool(_CHECKPOINTS_FORWARD.search(source))
    return _SKIPS_HOOKS[cls]


def checkpointing_flag_holder(model: nn.Module, stack_path: str, index: int) -> Optional[nn.Module]:
    """The module whose ``gradient_checkpointing`` flag decides whether layer ``index`` is checkpointed.

    The layer itself from transformers 4.52 (``GradientCheckpointingLayer``); before, the module that
    loops over the stack (or an ancestor of it).
    """
    flag = "gradient_checkpointing"
    layer = model.get_submodule(f"{stack_path}.{index}")
    if hasattr(layer, flag):
        return layer
    parts = stack_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut])) if cut else model
        if hasattr(module, flag):
            return module
    return None


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = True) -> bool:
    """Turn on transformers' gradient checkpointing of the given kind on a base model.

    transformers 5.x: ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
    deprecated alias); 4.35 .. 4.57: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=)``;
    < 4.35: no arguments, always reentrant.  Returns False (and changes nothing) where the installed
    transformers cannot do the requested kind.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    keyword = "activation_checkpointing_kwargs"
    if enable is None:
        enable = model.gradient_checkpointing_enable
        keyword = "gradient_checkpointing_kwargs"
    if keyword not in inspect.signature(enable).parameters:
        if not reentrant:
            return False
        enable()
        return True
    enable(**{keyword: {"use_reentrant": bool(reentrant)}})
    return True
