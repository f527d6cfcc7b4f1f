"""The plug-in's series (`extemb_vllm/metrics.py`) on `vllm serve`'s own /metrics.

Each is recorded in the process that knows it: what a request's layout implies in the API
server process, where the renderer plans over-long prompts; what the embedder did in the
engine's worker process, where it runs. vLLM serves /metrics from the API server process, so the
worker's series reach it the way vLLM's own do when it runs several API servers: Prometheus's
multiprocess mode. With `PROMETHEUS_MULTIPROC_DIR` set to a fresh directory when `vllm serve`
starts (the README's command does it), every process writes its series there and /metrics adds
them up; gauges add up too (`multiprocess_mode="sum"`: one chunk cache per engine).

Without that directory the API server's series still show, the worker's stay in the worker (a
warning says so). In an offline engine that runs in the caller's process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) all of them are in prometheus_client's default registry.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from .. import metrics as m

log = logging.getLogger("vllm.extemb.metrics")  # under vLLM's logger: printed as vLLM prints its own


def _make(series: m.Series):
    if series.kind == "counter":
        return Counter(series.name, series.help)
    if series.kind == "gauge":
        return Gauge(series.name, series.help, multiprocess_mode="sum")
    return Histogram(series.name, series.help, buckets=series.buckets)


# one object per series and process (module state: a process may build several engines in turn)
SERIES = {s: _make(s) for s in m.SERIES}


def record_layout(plan) -> None:
    """A request planned: what its layout compresses (nothing when it is read raw)."""
    increments = m.layout_increments(plan)
    if increments is None:
        return
    for series, amount in increments.items():
        SERIES[series].inc(amount)
    SERIES[m.K].observe(plan.k)


def record_chunks(encoded: int, cached: int, cache_bytes: int) -> None:
    """A batch of chunks through the embedder's step: encoded now, or served from the cache."""
    SERIES[m.CHUNKS_ENCODED].inc(encoded)
    SERIES[m.CHUNKS_CACHED].inc(cached)
    SERIES[m.CHUNK_CACHE_BYTES].set(cache_bytes)


@contextmanager
def embedder_forward():
    """Times one embedder forward into extemb_embedder_seconds."""
    t0 = time.perf_counter()
    yield
    SERIES[m.EMBEDDER_SECONDS].observe(time.perf_counter() - t0)


def warn_if_out_of_reach() -> None:
    """Called where the embedder lives: in a process of its own without a multiprocess directory,
    its series cannot reach the API server's /metrics."""
    if multiprocessing.parent_process() is not None and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: the embedder's series (extemb_chunks_encoded, ...) "
                    "stay in this engine process and /metrics will not show them; start `vllm serve` with "
                    "PROMETHEUS_MULTIPROC_DIR=$(mktemp -d), as the README's serving command does")
