"""Key tokens: where the frozen LLM's prediction depends on long context.

The idea of LongCE (Fang et al., "What is Wrong with Perplexity for Long-context Language
Modeling?", ICLR 2025): most tokens are predicted as well from a short context as from a
long one, and whole-text loss averages over them. For every token of chunks 1.. of a
training window, the frozen LLM's

    gain = log p(token | the whole window raw) - log p(token | its own chunk raw)

is what the compact slots of the earlier chunks have to make up. The LLM is frozen, so a
window's gains never go stale: `GainCache` keeps them on disk by the window's tokens, the
chunk length and the LLM's identity, and any later run that draws the window again (the
trainer's windows start on the chunk grid, a finite set) reads them instead of paying
two forward passes.

`key_weights` turns gains into the per-token weights of the loss.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .two_stream import linear_cross_entropy


@torch.no_grad()
def frozen_logprobs(model, ids: torch.Tensor, chunk_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, alone), each (N,) for the N = len(ids) - chunk_len tokens of chunks 1..: the frozen LLM's
    log-probability of each with the whole window raw, and with only its own chunk raw. A chunk's
    first token has no context of its own chunk; its `alone` is its `full` (no gain)."""
    n = ids.numel() // chunk_len
    if n < 2 or ids.numel() != n * chunk_len:
        raise ValueError(f"a window must be >= 2 chunks of {chunk_len} tokens, got {ids.numel()} tokens")
    head = model.llm.lm_head.weight
    h = model.llm.model(input_ids=ids[None]).last_hidden_state[0, chunk_len - 1 : -1]
    _, full = linear_cross_entropy(h, head, ids[chunk_len:])
    rows = ids[chunk_len:].view(n - 1, chunk_len)
    h = model.llm.model(input_ids=rows).last_hidden_state[:, :-1].reshape(-1, h.shape[-1])
    _, inside = linear_cross_entropy(h, head, rows[:, 1:].reshape(-1))
    alone = full.view(n - 1, chunk_len).clone()
    alone[:, 1:] = inside.view(n - 1, chunk_len - 1)
    return full, alone.view(-1)


def llm_identity(model) -> str:
    """A short digest of the frozen LLM's weights (token table, last layer, final norm): cached gains
    belong to one LLM."""
    h = hashlib.sha256()
    last = model.llm.model.layers[-1]
    for t in (model.llm.model.embed_tokens.weight, last.mlp.down_proj.weight, model.llm.model.norm.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class GainCache:
    """Gains (`frozen_logprobs` full - alone) of windows, on disk: one fp16 .npy per window, named by
    its tokens. `hits` / `misses` count what this process found and computed."""

    def __init__(self, cache_dir: str | Path, model, chunk_len: int, dtype: torch.dtype):
        dtype_name = str(dtype).removeprefix("torch.")
        self.dir = Path(cache_dir) / "key-gains" / f"{llm_identity(model)}-c{chunk_len}-{dtype_name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_len = chunk_len
        self.hits = self.misses = 0

    def _path(self, ids: torch.Tensor) -> Path:
        return self.dir / (hashlib.sha256(ids.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:24] + ".npy")

    def gains(self, model, ids: torch.Tensor) -> torch.Tensor:
        """(N,) float32 gains of the tokens of chunks 1.. of `ids`, computed under the caller's autocast."""
        path = self._path(ids)
        if path.exists():
            self.hits += 1
            return torch.from_numpy(np.load(path).astype(np.float32)).to(ids.device)
        self.misses += 1
        full, alone = frozen_logprobs(model, ids, self.chunk_len)
        gain = (full - alone).float()
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # ranks that miss the same window write apart
        np.save(tmp, gain.cpu().numpy().astype(np.float16))
        tmp.replace(path)
        return gain


def key_weights(gain: torch.Tensor, strength: float, cap: float = 4.0) -> torch.Tensor:
    """Per-token loss weights `1 + strength * clamp(gain, 0, cap)`: a token long context does not help
    keeps weight 1, one it helps by g nats (up to `cap`) weighs 1 + strength * g. Clipped because a
    few tokens gain many nats (a repeated rare name) and would otherwise carry a sample's loss;
    the loss normalises the weights, so only their ratios matter."""
    return 1.0 + strength * gain.clamp(0.0, cap)
