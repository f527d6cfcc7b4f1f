"""A plain-transformers reference of the whole model: embedder + frozen Llama.

Given a long input, the oldest tokens become compact embeddings (one per k tokens
of each chunk), the most recent tokens (at least `raw_tail`, as many as the window
holds) stay as token embeddings, and
the frozen Llama reads `[compact..., raw...]` with consecutive position ids. This
is the behaviour every other path (trainer, vLLM plug-in, Ray workers) must match.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .config import CompressionPlan, ContextError, ExtEmbConfig, plan_compression
from .embedder import ExtensibleEmbedder


class ExtEmbReference(nn.Module):
    """The whole model in plain transformers (its vLLM counterpart is vllm_plugin.model.ExtEmbLlamaForCausalLM)."""

    def __init__(self, llm: LlamaForCausalLM, embedder: ExtensibleEmbedder, ext: ExtEmbConfig):
        super().__init__()
        self.llm = llm.requires_grad_(False).eval()  # the LLM stays frozen, always
        self.embedder = embedder
        self.ext = ext

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def max_positions(self) -> int:
        return int(self.llm.config.max_position_embeddings)

    def plan(self, n_tokens: int, k: int | None = None, raw_tail: int | None = None,
             window: int | None = None, reserve: int = 0, fill_window: bool | None = None,
             append_stable: bool | None = None) -> CompressionPlan:
        """The layout of `n_tokens` (`plan_compression`). `reserve` defaults to 0 here, unlike a
        server's: scoring generates nothing, and `generate` reserves its own max_new_tokens."""
        window = self.ext.window if window is None else window
        if window > self.max_positions:
            raise ContextError(f"window {window} exceeds the base model's {self.max_positions} positions")
        return plan_compression(n_tokens, self.ext, k=k, raw_tail=raw_tail, window=window, reserve=reserve,
                                fill_window=fill_window, append_stable=append_stable)

    def compact_embeddings(self, ids: torch.Tensor, k: int, cache: dict | None = None) -> torch.Tensor:
        """(slots, hidden) compact embeddings of 1-D `ids` (the part to compress)."""
        return self.embedder.compress(ids, k, self.ext.chunk_size, self.embed_tokens, cache=cache)

    def build_inputs(self, ids: torch.Tensor, plan: CompressionPlan, compact: torch.Tensor | None = None,
                     cache: dict | None = None) -> torch.Tensor:
        """LLM input embeddings (1, plan.llm_length, hidden) for 1-D `ids`.

        `compact` replaces the embedder's output (precomputed, or another
        document's for the mismatched-context control); it must have plan.n_slots rows.
        """
        ids = _as_ids(ids, self.device)
        if ids.numel() != plan.n_tokens:
            raise ValueError(f"plan is for {plan.n_tokens} tokens, got {ids.numel()}")
        raw = self.embed_tokens(ids[plan.n_compressed:])
        if plan.k is None:
            return raw.unsqueeze(0)
        if compact is None:
            compact = self.compact_embeddings(ids[: plan.n_compressed], plan.k, cache=cache)
        if compact.shape != (plan.n_slots, raw.shape[-1]):
            raise ContextError(f"compact embeddings have shape {tuple(compact.shape)}, "
                               f"expected ({plan.n_slots}, {raw.shape[-1]})")
        return torch.cat([compact.to(raw.dtype), raw], dim=0).unsqueeze(0)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Logits (1, L, vocab) of the frozen LLM over already-built input embeddings."""
        return self.llm(inputs_embeds=inputs_embeds, use_cache=False).logits

    @torch.no_grad()
    def score(self, ids: torch.Tensor, n_targets: int, k: int | None = None, raw_tail: int | None = None,
              window: int | None = None, cache: dict | None = None, compact_ids: torch.Tensor | None = None,
              fill_window: bool | None = None, append_stable: bool | None = None) -> tuple[torch.Tensor, CompressionPlan]:
        """Log-probabilities (n_targets,) of the last `n_targets` tokens of `ids` given all before them.

        The targets must lie in the raw tail; the first of them is predicted from
        the last compact slot when everything before them is compressed.
        `compact_ids` compresses other tokens (same count) in place of the real
        old context: the mismatched-context control.
        """
        ids = _as_ids(ids, self.device)
        plan = self.plan(ids.numel(), k=k, raw_tail=raw_tail, window=window, fill_window=fill_window,
                         append_stable=append_stable)
        if not 0 < n_targets < plan.llm_length or n_targets > plan.n_raw:
            raise ContextError(f"cannot score {n_targets} targets: the LLM input has {plan.llm_length} "
                               f"positions of which {plan.n_raw} raw")
        compact = None
        if compact_ids is not None and plan.k is not None:
            compact_ids = _as_ids(compact_ids, self.device)[: plan.n_compressed]
            if compact_ids.numel() != plan.n_compressed:
                raise ValueError(f"compact_ids needs at least {plan.n_compressed} tokens")
            compact = self.compact_embeddings(compact_ids, plan.k, cache=cache)
        logits = self.forward(self.build_inputs(ids, plan, compact=compact, cache=cache))[0]
        pred = logits[-n_targets - 1 : -1].float().log_softmax(-1)
        return pred.gather(-1, ids[-n_targets:, None]).squeeze(-1), plan

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 64, k: int | None = None,
                 raw_tail: int | None = None, window: int | None = None, fill_window: bool | None = None,
                 append_stable: bool | None = None, **gen_kwargs) -> tuple[torch.Tensor, CompressionPlan]:
        """New token ids (greedy unless sampling options are given) after a long input."""
        ids = _as_ids(ids, self.device)
        plan = self.plan(ids.numel(), k=k, raw_tail=raw_tail, window=window, reserve=max_new_tokens,
                         fill_window=fill_window, append_stable=append_stable)
        embeds = self.build_inputs(ids, plan)
        gen_kwargs.setdefault("do_sample", False)
        eos = self.llm.generation_config.eos_token_id
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=eos if isinstance(eos, int) else (eos or [0])[0],
            **gen_kwargs,
        )
        return out[0], plan


def _as_ids(ids, device) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ContextError("empty input: there are no tokens to read")
    return ids
