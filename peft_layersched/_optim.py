"""Optimizer helpers of the Trainer callback: one verb each, on plain torch optimizers.

* :func:`inner`: the optimizer that holds the state (accelerate wraps the Trainer's).
* :func:`missing` / :func:`add_to_group`: parameters an optimizer lacks, and putting them into one of its
  existing groups (never a new group: the LR scheduler covers them and ``optimizer.pt`` keeps its layout).
* :func:`drop_state`, :func:`offload_state`, :func:`reload_state`: what happens to the state (Adam
  moments, step counts) of a layer that is frozen, and of one that rejoins.  Offloaded state stays *in*
  the optimizer, as CPU tensors, so the Trainer's ``optimizer.pt`` holds it; torch's
  ``Optimizer.load_state_dict`` puts it back on the parameters' device on resume, and the callback
  offloads it again as training starts.
* :func:`state_bytes`: bytes of optimizer state on the parameters' devices (offloaded state excluded).

Example::

    >>> opt = inner(trainer.optimizer)
    >>> offloaded = offload_state(opt, frozen_params)   # {param: keys moved to the CPU}
    >>> reload_state(opt, offloaded, rejoining_params)
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Set

import torch

FROZEN_STATES = ("keep", "drop", "offload")
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


def add_to_group(optimizer: Any, params: Iterable[torch.nn.Parameter], weight_decay: float) -> None:
    """Put ``params`` into the first existing group whose weight decay is ``weight_decay`` (else group 0)."""
    groups = optimizer.param_groups
    index = next((i for i, g in enumerate(groups) if g.get("weight_decay", 0.0) == weight_decay), 0)
    groups[index]["params"].extend(params)


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


class UpdateScaler(object):
    """Scales the update the last optimizer step made to chosen parameters: ``p = before + f * (p - before)``
    (an exact LR multiplier for SGD / Adam / AdamW, whose updates are proportional to the LR).

    >>> scaler = UpdateScaler()
    >>> scaler.snapshot(params)          # before optimizer.step()
    >>> scaler.scale({p: 0.5 for p in params})
    """

    def __init__(self) -> None:
        self._before: Dict[Any, torch.Tensor] = {}

    def snapshot(self, params: Iterable[torch.nn.Parameter]) -> None:
        self._before = {param: param.detach().clone() for param in params}

    def scale(self, factors: Dict[Any, float]) -> None:
        with torch.no_grad():
            for param, factor in factors.items():
                before = self._before.get(param)
                if before is not None:
                    param.copy_(before + factor * (param - before))


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
