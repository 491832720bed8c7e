"""Copies of a model's LoRA weights, compared bitwise, and short hashes of them per layer."""

from __future__ import annotations

import hashlib

import torch


def lora(model, layer=None):
    """``{name: detached copy}`` of every LoRA parameter, or of BERT encoder layer ``layer``'s only.

    The copies are contiguous: safetensors writes only contiguous tensors.
    """
    marker = None if layer is None else ".layer.{}.".format(layer)
    return {
        name: param.detach().clone().contiguous()
        for name, param in model.named_parameters()
        if "lora_" in name and (marker is None or marker in name)
    }


def same(a, b):
    """Whether two snapshots hold the same names and bitwise-equal tensors."""
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def layer_hashes(model):
    """``{layer: short sha256 of its LoRA weights}`` of a scheduled model: equal hashes, equal weights."""
    out = {}
    for layer, params in model.base_model.layer_parameters().items():
        digest = hashlib.sha256()
        for param in params:
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        out[str(layer)] = digest.hexdigest()[:16]
    return out
