"""The paper's two-stream auto-regression, all chunks of a sample in one forward pass.

Stream 1 encodes every chunk of the sample with the embedder. Stream 2 predicts
each chunk's tokens from the compact embeddings of all earlier chunks plus the
chunk's own raw tokens. One LLM forward does it for every chunk at once:

    sequence   [C_0 C_1 ... C_{n-2} | R_0 R_1 ... R_{n-1}]     C_j: compact slots of chunk j
    positions   0 .. (n-1)m-1       | R_i: i*m .. i*m + c-1     R_i: raw tokens of chunk i
    mask        C: causal over C    | R_i: C_0..C_{i-1} + causal inside R_i

so chunk i reads exactly what the reference model reads at inference,
`[compact(chunks < i), raw chunk i]` with consecutive positions. The first token of
chunk i is predicted at the last slot of C_{i-1}; the loss covers every token but
the sample's first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.embedder import keep_positions


@dataclass
class TwoStreamLayout:
    n_chunks: int
    chunk_len: int
    k: int
    slots: int  # compact slots per chunk
    positions: torch.Tensor  # (T,) position ids of the joint sequence
    allowed: torch.Tensor  # (T, T) bool, True = query row may attend to key column
    pred_at: torch.Tensor  # (N,) sequence index whose logits predict ...
    target_at: torch.Tensor  # (N,) ... the token at this index of the sample


def two_stream_layout(n_chunks: int, chunk_len: int, k: int, device=None) -> TwoStreamLayout:
    m = len(keep_positions(chunk_len, k))
    n_c = (n_chunks - 1) * m
    T = n_c + n_chunks * chunk_len
    ar = torch.arange
    chunk_of_raw = ar(n_chunks, device=device).repeat_interleave(chunk_len)  # (n*c,)
    offset_in_chunk = ar(chunk_len, device=device).repeat(n_chunks)
    positions = torch.cat([ar(n_c, device=device), chunk_of_raw * m + offset_in_chunk])

    q_compact = ar(T, device=device)[:, None] < n_c
    k_compact = ar(T, device=device)[None, :] < n_c
    idx = ar(T, device=device)
    causal = idx[None, :] <= idx[:, None]
    # which chunk each sequence index belongs to (compact slot j*m.. -> chunk j; raw -> its chunk)
    chunk_id = torch.cat([ar(n_c, device=device) // max(m, 1), chunk_of_raw])
    compact_to_compact = q_compact & k_compact & causal
    raw_to_earlier_compact = ~q_compact & k_compact & (chunk_id[None, :] < chunk_id[:, None])
    raw_to_own_raw = ~q_compact & ~k_compact & (chunk_id[None, :] == chunk_id[:, None]) & causal
    allowed = compact_to_compact | raw_to_earlier_compact | raw_to_own_raw

    # predictions: inside a chunk, raw t-1 -> raw t; across, last slot of C_{i-1} -> raw 0 of chunk i
    raw_seq = n_c + ar(n_chunks * chunk_len, device=device)
    inside = offset_in_chunk > 0
    pred_in, tgt_in = raw_seq[inside] - 1, ar(n_chunks * chunk_len, device=device)[inside]
    first = ar(1, n_chunks, device=device)
    pred_first, tgt_first = first * m - 1, first * chunk_len
    pred_at = torch.cat([pred_first, pred_in])
    target_at = torch.cat([tgt_first, tgt_in])
    return TwoStreamLayout(n_chunks, chunk_len, k, m, positions, allowed, pred_at, target_at)


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
    compact = torch.cat([h[keep] for h in hidden])
    raw = model.embed_tokens(ids)
    x = torch.cat([compact.to(raw.dtype), raw])[None]
    mask = lay.allowed[None, None]
    out = model.llm.model(inputs_embeds=x, attention_mask=mask, position_ids=lay.positions[None], use_cache=False)
    h = out.last_hidden_state[0, lay.pred_at]
    logits = model.llm.lm_head(h).float()
    targets = ids[lay.target_at]
    loss = F.cross_entropy(logits, targets)
    if not return_logprobs:
        return loss
    return loss, logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), lay
