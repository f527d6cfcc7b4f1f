"""One directory of entries that survive restarts, written so that readers never see half of one:
each entry goes to a temporary file that is renamed into place (an interrupted write leaves no
entry). Used by the embedder workers' chunk store and the ingress's document registry."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class EntryDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / f"{name}.msgpack"

    def write(self, name: str, payload: bytes):
        path = self.file(name)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old state or the whole new file

    def read(self, name: str) -> bytes | None:
        try:
            return self.file(name).read_bytes()
        except FileNotFoundError:
            return None

    def drop(self, name: str):
        self.file(name).unlink(missing_ok=True)
