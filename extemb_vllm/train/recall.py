"""Synthetic recall samples, made on the fly: facts planted early in natural text, asked for at the end.

The paper's second stage and Activation Beacon's needle data teach exact recall with
data that asks for it. A recall sample is a window of training text with one to four facts
("The locker code for the north archive is 60-3317.", a date, a name, a short sentence)
planted in chunks that the two-stream pass compresses, and questions about them, in one of
several phrasings, in a later chunk, each answered ("... for the north archive? 60-3317.").
The answers can only come through the compact slots, and they carry a fixed share of the
sample's loss (`answer_share`).

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

_PHRASES = ["the tide turns at dawn", "bring the blue lantern", "the second key is under the stair",
            "wait for the third bell", "the fox sleeps by the mill", "ask the ferryman twice",
            "the letters are in the red trunk", "nobody leaves before noon", "the owl has left the tower",
            "count the steps to the well", "the garden gate sticks in rain", "the cook knows the way"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]

# per kind of value: (statement, [questions]); {what} names the fact, {value} is the key; the answer
# follows the question. Several phrasings of each question, so no one wording is learned.
_TEMPLATES = {
    "code": [("The locker code for the {what} is {value}.",
              ["What is the locker code for the {what}?", "The {what}'s locker opens with the code",
               "Which code opens the locker of the {what}?"]),
             ("Note for later - the password of the {what} is {value}.",
              ["The password of the {what} was", "What was the password of the {what}?"])],
    "number": [("According to the ledger, the {what} was sold for {value} crowns.",
                ["For how many crowns was the {what} sold?", "The ledger says the {what} fetched (in crowns)"]),
               ("The {what} holds exactly {value} barrels, the clerk insisted.",
                ["How many barrels does the {what} hold?", "The clerk's count of barrels at the {what}:"])],
    "name": [("Remember this: the {what} is looked after by {value}.",
              ["Who looks after the {what}?", "The keeper of the {what} is"]),
             ("Our contact at the {what} goes by the name {value}.",
              ["By what name does our contact at the {what} go?", "Our contact at the {what} is called"])],
    "words": [("The keeper wrote that the {what} opens with the word {value}.",
               ["Which word opens the {what}?", "The word that opens the {what}:"])],
    "date": [("The meeting at the {what} is set for {value}.",
              ["When is the meeting at the {what}?", "The meeting at the {what} takes place on"]),
             ("Records show the {what} was built on {value}.",
              ["On what date was the {what} built?", "The {what} dates from"])],
    "sentence": [("The message left at the {what} reads: {value}.",
                  ["What does the message at the {what} say?", "The note at the {what} said:"])],
}


def _value(rng: np.random.Generator, kind: str) -> str:
    """A value of one kind; never the five-digit number that the pass-key evaluation asks for."""
    if kind == "code":
        if rng.random() < 0.5:
            return f"{rng.integers(10, 100)}-{rng.integers(1000, 10_000)}"
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return "".join(letters[i] for i in rng.integers(len(letters), size=2)) + str(rng.integers(100, 1000))
    if kind == "number":  # 3-4 or 6-8 digits
        return str(rng.integers(100, 10_000) if rng.random() < 0.5 else rng.integers(100_000, 100_000_000))
    if kind == "name":
        return f"{_FIRST[rng.integers(len(_FIRST))]} {_LAST[rng.integers(len(_LAST))]}"
    if kind == "words":
        return f"{_WORDS[rng.integers(len(_WORDS))]} {_WORDS[rng.integers(len(_WORDS))]}"
    if kind == "date":
        return f"{rng.integers(1, 29)} {_MONTHS[rng.integers(12)]} {rng.integers(1700, 1950)}"
    return _PHRASES[rng.integers(len(_PHRASES))]


@dataclass
class RecallSample:
    ids: torch.Tensor  # (length,) token ids
    answer: torch.Tensor  # (length,) bool: the tokens of the answers (what recall is scored on)


class RecallMaker:
    """Turns a window of natural text into a recall sample of the same length (seeded, resumable):
    1 to `facts` facts planted at random depths, asked for in a later chunk (the last or any before it)."""

    def __init__(self, tokenizer, chunk_len: int, facts: int = 4, seed: int = 0):
        self.tok = tokenizer
        self.chunk_len = chunk_len
        self.facts = facts
        self.rng = np.random.default_rng(seed)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def make(self, text_ids: torch.Tensor) -> RecallSample:
        length, c, rng = text_ids.numel(), self.chunk_len, self.rng
        n = length // c
        if n < 2:
            raise ValueError(f"a recall sample needs >= 2 chunks of {c} tokens, got {length} tokens")
        places = rng.choice(len(_PLACES), size=int(rng.integers(1, self.facts + 1)), replace=False)
        kinds = list(_TEMPLATES)
        facts = []
        for p in places:
            kind = kinds[rng.integers(len(kinds))]
            statement, questions = _TEMPLATES[kind][rng.integers(len(_TEMPLATES[kind]))]
            value = _value(rng, kind)
            question = questions[rng.integers(len(questions))]
            facts.append((self._ids("\n" + statement.format(what=_PLACES[p], value=value) + "\n"),
                          self._ids("\n" + question.format(what=_PLACES[p])), self._ids(" " + value + ".")))
        # the chunk that asks: any after the first, so the questions come at varying distances from the facts
        ask = int(rng.integers(1, n))
        # as many facts as fit: the questions in half a chunk, the statements in a quarter of the chunks before
        while facts and (sum(len(q) + len(a) for _, q, a in facts) > c // 2
                         or sum(len(s) for s, _, _ in facts) > ask * c // 4):
            facts.pop()
        if not facts:
            raise ValueError(f"chunks of {c} tokens are too short for a recall question")
        qa, answer_mask = [], []
        for i in rng.permutation(len(facts)):  # asked in a shuffled order
            _, q, a = facts[i]
            qa += q + a
            answer_mask += [False] * len(q) + [True] * len(a)
        statements = [s for s, _, _ in facts]
        planted = sum(map(len, statements))
        text = text_ids[: length - planted - len(qa)].tolist()
        # before the asking chunk: text with the statements at random depths, kept in order (ask * c tokens)
        cuts = np.sort(rng.integers(0, ask * c - planted + 1, size=len(statements)))
        ids, prev = [], 0
        for cut, s in zip(cuts, statements):
            ids += text[prev:cut] + s
            prev = cut
        ids += text[prev : ask * c - planted]
        # the asking chunk: text, the questions and answers at a random offset, text to the end
        at = ask * c - planted + int(rng.integers(0, c - len(qa) + 1))
        ids += text[ask * c - planted : at] + qa + text[at:]
        mask = [False] * (len(ids) - len(qa) - len(text[at:])) + answer_mask + [False] * len(text[at:])
        return RecallSample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask))


def answer_weights(answer: torch.Tensor, share: float) -> torch.Tensor:
    """Per-token loss weights that give the answer tokens `share` of the sample's loss (the rest is text)."""
    n_ans = int(answer.sum())
    if n_ans == 0 or not 0.0 < share < 1.0:
        return torch.ones(answer.shape, dtype=torch.float32)
    n_text = answer.numel() - n_ans
    return torch.where(answer, share / n_ans, (1.0 - share) / n_text).float() * answer.numel()
