"""vLLM plug-in: registers ExtEmbLlamaForCausalLM with vLLM's model registry.

Loaded by vLLM in every process through the `vllm.general_plugins` entry point.
The model layer (`extemb_vllm.model`) never imports this package.
"""

ARCHITECTURE = "ExtEmbLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "extemb_vllm.vllm_plugin.model:ExtEmbLlamaForCausalLM")
