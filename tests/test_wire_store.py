"""Wire messages (msgspec) and the document store: round trips, refusals, fuzzing, disk tier."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extemb_vllm.serving import wire
from extemb_vllm.serving.documents import DocumentRegistry, RegistryFull, UnknownDocument
from extemb_vllm.serving.store import ChunkStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip_is_exact(dtype):
    t = torch.randn(7, 5).to(dtype)
    back = wire.decode(wire.encode(wire.Tensor.from_torch(t)), wire.Tensor).to_torch()
    assert back.dtype == dtype and torch.equal(back, t)


def test_encode_result_round_trip():
    res = wire.EncodeResult(keys=["a", "b"], outputs=[wire.Tensor.from_torch(torch.ones(3, 4)),
                                                      wire.Tensor.from_torch(torch.zeros(1, 4))])
    assert wire.decode(wire.encode(res), wire.EncodeResult) == res


def _tensor_fields(**kw):
    t = wire.Tensor.from_torch(torch.ones(2, 3))
    fields = {"shape": list(t.shape), "dtype": t.dtype, "data": t.data, "digest": t.digest}
    fields.update(kw)
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize("payload, message", [
    (_tensor_fields(dtype="int64"), "dtype 'int64'"),
    (_tensor_fields(shape=[3, 3]), "needs 36 bytes, got 24"),
    (_tensor_fields(shape=[-2, -3]), "negative size"),
    (_tensor_fields(data=b"\0" * 24), "do not match their digest"),
    (_tensor_fields(shape="2x3"), "malformed Tensor"),
    (b"\xc1\xff garbage", "malformed Tensor"),
    (msgspec.msgpack.encode({"shape": [2]}), "malformed Tensor"),
])
def test_malformed_tensors_are_refused_with_the_reason(payload, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(payload, wire.Tensor)


@pytest.mark.parametrize("chunks, message", [
    ([], "at least one chunk"), ([[1, 2], []], "empty chunk"), ([[1, -5]], ">= 0"),
    ([["a"]], "malformed EncodeRequest"),
])
def test_malformed_encode_requests(chunks, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(msgspec.msgpack.encode({"chunks": chunks}), wire.EncodeRequest)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_never_escape_as_anything_but_wire_errors(payload):
    for kind in (wire.Tensor, wire.EncodeRequest, wire.EncodeResult, wire.ErrorReply):
        try:
            wire.decode(payload, kind)
        except wire.WireError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
                    | st.binary(max_size=16),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(
                        ["shape", "dtype", "data", "digest", "chunks", "keys", "outputs", "kind", "message"]),
                        kids, max_size=5), max_leaves=20))
def test_fuzz_structured_payloads(obj):
    payload = msgspec.msgpack.encode(obj)
    for kind in (wire.Tensor, wire.EncodeRequest, wire.EncodeResult, wire.ErrorReply):
        try:
            wire.decode(payload, kind)
        except wire.WireError:
            pass


def test_store_evicts_least_recently_used_within_its_byte_bound():
    one = torch.zeros(256)  # 1 KiB
    store = ChunkStore(max_bytes=3 * 1024)
    for key in "abc":
        store.put(key, one)
    store.get("a")  # a is now the most recent
    store.put("d", one)
    assert store.get("b") is None and store.get("a") is not None and store.get("d") is not None
    assert store.stats.evictions == 1


def test_disk_tier_survives_a_restart_and_refuses_corrupt_entries(tmp_path):
    t = torch.randn(5, 8)
    store, registry = ChunkStore(disk_dir=tmp_path), DocumentRegistry(disk_dir=tmp_path)
    store.put("k1", t)
    store.put("k2", t * 2)
    doc_id = registry.register(list(range(10)))
    # a torn write (killed mid-way) leaves only a temporary file: no entry appears
    (tmp_path / "chunks" / ".k3.msgpack.dead.tmp").write_bytes(b"\x85\xa5shape")
    # a corrupted entry (one flipped byte in the tensor data) is detected by its digest
    p = tmp_path / "chunks" / "k2.msgpack"
    raw = bytearray(p.read_bytes())
    raw[-40] ^= 0xFF
    p.write_bytes(bytes(raw))

    restarted = ChunkStore(disk_dir=tmp_path)
    assert torch.equal(restarted.get("k1"), t)
    assert restarted.get("k2") is None and restarted.stats.corrupt_entries == 1 and not p.exists()
    assert restarted.get("k3") is None
    assert DocumentRegistry(disk_dir=tmp_path).document(doc_id).token_ids == list(range(10))


def test_document_registry_is_bounded_and_never_drops_a_document_it_cannot_reload(tmp_path):
    memory_only = DocumentRegistry(max_tokens=10)
    kept = memory_only.register(list(range(6)))
    with pytest.raises(RegistryFull, match="no disk directory"):
        memory_only.register(list(range(6)))
    assert memory_only.document(kept).n_tokens == 6  # the refused one dropped nothing
    spilling = DocumentRegistry(disk_dir=tmp_path, max_tokens=10)
    ids = [spilling.register(list(range(6))) for _ in range(5)]  # 30 tokens: memory keeps the last
    assert spilling._tokens <= 10
    assert all(spilling.document(i).token_ids == list(range(6)) for i in ids)  # the rest reload from disk


def test_document_ids_are_unguessable_and_scoped_to_their_key(tmp_path):
    store = DocumentRegistry(disk_dir=tmp_path)
    ids = {store.register([1, 2, 3], api_key="alice") for _ in range(50)}
    assert len(ids) == 50 and all(len(i) >= 4 + 22 for i in ids)
    doc_id = next(iter(ids))
    assert store.document(doc_id, api_key="alice").n_tokens == 3
    for key in ("bob", None):
        with pytest.raises(UnknownDocument):
            store.document(doc_id, api_key=key)
    for bad in ("doc-nope", "../../etc/passwd", ""):
        with pytest.raises(UnknownDocument, match="unknown document id"):
            store.document(bad, api_key="alice")


_WRITER = """
import sys, torch
from extemb_vllm.serving.store import ChunkStore
store = ChunkStore(max_bytes=1, disk_dir=sys.argv[1])
print("ready", flush=True)
for i in range(10_000):
    print(f"k{i}", flush=True)
    store.put(f"k{i}", torch.full((2048, 576), float(i)))  # 4.7 MB per entry: writes take a while
"""


@pytest.mark.parametrize("kill_after_s", [0.05, 0.3, 0.9])
def test_a_writer_killed_mid_write_leaves_no_corrupt_entry(tmp_path, kill_after_s):
    """A real process writing to the disk tier is SIGKILLed at some moment: a fresh store over
    the same directory serves every entry whole or not at all, never a torn one."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # imports done: now it only writes
    time.sleep(kill_after_s)
    proc.kill()
    started = proc.stdout.read().split()
    proc.wait()
    assert len(started) >= 1
    store = ChunkStore(disk_dir=tmp_path)
    served = 0
    for key in started:
        t = store.get(key)
        if t is not None:
            assert torch.equal(t, torch.full((2048, 576), float(key[1:])))
            served += 1
    assert served >= len(started) - 1  # at most the entry being written when killed is missing
    assert store.stats.corrupt_entries == 0


def test_no_pickle_or_torch_load_on_the_wire():
    """Bytes from other processes are msgspec only: nothing that serves requests unpickles."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "extemb_vllm"
    served = [*(root / "serving").glob("*.py"), *(root / "vllm_plugin").glob("*.py")]
    hits = [f"{p.name}: {m.group(0)}" for p in served
            for m in re.finditer(r"import (cloud)?pickle|\b(cloud)?pickle\.loads?\(|torch\.load\(|marshal\.loads\(", p.read_text())]
    assert not hits, hits


def test_chunk_cache_is_bounded_in_bytes_and_drops_the_least_recently_used():
    from extemb_vllm.model.chunk_cache import ChunkCache

    cache = ChunkCache(max_bytes=3 * 400)  # three (10, 10) fp32 tensors
    for i in range(3):
        cache.put(f"c{i}", torch.full((10, 10), float(i)))
    assert cache.get("c0")[0, 0] == 0  # c0 used: c1 is now the oldest
    cache.put("c3", torch.zeros(10, 10))
    assert cache.get("c1") is None and cache.get("c0") is not None and len(cache) == 3
    assert (cache.bytes, cache.evictions, cache.hits, cache.misses) == (1200, 1, 2, 1)
    cache.put("c3", torch.ones(10, 10))  # a key already held keeps its first value
    assert cache.get("c3").sum() == 0
