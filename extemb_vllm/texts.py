"""Reading long texts (files or folders of .txt) and cutting PG19-style spans: shared by training,
evaluation and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch


def read_texts(paths) -> list[tuple[str, str]]:
    """(name, text) of each file; folders are read recursively (*.txt)."""
    out = []
    for p in map(Path, paths):
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                out.append((str(f), text))
    if not out:
        raise FileNotFoundError(f"no text found in {list(map(str, paths))}")
    return out


def cut_spans(token_streams: list[torch.Tensor], span_len: int, n_spans: int) -> list[torch.Tensor]:
    """`n_spans` non-overlapping spans of `span_len` tokens, spread over all documents.

    Spans never cross a document boundary; documents are visited in turn so the
    spans cover as many of them as possible, evenly spaced inside each.
    """
    fits = [len(t) // span_len for t in token_streams]
    if sum(fits) < n_spans:
        raise ValueError(
            f"need {n_spans} spans of {span_len} tokens but the texts hold only {sum(fits)} "
            f"(documents of {[len(t) for t in token_streams]} tokens); give more text or fewer/shorter spans"
        )
    take = [0] * len(token_streams)
    while sum(take) < n_spans:  # round-robin over documents with room left
        for i, f in enumerate(fits):
            if take[i] < f and sum(take) < n_spans:
                take[i] += 1
    spans = []
    for t, f, n in zip(token_streams, fits, take):
        if n == 0:
            continue
        stride = (len(t) - span_len) // max(n - 1, 1)
        spans.extend(t[j * stride : j * stride + span_len] for j in range(n))
    return spans
