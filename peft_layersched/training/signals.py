"""The signals adaptive schedules choose from, measured per layer on its LoRA parameters.

:class:`SignalMeter` measures ``grad_norm``, ``update``, ``outlier`` or ``weight_norm`` for the layers
of a scheduled adapter. Reductions are in float64, and every rank decides on the same bits.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set

import torch
from torch import nn

from .. import _compat
from ..schedules import LayerId


def _dist() -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _reduce_device(fallback: torch.device) -> torch.device:
    dist = _dist()
    if dist is not None and dist.get_backend() == "gloo":
        return torch.device("cpu")
    return fallback


def _collective(tensor: torch.Tensor, op: str) -> torch.Tensor:
    dist = _dist()
    if dist is None:
        return tensor
    device = tensor.device
    moved = tensor.to(_reduce_device(device))
    if op == "sum":
        dist.all_reduce(moved)
    else:
        dist.broadcast(moved, 0)
    return moved.to(device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks (as it is in one process)."""
    return _collective(tensor, "sum")


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank."""
    return _collective(tensor, "broadcast")


@contextlib.contextmanager
def _gathered(module: nn.Module) -> Iterator[None]:
    """The module's own parameters whole for the block (DeepSpeed ZeRO-3 partitions them)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _local(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter (ZeRO-3: its partition)."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


class SignalMeter(object):
    """Measures ``signal`` for ``layers`` (in the schedule's order), from ``params`` (layer -> its LoRA
    parameters) and ``modules`` (layer -> its LoRA layers, for the calibration signals).

    ``sharded``: the parameters are shards (ZeRO-3, FSDP), so squares of an update are summed over ranks.
    """

    def __init__(
        self, signal: str, layers: List[LayerId], params: Dict[LayerId, List[nn.Parameter]],
        modules: Dict[LayerId, List[nn.Module]], ema: float = 0.9, sharded: bool = False,
        calibration_batches: int = 8, outlier_m: float = 5.0,
    ) -> None:
        self.signal, self.layers, self.ema, self.sharded = signal, list(layers), float(ema), sharded
        self.calibration_batches, self.outlier_m = calibration_batches, outlier_m
        self._params = {layer: list(params.get(layer, [])) for layer in self.layers}
        self._modules = {layer: list(modules.get(layer, [])) for layer in self.layers}
        first = next((p for ps in self._params.values() for p in ps), None)
        self.device = first.device if first is not None else torch.device("cpu")
        n = len(self.layers)
        self.value = torch.zeros(n, dtype=torch.float64, device=self.device)  # the EMA
        self.seen = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.interval = torch.zeros(n, dtype=torch.float64, device=self.device)  # summed since the last decision
        self.interval_seen = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.calibrated = False
        self._pieces: List[Any] = []  # (layer position, squared gradient norm) of the step so far
        self._masks: Dict[Any, torch.Tensor] = {}
        self._index: Dict[Any, torch.Tensor] = {}
        self._hooks: List[Any] = []
        self._hooked: Set[int] = set()
        self._snapshot: Dict[int, List[torch.Tensor]] = {}

    # ------------------------------------------------------------------------ per step

    def track(self, active: Iterable[LayerId]) -> None:
        """After a switch: measure the layers that train now.  ``grad_norm``: a tensor hook on each LoRA
        parameter that requires grad (it stays on while the layer is frozen); ``update``: the weights the
        next step starts from."""
        chosen = set(active)
        for i, layer in enumerate(self.layers):
            if self.signal == "grad_norm":
                for param in self._params[layer]:
                    if param.requires_grad and id(param) not in self._hooked:
                        self._hooks.append(param.register_hook(self._grad_hook(i)))
                        self._hooked.add(id(param))
            elif self.signal == "update":
                if layer not in chosen:
                    self._snapshot.pop(i, None)
                elif i not in self._snapshot:
                    self._snapshot[i] = [_local(p).detach().clone() for p in self._params[layer]]

    def start_step(self) -> None:
        """An optimizer step is about to change the weights (``LayerScheduler`` calls it from an optimizer
        pre-step hook).  ``update`` measures from the weights as they are now: whatever set them since the
        last step (a resume that loads the weights after ``LayerScheduler`` was built) is not an update."""
        if self.signal != "update":
            return
        for i, before in self._snapshot.items():
            for param, old in zip(self._params[self.layers[i]], before):
                old.copy_(_local(param).detach())

    def _grad_hook(self, i: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            # One small kernel per gradient (its squared norm); end_step sums them in float64.
            flat = grad.detach().reshape(-1)
            self._pieces.append((i, flat.dot(flat)))
            return None

        return hook

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = [], set()

    def end_step(self, active: Iterable[LayerId]) -> None:
        """An optimizer step is done: fold what it measured into the active layers' values (all ranks
        call it).  ``grad_norm``: the gradients the hooks summed over its micro-batches, summed over ranks;
        ``update``: how far the step moved each active layer's LoRA weights."""
        n = len(self.layers)
        if self.signal == "grad_norm":
            squares = torch.zeros(2 * n, dtype=torch.float64, device=self.device)
            if self._pieces:
                positions = tuple(i for i, _ in self._pieces)
                index = self._index.get(positions)
                if index is None:  # the same hooks fire in the same order step after step: built once
                    index = torch.tensor(positions, device=self.device)
                    self._index = {positions: index}
                values = [v for _, v in self._pieces]
                if any(v.device != self.device for v in values):  # (a model spread over devices)
                    values = [v.to(self.device) for v in values]
                squares.index_add_(0, index, torch.stack(values).to(torch.float64))
                squares[n:].index_fill_(0, index, 1.0)
            self._pieces = []
            squares = all_reduce_sum(squares)
            self._fold(squares[:n].sqrt(), self._mask(active) & (squares[n:] > 0))
        elif self.signal == "update":
            squares = torch.zeros(n, dtype=torch.float64, device=self.device)
            for i, before in self._snapshot.items():
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                for param, old in zip(self._params[self.layers[i]], before):
                    now = _local(param).detach()
                    total = total + (now.double() - old.double()).pow(2).sum().to(self.device)
                    old.copy_(now)  # the next step starts here
                squares[i] = total
            if self.sharded:
                squares = all_reduce_sum(squares)
            mask = torch.zeros(n, dtype=torch.bool, device=self.device)
            mask[list(self._snapshot)] = True
            self._fold(squares.sqrt(), mask & self._mask(active))

    def _mask(self, active: Iterable[LayerId]) -> torch.Tensor:
        key = tuple(active)
        if self._masks.get(key) is None:
            chosen = set(key)
            self._masks = {key: torch.tensor([layer in chosen for layer in self.layers], dtype=torch.bool,
                                             device=self.device)}
        return self._masks[key]

    def _fold(self, measured: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask & torch.isfinite(measured)  # (an overflowed fp16 step is skipped, and so is its value)
        measured = torch.where(mask, measured, torch.zeros_like(measured))
        averaged = torch.where(self.seen, self.ema * self.value + (1.0 - self.ema) * measured, measured)
        self.value = torch.where(mask, averaged, self.value)
        self.seen = self.seen | mask
        self.interval = self.interval + measured
        self.interval_seen = self.interval_seen | mask

    def start_interval(self) -> None:
        """A decision was made: the interval sums (what autofreeze compares) start again."""
        self.interval = torch.zeros_like(self.interval)
        self.interval_seen = torch.zeros_like(self.interval_seen)

    # ------------------------------------------------------------------------ calibration

    def calibrate(self, model: nn.Module, batches: Optional[Iterable[Any]]) -> None:
        """Measure a calibration signal once (``outlier`` / ``weight_norm``); the global RNG states are
        left as they were, so the run trains on the same data as without it."""
        if self.signal not in ("outlier", "weight_norm") or self.calibrated:
            return
        if self.signal == "weight_norm":
            measured = self._weight_norms()
        else:
            if batches is None:
                raise ValueError(
                    "the 'outlier' signal measures activations on a few batches before the first decision, but "
                    "no data was given: pass calibration_data=<an iterable of batches> to LayerScheduler (the "
                    "Trainer callback and the Lightning callback use the training data)."
                )
            measured = self._outlier_ratios(model, batches)
        self._fold(measured, torch.isfinite(measured))
        self.calibrated = True

    def _base_weights(self, layer: LayerId) -> Iterator[torch.Tensor]:
        for module in self._modules[layer]:
            with _gathered(module):
                weight = _compat.base_weight(module)
                if weight is None:
                    continue
                if not weight.is_floating_point():
                    raise ValueError(
                        f"the '{self.signal}' signal reads the base weights the LoRA layers wrap, but those of "
                        f"layer {layer} are quantized ({weight.dtype}); use signal 'grad_norm' or 'update' "
                        f"(measured on the LoRA parameters), or 'weights' with your own scores."
                    )
                yield weight

    def _weight_norms(self) -> torch.Tensor:
        out = torch.full((len(self.layers),), float("nan"), dtype=torch.float64, device=self.device)
        for i, layer in enumerate(self.layers):
            squares, count = 0.0, 0
            for weight in self._base_weights(layer):
                squares += float(weight.detach().double().pow(2).sum())
                count += weight.numel()
            if count:
                out[i] = math.sqrt(squares / count)
        return broadcast(out)

    def _outlier_ratios(self, model: nn.Module, batches: Iterable[Any]) -> torch.Tensor:
        norms: Dict[int, torch.Tensor] = {}  # id(module) -> sum of squared input features
        handles = []

        def watch(module: nn.Module) -> Any:
            def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
                x = inputs[0] if isinstance(inputs, tuple) else inputs
                if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                    return
                square = x.detach().double().pow(2).reshape(-1, x.shape[-1]).sum(0)
                key = id(mod)
                norms[key] = square if key not in norms else norms[key] + square
            return hook

        modules = [m for layer in self.layers for m in self._modules[layer]]
        for module in modules:
            handles.append(module.register_forward_hook(watch(module)))
        was_training = model.training
        try:
            model.eval()
            with _compat.fork_rng(), torch.no_grad():
                for i, batch in enumerate(batches):
                    if i >= self.calibration_batches:
                        break
                    _forward(model, batch)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        out = torch.full((len(self.layers),), float("nan"), dtype=torch.float64, device=self.device)
        # One reduction for every module's feature norms (in a fixed order: the same on every rank).
        sizes = [self._fan_in(m) for m in modules]
        flat = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)
        offset = 0
        for module, size in zip(modules, sizes):
            if id(module) in norms and norms[id(module)].numel() == size:
                flat[offset:offset + size] = norms[id(module)].to(self.device)
            offset += size
        flat = all_reduce_sum(flat)
        offset, per_module = 0, {}
        for module, size in zip(modules, sizes):
            per_module[id(module)] = flat[offset:offset + size].sqrt()
            offset += size
        for i, layer in enumerate(self.layers):
            outliers, count = 0, 0
            for module in self._modules[layer]:
                feature = per_module.get(id(module))
                if feature is None or not feature.numel():
                    continue
                with _gathered(module):
                    weight = _compat.base_weight(module)
                    if weight is None or weight.shape[-1] != feature.numel():
                        continue
                    score = weight.detach().double().abs() * feature.to(weight.device).unsqueeze(0)
                    outliers += int((score > self.outlier_m * score.mean()).sum())
                    count += score.numel()
            if count:
                out[i] = outliers / float(count)
        return broadcast(out)

    def _fan_in(self, module: nn.Module) -> int:
        with _gathered(module):
            weight = _compat.base_weight(module)
            return int(weight.shape[-1]) if weight is not None else 0

    # ------------------------------------------------------------------------ reading

    def _share(self) -> None:
        """Rank 0's values on every rank (right before a decision)."""
        packed = broadcast(torch.cat([self.value, self.seen.double(), self.interval, self.interval_seen.double()]))
        n = len(self.layers)
        self.value, self.seen = packed[:n], packed[n:2 * n] > 0
        self.interval, self.interval_seen = packed[2 * n:3 * n], packed[3 * n:] > 0

    def measured(self) -> Dict[LayerId, Optional[float]]:
        """Each layer's value (EMA), ``None`` where it was never measured; the same on every rank."""
        self._share()
        values, seen = self.value.tolist(), self.seen.tolist()
        return {layer: (v if s else None) for layer, v, s in zip(self.layers, values, seen)}

    def interval_measured(self) -> Dict[LayerId, Optional[float]]:
        """Each layer's signal summed over the interval since the last decision (``None``: not measured)."""
        self._share()
        values, seen = self.interval.tolist(), self.interval_seen.tolist()
        return {layer: (v if s else None) for layer, v, s in zip(self.layers, values, seen)}

    # ------------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        """Plain floats and flags (JSON-able, exact).  (``update`` compares each step's weights with the
        step's start, which a resume loads, before or after ``LayerScheduler`` is built: nothing else to
        save.)"""
        return {
            "signal": self.signal,
            "layers": [str(layer) for layer in self.layers],
            "value": self.value.tolist(),
            "seen": self.seen.tolist(),
            "interval": self.interval.tolist(),
            "interval_seen": self.interval_seen.tolist(),
            "calibrated": self.calibrated,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("signal") != self.signal or state.get("layers") != [str(layer) for layer in self.layers]:
            raise ValueError(
                f"the saved signal state is of signal {state.get('signal')!r} on layers {state.get('layers')}, "
                f"but this schedule measures {self.signal!r} on {self.layers}: resume with the layer_schedule "
                f"the run was saved with."
            )

        def tensor(key: str, dtype: Any) -> torch.Tensor:
            return torch.tensor(state[key], dtype=dtype, device=self.device)

        self.value, self.seen = tensor("value", torch.float64), tensor("seen", torch.bool)
        self.interval, self.interval_seen = tensor("interval", torch.float64), tensor("interval_seen", torch.bool)
        self.calibrated = bool(state.get("calibrated", False))


def _forward(model: nn.Module, batch: Any) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(batch, dict):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model(**inputs)
    elif isinstance(batch, (list, tuple)):
        model(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in batch])
    else:
        model(batch.to(device) if isinstance(batch, torch.Tensor) else batch)
