"""ExtEmbLlamaForCausalLM for vLLM: vLLM's own Llama as the LLM, our embedder as the
pre-fill encoder of the "context" modality.

vLLM schedules the compressed chunks of every request in a step as encoder items;
`embed_multimodal` encodes them in one batch on the engine's device (a chunk it
encoded before comes from its content-keyed cache instead), keeps every k-th row,
and vLLM writes those rows into the prompt's placeholder slots of the paged KV cache. Paged attention, CUDA graphs, tensor parallelism and quantisation
of the LLM are vLLM's, untouched.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..model import ExtEmbConfig, ExtensibleEmbedder, compact_rows
from ..model.chunk_cache import ChunkCache
from ..model.config import EMBEDDER_PREFIX
from ..model.embedder import chunk_key
from . import metrics
from .processor import (
    MODALITY,
    PLACEHOLDER_TOKEN_ID,
    ExtEmbDummyInputsBuilder,
    ExtEmbMultiModalProcessor,
    ExtEmbProcessingInfo,
)

EMBEDDER_BATCH_TOKENS = 8192
# Full-resolution outputs of chunks this engine encoded, by content (any k is cut from them):
# a chunk compressed again (at another k after a conversation grows into the next band, or
# after vLLM evicted its cached blocks) is not encoded again. fp32 SmolLM2: ~1.2 MB a chunk.
CHUNK_CACHE_BYTES = int(os.environ.get("EXTEMB_CHUNK_CACHE_MB", "256")) << 20


@MULTIMODAL_REGISTRY.register_processor(
    ExtEmbMultiModalProcessor, info=ExtEmbProcessingInfo, dummy_inputs=ExtEmbDummyInputsBuilder
)
class ExtEmbLlamaForCausalLM(nn.Module, SupportsMultiModal):
    # checkpoint names -> this module's: the base Llama's tensors go to vLLM's Llama (whose own
    # loader fuses q/k/v and gate/up), the embedder's to the embedder's decoder layers. vLLM's
    # loader then checks that every parameter was loaded.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        EMBEDDER_PREFIX: "embedder.body.", "model.": "language_model.model.", "lm_head.": "language_model.lm_head."})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == MODALITY:
            return None
        raise ValueError(f"only the {MODALITY!r} modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.ext = ExtEmbConfig.from_dict(config.extemb)
        self.configure_mm_token_handling(vocab_size=config.vocab_size, mm_token_ids=[PLACEHOLDER_TOKEN_ID])
        # Precomputed-only engines (LLM replicas fed by separate embedder workers) hold no
        # embedder at all: set with hf_overrides={"extemb_precomputed_only": True}.
        self.precomputed_only = bool(getattr(config, "extemb_precomputed_only", False))
        self.embedder = None
        self.chunk_cache = ChunkCache(CHUNK_CACHE_BYTES)
        if not self.precomputed_only:
            metrics.warn_if_out_of_reach()
            with self._mark_tower_model(vllm_config, MODALITY):
                hf_cfg = copy.deepcopy(config)
                hf_cfg._attn_implementation = "sdpa"
                self.embedder = ExtensibleEmbedder(hf_cfg, self.ext.embedder_layers)
        with self._mark_language_model(vllm_config):
            self.language_model = LlamaForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        dtype = self.language_model.model.embed_tokens.weight.dtype
        if (embeds := kwargs.get("context_embeds")) is not None:  # precomputed, validated by the processor
            return [e.to(dtype) for e in embeds]
        ids, ks = kwargs.get("context_ids"), kwargs.get("context_k")
        if ids is None:
            return []
        if self.embedder is None:  # the processor refuses such requests first; this is the backstop
            raise ValueError("this engine serves precomputed compact embeddings only")
        chunks = list(ids) if isinstance(ids, torch.Tensor) else ids  # stacked when lengths agree
        ks = ks.tolist() if isinstance(ks, torch.Tensor) else [int(k) for k in ks]
        if not chunks:
            return []
        keys = [chunk_key(c) for c in chunks]  # weights never change inside an engine: content is enough
        hidden = [self.chunk_cache.get(key) for key in keys]
        todo = [i for i, h in enumerate(hidden) if h is None]
        # Groups of at most EMBEDDER_BATCH_TOKENS: a step may schedule every chunk of a 64K
        # document; bounded groups keep the embedder's activation memory flat in C, and past a
        # few thousand tokens a bigger batch is no faster (see `extemb bench embedder`).
        per_group = max(1, EMBEDDER_BATCH_TOKENS // max(int(chunks[i].numel()) for i in todo)) if todo else 1
        for g in range(0, len(todo), per_group):
            group = todo[g : g + per_group]
            with metrics.embedder_forward():
                encoded = self.embedder.encode_chunks([chunks[i] for i in group], self.language_model.model.embed_tokens)
            for i, h in zip(group, encoded):
                hidden[i] = h.clone()  # its own storage: a view would keep the whole batch alive
                self.chunk_cache.put(keys[i], hidden[i])
        metrics.record_chunks(encoded=len(todo), cached=len(chunks) - len(todo), cache_bytes=self.chunk_cache.bytes)
        return [compact_rows([h], k)[0] for h, k in zip(hidden, ks)]

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor):
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # a precomputed-only engine holds no embedder: the checkpoint's embedder tensors are skipped
        skip = [EMBEDDER_PREFIX] if self.embedder is None else None
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=skip)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
