"""The extensible embedder: the first L decoder layers of the base Llama, own weights.

It reads each chunk of old context independently (positions 0..c-1 inside the
chunk, causal attention) and keeps the output at the last position of every
k-block. That is the paper's strided down-sampling; it is the same for any k, so
one trained embedder serves every k.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from .config import check_k, chunk_bounds


def keep_positions(length: int, k: int, device=None) -> torch.Tensor:
    """Positions of a chunk that survive down-sampling by k.

    The last position of every k-block: k-1, 2k-1, ... A chunk whose length is not
    a multiple of k ends in a partial block; its last position (length-1) is kept
    too, so a chunk always yields ceil(length / k) compact embeddings and the
    chunk's final token is never dropped.
    """
    check_k(k)
    n_blocks = -(-length // k)
    return (torch.arange(1, n_blocks + 1, device=device) * k).clamp(max=length) - 1


def compact_rows(hidden: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Each chunk's full-resolution embedder output -> its compact embeddings (every k-th row).
    The full-resolution output serves every k, which is why the stores keep it."""
    return [h[keep_positions(h.shape[0], k, h.device)] for h in hidden]


class ExtensibleEmbedder(nn.Module):
    """Token ids of chunks -> full-resolution hidden states -> compact embeddings.

    The token embedding table is the frozen LLM's (passed in as `embed_tokens`):
    the decoder layers are what the method trains, and sharing the table keeps the
    shipped embedder small (8 layers of SmolLM2 in bf16: ~57 MB instead of ~113 MB).
    """

    def __init__(self, base_config: LlamaConfig, num_layers: int):
        super().__init__()
        if num_layers > base_config.num_hidden_layers:
            raise ValueError(
                f"embedder_layers={num_layers} exceeds the base model's {base_config.num_hidden_layers} layers"
            )
        cfg = copy.deepcopy(base_config)
        cfg.num_hidden_layers = num_layers
        cfg.use_cache = False
        self.config = cfg
        self.body = LlamaModel(cfg)
        # Ids are embedded by the shared table outside; the output of layer L is the
        # compact embedding itself (the paper: no projection, no extra norm).
        self.body.embed_tokens = None
        self.body.norm = nn.Identity()

    @classmethod
    def from_base(cls, llm_model: LlamaModel, num_layers: int) -> "ExtensibleEmbedder":
        """Initialise from the first `num_layers` layers of a base Llama (a copy, not a view)."""
        emb = cls(llm_model.config, num_layers)
        for mine, theirs in zip(emb.body.layers, llm_model.layers):
            mine.load_state_dict(theirs.state_dict())
        p = next(llm_model.parameters())
        return emb.to(device=p.device, dtype=p.dtype)

    def encode_chunks(self, chunks: list[torch.Tensor], embed_tokens: nn.Module) -> list[torch.Tensor]:
        """Full-resolution outputs (len_i, hidden) of each 1-D chunk of ids, in one batch.

        Chunks are right-padded to the longest: with causal attention a real
        position never attends to the padding after it, so padding changes nothing.
        """
        if not chunks:
            return []
        lengths = [int(c.numel()) for c in chunks]
        if min(lengths) == 0:
            raise ValueError("cannot encode an empty chunk")
        longest = max(lengths)
        ids = torch.zeros(len(chunks), longest, dtype=torch.long, device=chunks[0].device)
        for i, c in enumerate(chunks):
            ids[i, : lengths[i]] = c
        positions = torch.arange(longest, device=ids.device).expand(len(chunks), -1)
        hidden = self.body(inputs_embeds=embed_tokens(ids), position_ids=positions, use_cache=False).last_hidden_state
        return [hidden[i, :n] for i, n in enumerate(lengths)]

    def compress(
        self,
        ids: torch.Tensor,
        k: int,
        chunk_size: int,
        embed_tokens: nn.Module,
        cache: dict | None = None,
        max_batch_chunks: int = 8,
    ) -> torch.Tensor:
        """1-D ids -> (slots, hidden) compact embeddings, chunks aligned to the start of `ids`.

        `cache` maps a chunk's content key to its full-resolution output (the
        paper's offline mode): a chunk seen before is not re-encoded, for any k.
        """
        check_k(k)
        chunks = [ids[s:e] for s, e in chunk_bounds(int(ids.numel()), chunk_size)]
        keys = [chunk_key(c) for c in chunks] if cache is not None else [None] * len(chunks)
        hidden: dict[int, torch.Tensor] = {}
        todo = [i for i, key in enumerate(keys) if cache is None or key not in cache]
        for b in range(0, len(todo), max_batch_chunks):
            group = todo[b : b + max_batch_chunks]
            for i, h in zip(group, self.encode_chunks([chunks[i] for i in group], embed_tokens)):
                hidden[i] = h
                if cache is not None:
                    cache[keys[i]] = h
        out = [hidden[i] if i in hidden else cache[keys[i]] for i in range(len(chunks))]
        return torch.cat(compact_rows(out, k), dim=0)


def chunk_key(ids: torch.Tensor, weights: str = "") -> str:
    """Content key of a chunk of token ids (stable across processes); `weights` (a
    `weights_digest`) ties the key to the weights that encode it, for caches that outlive them."""
    h = hashlib.blake2b(weights.encode(), digest_size=16)
    h.update(ids.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()


def weights_digest(*modules: torch.nn.Module) -> str:
    """Digest of modules' tensors (names, dtypes, shapes, bytes): new weights or another dtype
    give another digest, so a store keyed with it never serves outputs of other weights."""
    h = hashlib.blake2b(digest_size=16)
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # hashed in place, any dtype
    return h.hexdigest()
