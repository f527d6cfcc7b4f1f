"""Pre-fill planning inside vLLM: the "context" modality.

A request carries its long context as `multi_modal_data={"context": ...}`: text,
`{"text": ...}`, `{"token_ids": [...]}`, or precomputed compact embeddings
`{"embeds": tensor (n, hidden)}` (made elsewhere, e.g. by the Ray embedder
workers; the prompt then holds the raw tail), optionally with `"k"`, `"raw_tail"`,
`"reserve"` (positions kept free for generation; default the checkpoint's),
`"fill_window"` (keep as many recent tokens raw as fit) and `"append_stable"` (the layout
rule under which a growing chat keeps its prefix; both default to the checkpoint's), also
accepted as `mm_processor_kwargs`. The processor lays out
context + prompt exactly as the reference model does (`model.plan_request`):
each compressed chunk becomes one multimodal item whose placeholder slots the
embedder fills, the raw tail stays as tokens. One item per chunk, hashed on its
content and k by vLLM, lets its encoder cache and prefix caching reuse chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np
import torch
from transformers import BatchFeature
from vllm.inputs import mm_input
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        ProcessorInputs, PromptIndexTargets, PromptInsertion)

from ..model import ContextError, ExtEmbConfig, plan_request
from ..model.config import LAYOUT_OPTIONS, check_request_options, compact_slots

MODALITY = "context"
PLACEHOLDER_TOKEN_ID = 0  # any in-vocabulary id: the embedder's rows replace its embedding
SOURCE_KEYS = ("text", "token_ids", "embeds")
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ContextItems(ProcessorBatchItems):
    def __init__(self, data):
        super().__init__(data, MODALITY)


class ContextDataParser(MultiModalDataParser):
    def _parse_context(self, data):
        if data is None:
            return None
        items = data if isinstance(data, list) and data and not isinstance(data[0], int) else [data]
        for item in items:
            _validate_context_item(item)
        return ContextItems(items)

    def _get_subparsers(self):
        return {**super()._get_subparsers(), MODALITY: self._parse_context}


def _validate_context_item(item):
    if isinstance(item, str):
        return
    if isinstance(item, dict):
        unknown = set(item) - {*SOURCE_KEYS, *LAYOUT_OPTIONS}
        if unknown:
            raise ContextError(f"unknown keys in a context item: {sorted(unknown)}")
        if sum(key in item for key in SOURCE_KEYS) != 1:
            raise ContextError(f"a context item needs exactly one of {SOURCE_KEYS}")
        return
    raise ContextError(f"a context is a string or a dict with 'text' or 'token_ids', got {type(item).__name__}")


class ExtEmbProcessingInfo(BaseProcessingInfo):
    @cached_property
    def ext(self) -> ExtEmbConfig:  # parsed once: the checkpoint's config does not change
        return ExtEmbConfig.from_dict(self.get_hf_config().extemb)

    @property
    def precomputed_only(self) -> bool:
        return bool(getattr(self.get_hf_config(), "extemb_precomputed_only", False))

    def get_data_parser(self):
        return ContextDataParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self):
        return {MODALITY: 1}

    def get_supported_mm_processor_kwargs(self):
        return {}

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts):
        # In-engine, one item = one chunk: ceil(chunk / smallest k) slots. Precomputed, one item
        # holds every compact slot of the request: up to the window less one raw token. vLLM
        # sizes its encoder cache from this; too small a figure refuses long contexts.
        most = self.ext.window - 1 if self.precomputed_only else -(-self.ext.chunk_size // self.ext.k_ladder[0])
        return {MODALITY: min(most, self.ext.window, seq_len)}


class ExtEmbDummyInputsBuilder(BaseDummyInputsBuilder[ExtEmbProcessingInfo]):
    def get_dummy_text(self, mm_counts):
        return ""

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        if not mm_counts.get(MODALITY):
            return {}
        # the largest item: one full chunk at the smallest k served (for memory profiling)
        ext = self.info.ext
        if self.info.precomputed_only:  # the largest item such an engine takes: precomputed rows
            rows = self.info.get_mm_max_tokens_per_item(seq_len, mm_counts)[MODALITY]
            return {MODALITY: {"embeds": torch.zeros(rows, self.info.get_hf_config().hidden_size), "reserve": 0}}
        k = ext.k_ladder[0]
        n = min(ext.chunk_size, (ext.window - 1) * k, (seq_len - 1) * k)
        # fill_window off: a filled window would keep this short input raw, leaving nothing to profile
        return {MODALITY: {"token_ids": [PLACEHOLDER_TOKEN_ID] * (n + 1), "k": k, "raw_tail": 1, "reserve": 0,
                           "fill_window": False}}


def request_options(item, request_kwargs: Mapping[str, object]) -> dict:
    """The layout options of a request (LAYOUT_OPTIONS; the context item's own override the request's)."""
    opts = {k: request_kwargs[k] for k in LAYOUT_OPTIONS if request_kwargs.get(k) is not None}
    if isinstance(item, dict):
        opts.update({k: item[k] for k in LAYOUT_OPTIONS if item.get(k) is not None})
    return opts


def validate_compact_embeds(embeds, hidden_size: int) -> torch.Tensor:
    """Precomputed compact embeddings must be a finite (n >= 1, hidden_size) float tensor."""
    if not isinstance(embeds, torch.Tensor):
        raise ContextError(f"context embeds must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.dtype not in EMBED_DTYPES:
        raise ContextError(f"context embeds must be float32, bfloat16 or float16, got {embeds.dtype}")
    if embeds.dim() != 2 or embeds.shape[0] < 1 or embeds.shape[1] != hidden_size:
        raise ContextError(f"context embeds must have shape (n >= 1, {hidden_size}), got {tuple(embeds.shape)}")
    if not torch.isfinite(embeds).all():
        raise ContextError("context embeds contain NaN or infinite values")
    return embeds.detach().cpu().contiguous()


# One target object for every item: vLLM groups insertions by target, and items that share one are
# inserted in item order (the compact slots in chunk order, then the raw part of the prompt).
PROMPT_START = PromptIndexTargets.start()


class ExtEmbMultiModalProcessor(BaseMultiModalProcessor[ExtEmbProcessingInfo]):
    """vLLM's multimodal processing, with one step before it.

    vLLM maps each multimodal item of a request to placeholders it inserts in the prompt. What
    its prompt updates cannot express is ExtEmb's layout: one context becomes as many items as
    the plan compresses chunks (a number that depends on the prompt's length too), and the part
    of the context kept raw joins the prompt. `apply` plans that (`model.plan_request`, as the
    reference model does) and hands the chunks, as items, to vLLM's own `apply`: its hashing
    (content and k: the encoder cache and prefix caching reuse chunks across requests), its
    processing cache, the insertion of each item's slots and its placeholder checks.
    """

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {
            "context_embeds": MultiModalFieldConfig.batched(MODALITY),
            "context_ids": MultiModalFieldConfig.batched(MODALITY),
            # k picks rows on the host; keeping it there avoids a device sync per step
            "context_k": MultiModalFieldConfig.batched(MODALITY, keep_on_cpu=True),
        }

    def _call_hf_processor(self, hf_data, hf_kwargs):
        # There is no HF processor: an item is already what the model reads.
        items = hf_data[f"{MODALITY}s"]
        if "embeds" in items[0]:
            return BatchFeature({"context_embeds": [item["embeds"] for item in items]})
        return BatchFeature({
            "context_ids": [torch.from_numpy(item["token_ids"]) for item in items],
            "context_k": torch.tensor([item["k"] for item in items], dtype=torch.long),
        })

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        def slots(i: int) -> list[int]:
            item = mm_items[MODALITY].get(i)
            if "embeds" in item:
                n = len(item["embeds"])
            else:
                n = compact_slots(len(item["token_ids"]), item["k"], self.info.ext.chunk_size)
            return [PLACEHOLDER_TOKEN_ID] * n

        return [PromptInsertion(MODALITY, target=PROMPT_START, insertion=slots)]

    def _context_ids(self, item) -> list[int]:
        if isinstance(item, dict) and "token_ids" in item:
            ids = item["token_ids"]
            arr = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):  # bools and floats refused too
                raise ContextError("context token_ids must be a flat list of integers")
            vocab = self.info.get_hf_config().vocab_size
            if arr.size and not (0 <= arr.min() and arr.max() < vocab):
                raise ContextError(f"context token_ids must lie in [0, {vocab})")
            return arr.tolist()
        text = item["text"] if isinstance(item, dict) else item
        return self.info.get_tokenizer().encode(text, add_special_tokens=False)

    def _precomputed_item(self, item, prompt: list[int]) -> dict:
        """Precomputed compact embeddings: the slots come first, the prompt is the raw part."""
        ext = self.info.ext
        embeds = validate_compact_embeds(item["embeds"], self.info.get_hf_config().hidden_size)
        n = embeds.shape[0]
        reserve = check_request_options(request_options(item, {}), ext).get("reserve", ext.reserve)
        if n + len(prompt) + reserve > ext.window:
            raise ContextError(f"{n} compact embeddings + {len(prompt)} prompt tokens + {reserve} reserved "
                               f"= {n + len(prompt) + reserve} > window {ext.window}")
        return {"embeds": embeds}

    def apply(self, inputs, timing_ctx):
        ext = self.info.ext
        items = inputs.mm_data_items.get(MODALITY)
        item = items.get(0) if items is not None and len(items) else None
        if isinstance(item, dict) and "embeds" in item:
            prompt = list(inputs.prompt)
            return self._apply_items([self._precomputed_item(item, prompt)], prompt, inputs, timing_ctx)
        ctx_ids = self._context_ids(item) if item is not None else []
        if item is not None and not ctx_ids:
            raise ContextError("empty context: there are no tokens to read")
        layout = plan_request(ctx_ids, inputs.prompt, request_options(item, inputs.hf_processor_mm_kwargs), ext,
                              self.info.get_tokenizer().bos_token_id)
        plan = layout.plan
        if plan.k is not None and self.info.precomputed_only:
            raise ContextError(f"this engine takes precomputed compact embeddings only (extemb_precomputed_only) and "
                               f"the input needs compressing ({plan.n_tokens} tokens > window {ext.window}): send "
                               f"the context as {{'embeds': tensor}} made by the embedder workers")
        if plan.k is None:  # everything fits raw: no item, nothing for the embedder
            return mm_input(prompt_token_ids=layout.ids, mm_kwargs=MultiModalKwargsItems({}), mm_hashes={},
                            mm_placeholders={})
        chunks = [{"token_ids": np.asarray(c, dtype=np.int64), "k": plan.k} for c in layout.chunks]
        return self._apply_items(chunks, layout.raw_ids, inputs, timing_ctx)

    def _apply_items(self, items: list[dict], prompt: list[int], inputs, timing_ctx):
        # The layout options are spent on the plan: left out of the items' hashes, so one chunk
        # hashes the same under every request's options (its k is in the item).
        planned = ProcessorInputs(prompt=prompt, mm_data_items=MultiModalDataItems({MODALITY: ContextItems(items)}),
                                  cache=inputs.cache)
        return super().apply(planned, timing_ctx)
