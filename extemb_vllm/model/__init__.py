"""The model: embedder, plain-transformers reference, config and checkpoint I/O.

Imports neither vLLM nor Ray: the plug-in and serving layers import this, never
the reverse.
"""

from .config import CompressionPlan, ContextError, ExtEmbConfig, compact_slots, plan_compression
from .embedder import ExtensibleEmbedder, keep_positions

__all__ = [
    "CompressionPlan",
    "ContextError",
    "ExtEmbConfig",
    "ExtensibleEmbedder",
    "compact_slots",
    "keep_positions",
    "plan_compression",
]
