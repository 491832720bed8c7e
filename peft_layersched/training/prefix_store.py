"""Row keys and row storage of the frozen-prefix cache.

A row's key hashes every input that reaches the prefix, over the row's real tokens. Rows live in
RAM up to a byte cap, then in files of a folder, or nowhere.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

# A row's layout: ("full", S): the whole row of a batch padded to S, keyed and kept whole (exact:
# the attention sums over S positions, and pad positions have states too); ("right", n): with
# any_pad_length, a right-padded row's n real tokens, under any padded length.
Layout = Tuple[Any, ...]

# Arguments of a forward that the cached modules do not read (loss scaling, output switches): not part of
# a row's key.
NOT_PREFIX_INPUTS = ("use_cache", "return_dict", "num_items_in_batch", "logits_to_keep")


def row_layouts(mask: Optional[torch.Tensor], batch: int, length: int, any_pad_length: bool = False) -> List[Layout]:
    """Each row's layout; right-padded rows (by the attention mask) are ("right", n) with ``any_pad_length``."""
    if not any_pad_length or mask is None or mask.dim() != 2:
        return [("full", length)] * batch
    real = (mask != 0).cpu()
    counts = real.sum(dim=1).tolist()
    return [("right", n) if n > 0 and bool(real[i, :n].all()) else ("full", length) for i, n in enumerate(counts)]


def real_slice(layout: Layout) -> slice:
    """The positions a row is keyed and kept over."""
    return slice(0, layout[1])


def row_keys(inputs: Dict[str, Any], layouts: List[Layout], length: int) -> List[bytes]:
    """One key per row over every tensor input (a tensor of the batch's rows and length: its real part)."""
    batch = len(layouts)
    digests = [hashlib.blake2b(repr(layout).encode(), digest_size=20) for layout in layouts]
    for name in sorted(inputs):
        value = inputs[name]
        if not isinstance(value, torch.Tensor):
            for digest in digests:
                digest.update(f"{name}={value!r};".encode())
            continue
        value = value.detach().cpu()
        rows = value.dim() >= 1 and value.shape[0] == batch
        for i, digest in enumerate(digests):
            part = value
            if rows:
                part = value[i]
                if part.dim() >= 1 and part.shape[0] == length:
                    part = part[real_slice(layouts[i])]
            digest.update(f"{name}:{part.dtype}:{tuple(part.shape)};".encode())
            digest.update(part.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return [digest.digest() for digest in digests]


def bound_inputs(signature: inspect.Signature, args: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A forward's arguments by name, its ``**kwargs`` spread out."""
    inputs: Dict[str, Any] = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs


def batch_keys(inputs: Dict[str, Any], config: Any) -> Optional[Tuple[torch.Tensor, List[Layout], List[bytes]]]:
    """A batch's ids (or embeddings), row layouts and row keys (``None``: no batch of rows to key);
    ``config``: the cache's options."""
    shaped = inputs.get("input_ids")
    if shaped is None:
        shaped = inputs.get("inputs_embeds")
    if shaped is None or shaped.dim() < 2:
        return None
    batch, length = int(shaped.shape[0]), int(shaped.shape[1])
    layouts = row_layouts(inputs.get("attention_mask"), batch, length, config.any_pad_length)
    keys = row_keys({k: v for k, v in inputs.items() if v is not None and k not in NOT_PREFIX_INPUTS},
                    layouts, length)
    return shaped, layouts, keys


def assemble(store: "RowStore", keys: List[bytes], layouts: List[Layout], length: int, device: Any,
             dtype: torch.dtype) -> torch.Tensor:
    """The batch of kept rows, padded to ``length`` (zeros where a row keeps its real tokens only)."""
    rows = [store.get(key) for key in keys]
    if all(layout[0] == "full" for layout in layouts):
        return torch.stack(rows).to(device, dtype)
    hidden = torch.zeros((len(rows), length) + tuple(rows[0].shape[1:]), dtype=dtype, device=device)
    for i, row in enumerate(rows):
        hidden[i, real_slice(layouts[i])] = row.to(hidden.device, hidden.dtype)
    return hidden


def cache_metrics(store: "RowStore", hits: int, misses: int, boundary: int) -> Dict[str, float]:
    """A cache's ``metrics()``: its bytes, hits and misses in rows, and its boundary."""
    return {
        "layer_schedule/prefix_cache_bytes": float(store.ram_bytes + store.disk_bytes),
        "layer_schedule/prefix_cache_disk_bytes": float(store.disk_bytes),
        "layer_schedule/prefix_cache_hits": float(hits),
        "layer_schedule/prefix_cache_misses": float(misses),
        "layer_schedule/prefix_cache_boundary": float(boundary),
    }


def uncompiled(hook: Any) -> Any:
    """``hook``, run eagerly under ``torch.compile``: traced, a cache's key lookups guard on its size, and
    each recorded batch would recompile the model's forward until dynamo's limit."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return hook if disable is None else disable(hook)


class RowStore(object):
    """Hidden-state rows by key: in RAM up to ``max_bytes``, beyond it in files under ``folder`` (or dropped)."""

    def __init__(self, max_bytes: int, folder: Optional[str], dtype: Optional[torch.dtype]) -> None:
        self.max_bytes, self.folder, self.dtype = max_bytes, folder, dtype
        self.ram: Dict[bytes, torch.Tensor] = {}
        self.disk: Dict[bytes, Tuple[str, Tuple[int, ...], torch.dtype]] = {}
        self.ram_bytes = self.disk_bytes = 0
        self.full = False  # a row did not fit (folder None)
        self._tmp: Optional[str] = None

    @classmethod
    def for_options(cls, options: Any) -> "RowStore":
        """The store a ``PrefixCache`` asks for."""
        return cls(options.max_bytes, options.dir, None if options.dtype is None else getattr(torch, options.dtype))

    def __contains__(self, key: bytes) -> bool:
        return key in self.ram or key in self.disk

    def get(self, key: bytes) -> torch.Tensor:
        row = self.ram.get(key)
        if row is not None:
            return row
        path, shape, dtype = self.disk[key]
        raw = np.fromfile(path, dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def put(self, key: bytes, row: torch.Tensor) -> None:
        if key in self:
            return
        row = row.detach().to("cpu", dtype=self.dtype or row.dtype).contiguous().clone()
        size = row.numel() * row.element_size()
        if self.ram_bytes + size <= self.max_bytes:
            self.ram[key] = row
            self.ram_bytes += size
            return
        if self.folder is None:
            self.full = True
            return
        if self._tmp is None:
            os.makedirs(self.folder, exist_ok=True)
            self._tmp = tempfile.mkdtemp(prefix="prefix-cache-", dir=self.folder)
        path = os.path.join(self._tmp, key.hex())
        row.view(-1).view(torch.uint8).numpy().tofile(path)
        self.disk[key] = (path, tuple(row.shape), row.dtype)
        self.disk_bytes += size

    def clear(self) -> None:
        self.ram.clear()
        self.disk.clear()
        self.ram_bytes = self.disk_bytes = 0
        self.full = False
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
