"""Over-long plain prompts: compress them instead of rejecting them.

vLLM hands a prompt without multimodal data straight to the engine, whose length
limit is the window (the KV cache is sized for it). For ExtEmb models this
renderer (a) lets tokenisation accept prompts up to the extended context length
and (b) turns a prompt longer than the window into a "context" request — its
oldest tokens compressed, the recent raw tail kept — before the engine's length
check. Everything else goes through vLLM's HfRenderer unchanged. Each prompt's layout is
handed on as it is planned: to the response's usage (`accounting.py`, for the middleware) and,
when it compresses, to the plug-in's series (`metrics.py`). vLLM selects it by
tokenizer mode ("extemb", which the plug-in makes the default of ExtEmb models, see
__init__.py); other models keep their own renderer.
"""

from __future__ import annotations

import dataclasses

from vllm.renderers.hf import HfRenderer

from ..model import ExtEmbConfig, plan_request
from ..model.config import layout_options, max_context_tokens
from ..usage import prompt_layout
from . import ARCHITECTURE, TOKENIZER_MODE, accounting, metrics
from .processor import MODALITY


class ExtEmbRenderer(HfRenderer):
    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        hf = self.model_config.hf_config
        if ARCHITECTURE not in (getattr(hf, "architectures", None) or []):
            raise ValueError(f"tokenizer mode {TOKENIZER_MODE!r} is for ExtEmb checkpoints ({ARCHITECTURE}); "
                             f"{self.model_config.model} is not one: leave --tokenizer-mode at auto")
        self.ext = ExtEmbConfig.from_dict(hf.extemb)

    def _extended(self, params):
        if params.max_total_tokens is None:
            return params
        return dataclasses.replace(params, max_total_tokens=max_context_tokens(self.ext))

    def _refuse_blank(self, prompt):
        # whitespace tokenises to a few tokens and would be "answered"; there is nothing to read
        text = prompt.get("prompt")
        if "prompt_token_ids" not in prompt and isinstance(text, str) and not text.strip():
            raise ValueError("the prompt is empty or whitespace only")

    def _tokenize_singleton_prompt(self, prompt, params):
        self._refuse_blank(prompt)
        return super()._tokenize_singleton_prompt(prompt, self._extended(params))

    async def _tokenize_singleton_prompt_async(self, prompt, params):
        self._refuse_blank(prompt)
        return await super()._tokenize_singleton_prompt_async(prompt, self._extended(params))

    def _as_context_request(self, prompt):
        if prompt.get("multi_modal_data"):
            return prompt
        ids = prompt["prompt_token_ids"]
        # the request's own options, checked here: a list or a string is the client's 400, not a 500
        opts = layout_options(prompt.get("mm_processor_kwargs"), self.ext)
        # planned as the processor will plan it (a given k may compress even what fits)
        plan = plan_request([], ids, opts, self.ext, None).plan if len(ids) >= 2 else None
        accounting.add(prompt_layout(len(ids), plan))  # the response's usage (middleware)
        if plan is None or plan.k is None:
            return prompt
        metrics.record_layout(plan)
        # everything but the last token is "context"; the processor plans over both exactly
        # as the reference model plans over the whole prompt
        return {**prompt, "prompt_token_ids": ids[-1:],
                "multi_modal_data": {MODALITY: {"token_ids": list(ids[:-1])}}}

    def _process_tokens(self, prompt, *, skip_mm_cache=False):
        return super()._process_tokens(self._as_context_request(prompt), skip_mm_cache=skip_mm_cache)

    async def _process_tokens_async(self, prompt, *, skip_mm_cache=False):
        return await super()._process_tokens_async(self._as_context_request(prompt), skip_mm_cache=skip_mm_cache)
