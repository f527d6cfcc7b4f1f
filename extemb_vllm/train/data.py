"""Training data: plain-text files or folders, tokenised once into a cache, split
deterministically into train and held-out documents, sampled as fixed-length windows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus import is_heldout
from ..texts import read_texts


def tokenizer_id(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]


def tokenize_cached(paths, tokenizer, cache_dir: str | Path = "data/cache") -> dict[str, np.ndarray]:
    """{document path: token ids}; each document is tokenised once per tokenizer and content."""
    cache = Path(cache_dir) / tokenizer_id(tokenizer)
    cache.mkdir(parents=True, exist_ok=True)
    docs = {}
    for name, text in tqdm(read_texts(paths), desc="tokenising", unit="doc", leave=False):
        f = cache / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".npy")
        if f.exists():
            docs[name] = np.load(f)
        else:
            ids = np.asarray(tokenizer(text).input_ids, dtype=np.uint32)
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, ids)
            tmp.rename(f)
            docs[name] = ids
    return docs


def split_documents(docs: dict[str, np.ndarray], heldout: dict[str, np.ndarray] | None = None):
    """(train, heldout): an explicit held-out set, else the corpus's deterministic document split."""
    if heldout:
        overlap = set(docs) & set(heldout)
        if overlap:
            raise ValueError(f"documents are both in training and held-out data: {sorted(overlap)[:3]}")
        return docs, heldout
    train = {n: d for n, d in docs.items() if not is_heldout(Path(n).stem)}
    held = {n: d for n, d in docs.items() if is_heldout(Path(n).stem)}
    return train, held


class WindowSampler:
    """Random windows of `length` tokens from documents at least that long (seeded, resumable).

    With `align`, windows start at multiples of it (a chunk length): a finite set of windows, so
    what is cached per window (the frozen LLM's key-token gains) is found again by later runs."""

    def __init__(self, docs: dict[str, np.ndarray], length: int, seed: int = 0, align: int = 1):
        self.docs = [d for d in docs.values() if len(d) >= length]
        if not self.docs:
            longest = max((len(d) for d in docs.values()), default=0)
            raise ValueError(f"no document holds a {length}-token sample (longest: {longest} tokens)")
        # documents weighted by how many windows they hold, so every token is equally likely
        self.starts = np.array([(len(d) - length) // align + 1 for d in self.docs])  # window starts per document
        self.p = self.starts / self.starts.sum()
        self.length = length
        self.align = align
        self.rng = np.random.default_rng(seed)

    def sample(self) -> torch.Tensor:
        i = self.rng.choice(len(self.docs), p=self.p)
        s = self.rng.integers(0, self.starts[i]) * self.align
        return torch.from_numpy(self.docs[i][s : s + self.length].astype(np.int64))

    def fixed(self, n: int, seed: int = 1234) -> list[torch.Tensor]:
        """The same n samples every time: for held-out evaluation."""
        keep = self.rng
        self.rng = np.random.default_rng(seed)
        out = [self.sample() for _ in range(n)]
        self.rng = keep
        return out
