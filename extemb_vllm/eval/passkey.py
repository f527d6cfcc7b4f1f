"""Pass-key retrieval: a number hidden at a chosen depth of long filler text,
asked for at the end. Accuracy by context length and depth, per method.

Methods: `auto` (the served behaviour: compress what does not fit the window),
`k<K>` (forced k), `truncated` (only the last W tokens) and `full` (all tokens,
where the base model's positions allow). Truncation cannot see a key that lies
before its window; that is the gap compact embeddings are meant to close.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..model import ContextError

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyCell:
    method: str
    length: int
    depth: float
    trials: int
    correct: int
    note: str = ""
    # mean negative log-probability per token of the key's digits, teacher-forced after the question:
    # moves before exact recall does (a key half-remembered scores 0 of 21 but a lower key_nll)
    key_nll: float | None = None

    @property
    def accuracy(self) -> float | None:
        return None if self.note else self.correct / self.trials


def make_prompt(tokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids of about `length` tokens with the needle at `depth` (0 = start, 1 = end)."""
    filler = tokenizer(FILLER, add_special_tokens=False).input_ids
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
    question = tokenizer(" " + QUESTION, add_special_tokens=False).input_ids
    n_fill = length - len(needle) - len(question)
    if n_fill < 1:
        raise ValueError(f"length {length} is too short for the pass-key prompt")
    fill = (filler * (n_fill // len(filler) + 1))[:n_fill]
    at = int(round(depth * n_fill))
    return torch.tensor(fill[:at] + needle + fill[at:] + question)


@torch.no_grad()
def evaluate_passkey(model, tokenizer, lengths, depths, methods, trials=3, window=None, raw_tail=None,
                     seed=0, max_new_tokens=8, progress=True, fill_window=None) -> list[PasskeyCell]:
    W = window or model.ext.window
    rng = random.Random(seed)
    keys = {(L, d, t): rng.randint(10000, 99999) for L in lengths for d in depths for t in range(trials)}
    cells = []
    bar = tqdm(total=len(lengths) * len(depths) * len(methods), desc="pass-key", unit="cell", disable=not progress)
    for L in lengths:
        for d in depths:
            for m in methods:
                cell = PasskeyCell(m, L, d, trials, 0)
                nll = []
                for t in range(trials):
                    key = keys[(L, d, t)]
                    ids = make_prompt(tokenizer, L, d, key)
                    try:
                        new = _generate(model, m, ids, W, raw_tail, max_new_tokens, fill_window)
                        nll.append(_key_nll(model, tokenizer, m, ids, key, W, raw_tail, max_new_tokens, fill_window))
                    except ContextError as e:
                        cell.note = str(e)
                        break
                    cell.correct += answer_is_correct(tokenizer, new, key)
                cell.key_nll = None if cell.note else sum(nll) / len(nll)
                cells.append(cell)
                bar.update()
    bar.close()
    return cells


def answer_is_correct(tokenizer, new_ids, key: int) -> bool:
    """The key's digits appear in the generated text (whitespace ignored: a tokenizer may split them)."""
    return str(key) in re.sub(r"\s", "", tokenizer.decode(new_ids))


def _generate(model, method, ids, W, raw_tail, max_new_tokens, fill_window):
    if method == "full":
        if ids.numel() + max_new_tokens > model.max_positions:
            raise ContextError(f"{ids.numel()} tokens exceed the base model's {model.max_positions} positions")
        return model.generate(ids, max_new_tokens, raw_tail=ids.numel(), window=model.max_positions)[0]
    if method == "truncated":
        return model.generate(ids[-(W - max_new_tokens):], max_new_tokens, window=W)[0]
    k = None if method == "auto" else int(method[1:])
    return model.generate(ids, max_new_tokens, k=k, raw_tail=raw_tail, window=W, fill_window=fill_window)[0]


def _key_nll(model, tokenizer, method, ids, key: int, W, raw_tail, max_new_tokens, fill_window) -> float:
    """Mean NLL of the key's tokens appended after the question, laid out as `_generate` lays out the prompt
    (the key in the positions generation would fill)."""
    answer = torch.tensor(tokenizer(f" {key}", add_special_tokens=False).input_ids)
    n = answer.numel()
    full_ids = torch.cat([ids, answer])
    if method == "full":
        lp, _ = model.score(full_ids, n, raw_tail=full_ids.numel(), window=model.max_positions)
    elif method == "truncated":
        lp, _ = model.score(full_ids[-(W - max_new_tokens + n):], n, window=W, raw_tail=W - max_new_tokens + n)
    else:
        k = None if method == "auto" else int(method[1:])
        # the generation plan reserves max_new_tokens at the end of the window; scoring keeps the same
        # compressed part and lets the answer take n of those reserved positions
        plan = model.plan(ids.numel(), k=k, raw_tail=raw_tail, window=W, reserve=max_new_tokens,
                          fill_window=fill_window)
        lp, _ = model.score(full_ids, n, k=plan.k, raw_tail=plan.n_raw + n, window=plan.llm_length + n,
                            fill_window=False, append_stable=False)
    return float(-lp.mean())


def write_json(cells, path, meta):
    with open(path, "w") as f:
        json.dump({"meta": meta, "cells": [dict(asdict(c), accuracy=c.accuracy) for c in cells]}, f, indent=2)


def format_table(cells) -> str:
    lines = []
    for m in dict.fromkeys(c.method for c in cells):
        cs = [c for c in cells if c.method == m]
        lengths = sorted({c.length for c in cs})
        depths = sorted({c.depth for c in cs})
        lines.append(f"pass-key accuracy, {m} (rows: depth, columns: tokens)")
        lines.append(f"{'depth':>6}" + "".join(f"{L:>9}" for L in lengths))
        for attr, fmt, heading in (("accuracy", ".2f", None),
                                   ("key_nll", ".3f", "  mean NLL per token of the key, teacher-forced "
                                                      "(lower: closer to recall)")):
            if heading:
                lines.append(heading)
            for d in depths:
                row = f"{d:>6.2f}"
                for L in lengths:
                    v = getattr(next(c for c in cs if c.length == L and c.depth == d), attr)
                    row += f"{'n/a':>9}" if v is None else f"{v:>9{fmt}}"
                lines.append(row)
    return "\n".join(lines)


def plot(cells, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(c.method for c in cells))
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in cells:
            if c.method == m and c.accuracy is not None:
                grid[depths.index(c.depth), lengths.index(c.length)] = c.accuracy
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("tokens")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("pass-key retrieval")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
