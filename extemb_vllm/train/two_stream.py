"""The paper's two-stream auto-regression, all chunks of a sample in one batched pass.

Stream 1 encodes every chunk of the sample with the embedder. Stream 2 predicts
each chunk's tokens from the compact embeddings of all earlier chunks plus the
chunk's own raw tokens. Written as one joint sequence with a block mask:

    sequence   [C_0 C_1 ... C_{n-2} | R_0 R_1 ... R_{n-1}]     C_j: compact slots of chunk j
    positions   0 .. (n-1)m-1       | R_i: i*m .. i*m + c-1     R_i: raw tokens of chunk i
    mask        C: causal over C    | R_i: C_0..C_{i-1} + causal inside R_i

so chunk i reads exactly what the reference model reads at inference,
`[compact(chunks < i), raw chunk i]` with consecutive positions. The first token of
chunk i is predicted at the last slot of C_{i-1}; the loss covers every token but
the sample's first.

The LLM runs that joint sequence in two calls that compute the same thing: the
compact slots once (causal; their keys/values are what every chunk reads), then
all raw chunks as one batch of n rows on top of those keys/values, row i masked to
C_0..C_{i-1} and its own causal prefix. With a dense (T, T) mask, SDPA (CPU flash
or the math path) computes attention over every pair of the joint sequence, masked
or not; the batched form only computes the (c, |C| + c) blocks that can be non-zero
(5x less attention work at 8 chunks of 512, k=8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..model.embedder import keep_positions


@dataclass
class TwoStreamLayout:
    n_chunks: int
    chunk_len: int
    k: int
    slots: int  # compact slots per chunk (m)
    compact_positions: torch.Tensor  # (n_c,) positions of C_0..C_{n-2}, n_c = (n-1)*m
    raw_positions: torch.Tensor  # (n, c) positions of R_i, i*m + 0..c-1
    raw_mask: torch.Tensor  # (n, c, n_c + c) bool: row i, query t may read [compact slot | own raw token]
    target_at: torch.Tensor  # (N,) index in the sample of each predicted token, in logits order


def two_stream_layout(n_chunks: int, chunk_len: int, k: int, device=None) -> TwoStreamLayout:
    n, c = n_chunks, chunk_len
    m = len(keep_positions(c, k))
    n_c = (n - 1) * m
    ar = lambda *a: torch.arange(*a, device=device)  # noqa: E731
    raw_positions = ar(n)[:, None] * m + ar(c)[None, :]
    sees_compact = ar(n_c)[None, None, :] < (ar(n) * m)[:, None, None]  # (n, 1, n_c): slots of chunks < i
    causal = ar(c)[None, :] <= ar(c)[:, None]  # (c, c)
    raw_mask = torch.cat([sees_compact.expand(n, c, n_c), causal.expand(n, c, c)], dim=-1)
    # logits order: first token of chunks 1..n-1 (from the last slot of C_{i-1}), then
    # tokens 1..c-1 of every chunk (from the raw token before them)
    firsts = ar(1, n) * c
    inside = (ar(n)[:, None] * c + ar(1, c)[None, :]).reshape(-1)
    return TwoStreamLayout(n, c, k, m, ar(n_c), raw_positions, raw_mask, torch.cat([firsts, inside]))


def two_stream_forward(model, ids: torch.Tensor, k: int, chunk_len: int, return_logprobs: bool = False):
    """Mean next-token loss of one sample (1-D ids, a multiple of chunk_len long).

    `model` is an ExtEmbLlamaForCausalLM; gradients reach only its embedder (the
    LLM's parameters do not require grad). With `return_logprobs`, also returns
    the log-probability of every target token, indexed like `layout.target_at`.
    """
    n = ids.numel() // chunk_len
    if n < 2 or ids.numel() != n * chunk_len:
        raise ValueError(f"a sample must be >= 2 chunks of {chunk_len} tokens, got {ids.numel()} tokens")
    lay = two_stream_layout(n, chunk_len, k, device=ids.device)
    chunks = ids.view(n, chunk_len)
    # stream 1: all chunks but the last one (whose compact slots nobody reads), one batch
    hidden = model.embedder.encode_chunks(list(chunks[:-1]), model.embed_tokens)
    keep = keep_positions(chunk_len, k, ids.device)
    raw = model.embed_tokens(chunks)  # (n, c, hidden)
    compact = torch.cat([h[keep] for h in hidden]).to(raw.dtype)
    llm = model.llm.model
    # stream 2a: the compact slots, causal, once; keep their keys/values for every chunk
    cache = DynamicCache(config=llm.config)
    out_c = llm(inputs_embeds=compact[None], position_ids=lay.compact_positions[None],
                past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(n)
    # stream 2b: every raw chunk as one row, reading the cached slots through its block of the mask
    out_r = llm(inputs_embeds=raw, attention_mask=lay.raw_mask[:, None], position_ids=lay.raw_positions,
                past_key_values=cache, use_cache=True)
    m = lay.slots
    h = torch.cat([out_c.last_hidden_state[0, m - 1 :: m], out_r.last_hidden_state[:, :-1].reshape(-1, raw.shape[-1])])
    logits = model.llm.lm_head(h).float()
    targets = ids[lay.target_at]
    loss = F.cross_entropy(logits, targets)
    if not return_logprobs:
        return loss
    return loss, logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), lay
