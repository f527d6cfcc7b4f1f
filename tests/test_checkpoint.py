"""Checkpoint format: build from a local HF directory, load, same outputs; reuse on a second build."""

import json

import torch
from safetensors.torch import load_file

from extemb_vllm.model import ExtEmbConfig
from extemb_vllm.model.checkpoint import (
    ARCHITECTURE,
    build_checkpoint,
    load_embedder,
    load_model,
    save_embedder_weights,
)

from .conftest import TINY_EXT


def test_layout_and_config(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE]
    assert cfg["model_type"] == "llama"
    assert ExtEmbConfig.from_dict(cfg["extemb"]) == TINY_EXT
    emb = load_file(tiny_checkpoint / "embedder.safetensors")
    assert all(k.startswith("embedder.layers.") for k in emb)
    assert {k.split(".")[2] for k in emb} == {"0", "1"}  # embedder_layers=2
    assert (tiny_checkpoint / "tokenizer.json").is_file()


def test_embedder_starts_as_a_copy_of_the_first_layers(tiny):
    model, _ = tiny
    for mine, base in zip(model.embedder.body.layers, model.llm.model.layers):
        for (n, a), (_, b) in zip(mine.named_parameters(), base.named_parameters()):
            torch.testing.assert_close(a, b, msg=n)
            assert a.data_ptr() != b.data_ptr()  # own weights, not a view of the frozen LLM


def test_round_trip_with_trained_weights(tiny_source, tiny_checkpoint, tiny, tmp_path):
    model, _ = tiny
    # stand-in for a trained embedder: perturb its weights, save, build with them, reload
    trained, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        for p in trained.embedder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_embedder_weights(trained.embedder, tmp_path / "trained.safetensors")
    out = build_checkpoint(tmp_path / "ck", source=tiny_source, ext=TINY_EXT,
                           embedder_weights=tmp_path / "trained.safetensors")
    loaded, _ = load_model(out)
    ids = torch.randint(3, 300, (200,))
    a, _ = trained.score(ids, 16)
    b, _ = loaded.score(ids, 16)
    torch.testing.assert_close(a, b)
    c, _ = model.score(ids, 16)
    assert not torch.allclose(a, c)  # the trained weights were really used


def test_second_build_reuses_the_directory(tiny_source, tmp_path, capsys):
    out = build_checkpoint(tmp_path / "ck", source=tiny_source, ext=TINY_EXT)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    build_checkpoint(tmp_path / "ck", source=tiny_source, ext=TINY_EXT)
    assert "up to date" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # a different recipe rebuilds
    build_checkpoint(tmp_path / "ck", source=tiny_source, ext=TINY_EXT.replace(raw_tail=8))
    assert json.loads((out / "config.json").read_text())["extemb"]["raw_tail"] == 8


def test_embedder_alone_loads_without_the_llm_and_encodes_the_same(tiny_checkpoint, tiny):
    model, _ = tiny
    embedder, table, ext = load_embedder(tiny_checkpoint)
    assert ext == model.ext and len(embedder.body.layers) == ext.embedder_layers
    ids = torch.randint(3, 320, (40,))
    with torch.no_grad():
        want = model.compact_embeddings(ids, k=4)
        got = embedder.compress(ids, 4, ext.chunk_size, table)
    assert torch.equal(got, want)


def test_shipped_embedder_is_what_its_record_says():
    """The trained embedder in the package: at most 64 MB of bf16, the digest and size its record
    gives, trained for the embedded default, and the tensor names of that default's embedder."""
    import hashlib

    from extemb_vllm.model.checkpoint import DEFAULT_GGUF_FILE, EMBEDDER_PREFIX, SHIPPED_EMBEDDER

    rec = json.loads(SHIPPED_EMBEDDER.with_suffix(".json").read_text())
    data = SHIPPED_EMBEDDER.read_bytes()
    assert len(data) == rec["bytes"] <= 64 * 2**20
    assert hashlib.sha256(data).hexdigest() == rec["sha256"]
    assert rec["base_model"] == DEFAULT_GGUF_FILE and rec["steps"] > 0 and rec["samples"] > 0
    tensors = load_file(str(SHIPPED_EMBEDDER))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    layers = ExtEmbConfig().embedder_layers
    assert {int(k[len(EMBEDDER_PREFIX):].split(".")[1]) for k in tensors if ".layers." in k} == set(range(layers))
    assert sum(t.numel() for t in tensors.values()) == rec["parameters"]
