"""Row keys and row storage of the frozen-prefix cache.

A row's key hashes every input that reaches the prefix, over the row's real tokens. Rows live in
RAM up to a byte cap, then in files of a folder, or nowhere.
"""

from __future__ import annotations

import hashlib
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


class RowStore(object):
    """Hidden-state rows by key: in RAM up to ``max_bytes``, beyond it in files under ``folder`` (or dropped)."""

    def __init__(self, max_bytes: int, folder: Optional[str], dtype: Optional[torch.dtype]) -> None:
        self.max_bytes, self.folder, self.dtype = max_bytes, folder, dtype
        self.ram: Dict[bytes, torch.Tensor] = {}
        self.disk: Dict[bytes, Tuple[str, Tuple[int, ...], torch.dtype]] = {}
        self.ram_bytes = self.disk_bytes = 0
        self.full = False  # a row did not fit (folder None)
        self._tmp: Optional[str] = None

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
