"""The frozen-prefix cache on an encoder-decoder model: the frozen encoder's output, per example.

While no encoder layer trains, the encoder's output is kept per example. A training batch whose rows
are all kept skips the encoder. The decoder always runs, its frozen bottom included.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..schedules import AdaptiveSchedule
from .prefix_checks import WHAT_WORKS, dropout_in, refuse_outputs, trained_parameters
from .prefix_store import RowStore, assemble, batch_keys, bound_inputs, cache_metrics, real_slice, uncompiled


class EncoderActivations(object):
    """The cache on an encoder-decoder model: its encoder's forward, patched, serves the kept rows.

    ``move``, ``metrics``, ``close``, ``hits`` and ``misses`` are those of ``PrefixActivations``; the
    boundary is the position of the lowest active layer in the model's layer order, encoder first.
    ``config``: the run's ``PrefixCache``.
    """

    def __init__(self, model: nn.Module, index: Any, config: Any) -> None:
        get_encoder = getattr(model, "get_encoder", None)
        encoder = get_encoder() if callable(get_encoder) else None
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"prefix_cache: {type(model).__name__} is an encoder-decoder model without "
                             f"get_encoder(), so its encoder cannot be found. {WHAT_WORKS}; leave prefix_cache "
                             f"unset for this model.")
        self.model, self.encoder, self.config = model, encoder, config
        path = {id(m): n for n, m in model.named_modules()}[id(encoder)] + "."
        order = index.all_layers()
        positions = sorted(order.index(index.layer_of(f"{stack.path}.{i}")) for stack in index.stacks
                           if stack.path.startswith(path) for i in range(stack.length))
        if positions != list(range(len(positions))):
            raise ValueError(f"prefix_cache: the layer order of {type(model).__name__} ({index.describe()}) does "
                             f"not start with its encoder's layers, which the encoder cache relies on. Leave "
                             f"prefix_cache unset for this model.")
        self.encoder_layers = len(positions)  # positions 0 .. encoder_layers - 1
        self.signature = inspect.signature(encoder.forward)
        self.store = RowStore.for_options(config)
        self.boundary = 0
        self.on = False  # no encoder layer trains: rows are kept and served
        self.hits = self.misses = 0
        self.formats: Dict[Any, Tuple[Any, ...]] = {}  # the encoder's output type, by the call's return_dict
        self._dtype = torch.float32
        self._verify = False
        self._original = encoder.forward
        self._lookup, self._keep = uncompiled(self._look_up), uncompiled(self._store_rows)
        encoder.forward = self._forward
        self._patched = True

    # ------------------------------------------------------------------------ the schedule and the boundary

    def check_schedule(self, schedule: Any, positions: List[Optional[int]], order: List[Any]) -> None:
        """Refuse schedules that train an encoder layer again after the whole encoder froze, or never freeze
        it; ``positions``: the lowest active position at each time left in the run (none for adaptive)."""
        trains_encoder = any(order.index(layer) < self.encoder_layers
                             for layer in schedule.all_layers() if layer in order)
        if not trains_encoder:
            return
        works = ("On an encoder-decoder model the cache keeps the encoder's output once every encoder layer is "
                 "frozen for good: schedules of decoder layers only, milestones that move up out of the encoder, "
                 "autofreeze.")
        if isinstance(schedule, AdaptiveSchedule) and schedule.spec.reactivates:
            raise ValueError(f"prefix_cache cannot be used with the {schedule.kind!r} schedule on this "
                             f"encoder-decoder model: it may activate encoder layers again at any decision. {works}")
        frozen = [p >= self.encoder_layers for p in positions if p is not None]
        if any(a and not b for a, b in zip(frozen, frozen[1:])):
            raise ValueError(f"prefix_cache cannot be used with this {schedule.kind!r} schedule on this "
                             f"encoder-decoder model: it trains encoder layers again after the whole encoder "
                             f"froze, which would throw the cache away. {works}")
        if frozen and not any(frozen):
            raise ValueError(f"prefix_cache would never be used with this {schedule.kind!r} schedule on this "
                             f"encoder-decoder model: an encoder layer trains until the end of the run, so the "
                             f"encoder's output is never fixed. {works} Or leave prefix_cache unset.")

    def move(self, boundary: int) -> None:
        """The lowest active layer is at ``boundary`` now: keep rows while no encoder layer trains."""
        self.boundary = boundary
        on = boundary >= self.encoder_layers
        if on:
            self._check_encoder()
        if on != self.on:
            self.store.clear()
            self.on, self._verify = on, on

    def _check_encoder(self) -> None:
        # (T5's and BART's input embeddings, `shared`, feed the decoder too: modules_to_save wraps them there.)
        trained = trained_parameters([self.encoder, self.model.get_input_embeddings()])
        if trained:
            raise ValueError(
                f"prefix_cache: parameters of the encoder or its input embeddings train ({trained[:3]}...), so "
                f"the encoder's output changes every step. Keep the encoder and the embeddings frozen (no "
                f"modules_to_save on 'shared' / 'embed_tokens'), or leave prefix_cache unset.")
        found = None if self.config.eval_prefix else dropout_in([self.encoder])
        if found is not None:
            raise ValueError(
                f"prefix_cache: the frozen encoder has dropout ({found}; T5: dropout_rate), so its output "
                f"differs at every pass and cannot be reused. Pass prefix_cache=PrefixCache(eval_prefix=True) to "
                f"run the encoder without dropout while it is cached (the decoder keeps its dropout), or set the "
                f"encoder's dropout to 0.")

    # ------------------------------------------------------------------------ the encoder's forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        # The lookup and the keeping run uncompiled; the encoder itself is traced as usual.
        served, plan = self._lookup(args, kwargs)
        if served is not None:
            return served
        output = self._original(*args, **kwargs)
        if plan is not None:
            self._keep(plan, output)
        return output

    def _look_up(self, args: Any, kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
        """``(output, None)`` to serve a batch of kept rows, ``(None, plan)`` to run the encoder and keep
        what ``plan`` names, ``(None, None)`` to run it as given."""
        if not self.on or not self.model.training:
            return None, None
        inputs = bound_inputs(self.signature, args, kwargs)
        for config in (getattr(self.encoder, "config", None), getattr(self.model, "config", None)):
            refuse_outputs(inputs, config, "the encoder does not run")
        if self.config.eval_prefix:
            self.encoder.eval()
        keyed = batch_keys(inputs, self.config)
        if keyed is None or any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values()):
            return None, None  # (inputs that train: the output is not fixed)
        shaped, layouts, keys = keyed
        output_format = self.formats.get(inputs.get("return_dict"))
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not missing and output_format is not None and not self._verify:
            hidden = assemble(self.store, keys, layouts, int(shaped.shape[1]), shaped.device, self._dtype)
            return _output(output_format, hidden), None
        before = _rng_states(shaped.device) if self._verify else None
        return None, (inputs.get("return_dict"), keys, layouts, missing, before, shaped.device)

    def _store_rows(self, plan: Tuple[Any, ...], output: Any) -> None:
        return_dict, keys, layouts, missing, before, device = plan
        if before is not None:
            self._check_no_random(before, _rng_states(device))
        hidden, self.formats[return_dict] = _hidden_and_format(output, self.encoder)
        self._dtype = hidden.dtype
        for i in missing:
            self.store.put(keys[i], hidden[i, real_slice(layouts[i])])

    def _check_no_random(self, before: List[torch.Tensor], after: List[torch.Tensor]) -> None:
        """On the first batch recorded: the encoder must not draw random numbers in training mode (BART's
        LayerDrop draws even at 0), or skipping it would change every later random draw of the run."""
        self._verify = False
        if not all(torch.equal(a, b) for a, b in zip(before, after)):
            raise ValueError(
                f"prefix_cache: {type(self.encoder).__name__} draws random numbers in training mode (dropout or "
                f"LayerDrop), so a run that skips it would draw differently. Pass "
                f"prefix_cache=PrefixCache(eval_prefix=True) to run the encoder in eval mode while it is cached, "
                f"or leave prefix_cache unset.")

    def metrics(self) -> Dict[str, float]:
        return cache_metrics(self.store, self.hits, self.misses, self.boundary)

    def close(self) -> None:
        """Restore the encoder's forward and drop the rows (nothing is kept after the run)."""
        if self._patched:
            self.encoder.__dict__.pop("forward", None)
            self._patched = False
        self.store.clear()
        self.on = False


def _hidden_and_format(output: Any, encoder: nn.Module) -> Tuple[torch.Tensor, Tuple[Any, ...]]:
    """The encoder's last hidden state and how to rebuild its output around it."""
    if isinstance(output, torch.Tensor):
        return output, ("tensor",)
    if isinstance(output, tuple):
        values = list(output)
    else:
        values = list(output.values()) if hasattr(output, "values") else [output]
    if not isinstance(values[0], torch.Tensor) or any(v is not None for v in values[1:]):
        raise ValueError(f"prefix_cache: {type(encoder).__name__} returns more than its last hidden state here "
                         f"(hidden states, attentions, a cache), which a skipped encoder cannot give. Leave "
                         f"prefix_cache unset for this model or call. {WHAT_WORKS}.")
    if isinstance(output, tuple):
        return values[0], ("tuple", len(output))
    return values[0], ("output", type(output))


def _output(output_format: Tuple[Any, ...], hidden: torch.Tensor) -> Any:
    if output_format[0] == "tensor":
        return hidden
    if output_format[0] == "tuple":
        return (hidden,) + (None,) * (output_format[1] - 1)
    return output_format[1](last_hidden_state=hidden)


def _rng_states(device: torch.device) -> List[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states
