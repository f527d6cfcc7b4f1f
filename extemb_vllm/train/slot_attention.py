"""Attention of the raw rows of the two-stream pass, without computing what the mask hides.

Row j of stream 2b (chunk i = j + 1) reads the first i*m compact slots and its own raw
tokens causally. One SDPA call over [all slots | own tokens] with a boolean mask
computes every pair, masked or not, and on CPU its backward was a quarter of a
training step. Here the two parts are separate flash-attention calls that only touch
what is read: the raw part with `is_causal` (the kernel skips the blocks above the
diagonal) and, per row, the slots it reads, unmasked. They are merged with their
log-sum-exps; the backward calls each part's flash backward with the merged output
and log-sum-exp, which gives exactly the gradient of the joint softmax (the same
identity that ring attention uses).

It is an attention function for transformers' Llama (`AttentionInterface`), used only
inside `slot_attention(llm, slots)`; every other call falls through to SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "extemb_two_stream"
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass
class CompactSlots:
    """The compact slots' keys and values of every layer, (1, kv_heads, n_c, head_dim) each, post-RoPE,
    and the slots each row reads: row j reads the first (j + 1) * per_chunk."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    per_chunk: int


class _SlotAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_raw, v_raw, k_slots, v_slots, per_chunk: int, scale: float):
        rows = q.shape[0]
        out_raw, lse_raw = _flash(q, k_raw, v_raw, 0.0, True, scale=scale)
        out_slots, lse_slots = torch.empty_like(out_raw), torch.empty_like(lse_raw)
        for j in range(rows):
            n = (j + 1) * per_chunk
            out_slots[j : j + 1], lse_slots[j : j + 1] = _flash(q[j : j + 1], k_slots[:, :, :n], v_slots[:, :, :n],
                                                                 0.0, False, scale=scale)
        lse = torch.logaddexp(lse_raw, lse_slots)
        out = (out_raw * (lse_raw - lse).exp().unsqueeze(-1) + out_slots * (lse_slots - lse).exp().unsqueeze(-1))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k_raw, v_raw, k_slots, v_slots, out, lse)
        ctx.per_chunk, ctx.scale = per_chunk, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_raw, v_raw, k_slots, v_slots, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk_raw, dv_raw = _flash_backward(grad_out, q, k_raw, v_raw, out, lse, 0.0, True, scale=ctx.scale)
        dk_slots, dv_slots = torch.zeros_like(k_slots), torch.zeros_like(v_slots)
        for j in range(q.shape[0]):
            n = (j + 1) * ctx.per_chunk
            dq_j, dk_j, dv_j = _flash_backward(grad_out[j : j + 1], q[j : j + 1], k_slots[:, :, :n],
                                               v_slots[:, :, :n], out[j : j + 1], lse[j : j + 1], 0.0, False,
                                               scale=ctx.scale)
            dq[j : j + 1] += dq_j
            dk_slots[:, :, :n] += dk_j
            dv_slots[:, :, :n] += dv_j
        return dq, dk_raw, dv_raw, dk_slots, dv_slots, None, None


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, compact_slots=None, **kwargs):
    if compact_slots is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # grouped-query attention: the CPU flash kernels take fewer key/value heads as they are
    k_slots = compact_slots.keys[module.layer_idx]
    v_slots = compact_slots.values[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _SlotAttention.apply(query, key, value, k_slots, v_slots, compact_slots.per_chunk, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def slot_attention(llm):
    """Inside: the LLM's attention is this module's (pass `compact_slots=` to the model call to use it)."""
    config = llm.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def available(device: torch.device) -> bool:
    """The flash kernels used here are the CPU ones."""
    return device.type == "cpu"
