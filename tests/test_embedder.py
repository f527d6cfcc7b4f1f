"""Mechanics of the embedder on a tiny random Llama: down-sampling, chunking, batching, dtypes."""

import pytest
import torch

from extemb_vllm.model import ContextError, compact_slots, keep_positions
from extemb_vllm.model.config import chunk_bounds


@pytest.mark.parametrize("length,k,expected", [
    (8, 2, [1, 3, 5, 7]),        # multiple of k: last position of every k-block
    (8, 4, [3, 7]),
    (10, 4, [3, 7, 9]),          # partial last block: its last position is kept too
    (5, 1, [0, 1, 2, 3, 4]),     # k=1 keeps everything
    (3, 8, [2]),                 # k longer than the chunk: only the last position
    (1, 3, [0]),
])
def test_keep_positions(length, k, expected):
    assert keep_positions(length, k).tolist() == expected


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_keep_positions_rejects_bad_k(bad):
    with pytest.raises(ContextError):
        keep_positions(8, bad)


def test_compact_slots_counts_each_chunk():
    # 40 tokens in chunks of 16: 16 + 16 + 8 -> at k=3: 6 + 6 + 3
    assert chunk_bounds(40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert compact_slots(40, 3, 16) == 15
    assert compact_slots(40, 3, 16) == sum(len(keep_positions(e - s, 3)) for s, e in chunk_bounds(40, 16))


def test_compressed_rows_are_the_kept_positions(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (40,))
    full = model.embedder.encode_chunks([ids[s:e] for s, e in chunk_bounds(40, 16)], model.embed_tokens)
    compact = model.compact_embeddings(ids, k=4)
    expected = torch.cat([h[keep_positions(h.shape[0], 4)] for h in full])
    assert compact.shape == (compact_slots(40, 4, 16), model.llm.config.hidden_size)
    torch.testing.assert_close(compact, expected)


def test_chunks_are_encoded_independently(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (48,))  # three chunks of 16
    changed = ids.clone()
    changed[20] = (changed[20] + 1 - 3) % 297 + 3  # a token inside the second chunk
    a = model.compact_embeddings(ids, k=4).view(3, 4, -1)
    b = model.compact_embeddings(changed, k=4).view(3, 4, -1)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])
    # inside the changed chunk: outputs before the changed token stay, those after it move
    torch.testing.assert_close(a[1, 0], b[1, 0])  # position 3 of the chunk < 4 (the change)
    assert not torch.allclose(a[1, 1:], b[1, 1:])


def test_batched_encoding_equals_one_by_one(tiny):
    model, _ = tiny
    chunks = [torch.randint(3, 300, (n,)) for n in (16, 9, 16, 1)]
    together = model.embedder.encode_chunks(chunks, model.embed_tokens)
    for c, h in zip(chunks, together):
        alone = model.embedder.encode_chunks([c], model.embed_tokens)[0]
        torch.testing.assert_close(h, alone, atol=1e-5, rtol=1e-5)


def test_chunk_cache_serves_any_k_without_re_encoding(tiny, monkeypatch):
    model, _ = tiny
    ids = torch.randint(3, 300, (40,))
    cache = {}
    first = model.compact_embeddings(ids, k=2, cache=cache)
    assert len(cache) == 3
    calls = []
    real = model.embedder.encode_chunks
    monkeypatch.setattr(model.embedder, "encode_chunks", lambda *a: calls.append(a) or real(*a))
    torch.testing.assert_close(model.compact_embeddings(ids, k=2, cache=cache), first)
    torch.testing.assert_close(model.compact_embeddings(ids, k=8, cache=cache), model.compact_embeddings(ids, k=8))
    assert len(calls) == 1  # only the uncached call above encoded anything


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_checkpoint, dtype):
    from extemb_vllm.model.checkpoint import load_model

    ref, _ = load_model(tiny_checkpoint)
    half, _ = load_model(tiny_checkpoint, dtype=dtype)
    ids = torch.randint(3, 300, (40,))
    a = ref.compact_embeddings(ids, k=4)
    b = half.compact_embeddings(ids, k=4)
    assert b.dtype == dtype
    torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_checkpoint):
    from extemb_vllm.model.checkpoint import load_model

    cpu, _ = load_model(tiny_checkpoint)
    gpu, _ = load_model(tiny_checkpoint, device="cuda")
    ids = torch.randint(3, 300, (40,))
    torch.testing.assert_close(gpu.compact_embeddings(ids.cuda(), k=4).cpu(), cpu.compact_embeddings(ids, k=4),
                               atol=1e-4, rtol=1e-4)
