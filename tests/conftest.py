"""Shared fixtures: a tiny random Llama for mechanics, the real SmolLM2 default for quality paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from extemb_vllm.model import ExtEmbConfig
from extemb_vllm.model.checkpoint import build_checkpoint, load_model

ROOT = Path(__file__).resolve().parent.parent
TINY_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
             "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


def tiny_llama_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,  # head_dim 64: vLLM CPU attention needs it
                rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TINY_TEXT], vocab_size=320, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return tok


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """A local HF Llama directory (random weights), as a user's own checkpoint would be."""
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


TINY_EXT = ExtEmbConfig(embedder_layers=2, chunk_size=16, k_ladder=(2, 4, 8), window=64, raw_tail=16, reserve=4)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_source, tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny-extemb", source=tiny_source, ext=TINY_EXT)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(ExtEmbReference, tokenizer) on the tiny checkpoint."""
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The embedded default, built into ./extemb-llama2 (reused when up to date, as in the README)."""
    return build_checkpoint(ROOT / "extemb-llama2")


@pytest.fixture(scope="session")
def heldout_texts() -> Path:
    from extemb_vllm.corpus import prepare

    return prepare(ROOT / "data") / "shakespeare" / "heldout"
