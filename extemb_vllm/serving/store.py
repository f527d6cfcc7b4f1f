"""The document store: full-resolution embedder outputs of chunks, keyed by content.

Storing the full-resolution output (not the compact one) is the paper's offline
mode: a registered document serves any k by down-sampling, without re-encoding.
Two tiers: memory (bounded bytes, least recently used out first) and an optional
disk directory that survives restarts. A disk entry is a msgpack `wire.Tensor`
(its bytes carry a digest) written to a temporary file and renamed into place, so
an interrupted write leaves no entry, and a corrupted file is refused and removed,
never served.

Documents are token lists under an id that cannot be guessed, owned by the API key
that registered them (when keys are configured).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from . import wire


class UnknownDocument(KeyError):
    def __str__(self):
        return f"unknown document id {self.args[0]!r}"


@dataclass
class StoreStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt_entries: int = 0


class Document(msgspec.Struct, frozen=True):
    """A registered document: its tokens (re-planned per request, at any k; its chunks'
    embedder outputs live in the chunk tier under their content keys)."""

    n_tokens: int
    token_ids: list[int]
    owner: str = ""  # digest of the registering API key; "" when the server has none


class DocumentStore:
    def __init__(self, max_bytes: int = 2 << 30, disk_dir: str | os.PathLike | None = None):
        self.max_bytes = max_bytes
        self.disk = Path(disk_dir) if disk_dir else None
        if self.disk:
            (self.disk / "chunks").mkdir(parents=True, exist_ok=True)
            (self.disk / "docs").mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._docs: dict[str, Document] = {}
        self._lock = threading.Lock()
        self.stats = StoreStats()

    # -- chunks ---------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if (t := self._mem.get(key)) is not None:
                self._mem.move_to_end(key)
                self.stats.memory_hits += 1
                return t
        t = self._read_disk("chunks", key)
        if t is None:
            self.stats.misses += 1
            return None
        self.stats.disk_hits += 1
        self._remember(key, t)
        return t

    def put(self, key: str, t: torch.Tensor):
        self._remember(key, t)
        if self.disk and not self._path("chunks", key).exists():
            self._write_disk("chunks", key, wire.encode(wire.Tensor.from_torch(t)))

    def _remember(self, key: str, t: torch.Tensor):
        size = t.numel() * t.element_size()
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return
            self._mem[key] = t
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
                self.stats.evictions += 1

    # -- documents ------------------------------------------------------------------------------
    def register(self, token_ids: list[int], api_key: str | None = None) -> str:
        doc_id = "doc-" + secrets.token_urlsafe(16)  # 128 random bits: ids cannot be guessed
        doc = Document(len(token_ids), token_ids, owner=_owner(api_key))
        with self._lock:
            self._docs[doc_id] = doc
        if self.disk:
            self._write_disk("docs", doc_id, msgspec.msgpack.encode(doc))
        return doc_id

    def document(self, doc_id: str, api_key: str | None = None) -> Document:
        doc = self._docs.get(doc_id)
        if doc is None and self.disk and _safe_name(doc_id):
            raw = self._read_raw("docs", doc_id)
            if raw is not None:
                try:
                    doc = msgspec.msgpack.decode(raw, type=Document)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self._drop_corrupt("docs", doc_id)
                    doc = None
                if doc is not None:
                    self._docs[doc_id] = doc
        # another key's document answers exactly like a missing one: ids leak nothing
        if doc is None or doc.owner != _owner(api_key):
            raise UnknownDocument(doc_id)
        return doc

    # -- disk tier ------------------------------------------------------------------------------
    def _path(self, kind: str, name: str) -> Path:
        return self.disk / kind / f"{name}.msgpack"

    def _write_disk(self, kind: str, name: str, payload: bytes):
        path = self._path(kind, name)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old state or the whole new file

    def _read_raw(self, kind: str, name: str) -> bytes | None:
        if not self.disk:
            return None
        try:
            return self._path(kind, name).read_bytes()
        except FileNotFoundError:
            return None

    def _read_disk(self, kind: str, key: str) -> torch.Tensor | None:
        raw = self._read_raw(kind, key)
        if raw is None:
            return None
        try:
            return wire.decode(raw, wire.Tensor).to_torch()
        except wire.WireError:
            self._drop_corrupt(kind, key)
            return None

    def _drop_corrupt(self, kind: str, name: str):
        self.stats.corrupt_entries += 1
        self._path(kind, name).unlink(missing_ok=True)


def _owner(api_key: str | None) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


def _safe_name(doc_id: str) -> bool:
    return doc_id.startswith("doc-") and all(c.isalnum() or c in "-_" for c in doc_id)
