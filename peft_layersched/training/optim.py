"""Optimizer helpers of the layer scheduler: one verb each, on plain torch optimizers.

* :func:`inner`: the optimizer that holds the state (accelerate wraps the Trainer's).
* :func:`missing` / :func:`add_to_group`: parameters an optimizer lacks, and putting them into one of its
  existing groups (never a new group: the LR scheduler covers them and ``optimizer.pt`` keeps its layout).
* :func:`drop_state`, :func:`offload_state`, :func:`reload_state`: what happens to the state (Adam
  moments, step counts) of a layer that is frozen, and of one that rejoins.  Offloaded state stays *in*
  the optimizer, as CPU tensors, so the Trainer's ``optimizer.pt`` holds it; torch's
  ``Optimizer.load_state_dict`` puts it back on the parameters' device on resume, and the callback
  offloads it again as training starts.
* :func:`state_bytes`: bytes of optimizer state on the parameters' devices (offloaded state excluded).
* :class:`LayerLRs`: per-layer LR factors on per-layer param groups; :class:`StillCheck`: which layers did
  not move over a phase.

Example::

    >>> opt = inner(trainer.optimizer)
    >>> offloaded = offload_state(opt, frozen_params)   # {param: keys moved to the CPU}
    >>> reload_state(opt, offloaded, rejoining_params)
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set

import torch

_CPU = torch.device("cpu")


def inner(optimizer: Any) -> Any:
    """The optimizer that holds ``state``: accelerate's AcceleratedOptimizer forwards ``param_groups``
    but keeps the state on the optimizer it wraps."""
    return getattr(optimizer, "optimizer", optimizer)


def missing(optimizer: Any, params_by_key: Dict[Any, List[torch.nn.Parameter]]) -> Dict[Any, List[Any]]:
    """The parameters of each key (a layer) that no param group of ``optimizer`` holds."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out: Dict[Any, List[Any]] = {}
    for key, params in params_by_key.items():
        lost = [p for p in params if id(p) not in held]
        if lost:
            out[key] = lost
    return out


def add_to_group(
    optimizer: Any, params: Iterable[torch.nn.Parameter], weight_decay: float, avoid_key: Optional[str] = None
) -> bool:
    """Put ``params`` into the first existing group whose weight decay is ``weight_decay`` (else the first),
    among the groups without ``avoid_key`` (a layer's own groups); ``False`` if there is none."""
    groups = [g for g in optimizer.param_groups if avoid_key is None or avoid_key not in g]
    if not groups:
        return False
    group = next((g for g in groups if g.get("weight_decay", 0.0) == weight_decay), groups[0])
    group["params"].extend(params)
    return True


def drop_state(optimizer: Any, params: Iterable[torch.nn.Parameter]) -> None:
    """Forget the state of ``params``: it starts afresh at their next step (as for a new parameter)."""
    state = inner(optimizer).state
    for param in params:
        state.pop(param, None)


def offload_state(optimizer: Any, params: Iterable[torch.nn.Parameter]) -> Dict[Any, Set[str]]:
    """Move the state tensors of ``params`` that are not on the CPU to the CPU, in the optimizer.

    Returns ``{param: names of the state entries moved}``, what :func:`reload_state` moves back.  On a
    CPU-only model nothing moves (the state already is where offloading would put it).
    """
    state = inner(optimizer).state
    moved: Dict[Any, Set[str]] = {}
    for param in params:
        entries = state.get(param)
        if not entries:
            continue
        for key, value in list(entries.items()):
            if isinstance(value, torch.Tensor) and value.device != _CPU:
                entries[key] = value.to(_CPU)
                moved.setdefault(param, set()).add(key)
    return moved


def reload_state(optimizer: Any, offloaded: Dict[Any, Set[str]], params: Iterable[torch.nn.Parameter]) -> None:
    """Move what :func:`offload_state` moved for ``params`` back to each parameter's device (and
    forget it in ``offloaded``)."""
    state = inner(optimizer).state
    for param in params:
        keys = offloaded.pop(param, ())
        entries = state.get(param)
        if not entries:
            continue
        for key in keys:
            if key in entries:
                entries[key] = entries[key].to(param.device)


def state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors that sit on their parameter's device."""
    opt = inner(optimizer)
    if not isinstance(opt, torch.optim.Optimizer):
        return 0
    total = 0
    for param, entries in opt.state.items():
        device = getattr(param, "device", None)
        for value in entries.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device == device:
                total += value.numel() * value.element_size()
    return total


UNSCALED_KEY = "peft_layersched_unscaled_lr"  # a layer group's LR before the layer's factor
SCALED_KEY = "peft_layersched_lr"  # the LR this package set in that group (the factor applied)


class LayerLRs(object):
    """Each per-layer param group's LR = the LR the LR scheduler gives it x the layer's factor.

    :meth:`apply` runs after every LR-scheduler step (and before the first optimizer step); an optimizer
    post-step hook puts the unscaled LRs back, so the LR scheduler always steps from its own values, also
    a chainable one (``StepLR``, ``CosineAnnealingLR``, ``ReduceLROnPlateau``, which compute from the
    group's LR).  Both LRs are kept in the group dict (``optimizer.state_dict()`` saves them), so a resumed
    optimizer is read back right.

    >>> lrs = LayerLRs(optimizer)        # the optimizer's groups with LAYER_KEY
    >>> lrs.apply({3: 0.0, 1: 0.5})      # layer 3 frozen, layer 1 at half the LR; others x 1
    """

    def __init__(self, optimizer: Any, layer_key: str) -> None:
        self.optimizer = optimizer
        self.layer_key = layer_key
        self.restored = True  # False from apply() until restore(): a skipped optimizer step leaves it False
        self._hook = None
        if any(layer_key in group for group in optimizer.param_groups):
            from .. import _compat

            self._hook = _compat.register_step_post_hook(inner(optimizer), self.restore)

    def apply(self, factors: Dict[Any, float]) -> Dict[Any, float]:
        """Set each layer group's LR; returns ``{layer: LR}``."""
        out: Dict[Any, float] = {}
        for group in self.optimizer.param_groups:
            if self.layer_key not in group:
                continue
            lr = group["lr"]
            # An LR we set and nobody changed since: the unscaled one is the one we kept; else it is the
            # LR scheduler's (or the post-step hook put the unscaled one back).
            unscaled = group[UNSCALED_KEY] if SCALED_KEY in group and lr == group[SCALED_KEY] else lr
            scaled = unscaled * factors.get(group[self.layer_key], 1.0)
            group[UNSCALED_KEY], group[SCALED_KEY], group["lr"] = unscaled, scaled, scaled
            out[group[self.layer_key]] = float(scaled)
        self.restored = False
        return out

    def stepped_from_scaled(self) -> bool:
        """Whether an LR scheduler stepped while the layer groups held scaled LRs that were never restored
        (the optimizer step was skipped, e.g. by AMP's ``GradScaler``): some group's LR changed since
        :meth:`apply`, and some group's factor was not 1, so that group's new LR came from its scaled one."""
        groups = [g for g in self.optimizer.param_groups if self.layer_key in g and SCALED_KEY in g]
        if self.restored:
            return False
        return any(g["lr"] != g[SCALED_KEY] for g in groups) and any(g[SCALED_KEY] != g[UNSCALED_KEY] for g in groups)

    def restore(self, *args: Any) -> None:
        """Put the unscaled LRs back (the optimizer post-step hook; also for an LR scheduler that steps from
        the group's LR at another moment)."""
        for group in self.optimizer.param_groups:
            if UNSCALED_KEY in group and group["lr"] == group.get(SCALED_KEY):
                group["lr"] = group[SCALED_KEY] = group[UNSCALED_KEY]
        self.restored = True

    def remove(self) -> None:
        """Stop restoring after optimizer steps (the groups keep their LRs)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class StillCheck(object):
    """Which groups of parameters did not change at all between :meth:`start` and :meth:`still`."""

    def __init__(self) -> None:
        self._start: Dict[Any, torch.Tensor] = {}
        self.steps = 0

    def start(self, params_by_key: Dict[Any, List[torch.nn.Parameter]]) -> None:
        self.steps = 0
        self._start = {key: _flat(params).clone() for key, params in params_by_key.items()}

    def still(self, params_by_key: Dict[Any, List[torch.nn.Parameter]]) -> List[Any]:
        """The keys whose parameters are bitwise what :meth:`start` saw (none if no step ran); then forgets."""
        found = []
        if self.steps:
            found = [key for key, start in self._start.items() if torch.equal(_flat(params_by_key[key]), start)]
        self._start = {}
        return found


def _flat(params: List[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])
