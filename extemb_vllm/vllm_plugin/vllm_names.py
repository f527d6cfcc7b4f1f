"""vLLM names the project relies on beyond the documented plug-in entry points, in one place.

vLLM's plug-in API moves between releases (the pin is in pyproject.toml). Each entry is
"module:attribute[.attribute]" -> where we use it; all were checked against CHECKED_WITH.
tests/test_vllm_names.py resolves every one in the installed vLLM and fails naming the one
that moved, so an upgrade breaks loudly in one test instead of deep inside a server.
"""

CHECKED_WITH = "0.32.0"

PRIVATE_NAMES = {
    # __init__.py: ExtEmb models' own tokenizer mode selects their renderer
    "vllm.renderers.registry:RENDERER_REGISTRY": "__init__.py registers the renderer",
    "vllm.tokenizers.registry:TokenizerRegistry": "__init__.py registers the 'extemb' tokenizer mode",
    "vllm.tokenizers.hf:CachedHfTokenizer": "__init__.py: the tokenizer of the 'extemb' mode",
    "vllm.model_executor.models.config:MODELS_CONFIG_MAP": "__init__.py: 'auto' -> 'extemb' for ExtEmb models",
    "vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_model_config": "__init__.py",
    # renderer.py: vLLM's default renderer, extended for ExtEmb models (over-long prompts)
    "vllm.renderers.hf:HfRenderer": "renderer.py subclasses it",
    "vllm.renderers.hf:HfRenderer._tokenize_singleton_prompt": "renderer.py: extended length",
    "vllm.renderers.hf:HfRenderer._tokenize_singleton_prompt_async": "renderer.py: extended length",
    "vllm.renderers.hf:HfRenderer._process_tokens": "renderer.py: over-long prompt -> context request",
    "vllm.renderers.hf:HfRenderer._process_tokens_async": "renderer.py: over-long prompt -> context request",
    # processor.py: the "context" modality
    "vllm.multimodal.parse:MultiModalDataParser._get_subparsers": "processor.py: the context parser",
    "vllm.multimodal.parse:ProcessorBatchItems": "processor.py: context items",
    "vllm.multimodal.processing:BaseMultiModalProcessor.apply": "processor.py plans, then calls it on the chunks",
    "vllm.multimodal.processing:BaseMultiModalProcessor._get_mm_fields_config": "processor.py",
    "vllm.multimodal.processing:BaseMultiModalProcessor._get_prompt_updates": "processor.py: each chunk's slots",
    "vllm.multimodal.processing:BaseMultiModalProcessor._call_hf_processor": "processor.py: items -> tensors",
    "vllm.multimodal.processing:ProcessorInputs": "processor.py: the planned chunks as a request's items",
    "vllm.multimodal.processing:PromptIndexTargets.start": "processor.py: slots go first",
    "vllm.multimodal.processing:PromptInsertion": "processor.py",
    "vllm.multimodal.parse:MultiModalDataItems": "processor.py",
    "vllm.multimodal.processing:BaseProcessingInfo._get_expected_hidden_size": "processor.py: precomputed embeds",
    "vllm.inputs:mm_input": "processor.py builds the processed input",
    "vllm.multimodal.inputs:MultiModalKwargsItems": "processor.py: no items when nothing is compressed",
    # model.py
    "vllm.model_executor.models.interfaces:SupportsMultiModal._mark_tower_model": "model.py: the embedder",
    "vllm.model_executor.models.interfaces:SupportsMultiModal._mark_language_model": "model.py: the Llama",
    "vllm.model_executor.models.interfaces:SupportsMultiModal.configure_mm_token_handling": "model.py",
    "vllm.model_executor.models.utils:AutoWeightsLoader": "model.py loads the checkpoint",
    "vllm.model_executor.models.utils:WeightsMapper": "model.py: checkpoint names -> module names",
    # middleware.py: request models and the app state vLLM's server sets
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest": "middleware.py: known fields",
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest": "middleware.py: known fields",
    "vllm.entrypoints.launchers.api_server.app_state:init_app_state": "middleware.py reads app.state.vllm_config",
    "vllm.entrypoints.serve.middleware.register:init_entrypoints_middleware": "vllm serve --middleware",
    # serving/llm_service.py: which engine errors are the request's fault
    "vllm.exceptions:VLLMClientError": "llm_service.py",
    "vllm.v1.engine.exceptions:EngineGenerateError": "llm_service.py",
}
