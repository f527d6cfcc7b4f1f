"""Full-resolution embedder outputs of chunks in memory, keyed by content, bounded in bytes.

The full-resolution output (not the compact rows) is what is kept: it serves every k by
down-sampling, so a chunk compressed at k=8 in one turn and at k=16 in a later one is
encoded once. Least recently used entries leave first. Used by the vLLM plug-in (inside
the engine) and by the Ray embedder workers' store (its memory tier).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class ChunkCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the Ray workers' store is called from several threads
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._entries.get(key)
            if t is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: str, t: torch.Tensor):
        """Keep `t` (pass a tensor that owns its storage: a view would keep its whole base alive)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = t
            self._bytes += _nbytes(t)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= _nbytes(old)
                self.evictions += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
