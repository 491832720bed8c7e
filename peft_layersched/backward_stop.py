"""Backward stops at the lowest active layer, with or without gradient checkpointing.

:func:`update` places the stop each time the tuner writes the layer state. Where the model's
trainable state does not allow a stop, the model's hooks stay as they are: full depth, as in PEFT.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _compat

_ATTR = "_peft_layersched_backward_stop"
_FLAG = "gradient_checkpointing"


def update(model: nn.Module, stacks: Sequence[Any]) -> "BackwardStop":
    """Place (or move, or remove) the backward stop of ``model`` for its current trainable state.

    ``stacks`` are the model's layer stacks (``LayerStack``: ``path`` relative to ``model`` and
    ``length``).  Returns the model's :class:`BackwardStop`.
    """
    stop = model.__dict__.get(_ATTR)
    if stop is None:
        stop = BackwardStop()
        model.__dict__[_ATTR] = stop
    stop.place(model, stacks)
    return stop


def backward_stop(model: nn.Module) -> Optional["BackwardStop"]:
    """The :class:`BackwardStop` that :func:`update` attached to ``model``, if any."""
    return model.__dict__.get(_ATTR)


def remove(model: nn.Module) -> None:
    """Take the backward stop off ``model``: its hooks go, the input-require-grads hooks come back."""
    stop = model.__dict__.pop(_ATTR, None)
    if stop is not None:
        stop.remove()


class BackwardStop(object):
    """The hooks that end backward at the lowest active layer of one model.

    ``where`` says what is in place: ``None`` (full depth: the model's own hooks untouched),
    ``"above-stacks"`` (only modules after every layer stack train), or ``(stack path, lo)``.
    ``leaf`` names the module whose output is made a leaf under reentrant checkpointing: ``(stack
    path, lo - 1)``, or ``"input-embeddings"`` (``lo == 0``, or ``lo == 1`` on transformers < 4.52,
    where backward then also runs through layer 0, for its input gradient only).
    """

    def __init__(self) -> None:
        self.where: Any = None
        self.leaf: Any = None
        self._handles: List[Any] = []
        self._stashed: List[Tuple[nn.Module, Any, Any]] = []
        self._armed: List[Tuple[nn.Module, bool]] = []
        self._arm_holders: List[nn.Module] = []
        self._fed_holder: Optional[nn.Module] = None
        self._inside = False  # between the stack parent's pre- and post-forward hooks

    # ---------------------------------------------------------------------------------- placement

    def place(self, model: nn.Module, stacks: Sequence[Any]) -> None:
        self._remove_own_hooks()
        where, input_hooks = _survey(model, stacks)
        if where is None:
            self._restore_input_hooks()
            self.where = None
            return
        if where == "above-stacks":
            self._stash_input_hooks(input_hooks)
            self.where = where
            return
        stack, lo = where
        layers = model.get_submodule(stack.path)
        site: Optional[nn.Module] = None
        arm_site: Optional[nn.Module] = None  # None: the stack parent's pre-hook switches the flags
        if lo >= 1:
            holders: List[nn.Module] = []
            for i in range(lo):
                holder = _compat.checkpointing_flag_holder(model, stack.path, i)
                if holder is not None and not any(holder is h for h in holders):
                    holders.append(holder)
            shared = [h for h in holders if not any(h is layer for layer in layers)]
            if not shared or lo >= 2:
                site = layers[lo - 1]
                self._arm_holders = holders
                self._fed_holder = _compat.checkpointing_flag_holder(model, stack.path, lo)
                # A flag on the stack's parent is also read before the loop (use_cache under checkpointing,
                # transformers < 4.52): switch it only once layer 0 has run.
                arm_site = layers[0] if shared else None
            # else: lo == 1 and layer 0's flag sits on the stack's parent, which reads it before any hook
            # of ours could switch it: the leaf goes to the input embeddings instead.
        self.leaf = (stack.path, lo - 1)
        if site is None:
            site = _input_embeddings(model, stack.path)
            if site is None:
                self._restore_input_hooks()
                self.where = self.leaf = None
                return
            self._fed_holder = _compat.checkpointing_flag_holder(model, stack.path, 0)
            self.leaf = "input-embeddings"
        self._stash_input_hooks(input_hooks)
        parent = _parent(model, stack.path)
        arm_in_parent = bool(self._arm_holders) and arm_site is None
        self._handles.append(parent.register_forward_pre_hook(_Reset(self, arm=arm_in_parent, entering=True)))
        self._handles.append(parent.register_forward_hook(_Reset(self, arm=False, entering=False)))
        if arm_site is not None:
            self._handles.append(arm_site.register_forward_hook(_Arm(self)))
        self._handles.append(site.register_forward_hook(_Leaf(self)))
        if self.leaf != "input-embeddings" and _compat.checkpointing_skips_layer_hooks(parent):
            # Under checkpointing this stack runs its layers' forward without their hooks (transformers
            # 4.35 .. 4.51, T5 family): neither _Arm nor the leaf above fire then.  While its
            # checkpointing is on, the input embeddings' output becomes the leaf instead: full depth,
            # as in vanilla PEFT, and correct gradients.
            embeddings = _input_embeddings(model, stack.path)
            if embeddings is not None:
                self._handles.append(embeddings.register_forward_hook(_Leaf(self, only_inside=True)))
        self.where = (stack.path, lo)

    def remove(self) -> None:
        """Take every hook of this stop off and put the model's input-require-grads hooks back."""
        self._remove_own_hooks()
        self._restore_input_hooks()
        self.where = None

    def _remove_own_hooks(self) -> None:
        self.leaf = None
        self._disarm()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._arm_holders = []
        self._fed_holder = None

    def _stash_input_hooks(self, hooks: List[Tuple[nn.Module, Any, Any]]) -> None:
        for module, key, hook in hooks:
            _compat.take_forward_hook(module, key)
            self._stashed.append((module, key, hook))

    def _restore_input_hooks(self) -> None:
        for module, key, hook in self._stashed:
            _compat.put_forward_hook(module, key, hook)
        self._stashed = []

    # --------------------------------------------------------------------------- forward-time work

    def _arm(self) -> None:
        # Frozen layers below lo hold nothing to save; run unchecked, layer lo - 1's hooks run outside
        # any checkpoint, and torch warns no "None of the inputs have requires_grad=True".
        if self._armed:
            return
        for holder in self._arm_holders:
            if holder.training and getattr(holder, _FLAG, False) and _compat.checkpoint_reentrant(holder):
                self._armed.append((holder, True))
                setattr(holder, _FLAG, False)

    def _disarm(self) -> None:
        for holder, flag in self._armed:
            setattr(holder, _FLAG, flag)
        self._armed = []

    def _needs_leaf(self, module: nn.Module) -> bool:
        if not (module.training and torch.is_grad_enabled()):
            return False
        holder = self._fed_holder
        if holder is None:
            # No transformers checkpointing flag around the layer: whatever checkpointing there may be,
            # a leaf input is what a reentrant one needs (and costs only that layer's input gradient).
            return True
        return bool(getattr(holder, _FLAG, False)) and _compat.checkpoint_reentrant(holder)


class _Reset(object):
    """Stack parent's pre/post hook: undo a switch left by an interrupted forward; arm for lo == 1."""

    def __init__(self, stop: BackwardStop, arm: bool, entering: bool) -> None:
        self.stop = stop
        self.arm = arm
        self.entering = entering  # the pre-hook (True) or the post-hook (False)

    def __call__(self, module: nn.Module, *args: Any) -> None:
        self.stop._disarm()
        self.stop._inside = self.entering
        if self.arm:
            self.stop._arm()


class _Arm(object):
    """Layer 0's forward hook: switch checkpointing off for layers 1 .. lo - 1 (flag on the stack's parent)."""

    def __init__(self, stop: BackwardStop) -> None:
        self.stop = stop

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.stop._arm()


class _Leaf(object):
    """Forward hook on the output that layer ``lo`` reads: switch back, make it a leaf that requires grad."""

    def __init__(self, stop: BackwardStop, only_inside: bool = False) -> None:
        self.stop = stop
        self.only_inside = only_inside  # act only within the stack parent's forward (shared embeddings)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.only_inside and not self.stop._inside:
            return
        self.stop._disarm()
        if not self.stop._needs_leaf(module):
            return
        tensor = _first_tensor(output)
        if tensor is not None and tensor.is_floating_point() and not tensor.requires_grad:
            tensor.requires_grad_(True)


# ----------------------------------------------------------------------------------------- helpers


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _parent(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model


def _input_embeddings(model: nn.Module, stack_path: str) -> Optional[nn.Module]:
    """The input embeddings of the (sub-)model that runs the stack: T5's decoder has its own module."""
    parts = stack_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        getter = getattr(owner, "get_input_embeddings", None)
        if getter is None:
            continue
        try:
            module = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(module, nn.Module):
            return module
    return None


def _survey(model: nn.Module, stacks: Sequence[Any]) -> Tuple[Any, List[Tuple[nn.Module, Any, Any]]]:
    """Where backward may stop, and the model's input-require-grads hooks; one pass over the modules.

    The stop is ``(stack, lo)``, ``"above-stacks"`` or ``None`` (full depth).  Modules are taken to run
    in the order they are registered (true of transformers models: embeddings, blocks, final norm,
    heads), so a trainable parameter registered before the lowest active layer means the gradient has
    to reach below it.
    """
    hooks: List[Tuple[nn.Module, Any, Any]] = []
    prefixes = [(stack, stack.path + ".") for stack in stacks]
    seen = set()
    first: Optional[str] = None
    first_stack: Any = None
    first_pos = -1
    last_in_stacks = -1
    trainable_stacks = set()
    lora_layers: Dict[str, nn.Module] = {}
    for pos, (name, module) in enumerate(model.named_modules()):
        if module._forward_hooks:
            hooks.extend((module, key, hook) for key, hook in _compat.input_require_grads_hooks_of(module))
        in_stack = None
        for stack, prefix in prefixes:
            if name.startswith(prefix):
                in_stack = stack
                last_in_stacks = pos
                break
        if _compat.is_lora_layer(module):
            lora_layers[name] = module
        # "<LoRA layer>.lora_A.<adapter>" (ModuleDict) or "<LoRA layer>.lora_embedding_A" holding params
        # keyed by adapter (ParameterDict), on every PEFT version.
        cut = name.find(".lora_")
        owner = lora_layers.get(name[:cut]) if cut >= 0 else None
        container_adapter = name[cut + 1:].split(".")[1] if owner is not None and name.count(".", cut + 1) else None
        for key, param in module._parameters.items():
            if param is None or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # An adapter a LoRA layer leaves out of its forward gets no gradient.
            if owner is not None and not _compat.layer_runs(owner, container_adapter or key):
                continue
            if first is None:
                first, first_stack, first_pos = name, in_stack, pos
            if in_stack is not None:
                trainable_stacks.add(in_stack.path)
    if not stacks or first is None or len(trainable_stacks) > 1:
        return None, hooks  # nothing trains (leave the model as it is), or several stacks: full depth
    if first_stack is not None:
        head = first[len(first_stack.path) + 1:].split(".", 1)[0]
        return ((first_stack, int(head)) if head.isdigit() else None), hooks
    return ("above-stacks" if first_pos > last_in_stacks else None), hooks
