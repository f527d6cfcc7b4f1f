"""Synthetic recall samples, made on the fly: facts planted early in natural text, asked for at the end.

The paper's second stage and Activation Beacon's needle data teach exact recall with
data that asks for it. A recall sample is a window of training text with a few facts
("The locker code for the north archive is 60-3317.") planted in chunks that the
two-stream pass compresses, and questions about them in the last chunk, each answered
("... for the north archive? 60-3317."). The answers can only come through the compact
slots, and they carry a fixed share of the sample's loss (`answer_share`).

Everything about the format is kept apart from what `extemb eval passkey` asks
(a five-digit "pass key" in repeated filler): other phrasings, other key formats, real
text around the facts. So a pass-key figure after training is recall, not a memorised format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_PLACES = ["north archive", "harbour office", "old mill", "east tower", "glass house", "river depot", "chapel vault",
           "signal station", "lower garden", "copper mine", "west library", "salt warehouse", "ferry landing",
           "stone bridge", "clock room", "market hall", "weather post", "cellar door", "orchard gate", "boat shed"]
_FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Esther", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lionel",
          "Mara", "Nils", "Olga", "Pavel", "Rosa", "Silas", "Tilda", "Umar", "Vera", "Walter", "Yara", "Zeno"]
_LAST = ["Abernathy", "Brandt", "Castellan", "Drummond", "Eriksen", "Fairweather", "Galloway", "Hollis", "Ivers",
         "Jarvis", "Kettering", "Lindqvist", "Marlowe", "Norcross", "Okafor", "Pemberton", "Quimby", "Rasmussen",
         "Sandoval", "Thorne", "Underhill", "Vasquez", "Whitlock", "Yardley"]
_WORDS = ["amber", "falcon", "willow", "granite", "lantern", "meadow", "cobalt", "thistle", "harbor", "ember",
          "juniper", "quartz", "saffron", "tundra", "velvet", "walnut", "zephyr", "indigo", "marble", "orchid"]

# (statement, question): {what} names the fact, {value} is the key; the answer follows the question
_TEMPLATES = [
    ("The locker code for the {what} is {value}.", "What is the locker code for the {what}?"),
    ("Remember this: the {what} is looked after by {value}.", "Who looks after the {what}?"),
    ("Note for later - the password of the {what} is {value}.", "The password of the {what} was"),
    ("According to the ledger, the {what} was sold for {value} crowns.", "For how many crowns was the {what} sold?"),
    ("The keeper wrote that the {what} opens with the word {value}.", "Which word opens the {what}?"),
    ("Our contact at the {what} goes by the name {value}.", "By what name does our contact at the {what} go?"),
]


def _value(rng: np.random.Generator) -> str:
    """A key in one of several formats; never the five-digit number that the pass-key evaluation asks for."""
    kind = rng.integers(5)
    if kind == 0:
        return str(rng.integers(100, 10_000))  # 3-4 digits
    if kind == 1:
        return str(rng.integers(100_000, 100_000_000))  # 6-8 digits
    if kind == 2:
        return f"{rng.integers(10, 100)}-{rng.integers(1000, 10_000)}"
    if kind == 3:
        return f"{_FIRST[rng.integers(len(_FIRST))]} {_LAST[rng.integers(len(_LAST))]}"
    return f"{_WORDS[rng.integers(len(_WORDS))]} {_WORDS[rng.integers(len(_WORDS))]}"


@dataclass
class RecallSample:
    ids: torch.Tensor  # (length,) token ids
    answer: torch.Tensor  # (length,) bool: the tokens of the answers (what recall is scored on)


class RecallMaker:
    """Turns a window of natural text into a recall sample of the same length (seeded, resumable)."""

    def __init__(self, tokenizer, chunk_len: int, facts: int = 3, seed: int = 0):
        self.tok = tokenizer
        self.chunk_len = chunk_len
        self.facts = facts
        self.rng = np.random.default_rng(seed)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def make(self, text_ids: torch.Tensor) -> RecallSample:
        length, c, rng = text_ids.numel(), self.chunk_len, self.rng
        n = length // c
        if n < 3:
            raise ValueError(f"a recall sample needs >= 3 chunks of {c} tokens, got {length} tokens")
        places = rng.choice(len(_PLACES), size=self.facts, replace=False)
        facts = []
        for p in places:
            statement, question = _TEMPLATES[rng.integers(len(_TEMPLATES))]
            value = _value(rng)
            facts.append((self._ids("\n" + statement.format(what=_PLACES[p], value=value) + "\n"),
                          self._ids("\n" + question.format(what=_PLACES[p])), self._ids(" " + value + ".")))
        # as many facts as fit: the questions in half of the last chunk, the statements in a quarter of the rest
        while facts and (sum(len(q) + len(a) for _, q, a in facts) > c // 2
                         or sum(len(s) for s, _, _ in facts) > (n - 1) * c // 4):
            facts.pop()
        if not facts:
            raise ValueError(f"chunks of {c} tokens are too short for a recall question")
        # questions in a shuffled order, at the very end: inside the last chunk, which reads only slots
        tail, answer_mask = [], []
        for i in rng.permutation(len(facts)):
            _, q, a = facts[i]
            tail += q + a
            answer_mask += [False] * len(q) + [True] * len(a)
        statements = [s for s, _, _ in facts]
        n_text = length - len(tail) - sum(map(len, statements))
        # facts at random depths of the compressed part (chunks 0 .. n-2), kept in order
        cuts = np.sort(rng.integers(0, (n - 1) * c - sum(map(len, statements)), size=len(statements)))
        text = text_ids[:n_text].tolist()
        ids, prev = [], 0
        for cut, s in zip(cuts, statements):
            ids += text[prev:cut] + s
            prev = cut
        ids += text[prev:] + tail
        mask = [False] * (length - len(tail)) + answer_mask
        return RecallSample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask))


def answer_weights(answer: torch.Tensor, share: float) -> torch.Tensor:
    """Per-token loss weights that give the answer tokens `share` of the sample's loss (the rest is text)."""
    n_ans = int(answer.sum())
    if n_ans == 0 or not 0.0 < share < 1.0:
        return torch.ones(answer.shape, dtype=torch.float32)
    n_text = answer.numel() - n_ans
    return torch.where(answer, share / n_ans, (1.0 - share) / n_text).float() * answer.numel()
