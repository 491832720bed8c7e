"""Layer discovery and addressing: find a model's block stacks and map layer ids to modules.

One stack takes ints, negative from the top. Several stacks take ``"<stack>.<index>"``, e.g.
``"decoder.-1"``. Canonical ids have a non-negative index. Modules map to layers by dotted path
segments, never substrings: layer ``1`` never captures layer ``10``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from . import _compat
from .schedules import LayerId, LayerStack, StackIndex, short_layer_list

ALL_LINEAR = "all-linear"


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    # Blocks have sub-modules; a list of bare Linear heads is not a layer stack.
    return any(True for _ in next(iter(module)).children())


def _matches_pattern(path: str, pattern: str) -> bool:
    return path == pattern or path.endswith("." + pattern)


def name_stacks(paths: List[str]) -> List[str]:
    if len(paths) <= 1:
        return list(paths)
    parents = [p.rsplit(".", 1)[0] if "." in p else p for p in paths]
    split = [parent.split(".") for parent in parents]
    longest = max(len(parts) for parts in split)
    for k in range(1, longest + 1):
        names = [".".join(parts[-k:]) for parts in split]
        if len(set(names)) == len(names):
            return names
    return paths


def discover_stacks(model: nn.Module, layer_stacks: Any = None) -> List[LayerStack]:
    """Find the model's repeated block stacks: the outermost ``nn.ModuleList`` s of identical blocks.

    ``layer_stacks``, a string or a list of them, overrides discovery. Each entry names a ``ModuleList``
    by its dotted path or a dotted suffix of it, e.g. ``"layer"`` or ``"decoder.layers"``.
    """
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if layer_stacks is not None:
        patterns = [layer_stacks] if isinstance(layer_stacks, str) else list(layer_stacks)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise TypeError(
                f"layer_stacks must be a non-empty string or list of strings naming layer stacks, "
                f"got {layer_stacks!r}."
            )
        chosen: List[Tuple[str, nn.Module]] = []
        for pattern in patterns:
            hits = [(n, m) for n, m in lists if _matches_pattern(n, pattern) and len(m) > 0]
            if not hits:
                found = [n for n, _ in lists] or ["(none)"]
                raise ValueError(
                    f"layer_stacks entry {pattern!r} matches no nn.ModuleList of the model; "
                    f"ModuleLists found: {found}. Give a path or dotted suffix of one of them."
                )
            chosen.extend(hit for hit in hits if hit[0] not in {c[0] for c in chosen})
        selected = chosen
    else:
        selected = []
        for name, module in lists:
            if not _is_block_list(module):
                continue
            if any(name.startswith(outer + ".") for outer, _ in selected):
                continue  # nested lists (MoE experts, T5 sub-layers) belong to their block
            selected.append((name, module))
    paths = [name for name, _ in selected]
    names = name_stacks(paths)
    return [LayerStack(n, p, len(m)) for n, p, (_, m) in zip(names, paths, selected)]


def no_stacks_message(model: nn.Module) -> str:
    """The ``ValueError`` text when no layer stack was found: why ``model`` cannot be scheduled, and the fixes."""
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if lists:
        found = f"its nn.ModuleLists ({short_layer_list(lists)}) do not hold repeated blocks"
        fix = f"pass layer_stacks naming the one that holds the model's blocks (e.g. layer_stacks={lists[0]!r})"
    else:
        found = "it has no nn.ModuleList"
        fix = ("keep the model's repeated blocks in an nn.ModuleList (as transformers models do) and pass its "
               "dotted path as layer_stacks")
    return (
        f"cannot schedule layers of {type(model).__name__}: a layer schedule trains blocks of a layer stack "
        f"(an nn.ModuleList of repeated blocks, e.g. 'model.layers' or 'encoder.layer'), and {found}. To schedule, "
        f"{fix}; to train every LoRA module all the time, use peft.LoraConfig (or ScheduledLoraConfig without "
        f"layer_schedule / preallocate_layers)."
    )


class LayerIndex(StackIndex):
    """Translate user layer ids to canonical ids and module names to layer ids for one model."""

    @classmethod
    def from_model(cls, model: nn.Module, layer_stacks: Any = None) -> "LayerIndex":
        return cls(discover_stacks(model, layer_stacks))

    def layer_of(self, module_name: str) -> Optional[LayerId]:
        """The canonical layer that holds the module ``module_name``, or ``None``."""
        for stack in self.stacks:
            prefix = stack.path + "."
            if module_name.startswith(prefix):
                head = module_name[len(prefix):].split(".", 1)[0]
                if head.isdigit():
                    index = int(head)
                    return index if not self.multi else f"{stack.name}.{index}"
        return None


def target_matcher(target_modules: Any):
    """A predicate ``(name, module) -> bool`` with PEFT's meaning of ``target_modules``.

    A str is a regex on the full name. A list or set matches a name or its dotted suffix, the newest
    PEFT's rule, on every PEFT: ``"proj"`` never hits ``q_proj``. ``"all-linear"`` takes every Linear or Conv1D.
    """
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            kinds = _compat.linear_types()
            return lambda name, module: isinstance(module, kinds)
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        suffixes = [str(t) for t in target_modules]
        return lambda name, module: any(name == t or name.endswith("." + t) for t in suffixes)
    raise TypeError(
        f"target_modules must be a list of module names, a regex string or 'all-linear', got "
        f"{target_modules!r} ({type(target_modules).__name__})."
    )


def exact_names_regex(names: Iterable[str]) -> str:
    """A regex that ``re.fullmatch`` es exactly ``names``: PEFT's rule for a str ``target_modules``."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def match_targets(model: nn.Module, target_modules: Any, index: LayerIndex) -> Dict[str, Optional[LayerId]]:
    """Every module of ``model`` that ``target_modules`` matches, mapped to its canonical layer.

    Modules outside every stack map to ``None``. Raises ``ValueError`` when nothing matches.
    """
    match = target_matcher(target_modules)
    matched = {name: index.layer_of(name) for name, module in model.named_modules() if name and match(name, module)}
    if not matched:
        samples = _sample_names(model, index)
        raise ValueError(
            f"target_modules={_show(target_modules)} matches no module of the model. A list entry must be a "
            f"module name or its dotted suffix (e.g. 'query', 'q_proj', 'c_attn'); a string is a regex that "
            f"must match the whole name. Names of Linear modules in this model: {samples}."
        )
    return matched


def select_targets(
    matched: Dict[str, Optional[LayerId]], target_modules: Any, index: LayerIndex, layers: Sequence[LayerId]
) -> Dict[str, LayerId]:
    """The modules of ``matched`` that lie in ``layers``: the modules that get LoRA.

    Raises ``ValueError`` when a requested layer holds no target module.
    """
    wanted = set(layers)
    chosen = {name: layer for name, layer in matched.items() if layer in wanted}
    present = {layer for layer in matched.values() if layer is not None}
    empty = [layer for layer in layers if layer not in present]
    if empty:
        covered = index.sort(present)
        raise ValueError(
            f"layer(s) {empty} contain no module matching target_modules={_show(target_modules)}; "
            f"layers with target modules: {short_layer_list(covered)}. Schedule only those layers, or widen "
            f"target_modules."
        )
    return chosen


def _show(target_modules: Any) -> str:
    if isinstance(target_modules, (set, frozenset)):
        return repr(sorted(target_modules))
    return repr(target_modules)


def _sample_names(model: nn.Module, index: LayerIndex, limit: int = 8) -> List[str]:
    kinds = _compat.linear_types()
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    first = index.stacks[0].path + ".0." if index.stacks else ""
    inside = [n for n in names if first and n.startswith(first)]
    return (inside or names)[:limit]
