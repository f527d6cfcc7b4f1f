"""vLLM plug-in: registers ExtEmbLlamaForCausalLM with vLLM's model registry.

Loaded by vLLM in every process through the `vllm.general_plugins` entry point.
The model layer (`extemb_vllm.model`) never imports this package.
"""

ARCHITECTURE = "ExtEmbLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "extemb_vllm.vllm_plugin.model:ExtEmbLlamaForCausalLM")
    # The default ("hf") renderer, extended for ExtEmb models only: it compresses
    # plain prompts longer than the window (see renderer.py). Other models are unaffected.
    if RENDERER_REGISTRY.renderers.get("hf") != (RENDERER_MODULE, "ExtEmbRenderer"):
        RENDERER_REGISTRY.register("hf", RENDERER_MODULE, "ExtEmbRenderer")


RENDERER_MODULE = "extemb_vllm.vllm_plugin.renderer"
