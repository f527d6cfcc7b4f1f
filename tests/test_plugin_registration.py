"""The plug-in acts for ExtEmb models only: other models served from the same environment keep
vLLM's own tokenizer mode and renderer (no vLLM registry entry of theirs is replaced)."""

from __future__ import annotations

import pytest

from extemb_vllm.vllm_plugin import TOKENIZER_MODE, register


def _renderer_for(model: str, **kw):
    from vllm.config import ModelConfig
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import tokenizer_args_from_config

    config = ModelConfig(model=model, **kw)
    mode, *_ = tokenizer_args_from_config(config)
    return config.tokenizer_mode, RENDERER_REGISTRY.load_renderer_cls(mode)


def test_extemb_checkpoints_get_the_extemb_renderer(tiny_checkpoint):
    from extemb_vllm.vllm_plugin.renderer import ExtEmbRenderer

    register()
    assert _renderer_for(str(tiny_checkpoint)) == (TOKENIZER_MODE, ExtEmbRenderer)


def test_other_models_keep_vllms_renderer(tiny_source):
    from vllm.renderers.hf import HfRenderer

    register()
    register()  # vLLM loads plug-ins once per process; twice must change nothing either
    mode, cls = _renderer_for(str(tiny_source))  # a plain Llama in the same process
    assert mode == "auto" and cls is HfRenderer


def test_a_mode_the_user_chose_is_kept(tiny_checkpoint):
    from vllm.renderers.hf import HfRenderer

    register()
    assert _renderer_for(str(tiny_checkpoint), tokenizer_mode="hf") == ("hf", HfRenderer)


def test_the_extemb_mode_on_another_model_is_a_clear_error(tiny_source):
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.registry import renderer_from_config

    register()
    config = VllmConfig(model_config=ModelConfig(model=str(tiny_source), tokenizer_mode=TOKENIZER_MODE))
    with pytest.raises(ValueError, match="for ExtEmb checkpoints"):
        renderer_from_config(config)
