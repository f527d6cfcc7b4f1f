"""The plug-in's series: one set of names, reported alike by both servers.

`vllm serve` exports them on its own /metrics with prometheus_client
(`vllm_plugin/metrics.py`); the Ray app through Ray's metrics (`serving/metrics.py`), which Ray
exports with its `ray_` prefix. A counter named `extemb_chunks_encoded` here is
`extemb_chunks_encoded_total` on /metrics, as Prometheus names counters.

    what the layout of a request implies (recorded where the request is planned)
      extemb_requests_compressed   requests whose input was compressed
      extemb_compressed_tokens     tokens read through compact slots
      extemb_compact_slots         compact slots written into prompts
      extemb_k                     the k each compressed request was planned with (histogram)
    what the embedder did (recorded where it runs)
      extemb_chunks_encoded        chunks the embedder encoded
      extemb_chunks_cached         chunks served from the chunk cache (not encoded again)
      extemb_chunk_cache_bytes     bytes the chunk cache holds (gauge)
      extemb_embedder_seconds      seconds of each embedder forward (histogram)

Colons, as in vLLM's own `vllm:` names, are refused by Ray's metrics; an `extemb_` prefix works on
both.
"""

from __future__ import annotations

from dataclasses import dataclass

K_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Series:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    buckets: tuple[float, ...] = ()


REQUESTS_COMPRESSED = Series("extemb_requests_compressed", "counter", "Requests whose input was compressed.")
COMPRESSED_TOKENS = Series("extemb_compressed_tokens", "counter", "Tokens read through compact slots.")
COMPACT_SLOTS = Series("extemb_compact_slots", "counter", "Compact slots written into prompts.")
K = Series("extemb_k", "histogram", "The k each compressed request was planned with.", K_BUCKETS)
CHUNKS_ENCODED = Series("extemb_chunks_encoded", "counter", "Chunks the embedder encoded.")
CHUNKS_CACHED = Series("extemb_chunks_cached", "counter",
                       "Chunks served from the chunk cache instead of being encoded again.")
CHUNK_CACHE_BYTES = Series("extemb_chunk_cache_bytes", "gauge", "Bytes the chunk cache holds.")
EMBEDDER_SECONDS = Series("extemb_embedder_seconds", "histogram", "Seconds of each embedder forward.",
                          SECONDS_BUCKETS)

SERIES = (REQUESTS_COMPRESSED, COMPRESSED_TOKENS, COMPACT_SLOTS, K, CHUNKS_ENCODED, CHUNKS_CACHED,
          CHUNK_CACHE_BYTES, EMBEDDER_SECONDS)


def layout_increments(plan) -> dict[Series, float] | None:
    """The counters a planned request moves (None when nothing is compressed); k is observed apart."""
    if plan.k is None:
        return None
    return {REQUESTS_COMPRESSED: 1, COMPRESSED_TOKENS: plan.n_compressed, COMPACT_SLOTS: plan.n_slots}
