"""Embedder workers as a Ray Serve deployment, scaled apart from the LLM.

Each replica loads the embedder once (its L layers and the token table, not the
LLM) on its own device, batches the chunks of all concurrent callers into one
forward (`@serve.batch`), and keeps full-resolution outputs in a chunk store
keyed by chunk content and the weights' digest, so a chunk it has seen is never encoded
again, for any k, and outputs of other weights are never served.
Replicas on one machine can share the store's disk tier.

Payloads are msgspec bytes (`wire.EncodeRequest` in, `wire.EncodeResult` or
`wire.ErrorReply` out): a malformed request gets an error reply, the batch it rode
in is not affected. `EmbedderClient` retries a call whose replica died on another.

    serve.run(EmbedderWorker.options(num_replicas=2).bind("extemb-llama2"), name="embedder")
    client = EmbedderClient(serve.get_deployment_handle("EmbedderWorker", app_name="embedder"))
    outputs = client.encode([[1, 2, 3], [4, 5]])   # full-resolution (len_i, hidden) each
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray
import torch
from ray import serve

from ..machine import default_device
from ..model.checkpoint import load_embedder
from ..model.embedder import chunk_key, weights_digest
from . import metrics, wire
from .store import ChunkStore

log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class EmbedderWorker:
    def __init__(self, model_dir: str, device: str | None = None, dtype: str = "float32",  # or "auto"
                 max_batch_chunks: int = 16, store_bytes: int = 1 << 30, store_dir: str | None = None):
        self.device = default_device(device)
        self.embedder, self.table, self.ext = load_embedder(model_dir, dtype=embedder_dtype(dtype, self.device),
                                                            device=self.device)
        self.vocab = self.table.num_embeddings
        self.max_batch_chunks = max_batch_chunks
        self.store = ChunkStore(store_bytes, store_dir)
        # chunk outputs are keyed by content *and* these weights in this dtype: the disk tier
        # outlives a worker, and a worker restarted on new weights must not serve the old outputs
        self.weights = weights_digest(self.embedder, self.table)
        self.chunks_encoded = 0
        self.forward_calls = 0
        self.pid = os.getpid()
        metrics.keep_reporting_cache_bytes(lambda: self.store.memory.bytes)

    async def encode(self, payload: bytes) -> bytes:
        try:
            req = wire.decode(payload, wire.EncodeRequest)
            bad = [t for c in req.chunks for t in c if t >= self.vocab][:3]
            if bad:
                raise wire.WireError(f"token ids {bad} are outside the vocabulary (size {self.vocab})")
            if max(len(c) for c in req.chunks) > self.ext.chunk_size:
                raise wire.WireError(f"a chunk is longer than the embedder's chunk size {self.ext.chunk_size}")
        except wire.WireError as e:
            return wire.encode(wire.ErrorReply("bad_request", str(e)))
        return wire.encode(await self._encode_batched(req))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batched(self, requests: list[wire.EncodeRequest]) -> list[wire.EncodeResult]:
        """All chunks of all callers in this batch: cached ones from the store, the rest encoded
        together (one forward per max_batch_chunks), each distinct chunk once."""
        keys = [[chunk_key(torch.tensor(c), self.weights) for c in r.chunks] for r in requests]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, list[int]] = {}
        for r, ks in zip(requests, keys):
            for c, key in zip(r.chunks, ks):
                if key in found or key in todo:
                    continue
                if (h := self.store.get(key)) is not None:
                    found[key] = h
                else:
                    todo[key] = c
        items = list(todo.items())
        cached = len(found)
        for b in range(0, len(items), self.max_batch_chunks):
            group = items[b : b + self.max_batch_chunks]
            # the forward runs in a thread: the replica keeps accepting (and batching) requests
            hidden = await asyncio.to_thread(self._forward, [c for _, c in group])
            for (key, _), h in zip(group, hidden):
                h = h.to("cpu")
                self.store.put(key, h)
                found[key] = h
        metrics.record_chunks(encoded=len(items), cached=cached, cache_bytes=self.store.memory.bytes)
        return [wire.EncodeResult(ks, [wire.Tensor.from_torch(found[k]) for k in ks]) for ks in keys]

    @torch.no_grad()
    def _forward(self, chunks: list[list[int]]) -> list[torch.Tensor]:
        self.forward_calls += 1
        self.chunks_encoded += len(chunks)
        ids = [torch.tensor(c, device=self.device) for c in chunks]
        with metrics.embedder_forward():
            return self.embedder.encode_chunks(ids, self.table)

    async def stats(self) -> dict:
        s = self.store.stats
        context = ray.get_runtime_context()
        return {"pid": self.pid, "actor_name": context.get_actor_name(), "worker_id": context.get_worker_id(),
                "chunks_encoded": self.chunks_encoded, "forward_calls": self.forward_calls,
                "store_memory_hits": s.memory_hits, "store_disk_hits": s.disk_hits, "weights": self.weights,
                "store_bytes": self.store.memory.bytes}


def embedder_dtype(name: str, device) -> torch.dtype:
    """A dtype by name; "auto": what `vllm serve` of the plug-in picks (on CPU bfloat16 where the
    CPU has native bf16, else float32; bfloat16 on GPUs)."""
    if name != "auto":
        return wire.DTYPES[name]
    from ..vllm_plugin.cpu_settings import serving_dtype

    return serving_dtype() if torch.device(device).type == "cpu" else torch.bfloat16


class EmbedderError(RuntimeError):
    pass


class EmbedderClient:
    """Calls the embedder deployment; a call whose replica died is retried (Serve routes the
    retry to a live replica and restarts the dead one)."""

    def __init__(self, handle, retries: int = 3, backoff_s: float = 0.5):
        self.handle = handle
        self.retries = retries
        self.backoff_s = backoff_s
        self.retried = 0  # calls re-sent after a replica failure (for tests and metrics)

    def encode(self, chunks: list[list[int]]) -> list[torch.Tensor]:
        """From synchronous code (tests, scripts)."""
        from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

        payload = _encode_request(chunks)
        for attempt in range(self.retries + 1):
            try:
                return _outputs(self.handle.encode.remote(payload).result())
            except RayActorError as e:
                self._failed(attempt, e)
                time.sleep(self.backoff_s * (attempt + 1))

    async def aencode(self, chunks: list[list[int]]) -> list[torch.Tensor]:
        """From a deployment's event loop (the router)."""
        from ray.exceptions import RayActorError

        payload = _encode_request(chunks)
        for attempt in range(self.retries + 1):
            try:
                return _outputs(await self.handle.encode.remote(payload))
            except RayActorError as e:
                self._failed(attempt, e)
                await asyncio.sleep(self.backoff_s * (attempt + 1))

    def _failed(self, attempt: int, e: Exception):
        if attempt == self.retries:
            raise EmbedderError(f"embedder replicas failed {attempt + 1} times: {e}") from e
        self.retried += 1
        log.warning("embedder replica failed (%s); retrying on another", type(e).__name__)


def _encode_request(chunks) -> bytes:
    return wire.encode(wire.EncodeRequest([list(map(int, c)) for c in chunks]))


def _outputs(reply: bytes) -> list[torch.Tensor]:
    return [t.to_torch() for t in wire.decode_reply(reply, wire.EncodeResult, EmbedderError).outputs]
