"""vLLM plug-in: registers ExtEmbLlamaForCausalLM with vLLM's model registry.

Loaded by vLLM in every process through the `vllm.general_plugins` entry point.
The model layer (`extemb_vllm.model`) never imports this package.
"""

ARCHITECTURE = "ExtEmbLlamaForCausalLM"
# ExtEmb models get their own tokenizer mode, as vLLM's Inkling and Cohere models do: the plain
# HF tokenizer, and a renderer of our own that compresses over-long plain prompts (renderer.py).
# Every other model keeps vLLM's "hf" renderer, untouched.
TOKENIZER_MODE = "extemb"
RENDERER = ("extemb_vllm.vllm_plugin.renderer", "ExtEmbRenderer")


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "extemb_vllm.vllm_plugin.model:ExtEmbLlamaForCausalLM")
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, *RENDERER)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, _model_config_hook())


def _model_config_hook():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class ExtEmbModelConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                from .cpu_settings import prefill_in_one_step

                prefill_in_one_step(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            # vLLM picks a built-in model's tokenizer mode from its architecture when the user left
            # it at "auto" (ModelConfig.__post_init__); this does the same for ours, afterwards.
            # A mode the user chose is kept (with "hf", over-long plain prompts are refused).
            if model_config.tokenizer_mode == "auto":
                model_config.tokenizer_mode = TOKENIZER_MODE
            from vllm.platforms import current_platform

            if current_platform.is_cpu():  # bf16 only where the CPU has it natively; one log line
                from .cpu_settings import settle_dtype

                settle_dtype(model_config)

    return ExtEmbModelConfig
