"""torch version differences (1.13 .. newest): RNG forking, empty-weight construction, forward hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def fork_rng() -> Any:
    """A context that restores the global CPU (and CUDA) RNG state on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def empty_weights() -> Any:
    """A context in which modules are built without allocating their weights, and the device it uses.

    Returns ``(context, device_name)``: ``with torch.device("meta")`` where torch has it (2.0+); torch
    1.13 has the meta device but not the context manager, so accelerate's ``init_empty_weights`` (PEFT
    depends on accelerate); else plain CPU allocation.
    """
    import contextlib

    meta = torch.device("meta")
    if hasattr(meta, "__enter__"):
        return meta, "meta"
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - every supported PEFT installs accelerate
        return contextlib.nullcontext(), "cpu"
    return init_empty_weights(include_buffers=True), "meta"


def take_forward_hook(module: nn.Module, key: Any) -> None:
    """Unregister the forward hook ``key`` (what its ``RemovableHandle.remove()`` does)."""
    module._forward_hooks.pop(key, None)


def put_forward_hook(module: nn.Module, key: Any, hook: Any) -> None:
    """Register ``hook`` again under its old key, so the owner's handle still removes it."""
    module._forward_hooks[key] = hook


class _StepWrapper(object):
    """torch 1.13 has no optimizer step hooks: ``optimizer.step`` is wrapped on the instance instead
    (``before``: the hook runs before the step, else after it)."""

    def __init__(self, optimizer: Any, hook: Any, before: bool = False) -> None:
        self.optimizer, self.hook = optimizer, hook
        self.original = optimizer.__dict__.get("step")
        bound = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if before:
                hook(optimizer, args, kwargs)
            result = bound(*args, **kwargs)
            if not before:
                hook(optimizer, args, kwargs)
            return result

        optimizer.step = step

    def remove(self) -> None:
        if self.original is None:
            self.optimizer.__dict__.pop("step", None)
        else:
            self.optimizer.step = self.original


def register_step_post_hook(optimizer: Any, hook: Any) -> Any:
    """``hook(optimizer, args, kwargs)`` after each ``optimizer.step()``; returns a handle with ``remove()``.
    torch >= 2.0: ``Optimizer.register_step_post_hook``; 1.13: a wrapper around the instance's ``step``."""
    register = getattr(optimizer, "register_step_post_hook", None)
    if register is not None:
        return register(hook)
    return _StepWrapper(optimizer, hook)


def register_step_pre_hook(optimizer: Any, hook: Any) -> Any:
    """``hook(optimizer, args, kwargs)`` before each ``optimizer.step()``; returns a handle with ``remove()``.
    torch >= 2.0: ``Optimizer.register_step_pre_hook``; 1.13: a wrapper around the instance's ``step``."""
    register = getattr(optimizer, "register_step_pre_hook", None)
    if register is not None:
        return register(hook)
    return _StepWrapper(optimizer, hook, before=True)
