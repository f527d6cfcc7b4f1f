"""The model: embedder, plain-transformers reference, config and checkpoint I/O.

Imports neither vLLM nor Ray: the plug-in and serving layers import this, never
the reverse.
"""

from .config import CompressionPlan, ContextError, ExtEmbConfig, compact_slots, plan_compression
from .embedder import ExtensibleEmbedder, compact_rows, keep_positions
from .layout import RequestLayout, plan_request

__all__ = [
    "CompressionPlan",
    "ContextError",
    "ExtEmbConfig",
    "ExtensibleEmbedder",
    "RequestLayout",
    "compact_rows",
    "compact_slots",
    "keep_positions",
    "plan_compression",
    "plan_request",
]
