"""Embedder workers on a local Ray runtime (real Ray, real Serve, tiny checkpoint)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from extemb_vllm.serving import wire  # noqa: E402
from extemb_vllm.serving.embedder_service import EmbedderClient, EmbedderError, EmbedderWorker  # noqa: E402

APP = "embedder-test"


@pytest.fixture(scope="module")
def embedder_app(tiny_checkpoint, tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy, no port taken
    store_dir = tmp_path_factory.mktemp("store")  # the disk tier both replicas share
    # max_batch_chunks=1: one forward per chunk, so a large request runs long enough to be
    # killed in the middle
    deployment = EmbedderWorker.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    handle = serve.run(deployment.bind(str(tiny_checkpoint), max_batch_chunks=1, store_dir=str(store_dir)),
                       name=APP, route_prefix=None)
    yield handle
    serve.shutdown()
    ray.shutdown()


def _replica_stats(handle, want=2, tries=60) -> dict:
    """{pid: stats} of every replica (Serve routes each call to one of them)."""
    seen = {}
    for _ in range(tries):
        s = handle.stats.remote().result()
        seen[s["pid"]] = s
        if len(seen) >= want:
            break
    return seen


def _chunks(n, seed, length=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (length,), generator=g).tolist() for _ in range(n)]


def test_outputs_equal_the_in_process_embedder(embedder_app, tiny):
    model, _ = tiny
    chunks = _chunks(5, seed=1) + [[5, 6, 7]]
    got = EmbedderClient(embedder_app).encode(chunks)
    with torch.no_grad():
        want = model.embedder.encode_chunks([torch.tensor(c) for c in chunks], model.embed_tokens)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5)


def test_two_replicas_serve_and_a_document_is_encoded_once(embedder_app):
    client = EmbedderClient(embedder_app)
    before = sum(s["chunks_encoded"] for s in _replica_stats(embedder_app).values())
    doc = _chunks(8, seed=2)
    first = client.encode(doc)
    for _ in range(10):  # many requests over the same document, spread over both replicas
        again = client.encode(doc)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    stats = _replica_stats(embedder_app)
    assert len(stats) == 2
    assert sum(s["chunks_encoded"] for s in stats.values()) - before == 8
    assert sum(s["store_memory_hits"] + s["store_disk_hits"] for s in stats.values()) >= 80


@pytest.mark.parametrize("payload, message", [
    (b"\x00not msgpack", "malformed EncodeRequest"),
    (wire.encode(wire.ErrorReply("x", "y")), "malformed EncodeRequest"),
    (wire.encode(wire.EncodeRequest([[1, 2, 10_000]])), "outside the vocabulary"),
    (wire.encode(wire.EncodeRequest([list(range(3, 40))])), "longer than the embedder's chunk size"),
])
def test_malformed_payloads_get_a_clear_error_and_nothing_else_fails(embedder_app, payload, message):
    reply = wire.decode(embedder_app.encode.remote(payload).result(), wire.ErrorReply)
    assert reply.kind == "bad_request" and message in reply.message
    assert len(EmbedderClient(embedder_app).encode([[4, 5, 6]])) == 1


def test_client_raises_the_workers_message(embedder_app):
    with pytest.raises(EmbedderError, match="outside the vocabulary"):
        EmbedderClient(embedder_app).encode([[1, 99_999]])


def _running_replicas() -> int:
    dep = serve.status().applications[APP].deployments["EmbedderWorker"]
    return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _busy_replica(handle) -> dict:
    """Stats of the replica whose encode count grows: the one working on our request."""
    for _ in range(50):
        before = _replica_stats(handle)
        time.sleep(0.2)
        after = _replica_stats(handle)
        busy = [pid for pid in after if pid in before and after[pid]["chunks_encoded"] > before[pid]["chunks_encoded"]]
        if busy:
            return after[busy[0]]
    raise AssertionError("no replica is working on the request")


@pytest.mark.slow
def test_a_replica_killed_mid_request_is_retried_and_comes_back(embedder_app, tiny):
    model, _ = tiny
    doc = _chunks(1500, seed=10)  # one forward per chunk (max_batch_chunks=1): seconds of work
    client = EmbedderClient(embedder_app, retries=5)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", client.encode(doc)))
    worker.start()
    victim = _busy_replica(embedder_app)
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    worker.join(timeout=300)
    assert "out" in result, "the request did not complete"
    assert client.retried >= 1, "the kill did not interrupt the request"
    with torch.no_grad():
        want = model.embedder.encode_chunks([torch.tensor(c) for c in doc[-50:]], model.embed_tokens)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(result["out"][-50:], want))
    # Serve's controller replaces the dead replica
    deadline = time.time() + 120
    while _running_replicas() < 2 and time.time() < deadline:
        time.sleep(1)
    assert _running_replicas() == 2
    assert victim["pid"] not in _replica_stats(embedder_app)


def test_store_is_keyed_by_the_weights_and_dtype(embedder_app, tiny_checkpoint, tmp_path):
    """The disk tier outlives a worker: after new embedder weights ship under the same path (or
    the worker runs in another dtype), a restarted worker encodes again instead of serving
    the old weights' outputs; with the same weights it serves them from disk."""
    import shutil

    from safetensors.torch import load_file, save_file

    from extemb_vllm.model.checkpoint import EMBEDDER_FILE

    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    shutil.copytree(tiny_checkpoint, ckpt)
    chunks = _chunks(3, seed=11)

    def start(**kw):  # a fresh worker on what the checkpoint holds now, over the same disk tier
        handle = serve.run(EmbedderWorker.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
                           .bind(str(ckpt), store_dir=str(store), **kw), name="weights-test", route_prefix=None)
        out = EmbedderClient(handle).encode(chunks)
        stats = handle.stats.remote().result()
        serve.delete("weights-test")
        return out, stats

    old_out, old = start()
    again_out, again = start()
    weights = load_file(ckpt / EMBEDDER_FILE)
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 0.05}, ckpt / EMBEDDER_FILE)  # new weights ship
    new_out, new = start()
    _, bf16 = start(dtype="bfloat16")

    assert old["chunks_encoded"] == 3 and again["chunks_encoded"] == 0 and again["store_disk_hits"] == 3
    assert all(torch.equal(a, b) for a, b in zip(old_out, again_out))
    assert new["weights"] != old["weights"] and new["chunks_encoded"] == 3 and new["store_disk_hits"] == 0
    assert not any(torch.allclose(a, b) for a, b in zip(old_out, new_out))
    assert bf16["weights"] != new["weights"] and bf16["chunks_encoded"] == 3
