"""Tiny real models built from configs (no hub): one per architecture family the package supports.

The builders are examples/tiny_models.py, which the examples and benchmarks use too; this module adds the
tests' tables. It loads that file by its path: putting examples/ on sys.path would let its axolotl/
folder pass for the axolotl package.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def _shared_builders():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("tiny_models", os.path.join(root, "examples", "tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _shared_builders()
bert, gpt2, llama, t5 = _shared.bert, _shared.gpt2, _shared.llama, _shared.t5

BUILDERS = {"bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5}

# (family, list target_modules) for each builder.
TARGETS = {
    "bert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


def example_inputs(family, batch=2, seq=7, seed=123):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, seq), generator=generator)
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}
