"""The embedder workers' chunk store: full-resolution embedder outputs of chunks, keyed by
content (and the weights' digest, by the caller).

Storing the full-resolution output (not the compact one) is the paper's offline mode: a
registered document serves any k by down-sampling, without re-encoding. Two tiers: memory
(`model.chunk_cache.ChunkCache`: bounded bytes, least recently used out first) and an optional
disk directory that survives restarts. A disk entry is a msgpack `wire.Tensor` (its bytes carry
a digest) written atomically, and a corrupted file is refused and removed, never served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..model.chunk_cache import ChunkCache
from . import wire
from .disk import EntryDir


@dataclass
class StoreStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt_entries: int = 0


class ChunkStore:
    def __init__(self, max_bytes: int = 2 << 30, disk_dir: str | os.PathLike | None = None):
        self.memory = ChunkCache(max_bytes)
        self.disk = EntryDir(os.path.join(disk_dir, "chunks")) if disk_dir else None
        self.stats = StoreStats()

    def get(self, key: str) -> torch.Tensor | None:
        if (t := self.memory.get(key)) is not None:
            self.stats.memory_hits += 1
            return t
        t = self._read_disk(key)
        if t is None:
            self.stats.misses += 1
            return None
        self.stats.disk_hits += 1
        self._remember(key, t)
        return t

    def put(self, key: str, t: torch.Tensor):
        self._remember(key, t)
        if self.disk and not self.disk.file(key).exists():
            self.disk.write(key, wire.encode(wire.Tensor.from_torch(t)))

    def _remember(self, key: str, t: torch.Tensor):
        self.memory.put(key, t)
        self.stats.evictions = self.memory.evictions

    def _read_disk(self, key: str) -> torch.Tensor | None:
        raw = self.disk.read(key) if self.disk else None
        if raw is None:
            return None
        try:
            return wire.decode(raw, wire.Tensor).to_torch()
        except wire.WireError:
            self.stats.corrupt_entries += 1
            self.disk.drop(key)
            return None
