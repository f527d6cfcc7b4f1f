"""The ingress's document registry: long contexts registered once (`POST /v1/contexts`) and named
by later requests (`context_id`), re-planned per request at any k (their chunks' embedder outputs
live in the workers' chunk store under their content keys).

Ids cannot be guessed (128 random bits) and a document answers only to the API key that
registered it. Memory holds at most `max_tokens` tokens of documents, least recently used out
first; with a disk directory every document survives restarts and evictions, and without one a
registration past the bound is refused (a document must never vanish while ids to it are out).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import OrderedDict

import msgspec

from .disk import EntryDir


class UnknownDocument(KeyError):
    def __str__(self):
        return f"unknown document id {self.args[0]!r}"


class RegistryFull(RuntimeError):
    pass


class Document(msgspec.Struct, frozen=True):
    n_tokens: int
    token_ids: list[int]
    owner: str = ""  # digest of the registering API key; "" when the server has none


class DocumentRegistry:
    def __init__(self, disk_dir: str | os.PathLike | None = None, max_tokens: int = 64 << 20):
        self.disk = EntryDir(os.path.join(disk_dir, "docs")) if disk_dir else None
        self.max_tokens = max_tokens
        self._docs: OrderedDict[str, Document] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def register(self, token_ids: list[int], api_key: str | None = None) -> str:
        doc_id = "doc-" + secrets.token_urlsafe(16)  # 128 random bits: ids cannot be guessed
        doc = Document(len(token_ids), token_ids, owner=_owner(api_key))
        if self.disk:
            self.disk.write(doc_id, msgspec.msgpack.encode(doc))
        elif self._tokens + doc.n_tokens > self.max_tokens:
            raise RegistryFull(f"the document registry holds {self._tokens} of {self.max_tokens} tokens and has "
                               f"no disk directory to spill to (contexts_dir); registering {doc.n_tokens} more "
                               f"would drop documents whose ids are still in use")
        self._remember(doc_id, doc)
        return doc_id

    def document(self, doc_id: str, api_key: str | None = None) -> Document:
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                self._docs.move_to_end(doc_id)
        if doc is None and self.disk and _safe_name(doc_id):
            raw = self.disk.read(doc_id)
            if raw is not None:
                try:
                    doc = msgspec.msgpack.decode(raw, type=Document)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.disk.drop(doc_id)
                    doc = None
                if doc is not None:
                    self._remember(doc_id, doc)
        # another key's document answers exactly like a missing one: ids leak nothing
        if doc is None or doc.owner != _owner(api_key):
            raise UnknownDocument(doc_id)
        return doc

    def _remember(self, doc_id: str, doc: Document):
        with self._lock:
            self._docs[doc_id] = doc
            self._tokens += doc.n_tokens
            while self.disk and self._tokens > self.max_tokens and len(self._docs) > 1:  # on disk: reloadable
                _, old = self._docs.popitem(last=False)
                self._tokens -= old.n_tokens


def _owner(api_key: str | None) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


def _safe_name(doc_id: str) -> bool:
    return doc_id.startswith("doc-") and all(c.isalnum() or c in "-_" for c in doc_id)
