"""The plug-in's series (`extemb_vllm/metrics.py`) from the Ray app, through Ray's metrics.

The same names as `vllm serve` exports: the router records what each request's layout implies,
the embedder workers what they encoded and served from their store. Ray exports them with its
`ray_` prefix on each node's metrics endpoint (`ray start --metrics-export-port`), with Ray
Serve's own series; counters add up over replicas, and so does the store's gauge (one per
worker, told apart by Ray's WorkerId label). Ray's histograms report bucket midpoints in their
`_sum`, not the values observed: read `extemb_k` by its buckets there.

Each process makes its metric objects once, when it first records (Ray's metrics need a
connected Ray worker, so not at import).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from functools import cache

from .. import metrics as m


@cache
def _series() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    def make(s: m.Series):
        if s.kind == "counter":
            return Counter(s.name, s.help)
        if s.kind == "gauge":
            return Gauge(s.name, s.help)
        return Histogram(s.name, s.help, boundaries=list(s.buckets))

    return {s: make(s) for s in m.SERIES}


def record_layout(plan) -> None:
    increments = m.layout_increments(plan)
    if increments is None:
        return
    series = _series()
    for s, amount in increments.items():
        series[s].inc(amount)
    series[m.K].observe(plan.k)


def record_chunks(encoded: int, cached: int, cache_bytes: int) -> None:
    series = _series()
    if encoded:
        series[m.CHUNKS_ENCODED].inc(encoded)
    if cached:
        series[m.CHUNKS_CACHED].inc(cached)
    series[m.CHUNK_CACHE_BYTES].set(cache_bytes)


def keep_reporting_cache_bytes(value, every_s: float = 1.0) -> None:
    """Ray exports a gauge's value only for a short while after it is set (two report
    intervals): a thread sets the store's size again every second, so the series stays."""

    def loop():
        while True:
            time.sleep(every_s)
            _series()[m.CHUNK_CACHE_BYTES].set(value())

    threading.Thread(target=loop, daemon=True, name="extemb-cache-bytes").start()


@contextmanager
def embedder_forward():
    t0 = time.perf_counter()
    yield
    _series()[m.EMBEDDER_SECONDS].observe(time.perf_counter() - t0)
