"""The text sources' pure parts: Jane Austen never reaches the training texts, long works are cut
and short pages packed at paragraph boundaries without losing or repeating text."""

from extemb_vllm import corpus


def _paragraphs(tag: str, n: int, size: int = 300) -> str:
    return "\n\n".join(f"{tag} paragraph {i}. " + " ".join(["word"] * (size // 5)) for i in range(n))


def test_fiction_drops_every_austen_work_by_name_title_or_opening():
    works = {
        "austen-emma": _paragraphs("emma", 5),  # by name
        "anon-novel": "PERSUASION\n\n" + _paragraphs("p", 5),  # by its title line
        "unknown-1": "A novel by Jane Austen, edited.\n\n" + _paragraphs("u", 5),  # by its opening
        "chesterton-ball": _paragraphs("ball", 5),
        "melville-moby_dick": _paragraphs("moby", 600),  # ~110 kB: cut in pieces
    }
    docs = corpus._fiction_documents(works)
    assert not [name for name in docs if "austen" in name or "emma" in name or "unknown" in name or "anon" in name]
    assert not [t for t in docs.values() if "Austen" in t or "PERSUASION" in t]
    assert "chesterton-ball" in docs  # a short work stays one document
    moby = sorted(name for name in docs if name.startswith("melville-moby_dick-"))
    assert len(moby) >= 2 and all(len(docs[n]) >= corpus.DOC_CHARS // 2 for n in moby)
    # the pieces are the work, in order, cut only at paragraph breaks
    paragraphs = [p for n in moby for p in docs[n].strip().split("\n\n")]
    assert paragraphs == works["melville-moby_dick"].split("\n\n")


def test_pack_joins_short_pages_in_order_and_keeps_long_ones():
    pages = [(f"p{i:03d}", _paragraphs(f"page{i}", 3)) for i in range(150)]  # ~1 kB each
    docs = corpus._pack(pages)
    assert len(docs) >= 2 and list(docs)[0] == "p000"  # each named after its first page
    # every page exactly once, in order, and no document much shorter than the target size
    assert "\n\n".join(d.strip() for d in docs.values()) == "\n\n".join(text for _, text in pages)
    assert all(len(t) >= corpus.DOC_CHARS // 2 for t in docs.values())
