"""The case table of the scheduled-LoRA tests: one row per model family of ``tiny_models``, plus helpers.

Each row names the family's layer stacks and three layers in the user's own spelling (negative ids and
``"<stack>.<index>"`` included) with their canonical ids, so a generic test reads
``case.top`` / ``case.low`` instead of hard-coding BERT's ``11``.  Only public PEFT API is used here
(``get_peft_model``, ``named_parameters``), so the helpers work on every PEFT from 0.3.0 on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_layersched import ScheduledLoraConfig

from helpers import tiny_models

PREFIX = "base_model.model."

_MODULE_NAMES = {}


class Case(object):
    """One model family: its stacks ``[(name, path, length)]`` and three layers (raw id, canonical id)."""

    def __init__(self, family, stacks, top, low, spare):
        self.family = family
        self.stacks = stacks
        self.raw_top, self.top = top
        self.raw_low, self.low = low
        self.raw_spare, self.spare = spare  # preallocated in some tests, never scheduled
        self.targets = tiny_models.TARGETS[family]

    def __repr__(self):
        return self.family

    @property
    def schedule(self):
        """``{0: [top], 2: [low, top]}`` in raw ids."""
        return {0: [self.raw_top], 2: [self.raw_low, self.raw_top]}

    @property
    def first(self):
        return [self.top]

    @property
    def later(self):
        return self.sort([self.low, self.top])

    def sort(self, layers):
        order = {name: i for i, (name, _, _) in enumerate(self.stacks)}

        def key(layer):
            if isinstance(layer, int):
                return (0, layer)
            name, index = layer.rsplit(".", 1)
            return (order[name], int(index))

        return sorted(set(layers), key=key)

    def layer_path(self, layer):
        """Dotted path of a canonical layer's block inside the base model."""
        if isinstance(layer, int):
            return "{}.{}".format(self.stacks[0][1], layer)
        name, index = layer.rsplit(".", 1)
        path = [p for n, p, _ in self.stacks if n == name][0]
        return "{}.{}".format(path, index)

    def layer_of(self, name):
        """Canonical layer of a module or parameter name (relative or ``base_model.model.``-prefixed)."""
        if name.startswith(PREFIX):
            name = name[len(PREFIX) :]
        for stack_name, _path, length in self.stacks:
            for index in range(length):
                layer = index if len(self.stacks) == 1 else "{}.{}".format(stack_name, index)
                if name.startswith(self.layer_path(layer) + "."):
                    return layer
        return None

    def base(self, seed=0, **fields):
        """The family's tiny model; ``fields``: its builder's keywords, e.g. ``num_layers``."""
        return tiny_models.BUILDERS[self.family](seed=seed, **fields)

    def config(self, **overrides):
        kwargs = dict(r=4, target_modules=self.targets, layer_schedule=self.schedule, init_seed=0)
        kwargs.update(overrides)
        return ScheduledLoraConfig(**kwargs)

    def build(self, seed=0, base=None, **overrides):
        """The scheduled model: ``self.base(seed, **base)`` with ``self.config(**overrides)``."""
        return get_peft_model(self.base(seed, **(base or {})), self.config(**overrides))

    def target_names(self, layers, targets=None):
        """Names (relative to the base model) of the target modules inside ``layers``."""
        return self.modules_under([self.layer_path(layer) + "." for layer in layers], targets)

    def modules_under(self, prefixes, targets=None):
        """Names of the modules whose last segment is a target, under one of the dotted ``prefixes``."""
        targets = self.targets if targets is None else targets
        if self.family not in _MODULE_NAMES:
            _MODULE_NAMES[self.family] = [name for name, _ in self.base().named_modules()]
        return sorted(
            name
            for name in _MODULE_NAMES[self.family]
            if name.split(".")[-1] in targets and any(name.startswith(p) for p in prefixes)
        )

    def inputs(self, seed=123):
        return tiny_models.example_inputs(self.family, seed=seed)


CASES = [
    Case("bert", [("bert.encoder.layer", "bert.encoder.layer", 12)], (-1, 11), (1, 1), (5, 5)),
    Case("gpt2", [("transformer.h", "transformer.h", 4)], (-1, 3), (1, 1), (2, 2)),
    Case("llama", [("model.layers", "model.layers", 4)], (3, 3), (-3, 1), (-2, 2)),
    Case(
        "t5",
        [("encoder", "encoder.block", 3), ("decoder", "decoder.block", 2)],
        ("decoder.-1", "decoder.1"),
        ("encoder.-2", "encoder.1"),
        ("encoder.0", "encoder.0"),
    ),
]
BY_FAMILY = {case.family: case for case in CASES}


def lora_params(model):
    """``{parameter name: parameter}`` of every LoRA parameter of a PeftModel."""
    return {name: param for name, param in model.named_parameters() if "lora_" in name}


def lora_modules(model):
    """Names (relative to the base model) of the modules that carry LoRA weights."""
    names = {name.split(".lora_")[0] for name in lora_params(model)}
    return sorted(name[len(PREFIX) :] if name.startswith(PREFIX) else name for name in names)


def trainable(model):
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)


def logits(model, case, seed=123):
    model.eval()
    with torch.no_grad():
        return model(**case.inputs(seed)).logits


def loss(model, case, seed):
    """A cross-entropy loss on the family's logits with random targets (same seed, same batch)."""
    out = model(**case.inputs(seed)).logits
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=generator)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), targets.reshape(-1))


def perturb(model, predicate=None):
    """Deterministic "training": shift the lora_B of every trainable (or ``predicate``-selected) parameter."""
    with torch.no_grad():
        for name, param in lora_params(model).items():
            chosen = predicate(name) if predicate is not None else param.requires_grad
            if chosen and "lora_B" in name:
                param.add_(0.05 * torch.arange(1, param.numel() + 1, dtype=param.dtype).reshape(param.shape).sin())
