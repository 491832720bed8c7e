"""The frozen-prefix activation cache: later epochs skip the frozen layers below the boundary.

The boundary is the lowest active layer. Its input hidden states are kept per example. A batch whose
rows are all kept runs nothing below the boundary; any other batch runs normally and is recorded.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..schedules import AdaptiveSchedule
from .prefix_checks import WHAT_WORKS, dropout_in, refuse_outputs, trained_parameters
from .prefix_encoder import EncoderActivations
from .prefix_store import RowStore, assemble, batch_keys, bound_inputs, cache_metrics, real_slice, uncompiled


@dataclasses.dataclass(frozen=True)
class PrefixCache(object):
    """The options of the frozen-prefix cache (``prefix_cache=True`` takes these defaults)."""

    max_bytes: int = dataclasses.field(default=2 ** 30, metadata={
        "help": "RAM the cached hidden states may take, in bytes."})
    dir: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "A folder for the rows beyond max_bytes (None: rows beyond it are not cached)."})
    dtype: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "Store rows in this torch dtype, e.g. 'bfloat16' (None: as computed; only None is exact)."})
    eval_prefix: bool = dataclasses.field(default=False, metadata={
        "help": "Run the frozen layers below the boundary without dropout (required when they have dropout)."})
    any_pad_length: bool = dataclasses.field(default=False, metadata={
        "help": "Key and keep a right-padded row's real tokens only, reused under any padded length (more hits "
                "with dynamic padding; not exact: pad positions get zeros, and sums over another length round "
                "differently)."})

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"PrefixCache(max_bytes=...) must be an int >= 0, got {self.max_bytes!r}.")
        if self.dir is not None and not isinstance(self.dir, str):
            raise TypeError(f"PrefixCache(dir=...) must be a folder path or None, got {self.dir!r}.")
        if self.dtype is not None and not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"PrefixCache(dtype=...) must name a torch dtype, e.g. 'bfloat16', or be None; "
                             f"got {self.dtype!r}.")
        for name in ("eval_prefix", "any_pad_length"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PrefixCache({name}=...) must be True or False, got {getattr(self, name)!r}.")


def resolve(value: Any) -> Optional[PrefixCache]:
    """The ``prefix_cache`` option as a :class:`PrefixCache` (``None``: off)."""
    if value is None or value is False:
        return None
    if value is True:
        return PrefixCache()
    if isinstance(value, PrefixCache):
        return value
    if isinstance(value, dict):
        return PrefixCache(**value)
    raise TypeError(f"prefix_cache must be None, True, a PrefixCache or a dict of its fields, got {value!r}.")


def check_engine(config: Optional[PrefixCache], engine: Any) -> None:
    """Refuse the cache under engines where skipping the prefix is not exact."""
    if config is None:
        return
    if engine.name == "lr-zero":
        raise ValueError(
            "prefix_cache is not available with engine='lr-zero' (DeepSpeed ZeRO): frozen layers keep "
            "requires_grad there and their optimizer state still moves, so skipping them would change the run. "
            f"Leave prefix_cache unset; {WHAT_WORKS}.")
    if getattr(engine, "sharded_state", False):
        raise ValueError(f"prefix_cache is not available under FSDP (the prefix's parameters are sharded and "
                         f"gathered in its forward). Leave prefix_cache unset; {WHAT_WORKS}.")
    if int(torch.__version__.split(".")[0]) < 2:
        raise ValueError(f"prefix_cache needs torch >= 2.0 (forward pre-hooks with keyword arguments); "
                         f"this is torch {torch.__version__}.")


def check_schedule(schedule: Any, positions: List[Optional[int]], kind: str) -> None:
    """Refuse schedules whose lowest active layer goes both down and up (the cache would be thrown away at
    every move): ``positions``: the lowest active position at each time left in the run."""
    works = ("It works with schedules whose lowest active layer only moves one way: autofreeze, fixed top-k, "
             "milestones that move up, gradual unfreezing (each move drops the cache; the next epoch records).")
    if isinstance(schedule, AdaptiveSchedule) and schedule.spec.reactivates:
        raise ValueError(f"prefix_cache cannot be used with the {kind!r} schedule: it may activate lower layers "
                         f"again at any decision. {works}")
    moves = [b - a for a, b in zip(positions, positions[1:]) if a is not None and b is not None and a != b]
    if any(m > 0 for m in moves) and any(m < 0 for m in moves):
        raise ValueError(f"prefix_cache cannot be used with this {kind!r} schedule: its lowest active layer moves "
                         f"down and up again, which would throw the cache away at every move. {works}")


def attach(config: Optional[PrefixCache], tuner: Any, adapter_name: str, engine: Any, schedule: Any,
           times: range) -> Any:
    """The cache of a run (``None`` when ``config`` is), after refusing what it cannot serve exactly: a
    :class:`PrefixActivations`, or on an encoder-decoder model an ``EncoderActivations``; ``times``: the
    schedule times the run has left."""
    if config is None:
        return None
    check_engine(config, engine)
    if schedule is None:
        raise ValueError("prefix_cache needs a layer schedule: without one every layer trains and nothing is frozen.")
    index = tuner.scheduled_adapter(adapter_name).index
    encoder_decoder = getattr(getattr(tuner.model, "config", None), "is_encoder_decoder", False)
    if len(index.stacks) != 1 and not encoder_decoder:
        raise ValueError(f"prefix_cache supports models with one layer stack; this one has "
                         f"{[stack.path for stack in index.stacks]}. {WHAT_WORKS}.")
    order = index.all_layers()
    positions: List[Optional[int]] = []
    if not isinstance(schedule, AdaptiveSchedule):
        granule, t = max(int(getattr(schedule, "granule", 1)), 1), times.start
        while t < times.stop and len(positions) < 100000:
            positions.append(lowest(schedule.active_at(t), order))
            t = (t // granule + 1) * granule
    if encoder_decoder:
        cache = EncoderActivations(tuner.model, index, config)
        cache.check_schedule(schedule, positions, order)
        return cache
    check_schedule(schedule, positions, schedule.kind)
    return PrefixActivations(tuner.model, index.stacks[0].path, config)


def lowest(active: List[Any], order: List[Any]) -> Optional[int]:
    """The position of the lowest of the ``active`` layers in the model's ``order`` (``None``: none)."""
    positions = [order.index(layer) for layer in active if layer in order]
    return min(positions) if positions else None


class PrefixActivations(object):
    """The cache on one model: hooks on its backbone, its embeddings and the layers below the boundary."""

    def __init__(self, model: nn.Module, stack_path: str, config: PrefixCache) -> None:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"PrefixActivations caches inside one layer stack; {type(model).__name__} is an "
                             f"encoder-decoder model, whose layers pass position bias from layer to layer. Use "
                             f"attach(), which caches its frozen encoder's output instead.")
        self.config = config
        self.stack = model.get_submodule(stack_path)
        embed = model.get_input_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        embed_parts, stack_parts = names[id(embed)].split("."), stack_path.split(".")
        common = 0
        while common < min(len(embed_parts), len(stack_parts)) - 1 and embed_parts[common] == stack_parts[common]:
            common += 1
        self.backbone = model.get_submodule(".".join(embed_parts[:common])) if common else model
        self.embedder = self.backbone.get_submodule(embed_parts[common])
        self.signature = inspect.signature(self.backbone.forward)
        self.store = RowStore.for_options(config)
        self.boundary = 0
        self.hits = self.misses = 0
        self.output_format: Any = None  # a layer's output: None (a tensor) or the tuple's length
        self._serving: Optional[torch.Tensor] = None
        self._recording: Optional[Dict[str, Any]] = None
        self._verify = False
        self._dtype = torch.float32
        self._trace: Optional[List[Any]] = None  # (input, output) of the prefix modules, on a verifying batch
        self._served = False
        self._patched: List[nn.Module] = []
        self._handles = [
            self.backbone.register_forward_pre_hook(uncompiled(self._before), with_kwargs=True),
            self.backbone.register_forward_hook(uncompiled(self._after)),
        ]
        self._layer_handles: List[Any] = []

    # ------------------------------------------------------------------------ the boundary

    def move(self, boundary: int) -> None:
        """The lowest active layer of the stack is ``boundary`` now: drop the rows of another boundary."""
        if boundary == self.boundary:
            return
        self._unpatch()
        self.store.clear()
        self.boundary = boundary
        if boundary <= 0:
            return
        self._check_prefix()
        self._verify = True
        layers = list(self.stack)
        for module in [self.embedder] + layers[:boundary]:
            self._patch(module, module is self.embedder)
        self._layer_handles = [
            layers[boundary].register_forward_pre_hook(uncompiled(self._record), with_kwargs=True),
            layers[boundary].register_forward_hook(uncompiled(self._output_format)),
        ]

    def prefix_modules(self) -> List[nn.Module]:
        return [self.embedder] + list(self.stack)[:self.boundary]

    def _check_prefix(self) -> None:
        trained = trained_parameters(self.prefix_modules())
        if trained:
            raise ValueError(
                f"prefix_cache: parameters below the lowest active layer train ({trained[:3]}...), so the "
                f"hidden states entering it change every step. Keep the embeddings and lower layers frozen "
                f"(no modules_to_save there), or leave prefix_cache unset.")
        found = None if self.config.eval_prefix else dropout_in(self.prefix_modules())
        if found is not None:
            raise ValueError(
                f"prefix_cache: the frozen layers below the boundary have dropout ({found}), so their output "
                f"differs at every pass and cannot be reused. Pass prefix_cache=PrefixCache(eval_prefix=True) to "
                f"run them without dropout (the layers above keep theirs), or set the dropout below the boundary "
                f"to 0.")

    def _patch(self, module: nn.Module, embedder: bool) -> None:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._serving is None:
                output = original(*args, **kwargs)
                if self._trace is not None:
                    self._trace.append((None if embedder else _hidden(args, kwargs), _first(output)))
                return output
            if embedder:
                self._served = True
                return self._serving
            hidden = _hidden(args, kwargs)
            if self.output_format is None:
                return hidden
            return (hidden,) + (None,) * (self.output_format - 1)

        module.forward = forward
        self._patched.append(module)

    def _unpatch(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles = []

    # ------------------------------------------------------------------------ hooks

    def _before(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        self._serving, self._recording, self._trace, self._served = None, None, None, False
        if self.boundary <= 0 or not module.training:
            return
        inputs = bound_inputs(self.signature, args, kwargs)
        refuse_outputs(inputs, getattr(module, "config", None), "the layers below the boundary do not run")
        if inputs.get("past_key_values") is not None:
            return
        if self.config.eval_prefix:
            for prefix in self.prefix_modules():
                prefix.eval()
        keyed = batch_keys(inputs, self.config)
        if keyed is None:
            return
        shaped, layouts, keys = keyed
        batch = len(keys)
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        if missing or self._verify:
            self.misses += len(missing)
            self.hits += batch - len(missing)
            self._recording = {"keys": keys, "layouts": layouts, "rows": missing}
            self._trace = [] if self._verify else None
            return
        self.hits += batch
        self._serving = assemble(self.store, keys, layouts, int(shaped.shape[1]), shaped.device, self._dtype)

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        served = self._serving is not None and self._served
        if self._serving is not None and not served:
            self._serving = None
            raise ValueError(f"prefix_cache: this call skipped the model's embeddings ({type(self.embedder).__name__}"
                             f"), e.g. given inputs_embeds, so the cached hidden states could not stand in for them. "
                             f"Pass input_ids while training with prefix_cache, or leave it unset.")
        self._serving, self._recording, self._trace = None, None, None

    def _record(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        recording = self._recording
        if recording is None:
            return
        hidden = _hidden(args, kwargs)
        self._dtype = hidden.dtype
        if self._trace is not None:
            self._check_passthrough(hidden, self._trace)
            self._verify = False
        for i in recording["rows"]:
            self.store.put(recording["keys"][i], hidden[i, real_slice(recording["layouts"][i])])

    def _output_format(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, tuple):
            if any(o is not None for o in output[1:]):
                raise ValueError(f"prefix_cache: the layers of {type(module).__name__} return more than their "
                                 f"hidden states here (attention weights, caches), which skipped layers cannot "
                                 f"give. Leave prefix_cache unset for this model or call. {WHAT_WORKS}.")
            self.output_format = len(output)
        else:
            self.output_format = None

    def _check_passthrough(self, hidden: torch.Tensor, trace: List[Any]) -> None:
        """On the first batch recorded at a boundary: the embedder's output must be the first layer's input,
        each prefix layer's output the next one's input (what the cached path relies on)."""
        chain = [out for _, out in trace[:1]] + [x for pair in trace[1:] for x in pair] + [hidden]
        linked = len(trace) == self.boundary + 1 and trace[0][0] is None and all(
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(chain[0::2], chain[1::2]))
        if not linked:
            raise ValueError(
                f"prefix_cache: in {type(self.backbone).__name__}, the embeddings' output does not reach the first "
                f"layer unchanged, or a layer's output the next layer (e.g. position embeddings added in between, "
                f"or inputs_embeds given), so cached hidden states cannot stand in for the prefix. {WHAT_WORKS}; "
                f"leave prefix_cache unset for this model.")

    def metrics(self) -> Dict[str, float]:
        return cache_metrics(self.store, self.hits, self.misses, self.boundary)

    def close(self) -> None:
        """Remove every hook and patch and drop the rows (nothing is kept after the run)."""
        self._unpatch()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.store.clear()
        self.boundary = 0


def _hidden(args: Any, kwargs: Dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output
