"""What the frozen-prefix caches refuse, shared by the single-stack and the encoder cache.

Each check names what was wrong, what works and the fix.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn

WHAT_WORKS = ("prefix_cache works with the requires_grad engine on one process or DDP, on a model with one layer "
              "stack whose embeddings feed its first layer (BERT-, LLaMA-style), and on an encoder-decoder model "
              "(T5-, BART-style) while its whole encoder is frozen")


def refuse_outputs(inputs: Dict[str, Any], config: Any, skipped: str) -> None:
    """Refuse a training call that asks for what skipped modules cannot give (``skipped``: which, and why)."""
    for flag in ("output_hidden_states", "output_attentions"):
        if inputs.get(flag) or getattr(config, flag, False):
            raise ValueError(f"prefix_cache: {flag} is requested, but {skipped} on cached batches. Leave {flag} "
                             f"off while training with prefix_cache, or leave prefix_cache unset.")


def trained_parameters(modules: List[nn.Module]) -> List[str]:
    """The names of the parameters of ``modules`` that require grad."""
    return [n for m in modules for n, p in m.named_parameters() if p.requires_grad]


def dropout_in(modules: List[nn.Module]) -> Optional[str]:
    """The first dropout with p > 0 in ``modules`` (e.g. "Dropout p=0.1 in T5Block"), or ``None``."""
    for module in modules:
        for sub in module.modules():
            p = sub.p if "Dropout" in type(sub).__name__ else getattr(sub, "attention_dropout", 0)
            if isinstance(p, (int, float)) and p > 0:
                return f"{type(sub).__name__} p={p} in {type(module).__name__}"
    return None
