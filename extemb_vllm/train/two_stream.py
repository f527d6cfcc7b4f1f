"""The paper's two-stream auto-regression, all chunks of a sample in one batched pass.

Stream 1 encodes every chunk of the sample with the embedder. Stream 2 predicts
each chunk's tokens from the compact embeddings of all earlier chunks plus the
chunk's own raw tokens. Written as one joint sequence with a block mask:

    sequence   [C_0 C_1 ... C_{n-2} | R_1 ... R_{n-1}]     C_j: compact slots of chunk j
    positions   0 .. (n-1)m-1       | R_i: i*m .. i*m + c-1     R_i: raw tokens of chunk i
    mask        C: causal over C    | R_i: C_0..C_{i-1} + causal inside R_i

so chunk i reads exactly what the reference model reads at inference,
`[compact(chunks < i), raw chunk i]` with consecutive positions. The first token of
chunk i is predicted at the last slot of C_{i-1}. Chunk 0 is only encoded: its
tokens see no slots, so their loss sends no gradient to the embedder, and the pass
neither runs its raw row nor scores it (the loss covers the tokens of chunks 1..).

The LLM runs that joint sequence in two calls that compute the same thing: the
compact slots once (causal; their keys/values are what every chunk reads), then
the raw chunks as one batch of n-1 rows on top of those keys/values, row i masked
to C_0..C_{i-1} and its own causal prefix. With a dense (T, T) mask, SDPA (CPU flash
or the math path) computes attention over every pair of the joint sequence, masked
or not; the batched form only computes the (c, |C| + c) blocks that can be non-zero.

The loss never materialises the (tokens, vocabulary) logits: `linear_cross_entropy`
works through them in row blocks and computes the gradient for the hidden states in
the same pass (the LM head is frozen). With a teacher (`distill`), the target of
each token is a mix of the true next token and the frozen LLM's own top-k
prediction when it reads the whole sample raw: the loss is
`(1 - distill) * CE + distill * KL(teacher || student)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from transformers import DynamicCache

from ..model.embedder import keep_positions
from .slot_attention import CompactSlots, slot_attention
from .slot_attention import available as slot_attention_available

LOSS_BLOCK_ROWS = 1024  # rows of logits in flight: 1024 x 49152 fp32 = 200 MB for SmolLM2


@dataclass
class TwoStreamLayout:
    n_chunks: int
    chunk_len: int
    k: int
    slots: int  # compact slots per chunk (m)
    row_len: int  # raw tokens per row (r <= c): the first r tokens of each predicted chunk
    compact_positions: torch.Tensor  # (n_c,) positions of C_0..C_{n-2}, n_c = (n-1)*m
    raw_positions: torch.Tensor  # (n-1, r) positions of R_1..R_{n-1}, i*m + 0..r-1
    raw_mask: torch.Tensor  # (n-1, r, n_c + r) bool: row of chunk i, query t may read [compact slot | own raw token]
    target_at: torch.Tensor  # (N,) index in the sample of each predicted token, in logits order


def two_stream_layout(n_chunks: int, chunk_len: int, k: int, device=None, row_len: int | None = None) -> TwoStreamLayout:
    n, c = n_chunks, chunk_len
    r = c if row_len is None else row_len
    if not 1 <= r <= c:
        raise ValueError(f"row_len must be in 1..{c}, got {r}")
    m = len(keep_positions(c, k))
    n_c = (n - 1) * m
    ar = lambda *a: torch.arange(*a, device=device)  # noqa: E731
    chunk = ar(1, n)  # the chunks that are predicted: every one but the first
    raw_positions = chunk[:, None] * m + ar(r)[None, :]
    sees_compact = ar(n_c)[None, None, :] < (chunk * m)[:, None, None]  # (n-1, 1, n_c): slots of chunks < i
    causal = ar(r)[None, :] <= ar(r)[:, None]  # (r, r)
    raw_mask = torch.cat([sees_compact.expand(n - 1, r, n_c), causal.expand(n - 1, r, r)], dim=-1)
    target_at = (chunk[:, None] * c + ar(r)[None, :]).reshape(-1)
    return TwoStreamLayout(n, c, k, m, r, ar(n_c), raw_positions, raw_mask, target_at)


def compact_slots(model, ids: torch.Tensor, k: int, chunk_len: int) -> torch.Tensor:
    """((n-1)*m, hidden) stream 1: the compact slots of every chunk of `ids` but the last (whose slots
    nobody reads), all chunks encoded in one batch."""
    chunks = ids.view(-1, chunk_len)
    hidden = model.embedder.encode_chunks(list(chunks[:-1]), model.embed_tokens)
    keep = keep_positions(chunk_len, k, ids.device)
    return torch.cat([h[keep] for h in hidden])


def two_stream_forward(model, ids: torch.Tensor, k: int, chunk_len: int, return_logprobs: bool = False,
                       teacher: tuple[torch.Tensor, torch.Tensor] | None = None, distill: float = 0.0,
                       token_weight: torch.Tensor | None = None, row_len: int | None = None,
                       compact: torch.Tensor | None = None,
                       hinge: tuple[torch.Tensor, torch.Tensor] | None = None, checkpoint: bool = False):
    """Mean next-token loss over chunks 1.. of one sample (1-D ids, a multiple of chunk_len long).

    `model` is an ExtEmbReference; gradients reach only its embedder (the
    LLM's parameters do not require grad). With `return_logprobs`, also returns
    the log-probability of every target token, indexed like `layout.target_at`.
    `teacher` is `teacher_topk(model, ids, chunk_len)`, mixed in with weight `distill`;
    `token_weight` (like ids) weights each token's share of the loss (recall samples, key tokens).
    `row_len` scores only the first row_len tokens of each chunk (the slots still come from
    whole chunks): the tokens that depend on the slots most, at a fraction of the LLM's cost.
    `compact` (from `compact_slots`) is read in place of the slots of `ids`' own chunks: another
    document's, for the content margin. `hinge = (floor, weight)`, like the targets, adds
    `sum(weight * max(0, floor - logprob))` (`linear_cross_entropy`).
    `checkpoint` recomputes each layer of the frozen LLM in the backward pass instead of keeping
    its activations (`_checkpointed_streams`; the same loss and gradients).
    """
    n = ids.numel() // chunk_len
    if n < 2 or ids.numel() != n * chunk_len:
        raise ValueError(f"a sample must be >= 2 chunks of {chunk_len} tokens, got {ids.numel()} tokens")
    if not 0.0 <= distill <= 1.0 or (distill > 0) != (teacher is not None):
        raise ValueError(f"distill must be in [0, 1] and comes with a teacher, got {distill} "
                         f"(teacher: {teacher is not None})")
    lay = two_stream_layout(n, chunk_len, k, device=ids.device, row_len=row_len)
    r = lay.row_len
    if teacher is not None and r < chunk_len:  # the teacher has every token of chunks 1..: keep the rows scored
        teacher = tuple(t[lay.target_at - chunk_len] for t in teacher)
    chunks = ids.view(n, chunk_len)
    raw = model.embed_tokens(chunks[1:, :r])  # (n-1, r, hidden)
    compact = (compact_slots(model, ids, k, chunk_len) if compact is None else compact).to(raw.dtype)
    if compact.shape[0] != (n - 1) * lay.slots:
        raise ValueError(f"compact has {compact.shape[0]} slots, the layout {(n - 1) * lay.slots}")
    llm = model.llm.model
    if checkpoint:
        h_c, h_r = _checkpointed_streams(model.llm, compact, raw, lay)
    else:
        # stream 2a: the compact slots, causal, once; keep their keys/values for every chunk
        cache = DynamicCache(config=llm.config)
        h_c = llm(inputs_embeds=compact[None], position_ids=lay.compact_positions[None],
                  past_key_values=cache, use_cache=True).last_hidden_state
        # stream 2b: every raw chunk but the first as one row, reading the slots of the chunks before it
        if slot_attention_available(ids.device):  # CPU: only the blocks that are read (slot_attention.py)
            slots = CompactSlots([x.keys for x in cache.layers], [x.values for x in cache.layers], lay.slots)
            with slot_attention(model.llm):
                h_r = llm(inputs_embeds=raw, position_ids=lay.raw_positions, use_cache=False,
                          compact_slots=slots).last_hidden_state
        else:  # the slots' keys/values repeated per row, read through each row's block of the mask
            cache.batch_repeat_interleave(n - 1)
            h_r = llm(inputs_embeds=raw, attention_mask=lay.raw_mask[:, None], position_ids=lay.raw_positions,
                      past_key_values=cache, use_cache=True).last_hidden_state
    m = lay.slots
    # the states that predict chunk i's tokens: the last slot of C_{i-1}, then raw tokens 0..r-2 of R_i
    h = torch.cat([h_c[0, m - 1 :: m, None], h_r[:, :-1]], dim=1)
    loss, logprobs = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.llm.lm_head.weight, ids[lay.target_at],
                                          teacher=teacher, distill=distill,
                                          row_weight=None if token_weight is None else token_weight[lay.target_at],
                                          hinge=hinge)
    if not return_logprobs:
        return loss
    return loss, logprobs, lay


def _checkpointed_streams(causal_lm, compact: torch.Tensor, raw: torch.Tensor, lay: TwoStreamLayout):
    """Streams 2a and 2b as above, layer by layer, each layer's pair recomputed in the backward pass:
    what is kept is each layer's input (slots and rows), not its attention and MLP activations.
    The slots' keys/values are made inside the layer's function, so a recomputation makes them
    again instead of appending to a cache a second time (why transformers' own checkpointing turns
    caching off, and why it cannot serve here). The gradient still reaches the slots, and through
    them the embedder: the recomputed graph starts from the slots' hidden states."""
    llm = causal_lm.model
    h_c, h_r = compact[None], raw
    rope_c = llm.rotary_emb(h_c, position_ids=lay.compact_positions[None])
    rope_r = llm.rotary_emb(h_r, position_ids=lay.raw_positions)
    kernel = slot_attention_available(raw.device)
    for layer in llm.layers[: llm.config.num_hidden_layers]:
        h_c, h_r = torch.utils.checkpoint.checkpoint(_layer_pair, causal_lm, layer, h_c, h_r, rope_c, rope_r, lay,
                                                     kernel, use_reentrant=False)
    return llm.norm(h_c), llm.norm(h_r)


def _layer_pair(causal_lm, layer, h_c, h_r, rope_c, rope_r, lay: TwoStreamLayout, kernel: bool):
    """One decoder layer on the slots (causal) and on the raw rows (reading the slots before each)."""
    cache = DynamicCache(config=causal_lm.config)  # this layer's slots' keys/values, made here each time
    h_c = layer(h_c, position_embeddings=rope_c, past_key_values=cache, use_cache=True)  # no mask: causal
    kv = cache.layers[layer.self_attn.layer_idx]
    if kernel:
        keys, values = [None] * len(cache.layers), [None] * len(cache.layers)
        keys[layer.self_attn.layer_idx], values[layer.self_attn.layer_idx] = kv.keys, kv.values
        with slot_attention(causal_lm):
            h_r = layer(h_r, position_embeddings=rope_r, compact_slots=CompactSlots(keys, values, lay.slots))
    else:
        kv.batch_repeat_interleave(h_r.shape[0])
        h_r = layer(h_r, attention_mask=lay.raw_mask[:, None], position_embeddings=rope_r, past_key_values=cache,
                    use_cache=True)
    return h_c, h_r


@torch.no_grad()
def teacher_topk(model, ids: torch.Tensor, chunk_len: int, top: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, probabilities), each (N, top): the frozen LLM's `top` most likely next tokens for every
    token of chunks 1.. when it reads the whole sample raw (full attention: what the slots stand in
    for), renormalised over those `top`. With top=64 they hold most of the mass of a 135M model's
    next-token distribution; the rest is dropped rather than spread."""
    h = model.llm.model(input_ids=ids[None]).last_hidden_state[0, chunk_len - 1 : -1]
    weight = model.llm.lm_head.weight
    idx, prob = [], []
    for s in range(0, h.shape[0], LOSS_BLOCK_ROWS):
        logits = (h[s : s + LOSS_BLOCK_ROWS].to(weight.dtype) @ weight.T).float()
        values, i = logits.topk(top, dim=-1)
        idx.append(i)
        prob.append(values.softmax(-1))
    return torch.cat(idx), torch.cat(prob)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean loss of `h @ weight.T` against (soft) targets, in row blocks, without keeping the logits.

    The weight (the LM head) is frozen, so the only gradient is d loss / d h, which is
    computed block by block in the forward pass: (softmax - target distribution) @ weight.
    This replaces a (N, vocab) fp32 logits tensor, its log-softmax and their backward
    (about 15% of a training step on CPU at 4096 tokens) with one pass over the blocks.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, teacher_idx, teacher_prob, distill: float, row_weight, floor, hinge_weight):
        n = h.shape[0]
        # each row's share of the loss: uniform, or the given weights normalised to sum to 1
        share = row_weight / row_weight.sum() if row_weight is not None else None
        hw = h.detach().to(weight.dtype)
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax in fp32 at least (bf16 logits)
        logprob = torch.empty(n, dtype=acc, device=h.device)
        kl = torch.zeros((), dtype=acc, device=h.device)
        hinge = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(hw) if ctx.needs_input_grad[0] else None
        for s in range(0, n, LOSS_BLOCK_ROWS):
            e = min(n, s + LOSS_BLOCK_ROWS)
            logits = torch.log_softmax(hw[s:e] @ weight.T, -1, dtype=acc)  # one fused pass from bf16 logits
            logprob[s:e] = logits.gather(-1, targets[s:e, None]).squeeze(-1)
            rows = torch.full((e - s,), 1.0 / n, dtype=acc, device=h.device) if share is None else share[s:e].to(acc)
            # the hinge's rows: those whose log-probability is below their floor; d(-logprob)/dh is
            # the CE gradient of the row, so a hinge only adds weight to the row's CE gradient
            active = torch.zeros_like(rows)
            if floor is not None:
                short = (floor[s:e].to(acc) - logprob[s:e]).clamp_min(0.0)
                hinge += (hinge_weight[s:e].to(acc) * short).sum()
                active = hinge_weight[s:e].to(acc) * (short > 0)
            if distill:
                p = teacher_prob[s:e]
                kl += (rows * (p * (p.clamp_min(1e-30).log() - logits.gather(-1, teacher_idx[s:e]))).sum(-1)).sum()
            if grad_h is not None:
                # rows * (softmax - (1 - distill) one-hot - distill teacher) + active * (softmax - one-hot)
                g = logits.exp_() * (rows + active)[:, None]
                g.scatter_add_(-1, targets[s:e, None], (-(rows * (1.0 - distill) + active))[:, None])
                if distill:
                    g.scatter_add_(-1, teacher_idx[s:e], -distill * rows[:, None] * teacher_prob[s:e].to(acc))
                grad_h[s:e] = g.to(weight.dtype) @ weight
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        ctx.mark_non_differentiable(logprob)
        ce = -logprob.mean() if share is None else -(logprob * share).sum()
        return (1.0 - distill) * ce + distill * kl + hinge, logprob

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.h_dtype), None, None, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
                         distill: float = 0.0,
                         row_weight: torch.Tensor | None = None,
                         hinge: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, log-probability of each target) for hidden states `h` (N, hidden) and a frozen
    output layer `weight` (vocab, hidden): `(1 - distill) * CE + distill * KL(teacher || student)`,
    each a mean over rows, weighted by `row_weight` (N,) when given; with `hinge = (floor, weight)`
    (each (N,)), plus `sum(weight * max(0, floor - logprob))`: rows must reach their floor."""
    idx, prob = teacher if teacher is not None else (None, None)
    floor, hinge_weight = hinge if hinge is not None else (None, None)
    with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen inside
        return _LinearCrossEntropy.apply(h, weight, targets, idx, prob, float(distill), row_weight, floor,
                                         hinge_weight)
